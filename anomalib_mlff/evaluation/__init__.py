"""Evaluation protocols and measurements shared by the benchmarks and the paper reproduction.

- :mod:`.protocols`: MVTec-layout test sets with exact masks: F2PAD's cut-paste protocol (the paper's)
  and a realistic one (the embedded data's own defects plus material defects).
- :mod:`.measure`: fit an anomalib model with F2PAD, set each protocol's F1-optimal pixel threshold,
  and score the test set with F2PAD disabled and enabled (IoU, DICE, seconds per image).
- :mod:`.cost`: model time per image, FLOPs and coreset coverage radius.
- :mod:`.tables`: the markdown tables the benchmarks print.

A layer above the models and post-processing: it imports them, they never import it.
"""
