"""Whether this CPU runs bf16 natively (AVX512-BF16 or AMX): the condition for bf16 autocast on a CPU, in
pretraining (``SOLVER.AMP``) and fine-tuning (``SOLVER.AMP.ENABLED``)."""

import torch


def cpu_supports_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())
