"""Image folders and SimSiam's two-view augmentation (the official MoCo v2 recipe)."""

import math
import random
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from simsiam_transfer.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomGaussianBlur:
    """PIL Gaussian blur with radius uniform in [sigma_min, sigma_max] (official: [0.1, 2.0])."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def simsiam_augmentation(size=224, min_scale=0.2):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size=224):
    """Resize to size*256/224 and centre-crop ``size`` (the standard ImageNet evaluation view)."""
    return transforms.Compose([
        transforms.Resize(int(round(size * 256 / 224))),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def list_images(root, key="DATA.TRAIN_DIR"):
    root = Path(root) if root else None
    if root is None or not root.is_dir():
        raise UserError(f"{key} {str(root) if root else '(empty)'}: not a folder; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{key} {root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    return files


def draft_side(transform) -> int:
    """Smallest source side at which every output of ``transform`` still comes from at least its own
    number of pixels (RandomResizedCrop's smallest, narrowest crop; Resize's short side); 0 if unknown.
    A JPEG may then decode at 1/2, 1/4 or 1/8 scale (``Image.draft``) without changing what a crop sees."""
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, transforms.RandomResizedCrop):
            narrowest = math.sqrt(t.scale[0] * min(t.ratio[0], 1 / t.ratio[1]))
            return math.ceil(max(t.size) / narrowest)
        if isinstance(t, transforms.Resize) and isinstance(t.size, int):
            return t.size
    return 0


def _open_rgb(path, min_side=0):
    try:
        with Image.open(path) as img:
            if min_side and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))  # DCT-domain downscale: most of the decode time
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")  # RGB already: no copy
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


class TwoViewDataset(torch.utils.data.Dataset):
    """Unlabeled images -> (view1, view2, index); the index serves the Sec. 5.2 target memory."""

    def __init__(self, root, transform):
        self.files = list_images(root)
        self.transform = transform
        self.min_side = draft_side(transform)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        img = _open_rgb(self.files[index], self.min_side)
        return self.transform(img), self.transform(img), index


class LabeledFolder(torch.utils.data.Dataset):
    """ImageFolder layout ``root/<class>/<image>`` for the kNN monitor and the linear probe."""

    def __init__(self, root, transform, key="DATA.KNN_TRAIN_DIR", classes=None):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{key} {root}: not a folder; expected <root>/<class>/<image> sub-folders")
        self.classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise UserError(f"{key} {root}: no class sub-folders")
        self.samples = [(f, i) for i, c in enumerate(self.classes) if (root / c).is_dir()
                        for f in list_images(root / c, key)]
        self.transform = transform
        self.min_side = draft_side(transform)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(_open_rgb(path, self.min_side)), label
