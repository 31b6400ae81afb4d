"""Checkpoint conversion: pretraining checkpoints -> detectron2 (or torchvision) ResNet weights.

``sources`` reads and recognises the input, ``rename`` maps torchvision names to detectron2's,
``d2_format`` reads/writes detectron2's pickle format without executing foreign pickles, and
``verify`` proves the result loads completely and computes the same features.
"""
