"""SimSiam (Chen & He, 2021): encoder f = ResNet + projection MLP, predictor h, as the official code.

State-dict layout matches the official checkpoints (without the DDP ``module.`` prefix):
backbone ``encoder.{conv1,bn1,layer1-4}.*``, projector ``encoder.fc.*``, predictor ``predictor.*``.
"""

import torchvision
from torch import nn

from simsiam_transfer.resnet import PRETRAIN_BACKBONES, pooled_features


def _bn_flags(head_bn):
    """(projector hidden, projector output, predictor hidden, predictor output) BN, Table 3."""
    return {
        "none": (False, False, False, False),
        "hidden": (True, False, True, False),
        "default": (True, True, True, False),
        "all": (True, True, True, True),
    }[head_bn]


def _linear_block(in_dim, out_dim, bn, relu):
    layers = [nn.Linear(in_dim, out_dim, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(out_dim))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def build_projector(in_dim, hidden_dim, last_linear, num_layers=3, head_bn="default"):
    """Projection MLP: (num_layers - 1) x [fc, BN, ReLU], then ``last_linear`` and an affine-free BN.

    ``last_linear`` is the ResNet's own fc (as in the official code); its bias is frozen when a
    BN follows, since that BN cancels it.
    """
    hidden_bn, out_bn, _, _ = _bn_flags(head_bn)
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers += _linear_block(dim, hidden_dim, hidden_bn, relu=True)
        dim = hidden_dim
    if last_linear.in_features != dim:
        last_linear = nn.Linear(dim, last_linear.out_features)
    layers.append(last_linear)
    if out_bn:
        layers.append(nn.BatchNorm1d(last_linear.out_features, affine=False))
        last_linear.bias.requires_grad = False
    return nn.Sequential(*layers)


def build_predictor(dim, pred_dim, kind="mlp", head_bn="default"):
    """Prediction MLP h: fc, BN, ReLU, fc (bias) -- or identity ("none"), or frozen at init."""
    if kind == "none":
        return nn.Identity()
    _, _, hidden_bn, out_bn = _bn_flags(head_bn)
    layers = _linear_block(dim, pred_dim, hidden_bn, relu=True)
    layers.append(nn.Linear(pred_dim, dim))
    if out_bn:
        layers.append(nn.BatchNorm1d(dim, affine=False))
    predictor = nn.Sequential(*layers)
    if kind == "fixed_random":
        predictor.requires_grad_(False)
    return predictor


class SimSiam(nn.Module):
    """``SimSiam(backbone, dim, pred_dim)(x1, x2) -> (p1, p2, z1, z2)``; z are *not* detached here
    (``simsiam_loss`` applies the stop-gradient, so the Fig. 2 ablation is a loss switch)."""

    def __init__(self, backbone="resnet50", dim=2048, pred_dim=512, proj_layers=3, predictor="mlp",
                 head_bn="default", zero_init_residual=True, proj_hidden_dim=None):
        super().__init__()
        if backbone not in PRETRAIN_BACKBONES:
            raise ValueError(f"backbone {backbone!r} not in {PRETRAIN_BACKBONES}")
        self.encoder = getattr(torchvision.models, backbone)(
            weights=None, num_classes=dim, zero_init_residual=zero_init_residual)
        width = self.encoder.fc.in_features
        self.encoder.fc = build_projector(width, proj_hidden_dim or width, self.encoder.fc,
                                          proj_layers, head_bn)
        self.predictor = build_predictor(dim, pred_dim, predictor, head_bn)

    def forward(self, x1, x2):
        z1, z2 = self.encoder(x1), self.encoder(x2)
        return self.predictor(z1), self.predictor(z2), z1, z2

    def backbone_features(self, x):
        """Pooled backbone output (before the projector): what kNN and linear probes read."""
        return pooled_features(self.encoder, x)

    def parameter_groups(self, fix_pred_lr=False):
        """SGD groups: everything trainable; the predictor separately when its lr stays fixed."""
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        if fix_pred_lr:
            return [{"params": encoder, "fix_lr": False}, {"params": predictor, "fix_lr": True}]
        return [{"params": encoder + predictor, "fix_lr": False}]
