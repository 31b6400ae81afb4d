"""detectron2 integration: the C4 ExtraNorm head, datasets, fine-tuning and the benchmark runner.

Importing this package registers ``Res5ROIHeadsExtraNorm`` in detectron2's ROI-head registry
whenever detectron2 is importable, so configs that name it always build.
"""

import importlib.util

if importlib.util.find_spec("detectron2") is not None:
    from simsiam_transfer import c4  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
