"""Supervised pretraining: cross-entropy on a class-per-folder tree with the same backbone, engine and
checkpoints as SimSiam. It is the benchmark's positive control: a backbone that knows the classes, so a
fine-tune long enough to see the backbone must rank it above random init."""

import math

import torch.nn.functional as F
import torchvision
from torchvision import transforms

from pretrain.data import LabeledFolder
from pretrain.methods.base import PretrainMethod, register_method
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_BACKBONES


def supervised_augmentation(size, min_scale):
    """The standard supervised recipe: a random resized crop and a flip (no colour or blur)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class IndexedFolder(LabeledFolder):
    """``DATA.TRAIN_DIR/<class>/<image>`` -> (image, label, index), with the file list the image check scans."""

    @property
    def files(self):
        return [path for path, _ in self.samples]

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, index


@register_method("supervised")
class Supervised(PretrainMethod):
    """A torchvision ResNet whose ``fc`` classifies ``DATA.TRAIN_DIR``'s class folders."""

    labeled = True
    views = 1

    def __init__(self, backbone="resnet50", num_classes=1000, zero_init_residual=True):
        super().__init__()
        if backbone not in PRETRAIN_BACKBONES:
            raise ValueError(f"backbone {backbone!r} not in {PRETRAIN_BACKBONES}")
        self.num_classes = num_classes
        self.encoder = getattr(torchvision.models, backbone)(weights=None, num_classes=num_classes,
                                                             zero_init_residual=zero_init_residual)

    @classmethod
    def build(cls, cfg) -> "Supervised":
        classes = LabeledFolder.class_names(cfg.DATA.TRAIN_DIR, "DATA.TRAIN_DIR")
        return cls(cfg.MODEL.BACKBONE, len(classes), cfg.MODEL.ZERO_INIT_RESIDUAL)

    def train_dataset(self, cfg):
        return IndexedFolder(cfg.DATA.TRAIN_DIR, supervised_augmentation(cfg.DATA.IMAGE_SIZE, cfg.DATA.MIN_SCALE),
                             "DATA.TRAIN_DIR")

    def forward(self, x):
        return self.encoder(x)

    def step_inputs(self, batch):
        images, labels, index = batch
        return (images,), {"labels": labels, "index": index}

    def loss(self, outputs, aux, targets=None):
        logits = outputs.float()
        return F.cross_entropy(logits, aux["labels"]), logits

    def epoch_record(self):
        """The loss of guessing (ln of the class count): the no-op check compares the run's loss with it."""
        return {"chance_loss": round(math.log(self.num_classes), 4)}
