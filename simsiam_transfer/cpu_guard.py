"""No silent paper-scale run on a CPU: a stage that recognises paper-scale work (its own rule) refuses to
run it without a CUDA GPU in one line, unless the user asked for it (``--allow-cpu``)."""

from typing import Optional

from simsiam_transfer.errors import UserError


def refuse_on_cpu(reason: Optional[str], allow_cpu: bool) -> None:
    """``reason``: why the work is paper-scale (one phrase), or None for mini work (never refused)."""
    if not reason or allow_cpu:
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{reason} and this machine has no CUDA GPU, where it would run for days or weeks; run it "
                        "on GPUs, or pass --allow-cpu to run it here anyway")
