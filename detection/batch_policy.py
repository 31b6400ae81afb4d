"""How a trial's batch is spread over its GPUs, and what that does to BN, LR and the schedule.

``faithful`` (default): the config's global batch (``SOLVER.IMS_PER_BATCH``, 16 in the protocol),
LR and schedule are kept whatever the world size; the images are split over the trial's
processes (8x2, 4x4, 2x8, 1x16) and BN is synced over them, so the BN group is the global batch
as in the protocol (MoCo's 8 GPUs x 2 images with SyncBN). detectron2's ``REFERENCE_WORLD_SIZE``
rescaling is switched off (set to 0).

``linear`` (opt-in): detectron2's ``REFERENCE_WORLD_SIZE`` rule (``DefaultTrainer.auto_scale_workers``):
images per GPU stay at ``IMS_PER_BATCH / REFERENCE_WORLD_SIZE`` and the batch, LR and schedule
scale with the world size. K. He (facebookresearch/moco#11) calls this not fully equivalent
because the BN batch changes; plans that change the batch or the BN group carry a flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from simsiam_transfer.errors import UserError

# Training memory of R50-C4 with trainable BN and nothing frozen (the protocol), in GiB: per 800x1333
# image, the tensors autograd keeps for backward (4.34 counted on CPU), plus once the weights, gradients
# and momentum (0.37) (benchmarks/gpu_probes.py activation-count; docs/protocol.md). detectron2's model zoo
# lists 4.8 GB for 2 images, but with FrozenBN and a frozen stem and res2, which keep far less. Until GPU
# figures replace it; scaled by input area; used for every depth (an over-estimate for R18/R34), with
# SAFETY of the card's memory usable.
GIB_PER_IMAGE_R50_C4 = 4.3
FIXED_GIB_R50_C4 = 0.4
REFERENCE_PIXELS = 800 * 1333
SAFETY = 0.9
SYNCED_NORMS = ("SyncBN", "naiveSyncBN")
PROTOCOL_IMS_PER_GPU = 2  # MoCo's detection runs: 8 GPUs x 2 images
# The plan's field lists, declared once: the effective setup every trial record, bench folder, summary
# and report carries, and what a fine-tune folder must keep to be resumed or evaluated.
SETUP_FIELDS = ("scaling", "world_size", "ims_per_gpu", "effective_batch", "bn_mode", "bn_group", "lr_scale",
                "max_iter", "flags")
RESUME_FIELDS = ("scaling", "world_size", "ims_per_gpu", "effective_batch", "bn_mode", "base_lr", "max_iter",
                 "steps", "warmup_iters")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The effective setup of one trial."""

    scaling: str
    world_size: int
    ims_per_gpu: int
    effective_batch: int
    bn_mode: str
    bn_group: int | None  # images one BN normalises over; None for FrozenBN / GN
    base_lr: float  # effective SOLVER.BASE_LR for the config's BASE_LR
    lr_scale: float  # effective LR / the LR asked for
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    config_batch: int  # SOLVER.IMS_PER_BATCH as written (the protocol's batch)
    est_gib_per_gpu: float

    @property
    def flags(self) -> list[str]:
        """What differs from the protocol's setup: the batch, BN group or schedule of the config, and more
        than MoCo's 2 images per GPU (detectron2 pads a GPU's images to its largest before the backbone's
        BN, so padding enters BN and PreciseBN statistics differently: 1x16 is close to 8x2, not equal)."""
        out = []
        if self.ims_per_gpu > PROTOCOL_IMS_PER_GPU:
            out.append(f"{self.ims_per_gpu} images per GPU: padding differs from 8x{PROTOCOL_IMS_PER_GPU}")
        if self.effective_batch != self.config_batch:
            out.append(f"batch {self.effective_batch} != {self.config_batch}")
        if self.bn_group is not None and self.bn_group != self.config_batch:
            out.append(f"BN group {self.bn_group} != {self.config_batch}")
        if self.lr_scale != 1.0:
            out.append(f"LR x{self.lr_scale:g}, {self.max_iter} iterations")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": list(self.steps), "flags": self.flags,
                "setup": f"{self.world_size}x{self.ims_per_gpu}"}

    def setup(self) -> dict[str, Any]:
        """The ``SETUP_FIELDS`` of this plan."""
        full = self.as_dict()
        return {k: full[k] for k in SETUP_FIELDS}

    def resume_record(self) -> dict[str, Any]:
        """The ``RESUME_FIELDS`` of this plan (``schedule.json`` of a fine-tune folder)."""
        full = self.as_dict()
        return {k: full[k] for k in RESUME_FIELDS}


def gib_per_image(max_short_side: int, max_long_side: int) -> float:
    return GIB_PER_IMAGE_R50_C4 * max_short_side * max_long_side / REFERENCE_PIXELS


def estimate_gib_per_gpu(ims_per_gpu: int, max_short_side: int, max_long_side: int) -> float:
    return round(FIXED_GIB_R50_C4 + gib_per_image(max_short_side, max_long_side) * ims_per_gpu, 1)


def bn_group(norm: str, world_size: int, ims_per_gpu: int) -> int | None:
    if norm in SYNCED_NORMS:
        return ims_per_gpu * world_size
    if norm == "BN":
        return ims_per_gpu
    return None


def plan_batch(cfg: Any, world_size: int, scaling: str) -> BatchPlan:
    """The plan for ``cfg`` (as built by ``finetune.build_cfg`` for ``scaling``) on ``world_size`` processes.

    ``cfg.SOLVER.REFERENCE_WORLD_SIZE`` is 0 under ``faithful`` (build_cfg sets it), so detectron2's
    ``auto_scale_workers`` leaves the config as it is; under ``linear`` it applies its rule.
    """
    from detectron2.engine import DefaultTrainer  # here: the field lists above are read by light modules

    batch = int(cfg.SOLVER.IMS_PER_BATCH)
    if scaling == "linear" and not cfg.SOLVER.REFERENCE_WORLD_SIZE:
        raise UserError("--scaling linear needs SOLVER.REFERENCE_WORLD_SIZE (the world size IMS_PER_BATCH "
                        "was written for) in the config; set it, e.g. SOLVER.REFERENCE_WORLD_SIZE 8")
    eff = DefaultTrainer.auto_scale_workers(cfg, world_size)
    eff_batch = int(eff.SOLVER.IMS_PER_BATCH)
    if eff_batch % world_size:
        raise UserError(f"SOLVER.IMS_PER_BATCH {eff_batch} cannot be split over {world_size} GPUs; "
                        f"use a GPU count that divides it (e.g. {', '.join(_divisors(eff_batch))})")
    per_gpu = eff_batch // world_size
    norm = cfg.MODEL.RESNETS.NORM
    return BatchPlan(
        scaling=scaling, world_size=world_size, ims_per_gpu=per_gpu, effective_batch=eff_batch,
        bn_mode=norm, bn_group=bn_group(norm, world_size, per_gpu), base_lr=float(eff.SOLVER.BASE_LR),
        lr_scale=float(eff.SOLVER.BASE_LR) / float(cfg.SOLVER.BASE_LR), max_iter=int(eff.SOLVER.MAX_ITER),
        steps=tuple(int(s) for s in eff.SOLVER.STEPS), warmup_iters=int(eff.SOLVER.WARMUP_ITERS),
        config_batch=batch,
        est_gib_per_gpu=estimate_gib_per_gpu(per_gpu, max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN))


def _divisors(n: int) -> list[str]:
    return [str(d) for d in range(1, min(n, 8) + 1) if n % d == 0]


def images_that_fit(gpu_gib: float, per_image_gib: float) -> int:
    return max(0, int((SAFETY * gpu_gib - FIXED_GIB_R50_C4) // per_image_gib))


def check_fits(plan: BatchPlan, gpu_gib: float | None) -> None:
    """Refuse a plan whose images per GPU will not fit the card (None: memory unknown, e.g. CPU), naming
    the largest number of images per GPU that fits and the GPUs per trial that gives."""
    if gpu_gib is None or plan.est_gib_per_gpu <= SAFETY * gpu_gib:
        return
    per_image = (plan.est_gib_per_gpu - FIXED_GIB_R50_C4) / plan.ims_per_gpu
    fit = images_that_fit(gpu_gib, per_image)
    gpus = next((d for d in range(plan.world_size + 1, plan.effective_batch + 1)
                 if plan.effective_batch % d == 0 and plan.effective_batch // d <= fit), None)
    option = (f"{gpus} GPUs per trial ({gpus}x{plan.effective_batch // gpus}, --gpus-per-trial {gpus})"
              if gpus and fit else "more GPUs per trial")
    raise UserError(
        f"{plan.ims_per_gpu} images per GPU need about {plan.est_gib_per_gpu:g} GiB (R50-C4 with trainable BN: "
        f"{GIB_PER_IMAGE_R50_C4:g} GiB per 800x1333 image) but the GPU has {gpu_gib:.1f} GiB "
        f"({SAFETY:.0%} usable): {fit} image(s) per GPU fit; use {option}, --scaling linear (changes the "
        "batch and BN group), or a smaller input (INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN)")


def check_gpu_count(num_gpus: int, visible: int) -> None:
    """Refuse, before detectron2's ``launch`` starts them, more processes than visible GPUs: two ranks
    would share a GPU and NCCL stops at the first collective ("Duplicate GPU detected")."""
    if visible and num_gpus > visible:
        raise UserError(f"--num-gpus {num_gpus} but {visible} GPU(s) visible: each process needs its own GPU; "
                        f"use --num-gpus {visible} or fewer, or make more GPUs visible (CUDA_VISIBLE_DEVICES)")


def visible_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key saved (now new)`` for every effective-setup value that differs."""
    return [f"{k} {saved.get(k)} (now {now.get(k)})" for k in now if saved.get(k) != now.get(k)]
