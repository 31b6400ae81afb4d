"""Prove a converted file is what it claims: complete in detectron2, and numerically the same network.

1. Coverage: build detectron2's C4 model of the matching depth from the project's C4 config,
   load the weights through detectron2's own checkpointer logic (name-matching heuristics
   included), and fail unless every backbone and res5 tensor came from the file and no
   backbone tensor of the file went unused.
2. Equivalence: run one input through the torchvision ResNet and through detectron2's
   backbone + res5 (both in eval mode, RGB, ImageNet mean/std) and fail unless the res4 and
   res5 features agree to 1e-4 of the feature range (max |diff| / max(1, max |feature|); an
   absolute bound would flag float32 rounding on the large activations of untrained nets).
3. Diagnostics: the last BN scale of every residual branch, per stage; near-zero scales mean
   near-identity blocks, which fine-tune worse than random init; scales still at 1.0 (their init
   without zero-init residuals) or exactly where weight decay alone puts them, a loss that never
   fell, or a collapsed output mean a pretraining that did not learn (``pretraining_check``; the
   verdict lands in OUTPUT.report.json for ``bench``).
"""

import math
from typing import Optional

import numpy as np
import torch
from detectron2.modeling import build_model

from simsiam_transfer.c4 import c4_config, coverage_problems
from simsiam_transfer.checkpoints import torchvision_resnet
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD, residual_branch_gammas

TOLERANCE = 1e-4
NEAR_IDENTITY_SCALE = 0.02
# Residual-BN scales whose mean |gamma - 1| stays under this never left their 1.0 init.
STUCK_AT_ONE = 0.005
# Scales that moved only by weight decay: every stage's mean within this fraction of the decay (plus
# 0.001) of the decay-only prediction, and res5's scales within STUCK_AT_ONE of it on average.
DECAY_ONLY_FRACTION = 0.1
# A SimSiam run that learned reaches a loss well below this (trained: -0.6 to -0.9; untouched: ~0).
LEARNED_LOSS = -0.3
# A classifier that learned ends well below the loss of guessing, ln(classes).
LEARNED_OF_CHANCE = 0.8
# std of the l2-normalised output times sqrt(d): ~1 when spread out, ~0 when collapsed (paper Fig. 2).
COLLAPSED_Z_STD = 0.1


class VerificationError(UserError):
    """The converted weights do not load completely or do not compute the same features."""


def _features_torchvision(tv_model, image):
    x = image / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = tv_model.maxpool(tv_model.relu(tv_model.bn1(tv_model.conv1(x))))
    res4 = tv_model.layer3(tv_model.layer2(tv_model.layer1(x)))
    return res4, tv_model.layer4(res4)


def _features_detectron2(d2_model, image):
    x = (image - d2_model.pixel_mean.view(1, 3, 1, 1)) / d2_model.pixel_std.view(1, 3, 1, 1)
    res4 = d2_model.backbone(x)["res4"]
    res5 = res4
    for name, block in d2_model.roi_heads.res5.named_children():
        if name != "norm":
            res5 = block(res5)
    return res4, res5


def verify_detectron2_payload(payload, backbone, depth, stride_in_1x1=False, image_size=96, seed=0):
    """Coverage + numeric equivalence of a detectron2 payload against the torchvision backbone."""

    d2_model = build_model(c4_config(depth, stride_in_1x1)).eval()
    problems = coverage_problems(d2_model, payload)
    if problems:
        raise VerificationError("detectron2 did not load the converted weights completely: " + "; ".join(problems))
    tv_model = torchvision_resnet(depth)
    tv_model.load_state_dict(backbone, strict=False)
    tv_model.eval()
    image = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)) * 255
    with torch.no_grad():
        expected = _features_torchvision(tv_model, image)
        got = _features_detectron2(d2_model, image)
    report = {}
    for name, a, b in zip(("res4", "res5"), expected, got):
        if a.shape != b.shape:
            raise VerificationError(f"{name} feature shapes differ: torchvision {tuple(a.shape)} vs "
                                    f"detectron2 {tuple(b.shape)}")
        diff = float((a - b).abs().max())
        scale = max(float(a.abs().max()), 1.0)
        report[name] = {"max_abs_diff": diff, "max_abs": float(a.abs().max()), "relative_diff": diff / scale}
        if diff / scale > TOLERANCE:
            raise VerificationError(
                f"{name} features differ between torchvision and detectron2 (max |diff| {diff:.3g}, "
                f"{diff / scale:.2g} of the feature range > {TOLERANCE:g}); the renaming or the "
                "stride/pixel convention is wrong")
    return report


def residual_scale_stats(backbone, decay_only: Optional[float] = None):
    """Per stage, |gamma| of each residual branch's last BN (mean, min, max), and the mean distance
    of the scales from 1.0 (their init without zero-init residuals) and from ``decay_only`` (where
    weight decay alone would have put them, ``decay_only_scale``) when given."""
    stats = {}
    for stage, gammas in enumerate(residual_branch_gammas(backbone), start=1):
        scales = [g.abs().mean().item() for g in gammas]
        stats[f"res{stage + 1}"] = {
            "mean": float(np.mean(scales)), "min": float(np.min(scales)), "max": float(np.max(scales)),
            "blocks": len(scales), "mean_abs_change_from_one": float(np.mean([(g - 1).abs().mean().item()
                                                                              for g in gammas])),
        }
        if decay_only is not None:
            stats[f"res{stage + 1}"]["mean_abs_change_from_decay_only"] = float(np.mean(
                [(g.abs() - decay_only).abs().mean().item() for g in gammas]))
    return stats


def decay_only_scale(history: list, weight_decay: float, momentum: float) -> Optional[float]:
    """Where SGD's weight decay alone takes a parameter that starts at 1.0 and gets no gradient:
    each step multiplies it by about (1 - lr * wd / (1 - momentum)), so after the run by
    exp(-wd / (1 - momentum) * sum over epochs of lr * steps). None without the per-epoch record."""
    if not history or not 0 <= momentum < 1 or any("lr" not in r or "steps" not in r for r in history):
        return None
    return math.exp(-weight_decay / (1 - momentum) * sum(float(r["lr"]) * int(r["steps"]) for r in history))


def near_identity_warnings(stats, threshold=NEAR_IDENTITY_SCALE):
    return [
        f"{stage}: residual-branch BN scale mean {s['mean']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}) "
        f"< {threshold}: near-identity blocks (zero-init residuals barely trained?); such a backbone "
        "can fine-tune worse than random init"
        for stage, s in stats.items() if s["mean"] < threshold
    ]


def stuck_scale_warnings(stats: dict, tolerance: float = STUCK_AT_ONE, decay_only: Optional[float] = None) -> list:
    """Residual-BN scales that never left 1.0, their init with ZERO_INIT_RESIDUAL False, or that moved
    exactly as weight decay alone moves them (``decay_only``: the predicted scale) with next to no
    gradient."""
    stuck = {stage: s for stage, s in stats.items()
             if s.get("mean_abs_change_from_one", float("inf")) < tolerance}
    if len(stuck) == len(stats):
        values = ", ".join(f"{stage} {s['mean_abs_change_from_one']:.4f}" for stage, s in stuck.items())
        return [f"residual-branch BN scales still at their 1.0 init in every stage (mean |gamma - 1|: {values}; "
                f"< {tolerance}): the backbone barely moved from its initialisation"]
    if decay_only is None or "res5" not in stats or "mean_abs_change_from_decay_only" not in stats["res5"]:
        return []
    close = DECAY_ONLY_FRACTION * (1 - decay_only) + 0.001
    if all(abs(s["mean"] - decay_only) <= close for s in stats.values()) and \
            stats["res5"]["mean_abs_change_from_decay_only"] < tolerance:
        values = ", ".join(f"{stage} {s['mean']:.4f}" for stage, s in stats.items())
        return [f"residual-branch BN scales moved only as weight decay alone moves them (mean |gamma|: {values}; "
                f"decay alone, from the LR schedule, SOLVER.WEIGHT_DECAY and SOLVER.MOMENTUM: {decay_only:.4f}): "
                "the residual branches got next to no gradient"]
    return []


def training_warnings(history: list, dim: int, loss_threshold: float = LEARNED_LOSS,
                      collapsed: float = COLLAPSED_Z_STD, method: str = "simsiam") -> list:
    """Problems read from a pretraining checkpoint's ``history`` (per-epoch loss and z_std). SimSiam's loss
    must fall below ``loss_threshold`` and its output must not collapse; a method that records the loss of
    guessing (``chance_loss``: supervised) must get below ``LEARNED_OF_CHANCE`` of it; other methods' losses
    have no known scale and are not judged."""
    if not history:
        return []
    warnings = []
    best = min(float(r["loss"]) for r in history)
    steps = sum(int(r.get("steps", 0)) for r in history)
    chance = history[-1].get("chance_loss")
    if method == "simsiam" and best > loss_threshold:
        warnings.append(f"pretraining loss never went below {loss_threshold} (best {best:.4f} over "
                        f"{len(history)} epoch(s), {steps} steps): SimSiam did not learn")
    elif method != "simsiam" and isinstance(chance, (int, float)) and best > LEARNED_OF_CHANCE * chance:
        warnings.append(f"{method} loss never went below {LEARNED_OF_CHANCE:g} x the loss of guessing "
                        f"({chance:.3f}; best {best:.4f} over {len(history)} epoch(s), {steps} steps): it did not "
                        "learn the classes")
    z = float(history[-1]["z_std"]) * math.sqrt(dim) if dim and method == "simsiam" else None
    if z is not None and z < collapsed:
        warnings.append(f"final z_std*sqrt(d) {z:.3f} < {collapsed}: the output collapsed to a constant "
                        "(as without stop-gradient, paper Fig. 2)")
    return warnings


def pretraining_check(stats: dict, history: Optional[list] = None, dim: int = 0,
                      decay_only: Optional[float] = None, method: str = "simsiam") -> dict:
    """The no-op/collapse verdict of one pretrained backbone: ``{"ok", "problems", "advice", ...}``."""
    problems = stuck_scale_warnings(stats, decay_only=decay_only) + training_warnings(history or [], dim,
                                                                                       method=method)
    checks = "MODEL.STOP_GRADIENT / MODEL.PREDICTOR" if method == "simsiam" else "the labels and SOLVER.*"
    advice = (f"train longer (more SOLVER.EPOCHS or images), raise SOLVER.BASE_LR, and check {checks}; "
              f"until then its fine-tunes need not show what {method} learns") \
        if problems else ""
    return {
        "ok": not problems, "problems": problems, "advice": advice,
        "best_loss": min((float(r["loss"]) for r in history), default=None) if history else None,
        "final_z_std_times_sqrt_d": float(history[-1]["z_std"]) * math.sqrt(dim) if history and dim else None,
        "epochs": len(history or []),
    }
