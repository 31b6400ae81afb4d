"""The C4 model that conversion verifies against and fine-tuning trains: its RoI head, its config,
and loading a detectron2 weights payload into it (both stages build it, so it lives in the floor).

``Res5ROIHeadsExtraNorm``, the C4 RoI head of the MoCo/SimSiam detection protocol, is registered
in detectron2's ROI-head registry when this module is imported.

It is detectron2's ``Res5ROIHeads`` with one extra norm layer (type ``MODEL.RESNETS.NORM``,
randomly initialised, weights ``roi_heads.res5.norm.*``) appended to the res5 stage, so the
box predictor and the mask head see normalised res5 features.

Unlike the stock head, res5 is built from the backbone's own block type: for ResNet-18/34
the stock head builds bottleneck blocks (256->512->512) that no ResNet-18 checkpoint can
fill, so the pretrained res5 would be silently dropped. Here every pretrained weight of a
basic-block ResNet transfers too.
"""

import logging

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.config import get_cfg
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from simsiam_transfer.d2_weights import read_detectron2_pkl
from simsiam_transfer.config import merge_file
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import RESNETS

C4_CONFIG = "detection/Base-RCNN-C4-BN.yaml"


def single_process_norm(norm: str) -> str:
    """A norm that builds without CUDA or a process group, with the same tensors: nn.SyncBatchNorm
    needs both, and detectron2's naiveSyncBN is plain BN in a single process."""
    return "naiveSyncBN" if norm == "SyncBN" else norm



def build_res5_stage(cfg):
    """res5 as a ``nn.Sequential`` of the backbone's block type; returns (stage, out_channels)."""
    r = cfg.MODEL.RESNETS
    if r.DEFORM_ON_PER_STAGE[-1]:
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable conv is not supported in res5")
    out_channels = r.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
    common = dict(in_channels=out_channels // 2, out_channels=out_channels, norm=r.NORM)
    if r.DEPTH not in RESNETS:
        raise ValueError(f"MODEL.RESNETS.DEPTH {r.DEPTH} is not a ResNet depth ({'/'.join(map(str, RESNETS))})")
    block, counts = RESNETS[r.DEPTH]
    stride_per_block = [2] + [1] * (counts[-1] - 1)
    if block == "basic":
        blocks = ResNet.make_stage(BasicBlock, counts[-1], stride_per_block=stride_per_block, **common)
    else:
        blocks = ResNet.make_stage(
            BottleneckBlock, counts[-1], stride_per_block=stride_per_block,
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            num_groups=r.NUM_GROUPS, stride_in_1x1=r.STRIDE_IN_1X1, **common,
        )
    return blocks, out_channels


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads + a norm layer after res5, with res5 matching the backbone's block type."""

    @classmethod
    def _build_res5_block(cls, cfg):
        blocks, out_channels = build_res5_stage(cfg)
        stage = nn.Sequential(*blocks)
        stage.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return stage, out_channels


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def c4_config(depth, stride_in_1x1=False):
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
    if not str(path).endswith(".pkl"):
        raise UserError(f"--weights {path}: expected a detectron2 .pkl; convert the checkpoint first "
                        "(simsiam-transfer convert INPUT OUTPUT.pkl)")
    payload = read_detectron2_pkl(path)
    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    cpu_cfg.MODEL.RESNETS.NORM = single_process_norm(cpu_cfg.MODEL.RESNETS.NORM)
    problems = coverage_problems(build_model(cpu_cfg), payload)
    if problems:
        raise UserError(f"--weights {path} does not cover the model's backbone: {'; '.join(problems)}. "
                        "Check MODEL.RESNETS.DEPTH matches the converted network")
