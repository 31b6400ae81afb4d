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

import logging

import numpy as np
import torch

from simsiam_transfer.config import merge_file
from simsiam_transfer.errors import UserError

C4_CONFIG = "detection/Base-RCNN-C4-BN.yaml"
TOLERANCE = 1e-4
NEAR_IDENTITY_SCALE = 0.02
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VerificationError(UserError):
    """The converted weights do not load completely or do not compute the same features."""


def c4_config(depth, stride_in_1x1=False):
    import detection  # noqa: F401  (registers the ExtraNorm head)
    from detectron2.config import get_cfg

    cfg = get_cfg()
    merge_file(cfg, C4_CONFIG)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _is_backbone_key(key):
    """Model keys the pretrained file must provide (the ExtraNorm layer is new by design)."""
    if key.startswith("backbone."):
        return True
    return key.startswith("roi_heads.res5.") and not key.startswith("roi_heads.res5.norm.")


def load_payload(model, payload):
    """Load a detectron2 .pkl payload into ``model`` the way ``DetectionCheckpointer`` does, through
    public API only: detectron2's name-matching heuristics (``align_and_update_state_dicts``) when the
    file asks for them, tensors of the wrong shape left out, then ``load_state_dict(strict=False)``.
    Returns (missing keys, unexpected keys, [(key, file shape, model shape)] of wrong shapes)."""
    from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

    model_state = model.state_dict()
    weights = {k: torch.as_tensor(np.asarray(v)) for k, v in payload["model"].items()}
    if payload.get("matching_heuristics", False):
        d2_logger = logging.getLogger("detectron2")
        level = d2_logger.level
        d2_logger.setLevel(logging.ERROR)  # it logs one line per matched tensor
        try:
            weights = align_and_update_state_dicts(model_state, weights,
                                                   c2_conversion=payload.get("__author__") == "Caffe2")
        finally:
            d2_logger.setLevel(level)
    wrong = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in weights.items()
             if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]
    for key, *_ in wrong:
        del weights[key]
    result = model.load_state_dict(weights, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys), wrong


def coverage_problems(model, payload):
    """List of human-readable problems; empty when the payload covers backbone + res5 exactly."""
    missing_keys, unexpected_keys, wrong_shapes = load_payload(model, payload)
    problems = []
    missing = [k for k in missing_keys if _is_backbone_key(k)]
    if missing:
        problems.append(f"{len(missing)} backbone/res5 tensor(s) not in the file, e.g. {missing[:3]}")
    shapes = [k for k, *_ in wrong_shapes if _is_backbone_key(k)]
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) with the wrong shape, e.g. {shapes[:3]}")
    unused = [k for k in unexpected_keys
              if k.split(".")[0] in ("stem", "res2", "res3", "res4", "res5") and ".fc." not in k]
    if unused:
        problems.append(f"{len(unused)} backbone tensor(s) of the file left unused, e.g. {unused[:3]}")
    return problems


def check_weights_cover_model(path, cfg):
    """Refuse a weights file that would leave part of ``cfg``'s backbone/res5 randomly initialised."""
    from detectron2.modeling import build_model

    from convert.d2_format import read_detectron2_pkl

    if not str(path).endswith(".pkl"):
        raise UserError(f"--weights {path}: expected a detectron2 .pkl; convert the checkpoint first "
                        "(simsiam-transfer convert INPUT OUTPUT.pkl)")
    payload = read_detectron2_pkl(path)
    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    if cpu_cfg.MODEL.RESNETS.NORM in ("SyncBN", "naiveSyncBN"):
        cpu_cfg.MODEL.RESNETS.NORM = "BN"  # same tensors; SyncBN cannot be built on CPU
    problems = coverage_problems(build_model(cpu_cfg), payload)
    if problems:
        raise UserError(f"--weights {path} does not cover the model's backbone: {'; '.join(problems)}. "
                        "Check MODEL.RESNETS.DEPTH matches the converted network")


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

    from convert.sources import torchvision_resnet

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
