"""Cloud TPU: slices (devices, hosts, batch plans; ``slices``) and the launcher that prints or
runs the ``gcloud`` commands of a run (``launch``)."""
