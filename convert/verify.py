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
   near-identity blocks, which fine-tune worse than random init.
"""

import numpy as np
import torch

from simsiam_transfer.c4 import c4_config, coverage_problems
from simsiam_transfer.checkpoints import torchvision_resnet
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD

TOLERANCE = 1e-4
NEAR_IDENTITY_SCALE = 0.02


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
    from detectron2.modeling import build_model


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


def residual_scale_stats(backbone, block):
    """Per stage, |gamma| of each residual branch's last BN (mean, min, max)."""
    last_bn = "bn3" if block == "bottleneck" else "bn2"
    stats = {}
    for stage in range(1, 5):
        scales = [backbone[k].abs().mean().item() for k in sorted(backbone)
                  if k.startswith(f"layer{stage}.") and k.endswith(f".{last_bn}.weight")]
        stats[f"res{stage + 1}"] = {
            "mean": float(np.mean(scales)), "min": float(np.min(scales)), "max": float(np.max(scales)),
            "blocks": len(scales),
        }
    return stats


def near_identity_warnings(stats, threshold=NEAR_IDENTITY_SCALE):
    return [
        f"{stage}: residual-branch BN scale mean {s['mean']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}) "
        f"< {threshold}: near-identity blocks (zero-init residuals barely trained?); such a backbone "
        "can fine-tune worse than random init"
        for stage, s in stats.items() if s["mean"] < threshold
    ]
