"""simsiam-transfer: SimSiam pretraining -> detectron2 conversion -> C4 detection transfer.

This package holds what the three stages (``pretrain``, ``convert``, ``detection``) share:
the command-line dispatcher, user-error handling, atomic file writes, library versions and
the detectron2 install path. It must stay importable without torch or detectron2, because
the set-up runs ``python -m simsiam_transfer.install_detectron2`` before either exists.
"""

__version__ = "0.1.0"
