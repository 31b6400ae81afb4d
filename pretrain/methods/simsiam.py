"""SimSiam (Chen & He, 2021): two augmented views of an image, a shared encoder (ResNet + projector),
a predictor, and the negative cosine between one view's prediction and the other's (stop-gradient)
projection, symmetrised. Every ablation of the paper is a ``MODEL.*`` key (``pretrain/config.py``)."""

from pretrain.data import TwoViewDataset, crop_and_params, simsiam_augmentation
from pretrain.loss import simsiam_loss
from pretrain.methods.base import PretrainMethod, register_method
from pretrain.model import SimSiam


@register_method("simsiam")
class SimSiamMethod(SimSiam, PretrainMethod):
    """The network of ``pretrain.model.SimSiam``; its state dict is the official layout (``encoder.*``,
    ``predictor.*``)."""

    views = 2
    device_augmentation = True
    loss_kwargs: dict = {}

    @classmethod
    def build(cls, cfg) -> "SimSiamMethod":
        m = cfg.MODEL
        method = cls(backbone=m.BACKBONE, dim=m.DIM, pred_dim=m.PRED_DIM, proj_layers=m.PROJ_LAYERS,
                     predictor=m.PREDICTOR, head_bn=m.HEAD_BN, zero_init_residual=m.ZERO_INIT_RESIDUAL,
                     proj_hidden_dim=m.PROJ_HIDDEN_DIM or None)
        method.loss_kwargs = dict(stop_gradient=m.STOP_GRADIENT, similarity=m.SIMILARITY, symmetric=m.SYMMETRIC)
        return method

    def train_dataset(self, cfg):
        """(view 1, view 2, index) of each image; on the device path the loader only crops (uint8) and draws
        the rest of the official augmentation, which ``DeviceAugmentation`` applies batched."""
        on_device = cfg.DATA.AUGMENT_ON == "device"
        transform = (crop_and_params if on_device else simsiam_augmentation)(cfg.DATA.IMAGE_SIZE, cfg.DATA.MIN_SCALE)
        return TwoViewDataset(cfg.DATA.TRAIN_DIR, transform, as_tensor=on_device)

    def step_inputs(self, batch):
        x1, x2, index = batch
        return (x1, x2), {"index": index}

    def loss(self, outputs, aux, targets=None):
        """``targets``: None (the other view's z), a cached (t1, t2) pair (k-step alternation, Sec. 5.2) or
        ``fn(z1, z2) -> (t1, t2)`` (the moving-average memory, Sec. 5.2)."""
        p1, p2, z1, z2 = (o.float() for o in outputs)
        if callable(targets):
            t1, t2 = targets(z1, z2)
        else:
            t1, t2 = targets if targets is not None else (z1, z2)
        return simsiam_loss(p1, p2, t1, t2, **self.loss_kwargs), z1
