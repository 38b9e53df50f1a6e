"""Dataset format (records, manifest), augmentations and Grain input pipelines."""
