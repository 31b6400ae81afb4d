"""What every pretraining method provides, and the registry that ``MODEL.METHOD`` names."""

from typing import Any, Callable, Dict, Tuple, Type

import torch
from torch import nn

from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import pooled_features

METHODS: Dict[str, Type["PretrainMethod"]] = {}


def register_method(name: str) -> Callable[[Type["PretrainMethod"]], Type["PretrainMethod"]]:
    """Class decorator: make ``cls`` the method ``MODEL.METHOD name`` builds."""
    def register(cls: Type["PretrainMethod"]) -> Type["PretrainMethod"]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"pretraining method {name!r} is registered twice")
        cls.method_name = name
        METHODS[name] = cls
        return cls
    return register


def method_class(name: str) -> Type["PretrainMethod"]:
    if name not in METHODS:
        raise UserError(f"MODEL.METHOD {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(cfg) -> "PretrainMethod":
    return method_class(cfg.MODEL.METHOD).build(cfg)


class PretrainMethod(nn.Module):
    """One pretraining method. Its ``encoder`` is a torchvision ResNet (whatever head its ``fc`` holds):
    the backbone ``convert`` takes, the kNN monitor reads and the residual-BN monitor watches.

    The engine drives it per step as ``inputs, aux = step_inputs(batch)``; ``outputs = model(*inputs)``
    (through DDP, under autocast); ``loss, z = loss(outputs, aux, targets)``. ``z`` is the embedding whose
    spread the collapse monitor records (``z_std``).
    """

    method_name = ""
    labeled = False  # trains on a class-per-folder tree (DATA.TRAIN_DIR/<class>/<image>) instead of images
    views = 2        # images the network sees per training image (the memory pre-flight's unit)
    device_augmentation = False  # its augmentation can run batched on the device (DATA.AUGMENT_ON device)
    encoder: nn.Module

    @classmethod
    def build(cls, cfg) -> "PretrainMethod":
        raise NotImplementedError

    def train_dataset(self, cfg, transform=None):
        """The training set; ``transform`` replaces the method's own augmentation (e.g. device-side)."""
        raise NotImplementedError

    def step_inputs(self, batch) -> Tuple[tuple, Dict[str, Any]]:
        """(tensors for the network's forward, everything else the loss needs) of a loader batch."""
        raise NotImplementedError

    def loss(self, outputs, aux: Dict[str, Any], targets=None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def parameter_groups(self, fix_pred_lr: bool = False) -> list:
        """SGD groups; ``fix_lr`` groups keep the initial LR (SimSiam's predictor, Table 1c)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "fix_lr": False}]

    def epoch_record(self) -> Dict[str, Any]:
        """Values this method adds to every epoch's metrics record."""
        return {}

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone output (before any head): what kNN and linear probes read."""
        return pooled_features(self.encoder, x)
