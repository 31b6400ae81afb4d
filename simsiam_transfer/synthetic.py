"""Deterministic generated datasets with real image structure, written in the real on-disk layouts.

Each scene is a crop of a real photograph or texture shipped inside scikit-image (``skimage.data``),
re-coloured and re-lit, cluttered with textured distractor strokes, with 1..max_objects objects pasted
on it. A class differs from the others in shape AND in texture (``CLASS_TEXTURES``); object colours,
scale, rotation, lighting, shadows and overlap vary at random, so neither colour nor size gives the
class away. ``simsiam-transfer data make-synthetic --out DIR`` writes::

    DIR/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{train,val,trainval,test}.txt}
    DIR/coco/annotations/instances_{train,val}.json   DIR/coco/{train,val}/*.jpg
    DIR/unlabeled/*.jpg                                (pretraining images, no labels)
    DIR/labeled/{train,val}/<class>/*.jpg              (one main object per image: kNN / linear probe)
    DIR/datasets.yaml                                  (dataset catalog for the sets above)

Every image has its own random stream (seed, split, index), so the same seed gives byte-identical files
whatever the number of worker processes.
"""

import json
import math
import os
from pathlib import Path
from typing import Dict, List
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw
from skimage import data

from simsiam_transfer.atomic import atomic_dir, check_output_dir
from simsiam_transfer.catalog import write_catalog as write_catalog_file
from simsiam_transfer.errors import UserError
from simsiam_transfer.stopping import worker_pool

CLASSES = ("disk", "square", "triangle")
VOC_NAME = "synthetic_voc"
# Each class has its own shape and its own surface (grey textures from skimage.data).
CLASS_TEXTURES = {"disk": "gravel", "square": "brick", "triangle": "grass"}
# Scene sources: colour photographs and grey images (re-coloured at random) from skimage.data.
COLOR_SCENES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
GRAY_SCENES = ("camera", "coins", "moon", "page", "text", "clock", "cell")
SPLIT_CODES = {"voc_trainval": 1, "voc_test": 2, "coco_train": 3, "coco_val": 4, "unlabeled": 5,
               "labeled_train": 6, "labeled_val": 7}

_SOURCES: Dict[str, np.ndarray] = {}


def texture_sources() -> Dict[str, np.ndarray]:
    """name -> uint8 array (H, W) or (H, W, 3), loaded once per process from the installed skimage."""
    if not _SOURCES:
        for name in COLOR_SCENES + GRAY_SCENES + tuple(CLASS_TEXTURES.values()):
            _SOURCES[name] = np.ascontiguousarray(getattr(data, name)())
    return _SOURCES


def _crop(rng, src, out, frac):
    """A random square crop covering ``frac`` of the source's short side, rotated by k*90 deg, resized."""
    h, w = src.shape[:2]
    side = max(8, min(h, w, int(frac * min(h, w))))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = np.rot90(src[y:y + side, x:x + side], int(rng.integers(4)))
    img = Image.fromarray(np.ascontiguousarray(patch)).resize((out, out), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _colorize(rng, gray):
    """Grey texture -> colour: a random base colour modulated by the normalised texture."""
    g = (gray - gray.mean()) / (gray.std() + 1e-3)
    base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    tint = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    return np.clip(base + float(rng.uniform(0.12, 0.25)) * g[..., None] * tint, 0.0, 1.0)


def _surface(rng, name, size, frac):
    src = texture_sources()[name]
    patch = _crop(rng, src, size, frac)
    if patch.ndim == 2:
        return _colorize(rng, patch)
    return np.clip(patch * rng.uniform(0.7, 1.3, 3).astype(np.float32), 0.0, 1.0)


def _mask(size, draw_fn):
    """Anti-aliased mask in [0, 1]: drawn at 2x and box-filtered down."""
    big = Image.new("L", (2 * size, 2 * size), 0)
    draw_fn(ImageDraw.Draw(big), 2.0)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _shape_polygon(kind, cx, cy, r, angle):
    n = {"disk": 32, "square": 4, "triangle": 3}[kind]
    return [(cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
            for i in range(n)]


def _paste(canvas, mask, surface, shade=1.0):
    m = mask[..., None]
    canvas *= 1.0 - m
    canvas += m * surface * shade


def _background(rng, size):
    names = COLOR_SCENES + GRAY_SCENES
    canvas = _surface(rng, names[int(rng.integers(len(names)))], size, rng.uniform(0.25, 0.9))
    if rng.random() < 0.3:  # a second scene blended in: more varied statistics
        other = _surface(rng, names[int(rng.integers(len(names)))], size, rng.uniform(0.25, 0.9))
        canvas = 0.6 * canvas + 0.4 * other
    # Clutter: textured strokes and elongated ellipses; some wear a class texture, so texture alone
    # does not give the class away.
    for _ in range(int(rng.integers(2, 7))):
        if rng.random() < 0.3:
            tex = CLASS_TEXTURES[CLASSES[int(rng.integers(len(CLASSES)))]]
        else:
            tex = names[int(rng.integers(len(names)))]
        surface = _surface(rng, tex, size, rng.uniform(0.1, 0.5))
        cx, cy = rng.uniform(0, size, 2)
        length, angle = rng.uniform(0.15, 0.6) * size, rng.uniform(0, math.pi)
        dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
        if rng.random() < 0.5:
            width = float(rng.uniform(0.02, 0.06) * size)

            def stroke(d, s, a=(cx - dx, cy - dy, cx + dx, cy + dy), w=width):
                d.line([v * s for v in a], fill=255, width=max(1, int(w * s)))
            mask = _mask(size, stroke)
        else:
            minor = float(rng.uniform(0.15, 0.4) * length / 2)
            pts = [(cx + dx * math.cos(t) - minor * math.sin(angle) * math.sin(t),
                    cy + dy * math.cos(t) + minor * math.cos(angle) * math.sin(t))
                   for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
            mask = _mask(size, lambda d, s, p=pts: d.polygon([(x * s, y * s) for x, y in p], fill=255))
        _paste(canvas, mask, surface, float(rng.uniform(0.7, 1.2)))
    return canvas


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_scene(rng, size, max_objects, min_objects=1, classes=CLASSES, radius=(0.09, 0.26), central=False):
    """An RGB image of ``size`` px and its objects (name, polygon, box, difficult)."""
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)
    objects, masks = [], []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        kind = classes[int(rng.integers(len(classes)))]
        for _attempt in range(10):  # avoid near-duplicate boxes; overlap stays possible
            r = float(rng.uniform(*radius) * size)
            lo, hi = (0.3 * size, 0.7 * size) if central else (0.8 * r, size - 0.8 * r)
            cx, cy = (float(v) for v in rng.uniform(lo, hi, 2))
            angle = float(rng.uniform(0, 2 * math.pi))
            poly = [(min(max(x, 0.0), size - 1.0), min(max(y, 0.0), size - 1.0))
                    for x, y in _shape_polygon(kind, cx, cy, r, angle)]
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            box = (min(xs), min(ys), max(xs), max(ys))
            if all(_iou(box, o["box"]) < 0.4 for o in objects):
                break
        mask = _mask(size, lambda d, s, p=poly: d.polygon([(x * s, y * s) for x, y in p], fill=255))
        # A soft drop shadow, then the object: its own texture, colour and lighting gradient.
        off = rng.integers(1, max(2, size // 32) + 1, 2)
        shadow = np.roll(mask, tuple(int(v) for v in off), axis=(0, 1))
        canvas *= 1.0 - 0.45 * shadow[..., None]
        surface = _surface(rng, CLASS_TEXTURES[kind], size, rng.uniform(0.15, 0.5))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-6
        light = float(rng.uniform(0.7, 1.3)) * (1.0 + float(rng.uniform(0.0, 0.8)) *
                                                (direction[0] * xx + direction[1] * yy))
        _paste(canvas, mask, surface, light[..., None])
        owner[mask > 0.5] = len(objects)
        masks.append(mask > 0.5)
        objects.append({"name": kind, "polygon": poly, "box": box, "difficult": 0})
    for i, (obj, m) in enumerate(zip(objects, masks)):
        visible = float((owner[m] == i).mean()) if m.any() else 0.0
        # VOC convention: heavily occluded or tiny objects are "difficult" (ignored by the VOC metric).
        obj["difficult"] = int(visible < 0.35 or (obj["box"][2] - obj["box"][0]) < 0.1 * size)
    # Global lighting: gain, a linear illumination gradient, and sensor noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    direction = rng.normal(size=2)
    gain = float(rng.uniform(0.6, 1.25)) * (1.0 + float(rng.uniform(0, 0.6)) * (direction[0] * xx + direction[1] * yy))
    canvas = canvas * gain[..., None] + rng.normal(0, 0.02, canvas.shape).astype(np.float32)
    img = Image.fromarray((np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8))
    return img, objects


def _render(job):
    """Worker: draw one image from its own random stream, save it, return its objects."""
    seed, split, index, path, size, max_objects, cls = job
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    if cls is None:
        img, objects = _draw_scene(rng, size, max_objects)
    else:  # labeled: one large, roughly central object of the class
        img, objects = _draw_scene(rng, size, 1, classes=(cls,), radius=(0.2, 0.32), central=True)
    img.save(path, quality=92)
    return objects


def _render_all(jobs, workers):
    if workers <= 1 or len(jobs) < 32:
        return [_render(j) for j in jobs]
    # spawn: safe when the caller already runs threaded libraries (torch) in this process.
    with worker_pool("spawn", workers) as pool:
        return pool.map(_render, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


def _voc_xml(file_id, size, objects):
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    sz = ET.SubElement(root, "size")
    for tag, val in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(val)
    for obj in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = obj["name"]
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = str(obj["difficult"])
        bb = ET.SubElement(o, "bndbox")
        x0, y0, x1, y1 = obj["box"]
        # VOC stores 1-based inclusive pixel indices.
        for tag, val in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(bb, tag).text = str(int(round(val)))
    return ET.tostring(root, encoding="unicode")


def write_voc(root, seed, num_trainval, num_test, size, max_objects, workers=1):
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = {}
    for split, count in (("trainval", num_trainval), ("test", num_test)):
        ids[split] = [f"{split[:2]}{i:05d}" for i in range(count)]
        jobs = [(seed, f"voc_{split}", i, str(voc / "JPEGImages" / f"{fid}.jpg"), size, max_objects, None)
                for i, fid in enumerate(ids[split])]
        for fid, objects in zip(ids[split], _render_all(jobs, workers)):
            (voc / "Annotations" / f"{fid}.xml").write_text(_voc_xml(fid, size, objects))
    half = len(ids["trainval"]) // 2
    ids["train"], ids["val"] = ids["trainval"][:half], ids["trainval"][half:]
    for split, names in ids.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return voc


def write_coco(root, seed, num_train, num_val, size, max_objects, workers=1):
    coco = Path(root) / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    for split, count in (("train", num_train), ("val", num_val)):
        (coco / split).mkdir(exist_ok=True)
        names = [f"{split}{i:05d}.jpg" for i in range(count)]
        jobs = [(seed, f"coco_{split}", i, str(coco / split / n), size, max_objects, None)
                for i, n in enumerate(names)]
        images, annotations = [], []
        for i, (file_name, objects) in enumerate(zip(names, _render_all(jobs, workers))):
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                xs = [p[0] for p in obj["polygon"]]
                ys = [p[1] for p in obj["polygon"]]
                # Shoelace area of the polygon.
                area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CLASSES.index(obj["name"]) + 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(area, 2),
                    "segmentation": [[round(v, 2) for p in obj["polygon"] for v in p]],
                    "iscrowd": 0,
                })
        doc = {"images": images, "annotations": annotations, "categories": categories}
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return coco


def write_unlabeled(root, seed, count, size, max_objects, workers=1):
    folder = Path(root) / "unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    _render_all([(seed, "unlabeled", i, str(folder / f"img{i:05d}.jpg"), size, max_objects, None)
                 for i in range(count)], workers)
    return folder


def write_labeled(root, seed, per_class_train, per_class_val, size, workers=1):
    """ImageFolder layout; each image holds one large object of its class (for kNN and linear probes)."""
    base = Path(root) / "labeled"
    jobs = []
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for c, cls in enumerate(CLASSES):
            folder = base / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(seed, f"labeled_{split}", c * 100000 + i, str(folder / f"{cls}{i:04d}.jpg"), size, 1, cls)
                     for i in range(count)]
    _render_all(jobs, workers)
    return base


def write_catalog(root):
    """The catalog of the generated sets (paths relative to it), rendered from the catalog's schema."""
    entries = {f"{VOC_NAME}_{split}": {"format": "voc", "root": "VOCdevkit/VOC2007", "split": split,
                                       "classes": list(CLASSES), "year": 2007} for split in ("trainval", "test")}
    for split in ("train", "val"):
        entries[f"synthetic_coco_{split}"] = {"format": "coco", "json": f"coco/annotations/instances_{split}.json",
                                              "image_root": f"coco/{split}"}
    return write_catalog_file(Path(root) / "datasets.yaml", entries,
                              "Dataset catalog for the generated data (paths relative to this file).")


# Written last into every generated folder: the generator replaces a folder only when this mark is
# there and every file in it is one the mark lists, so a folder of the user's is never deleted.
MANIFEST = ".simsiam-transfer-generated.json"
GENERATOR = "simsiam-transfer data make-synthetic"
IMAGE_SIZES = (16, 2048)


def _generated_files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _manifest(out: Path):
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def is_generated(out) -> bool:
    """Whether ``out`` holds a finished generated dataset: its mark (written last), or the layout of a
    version that wrote no mark (such a folder is used as it is, but never replaced)."""
    out = Path(out)
    earlier = all((out / name).exists() for name in ("datasets.yaml", "VOCdevkit", "coco", "unlabeled", "labeled"))
    return _manifest(out) is not None or earlier


def _refuse_unless_generated(out: Path) -> None:
    """Refuse, before any work, an ``out`` that is not a new, empty or earlier generated folder."""
    if out.is_symlink():
        raise UserError(f"--out {out}: is a symbolic link; give the folder itself ({out.resolve()})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is an existing file; give a folder path")
    check_output_dir(out, "--out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = _manifest(out)
    listed = set(manifest["files"]) if manifest and isinstance(manifest.get("files"), list) else None
    if listed is None:
        raise UserError(f"--out {out}: holds files that data make-synthetic did not write (no {MANIFEST}); "
                        "nothing was changed: give a new or empty folder")
    foreign = [f for f in _generated_files(out) if f not in listed and f != MANIFEST]
    if foreign:
        raise UserError(f"--out {out}: {foreign[0]} ({len(foreign)} file(s) in all) was not written by data "
                        "make-synthetic; nothing was changed: move such files away or give a new folder")


def _check_sizes(image_size, counts: Dict[str, int]) -> None:
    lo, hi = IMAGE_SIZES
    if not isinstance(image_size, int) or not lo <= image_size <= hi:
        raise UserError(f"--image-size {image_size}: use an integer from {lo} to {hi} (pixels per side)")
    for flag, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} {value}: use an integer >= 1")


def make_synthetic(out, seed=0, num_train=300, num_test=200, num_unlabeled=4000, image_size=128,
                   max_objects=4, labeled_per_class=(100, 60), workers=None, num_labeled=None):
    """Write every generated dataset under ``out`` (replaced atomically as a whole, and only when ``out``
    is new, empty or generated earlier: see ``MANIFEST``).

    ``workers`` processes draw the images (default: up to 2, the CPU count); the bytes do not depend on it.
    ``num_labeled``: labeled training images per class (supervised pretraining, kNN), else ``labeled_per_class``.
    """
    out = Path(out)
    if num_labeled is not None:  # training images per class; the kNN / validation split keeps its size
        labeled_per_class = (num_labeled, labeled_per_class[1])
    _check_sizes(image_size, {"--num-train": num_train, "--num-test": num_test, "--num-unlabeled": num_unlabeled,
                              "--num-labeled": labeled_per_class[0],
                              "labeled images per class (val)": labeled_per_class[1]})
    _refuse_unless_generated(out)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    with atomic_dir(out) as tmp:
        write_voc(tmp, seed, num_train, num_test, image_size, max_objects, workers)
        write_coco(tmp, seed, num_train, num_test, image_size, max_objects, workers)
        write_unlabeled(tmp, seed, num_unlabeled, image_size, max_objects, workers)
        write_labeled(tmp, seed, labeled_per_class[0], labeled_per_class[1], image_size, workers)
        write_catalog(tmp)
        manifest = {"generator": GENERATOR, "seed": seed, "image_size": image_size, "num_train": num_train,
                    "num_test": num_test, "num_unlabeled": num_unlabeled,
                    "labeled_per_class": list(labeled_per_class), "files": _generated_files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out
