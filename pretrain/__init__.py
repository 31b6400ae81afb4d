"""SimSiam pretraining: model, loss, augmentations, engine (DDP, resume), monitors, linear probe.

Library API::

    from pretrain import SimSiam, simsiam_loss
    p1, p2, z1, z2 = SimSiam(backbone="resnet50", dim=2048, pred_dim=512)(x1, x2)
    loss = simsiam_loss(p1, p2, z1, z2)   # symmetric negative cosine with stop-gradient, min -1
"""

from pretrain.loss import simsiam_loss
from pretrain.model import SimSiam

__all__ = ["SimSiam", "simsiam_loss"]
