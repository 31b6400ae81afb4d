"""Checkpoint conversion: pretraining checkpoints -> detectron2 (or torchvision) ResNet weights.

The floor's ``simsiam_transfer.checkpoints`` reads and recognises the input, ``rename`` maps
torchvision names to detectron2's, the floor's ``simsiam_transfer.d2_weights`` writes (and reads)
detectron2's pickle format and the report beside it, and ``verify`` proves the result loads
completely and computes the same features.
"""
