"""Memory pre-flight of pretraining: refuse, before the first step, a per-GPU batch that will not fit the GPU.

Basis, counted on CPU (``python benchmarks/gpu_probes.py simsiam-activation-count``; docs/protocol.md): the
distinct tensors autograd keeps for backward in one SimSiam training forward of both views at 224 px,
per image, in fp32 and under bf16 autocast (fp16 keeps the same sizes). Activations scale with the crop's
pixels. Weights, gradients and SGD momentum (fp32) come on top. GPU figures replace these once measured.
ResNet-50 at batch 512 on one GPU: about 100 GiB in fp32, 51 GiB in bf16.
"""

from typing import Optional

import torch

from simsiam_transfer.errors import UserError

GIB = 2**30
GIB_PER_IMAGE_224 = {
    "resnet18": {"fp32": 0.0552, "half": 0.0291},
    "resnet34": {"fp32": 0.0834, "half": 0.0432},
    "resnet50": {"fp32": 0.1958, "half": 0.0995},
    "resnet101": {"fp32": 0.2899, "half": 0.1466},
}
SAFETY = 0.9  # share of the card usable (allocator caching, cuDNN workspaces, the CUDA context)


def estimate_gib(backbone: str, precision: str, size: int, batch: int, params: int, views: int = 2) -> float:
    """GiB one process needs for ``batch`` images (``views`` each: SimSiam's two, one supervised) at ``size``
    px; ``precision`` fp32/bf16/fp16."""
    per_image = GIB_PER_IMAGE_224[backbone]["fp32" if precision == "fp32" else "half"] * (size / 224) ** 2 * views / 2
    return per_image * batch + 3 * 4 * params / GIB


def images_that_fit(backbone: str, precision: str, size: int, params: int, gpu_gib: float, views: int = 2) -> int:
    per_image = estimate_gib(backbone, precision, size, 1, 0, views)
    return max(0, int((SAFETY * gpu_gib - estimate_gib(backbone, precision, size, 0, params)) // per_image))


def check_fits(cfg, precision: str, world_size: int, params: int, gpu_gib: Optional[float], views: int = 2) -> None:
    """One line naming what would fit when SOLVER.BATCH_SIZE / world_size images per GPU will not
    (``gpu_gib`` None: no GPU, nothing to check)."""
    backbone, size = cfg.MODEL.BACKBONE, cfg.DATA.IMAGE_SIZE
    per_gpu = cfg.SOLVER.BATCH_SIZE // world_size
    need = estimate_gib(backbone, precision, size, per_gpu, params, views)
    if gpu_gib is None or need <= SAFETY * gpu_gib:
        return
    fit = images_that_fit(backbone, precision, size, params, gpu_gib, views)
    half = "" if precision != "fp32" else ", or SOLVER.AMP True (bf16 keeps about half)"
    raise UserError(
        f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} on {world_size} process(es) is {per_gpu} images per GPU; "
        f"{backbone} at {size} px in {precision} needs about {need:.0f} GiB for them but the GPU has "
        f"{gpu_gib:.1f} GiB ({SAFETY:.0%} usable): at most {fit} images per GPU fit; use SOLVER.BATCH_SIZE "
        f"{fit * world_size} or less, more GPUs (torchrun --nproc_per_node){half}")


def gpu_gib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB
