"""``Res5ROIHeadsExtraNorm``: the C4 RoI head of the MoCo/SimSiam detection protocol.

It is detectron2's ``Res5ROIHeads`` with one extra norm layer (type ``MODEL.RESNETS.NORM``,
randomly initialised, weights ``roi_heads.res5.norm.*``) appended to the res5 stage, so the
box predictor and the mask head see normalised res5 features.

Unlike the stock head, res5 is built from the backbone's own block type: for ResNet-18/34
the stock head builds bottleneck blocks (256->512->512) that no ResNet-18 checkpoint can
fill, so the pretrained res5 would be silently dropped. Here every pretrained weight of a
basic-block ResNet transfers too.
"""

from torch import nn

from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads

BASIC_BLOCK_DEPTHS = {18: 2, 34: 3}
BOTTLENECK_DEPTHS = {50: 3, 101: 3, 152: 3}


def build_res5_stage(cfg):
    """res5 as a ``nn.Sequential`` of the backbone's block type; returns (stage, out_channels)."""
    r = cfg.MODEL.RESNETS
    if r.DEFORM_ON_PER_STAGE[-1]:
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable conv is not supported in res5")
    out_channels = r.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
    common = dict(in_channels=out_channels // 2, out_channels=out_channels, norm=r.NORM)
    if r.DEPTH in BASIC_BLOCK_DEPTHS:
        blocks = ResNet.make_stage(
            BasicBlock, BASIC_BLOCK_DEPTHS[r.DEPTH], stride_per_block=[2] + [1] * (BASIC_BLOCK_DEPTHS[r.DEPTH] - 1),
            **common,
        )
    elif r.DEPTH in BOTTLENECK_DEPTHS:
        blocks = ResNet.make_stage(
            BottleneckBlock, 3, stride_per_block=[2, 1, 1],
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            num_groups=r.NUM_GROUPS, stride_in_1x1=r.STRIDE_IN_1X1, **common,
        )
    else:
        raise ValueError(f"MODEL.RESNETS.DEPTH {r.DEPTH} is not a ResNet depth (18/34/50/101/152)")
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
