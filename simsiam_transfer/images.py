"""Image files checked before a run costs anything: empty, not an image, oversize, or not decodable.

One scan serves ``data check --images DIR`` and the check ``pretrain`` runs before it writes
``OUTPUT_DIR``; training opens every image through ``open_rgb``, which refuses the same files by
name. Oversize means more pixels than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
89.5 Mpx by default): such a file is refused from its header, before anything is decoded.
"""

import dataclasses
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from simsiam_transfer.errors import UserError
from simsiam_transfer.stopping import worker_pool

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}
# pretrain scans folders up to this many images by default (DATA.CHECK_IMAGES auto); see docs/reliability.md.
AUTO_SCAN_LIMIT = 50_000


class UnreadableImage(UserError):
    """An image that cannot be used; one line naming the file, also when raised in a loader worker."""

    def __init__(self, message):
        # DataLoader re-raises a worker's error as Type("Caught ... <traceback>"): keep the original line.
        lines = str(message).strip().splitlines()
        if len(lines) > 1:
            message = lines[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def list_images(root, key: str = "DATA.TRAIN_DIR") -> List[Path]:
    """The image files under ``root`` (recursive, by extension), sorted; refuses an empty folder."""
    root = Path(root) if root else None
    if root is None or not root.is_dir():
        raise UserError(f"{key} {str(root) if root else '(empty)'}: not a folder; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{key} {root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    return files


def _bomb_text(pixels: int) -> str:
    return (f"{pixels:,} pixels, over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} "
            "(PIL Image.MAX_IMAGE_PIXELS)")


def _oversize(size: Tuple[int, int]) -> Optional[str]:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        return f"{size[0]}x{size[1]}: {_bomb_text(size[0] * size[1])}"
    return None


def _open_checked(path, decode: bool, mode: Optional[str] = None, min_side: int = 0):
    """Open ``path``: its size from the header, or decoded fully (``decode``), or converted to ``mode``
    (a JPEG decoded at the smallest DCT scale whose sides stay >= ``min_side``).

    Raises ``_Problem(kind, detail)`` for anything a training run could not use.
    """
    try:
        if os.path.getsize(path) == 0:
            raise _Problem("empty file", "0 bytes")
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; such a file is refused like a bigger one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            try:
                too_big = _oversize(img.size)
                if too_big:
                    raise _Problem("oversize image", too_big)
                if mode is not None:
                    if min_side and img.format == "JPEG":
                        img.draft(mode, (min_side, min_side))  # DCT-domain downscale: most of the decode time
                    return img.convert(mode)
                if decode:
                    # JPEG decodes at 1/8 scale here: every byte is still read, a tenth of the work.
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
                return _oriented_size(img)
            finally:
                img.close()
    except _Problem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses over twice its limit inside open(); its message holds the pixel count.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise _Problem("oversize image", _bomb_text(int(pixels.group(1))) if pixels else str(exc)) from None
    except UnidentifiedImageError:
        raise _Problem("not an image", "no image format recognises its content") from None
    except FileNotFoundError:
        raise _Problem("missing image", "file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise _Problem("unreadable image", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                       .rstrip(": ")) from None


def _oriented_size(img) -> Tuple[int, int]:
    """Size after the EXIF orientation, as detectron2's reader sees it (it transposes before checking)."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the stored size
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


class _Problem(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail


def image_problem(path) -> Optional[Tuple[str, str]]:
    """``None`` for a usable image, else ``(kind, detail)``; decodes the whole file."""
    try:
        _open_checked(path, decode=True)
    except _Problem as problem:
        return problem.kind, problem.detail
    return None


def image_size(path) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[str, str]]]:
    """``((width, height), None)`` read from the header only (nothing decoded), or ``(None, problem)``."""
    try:
        return _open_checked(path, decode=False), None
    except _Problem as problem:
        return None, (problem.kind, problem.detail)


def open_rgb(path, min_side: int = 0) -> Image.Image:
    """The decoded RGB image for training (see ``_open_checked`` for ``min_side``); any problem stops
    the run with one line naming the file."""
    try:
        return _open_checked(path, decode=True, mode="RGB", min_side=min_side)
    except _Problem as problem:
        raise UnreadableImage(f"{path}: {problem.kind} ({problem.detail}); remove or replace it "
                              f"(`simsiam-transfer data check --images {Path(path).parent}` lists every bad file)") from None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(fn: Callable, items: Sequence, workers: int, desc: str) -> list:
    """``[fn(x) for x in items]`` over ``workers`` processes (0 = here), in order, with a progress bar on a TTY."""
    bar = dict(total=len(items), desc=desc, unit="file", disable=None, leave=False, dynamic_ncols=True)
    if workers <= 0 or len(items) < 64:
        return [fn(x) for x in tqdm(items, **bar)]
    chunk = max(1, min(256, len(items) // (workers * 8)))
    with worker_pool("fork", workers) as pool:
        return list(tqdm(pool.imap(fn, items, chunksize=chunk), **bar))


@dataclasses.dataclass
class ImageScan:
    """What a scan found: file count, ``(path, kind, detail)`` per bad file, and its duration."""

    files: int
    problems: List[Tuple[str, str, str]]
    seconds: float
    workers: int

    @property
    def ok(self) -> bool:
        return not self.problems


def scan_files(files: Iterable, workers: int) -> ImageScan:
    files = [str(f) for f in files]
    start = time.perf_counter()
    results = parallel_map(image_problem, files, workers, "checking images")
    problems = [(path, *result) for path, result in zip(files, results) if result is not None]
    return ImageScan(len(files), problems, round(time.perf_counter() - start, 3), workers)


def check_image_folder(root, workers: int = 0, key: str = "--images") -> ImageScan:
    """Decode every image under ``root`` on ``workers`` processes; the report lists bad files by path."""
    return scan_files(list_images(root, key), workers)
