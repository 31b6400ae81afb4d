"""Stand-in for ``detectron2._C`` in the offline fallback build (PyPI ``pb1-detectron2==0.6``).

That distribution ships detectron2's Python sources without ``detectron2/layers/csrc``, so
the compiled extension cannot be built. Several detectron2 modules import ``_C`` at module
level even though C4 Faster/Mask R-CNN never call it; this module lets those imports succeed
and turns every actual use of a compiled op into one error that names the op.

``simsiam_transfer.install_detectron2`` copies this file to ``detectron2/_C.py`` inside the
fallback source tree before building it, so it is part of that install only (uninstalling
the fallback removes it; an upstream install never sees it).
"""

import torch

IS_SIMSIAM_TRANSFER_FALLBACK = True

_OPS = {
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution (ModulatedDeformConv)",
    "modulated_deform_conv_backward": "modulated deformable convolution (ModulatedDeformConv)",
    "box_iou_rotated": "rotated-box IoU (pairwise_iou_rotated)",
    "roi_align_rotated_forward": "rotated RoIAlign (ROIAlignRotated)",
    "roi_align_rotated_backward": "rotated RoIAlign (ROIAlignRotated)",
    "nms_rotated": "rotated-box NMS (nms_rotated)",
    "COCOevalEvaluateImages": "fast COCO evaluation (COCOEvaluator use_fast_impl=True)",
    "COCOevalAccumulate": "fast COCO evaluation (COCOEvaluator use_fast_impl=True)",
    "InstanceAnnotation": "fast COCO evaluation (COCOEvaluator use_fast_impl=True)",
}


class CompiledOpUnavailable(RuntimeError):
    """A detectron2 op that needs the C++/CUDA extension was called on the fallback build."""


def _message(name):
    what = _OPS.get(name, f"compiled op {name!r}")
    return (
        f"{what} needs detectron2's compiled extension, which this install lacks "
        "(offline fallback pb1-detectron2==0.6, built without C++ sources); install upstream "
        "detectron2 from source (see docs/installing.md) to use it"
    )


def get_compiler_version():
    return "none (simsiam-transfer fallback: compiled ops absent)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise CompiledOpUnavailable(_message(name))


def _register_missing_torch_op():
    # nms_rotated is reached through torch.ops.detectron2, not through this module.
    lib = torch.library.Library("detectron2", "DEF")
    lib.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")

    def _nms_rotated(boxes, scores, iou_threshold):
        raise CompiledOpUnavailable(_message("nms_rotated"))

    lib.impl("nms_rotated", _nms_rotated, "CompositeExplicitAutograd")
    return lib


try:
    _LIBRARY = _register_missing_torch_op()
except RuntimeError:  # already defined in this process (module reloaded)
    _LIBRARY = None
