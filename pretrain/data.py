"""Image folders and SimSiam's two-view augmentation (the official MoCo v2 recipe).

Bad images: ``check_train_images`` decodes the folder before any output is written; during
training an image that fails to decode stops the run at once with one line naming it.
"""

import math
import random
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import ImageFilter
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from pretrain.device_augment import DrawViewParams, Uint8ResizedCrop
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD
from simsiam_transfer.images import AUTO_SCAN_LIMIT, ImageScan, list_images, open_rgb, scan_files

# The official recipe after the crop, shared by the CPU pipeline and the device one (DATA.AUGMENT_ON).
COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAYSCALE, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)


class RandomGaussianBlur:
    """PIL Gaussian blur with radius uniform in [sigma_min, sigma_max] (official: [0.1, 2.0])."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def simsiam_augmentation(size=224, min_scale=0.2):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(*COLOR_JITTER)], p=P_JITTER),
        transforms.RandomGrayscale(p=P_GRAYSCALE),
        transforms.RandomApply([RandomGaussianBlur(BLUR_SIGMA)], p=P_BLUR),
        transforms.RandomHorizontalFlip(p=P_FLIP),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def crop_and_params(size=224, min_scale=0.2):
    """``DATA.AUGMENT_ON device``: the official crop of a uint8 tensor image, and the rest of the official
    random draws, for ``pretrain.device_augment.DeviceAugmentation`` to apply on the device."""
    return transforms.Compose([
        Uint8ResizedCrop(size, scale=(min_scale, 1.0)),
        DrawViewParams(COLOR_JITTER, P_JITTER, P_GRAYSCALE, P_BLUR, BLUR_SIGMA, P_FLIP),
    ])


def eval_transform(size=224):
    """Resize to size*256/224 and centre-crop ``size`` (the standard ImageNet evaluation view)."""
    return transforms.Compose([
        transforms.Resize(int(round(size * 256 / 224))),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_train_images(files, cfg, dist=None) -> Optional[ImageScan]:
    """Decode every training image before OUTPUT_DIR is written (DATA.CHECK_IMAGES); each rank scans
    its share, all ranks refuse together with one line. Returns the scan, or None when skipped."""
    policy, root = cfg.DATA.CHECK_IMAGES, cfg.DATA.TRAIN_DIR
    main = dist is None or dist.is_main
    if policy == "never" or (policy == "auto" and len(files) > AUTO_SCAN_LIMIT):
        if main and policy == "auto":
            print(f"image check skipped: {len(files)} images in DATA.TRAIN_DIR, over {AUTO_SCAN_LIMIT:,} "
                  "(DATA.CHECK_IMAGES always runs it; an unreadable image will stop training by name)", flush=True)
        return None
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    scan = scan_files(files[rank::world], cfg.DATA.NUM_WORKERS)
    if world > 1:
        shares: List[List[Tuple[str, str, str]]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(shares, scan.problems)
        scan.problems = sorted(p for share in shares for p in share)
    if scan.problems:
        path, kind, detail = scan.problems[0]
        raise UserError(f"DATA.TRAIN_DIR {root}: {len(scan.problems)} of {len(files)} images cannot be used, "
                        f"first {path}: {kind} ({detail}); run `simsiam-transfer data check --images {root}` "
                        "for the list, then remove or fix them")
    if main:
        print(f"checked {len(files)} images in DATA.TRAIN_DIR in {scan.seconds:.1f} s "
              f"({scan.workers} worker(s)): all decode", flush=True)
    return scan


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


class TwoViewDataset(torch.utils.data.Dataset):
    """Unlabeled images -> (view1, view2, index); the index serves the Sec. 5.2 target memory.
    ``as_tensor``: the transform gets a uint8 (3, H, W) tensor, converted once for both views."""

    def __init__(self, root, transform, as_tensor=False):
        self.files = list_images(root)
        self.transform = transform
        self.min_side = draft_side(transform)
        self.as_tensor = as_tensor

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        img = open_rgb(self.files[index], self.min_side)
        if self.as_tensor:
            img = pil_to_tensor(img)
        return self.transform(img), self.transform(img), index


class LabeledFolder(torch.utils.data.Dataset):
    """ImageFolder layout ``root/<class>/<image>`` for the kNN monitor and the linear probe."""

    def __init__(self, root, transform, key="DATA.KNN_TRAIN_DIR", classes=None):
        root = Path(root)
        found = self.class_names(root, key)
        self.classes = classes or found
        self.samples = [(f, i) for i, c in enumerate(self.classes) if (root / c).is_dir()
                        for f in list_images(root / c, key)]
        self.transform = transform
        self.min_side = draft_side(transform)

    @staticmethod
    def class_names(root, key):
        """The sorted class sub-folders of ``root`` (ImageFolder's order), or one line naming ``key``."""
        root = Path(root) if root else None
        if root is None or not root.is_dir():
            raise UserError(f"{key} {root or '(empty)'}: not a folder; expected <root>/<class>/<image> sub-folders")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"{key} {root}: no class sub-folders; expected <root>/<class>/<image>")
        return classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(open_rgb(path, self.min_side)), label
