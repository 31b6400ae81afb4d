"""TF32 for float32 convolutions and matmuls on NVIDIA GPUs (Ampere and later): one switch, read back.

Off means IEEE fp32, the paper's setting (its V100s have no TF32). cuDNN's own default for convolutions
is TF32, so off is set explicitly. torch >= 2.9 has a per-backend ``fp32_precision``; mixing it with the
legacy ``allow_tf32`` flags raises, so one API is used: the new one where it exists.
"""

import torch


def _new_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def set_tf32(enabled: bool) -> None:
    if _new_api():
        mode = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> dict:
    """``{"matmul": bool, "conv": bool}`` as the backends are set now (for a run's provenance)."""
    if _new_api():
        return {"matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
                "conv": torch.backends.cudnn.conv.fp32_precision == "tf32"}
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "conv": bool(torch.backends.cudnn.allow_tf32)}
