"""``SOLVER.AMP.ENABLED`` on a CPU: detectron2's ``SimpleTrainer`` whose training forward runs under bf16
autocast, where the CPU runs bf16 natively. detectron2's ``AMPTrainer`` asserts CUDA; this is its CPU
counterpart. Weights, gradients and the optimizer step stay fp32 and bf16 has fp32's exponent range, so
there is no loss scaling. Evaluation and PreciseBN stay fp32, as with ``AMPTrainer``.

The step itself is detectron2's (``SimpleTrainer.run_step`` of whichever detectron2 is installed): the
autocast region is opened and closed by forward hooks on the model, only while ``run_step`` runs."""

import logging

import torch
from detectron2.engine import SimpleTrainer

from simsiam_transfer.bf16 import cpu_supports_bf16

logger = logging.getLogger("simsiam_transfer.finetune")


def training_precision(cfg) -> str:
    """What a fine-tune's training forward runs in: fp16 (detectron2's AMPTrainer on CUDA), bf16 (CPU
    autocast where the CPU has native bf16) or fp32."""
    if not cfg.SOLVER.AMP.ENABLED:
        return "fp32"
    if cfg.MODEL.DEVICE != "cpu":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` with the model's forward inside ``run_step`` (and so its losses) under
    ``torch.autocast("cpu", bfloat16)``; backward and the optimizer step run outside it."""

    def __init__(self, model, data_loader, optimizer):
        super().__init__(model, data_loader, optimizer)
        self._in_step = False
        self._autocast = None
        model.register_forward_pre_hook(self._open_autocast)
        model.register_forward_hook(self._close_autocast, always_call=True)  # also when the forward raises

    def run_step(self):
        self._in_step = True
        try:
            super().run_step()
        finally:
            self._in_step = False

    def _open_autocast(self, module, args):
        if self._in_step and self._autocast is None:
            self._autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            self._autocast.__enter__()

    def _close_autocast(self, module, args, output):
        if self._autocast is not None:
            region, self._autocast = self._autocast, None
            region.__exit__(None, None, None)


def cpu_step_trainer(trainer: SimpleTrainer) -> SimpleTrainer:
    """The step trainer of a CPU fine-tune with ``SOLVER.AMP.ENABLED``, on ``trainer``'s model, loader and
    optimizer: bf16 autocast where the CPU has native bf16, else ``trainer`` itself (fp32) and a warning."""
    if cpu_supports_bf16():
        return CPUAutocastTrainer(trainer.model, trainer.data_loader, trainer.optimizer)
    logger.warning("SOLVER.AMP.ENABLED: this CPU has no native bf16 (AVX512-BF16 or AMX); fine-tuning in fp32")
    return trainer
