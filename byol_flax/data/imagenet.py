"""ImageNet's sizes as the paper uses them, in one place (the training config and the
converters both need them; this module imports nothing heavy)."""

# Appendix J.1: max_steps = 1000 * 1281167 / 4096 (the full ILSVRC2012 train split); Table 10.
IMAGENET_TRAIN_EXAMPLES = 1_281_167
# Appendix E.1: "For ImageNet, we took the last 10009 images of the official tensorflow ImageNet
# split" (Table 10: 1281167 train images = 1271158 for training + 10009 for validation; Appendix
# D.1 chooses the linear-evaluation learning rate on them).
IMAGENET_HOLDOUT_COUNT = 10_009
