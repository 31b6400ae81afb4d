"""SimSiam's augmentation after the crop, batched on the training device (``DATA.AUGMENT_ON device``).

Loader workers decode and take the official RandomResizedCrop (uint8), then draw every other random
parameter of the official pipeline (``pretrain.data.simsiam_augmentation``) from the same RNG streams,
in the same order and under the same conditions, and ship them beside the crop (``CropView``). The
device then applies colour jitter (its four ops in each sample's own order), grayscale, Gaussian blur,
flip and normalisation to the whole batch. Because the draws are the official ones, a seed gives the
same crops, factors, orders and coin flips on either path; only the arithmetic differs (float here,
uint8 with truncation in PIL; docs/loader.md lists the differences and tests/test_device_augment.py
bounds them). Worker seeding, resume and the k-step alternation's replay therefore need nothing new.
"""

import random
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms.v2 import functional as F2

# Columns of a view's parameter vector (float32, one row per view).
JITTER, ORDER, FACTORS, GRAYSCALE, SIGMA, FLIP = 0, slice(1, 5), slice(5, 9), 9, 10, 11
NUM_PARAMS = 12
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op ids (torchvision's fn_idx)
# ITU-R 601-2 luma, as PIL's convert("L") (used by the official grayscale, contrast and saturation).
LUMA = (0.299, 0.587, 0.114)


class CropView(NamedTuple):
    """One view as a loader worker ships it; the DataLoader collates a batch field by field."""

    image: torch.Tensor   # uint8 (3, H, W): the RandomResizedCrop, resized as the official pipeline does
    params: torch.Tensor  # float32 (NUM_PARAMS,): jitter on, op order, factors, grayscale, blur sigma (0 = off), flip


class Uint8ResizedCrop(transforms.RandomResizedCrop):
    """The official RandomResizedCrop (torchvision's draws, so the same RNG stream) of a uint8 (3, H, W) image,
    resized by torch's antialiased bilinear on uint8 (its vectorised path: within 1 level of PIL's resize,
    about 2.5x faster here)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self.get_params(pixels, self.scale, self.ratio)
        return F2.resized_crop(pixels, top, left, height, width, self.size, antialias=True)


class DrawViewParams:
    """The official pipeline's draws after its crop, in its order: ``RandomApply(ColorJitter)``'s coin, then
    ColorJitter's ``get_params`` (only if applied), ``RandomGrayscale``, ``RandomApply(blur)``'s coin and the
    blur's ``random.uniform`` sigma (only if applied), ``RandomHorizontalFlip``."""

    def __init__(self, jitter: Sequence[float], p_jitter: float, p_grayscale: float, p_blur: float,
                 sigma: Tuple[float, float], p_flip: float):
        self.jitter = transforms.ColorJitter(*jitter)
        self.p_jitter, self.p_grayscale, self.p_blur, self.sigma, self.p_flip = p_jitter, p_grayscale, p_blur, sigma, p_flip

    def draw(self) -> torch.Tensor:
        params = [0.0] * NUM_PARAMS
        if not self.p_jitter < torch.rand(1):  # RandomApply skips when p < rand
            j = self.jitter
            order, *factors = transforms.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            params[JITTER], params[ORDER], params[FACTORS] = 1.0, order.tolist(), factors
        params[GRAYSCALE] = float(torch.rand(1) < self.p_grayscale)
        if not self.p_blur < torch.rand(1):
            params[SIGMA] = random.uniform(*self.sigma)
        params[FLIP] = float(torch.rand(1) < self.p_flip)
        return torch.tensor(params)

    def __call__(self, crop: torch.Tensor) -> CropView:
        return CropView(crop, self.draw())


# -- batched ops on float images in [0, 1], shape (n, 3, H, W); factors shape (n,) -----------------------
def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance``: other + factor * (x - other), clipped to the valid range."""
    f = _per_sample(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns: RGB -> HSV, H + shift mod 1, HSV -> RGB (as torchvision's
    tensor ``adjust_hue``, per sample); greys keep their value."""
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)  # = value * saturation
    safe = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = hue + 6.0 * shift.view(-1, 1, 1)  # in sixths of a turn
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B of the closed-form HSV -> RGB
        k = torch.remainder(hue + n, 6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(channels, dim=1)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    return luma(x).expand_as(x).contiguous()


BLUR_PASSES = 3  # PIL's GaussianBlur: three extended box blurs whose variance is sigma^2


def box_blur_radius(sigma: torch.Tensor, passes: int = BLUR_PASSES) -> Tuple[torch.Tensor, torch.Tensor]:
    """(integer part l, fraction a) of the extended box of each pass (Gwosdek et al. 2011, as PIL's
    ``_gaussian_blur_radius``): ``passes`` boxes of radius l + a have variance sigma^2."""
    var = sigma.double() ** 2 / passes
    l = torch.floor((torch.sqrt(12.0 * var + 1.0) - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    return l, a


def box_kernels(sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """(n, 2 * reach + 1) per-sample weights of one pass: 1/(2(l+a)+1) on the 2l+1 inner taps,
    a times that on the two outer ones, zero beyond."""
    l, a = box_blur_radius(sigma)
    inner = 1.0 / (2 * (l + a) + 1)
    dist = torch.arange(-reach, reach + 1, device=sigma.device, dtype=torch.float64).abs()
    weights = torch.where(dist <= l.view(-1, 1), inner.view(-1, 1),
                          torch.where(dist == (l + 1).view(-1, 1), (a * inner).view(-1, 1), 0.0))
    return weights.float()


def max_reach(max_sigma: float) -> int:
    """Taps each side a pass needs for sigma up to ``max_sigma`` (2 for the official 2.0)."""
    return int(box_blur_radius(torch.tensor([max_sigma]))[0].item()) + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """PIL's Gaussian blur with a per-sample sigma (pixels): per axis ``BLUR_PASSES`` extended box passes,
    each clamping at the border as PIL does (edges replicated), in float without PIL's per-pass rounding."""
    n, c, h, w = x.shape
    kernel = box_kernels(sigma, reach).repeat_interleave(c, dim=0)  # (n * c, 2 * reach + 1)
    planes = x.reshape(1, n * c, h, w)
    for shape, pad in (((1, -1), (reach, reach, 0, 0)), ((-1, 1), (0, 0, reach, reach))):
        weight = kernel.view(n * c, 1, *shape)
        for _ in range(BLUR_PASSES):
            planes = F.conv2d(F.pad(planes, pad, mode="replicate"), weight, groups=n * c)
    return planes.view(n, c, h, w)


JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation,
              HUE: adjust_hue}


# -- the batch -------------------------------------------------------------------------------------------
def subsets(params: torch.Tensor) -> List[torch.Tensor]:
    """Host-side index lists, in the order they are applied: for each of the 4 jitter positions, the
    samples whose op at that position is brightness, contrast, saturation, hue; then grayscale, blur, flip."""
    jittered = params[:, JITTER] > 0
    order = params[:, ORDER].long()
    masks = [jittered & (order[:, pos] == op) for pos in range(4) for op in range(4)]
    masks += [params[:, GRAYSCALE] > 0, params[:, SIGMA] > 0, params[:, FLIP] > 0]
    return [m.nonzero().flatten() for m in masks]


class DeviceAugmentation:
    """``CropView`` batch (uint8 images, parameters) -> normalised float views on ``device``.

    Each op runs on the index subset of the samples that take it: the indices come from the host copy
    of the parameters and travel in one transfer, so nothing waits on the device.
    """

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float], max_sigma: float):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.reach = max_reach(max_sigma)

    @torch.no_grad()
    def __call__(self, views: CropView) -> torch.Tensor:
        images, params = views
        index_lists = subsets(params)
        flat = torch.cat(index_lists)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat_dev = flat.to(self.device, non_blocking=True)
        indices = flat_dev.split([len(i) for i in index_lists])
        factors = params.to(self.device, non_blocking=True)
        x = images.to(self.device, non_blocking=True).float().div_(255)
        for k, idx in enumerate(indices[:16]):
            op = k % 4
            self._apply(x, idx, lambda v, i, op=op: JITTER_OPS[op](v, factors[i, FACTORS.start + op]))
        gray, blur, flip = indices[16:]
        self._apply(x, gray, lambda v, i: to_grayscale(v))
        self._apply(x, blur, lambda v, i: gaussian_blur(v, factors[i, SIGMA], self.reach))
        self._apply(x, flip, lambda v, i: v.flip(-1))
        return x.sub_(self.mean).div_(self.std)

    @staticmethod
    def _apply(x: torch.Tensor, idx: torch.Tensor, fn) -> None:
        if len(idx):
            x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))
