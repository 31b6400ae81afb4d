"""Deterministic generated datasets of simple shapes, written in the real on-disk layouts.

``simsiam-transfer data make-synthetic --out DIR`` writes::

    DIR/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{train,val,trainval,test}.txt}
    DIR/coco/annotations/instances_{train,val}.json   DIR/coco/{train,val}/*.jpg
    DIR/unlabeled/*.jpg                                (pretraining images, no labels)
    DIR/labeled/{train,val}/<class>/*.jpg              (one shape per image: kNN / linear probe)
    DIR/datasets.yaml                                  (dataset catalog for the sets above)

The same seed always gives the same files.
"""

import json
import math
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

from simsiam_transfer.atomic import atomic_dir

CLASSES = ("disk", "square", "triangle")
VOC_NAME = "synthetic_voc"


def _shape_polygon(kind, cx, cy, r, angle):
    if kind == "disk":
        n = 16
    elif kind == "square":
        n = 4
    else:
        n = 3
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _draw_scene(rng, size, max_objects, min_objects=1, classes=CLASSES):
    """An image of ``size`` px with random shapes; returns the image and its objects."""
    background = tuple(int(c) for c in rng.integers(0, 110, 3))
    noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(np.clip(np.array(background, np.uint8) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        kind = classes[int(rng.integers(len(classes)))]
        r = float(rng.uniform(size * 0.1, size * 0.22))
        cx, cy = (float(v) for v in rng.uniform(r, size - r, 2))
        angle = float(rng.uniform(0, 2 * math.pi)) if kind != "disk" else 0.0
        poly = _shape_polygon(kind, cx, cy, r, angle)
        poly = [(min(max(x, 0.0), size - 1.0), min(max(y, 0.0), size - 1.0)) for x, y in poly]
        color = tuple(int(c) for c in rng.integers(130, 256, 3))
        draw.polygon(poly, fill=color)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        objects.append({
            "name": kind,
            "polygon": poly,
            "box": (min(xs), min(ys), max(xs), max(ys)),
            "difficult": int(rng.random() < 0.1),
        })
    return img, objects


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


def write_voc(root, rng, num_trainval, num_test, size, max_objects):
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = {"trainval": [], "test": []}
    for split, count in (("trainval", num_trainval), ("test", num_test)):
        for i in range(count):
            file_id = f"{split[:2]}{i:05d}"
            img, objects = _draw_scene(rng, size, max_objects)
            img.save(voc / "JPEGImages" / f"{file_id}.jpg", quality=95)
            (voc / "Annotations" / f"{file_id}.xml").write_text(_voc_xml(file_id, size, objects))
            ids[split].append(file_id)
    half = len(ids["trainval"]) // 2
    ids["train"], ids["val"] = ids["trainval"][:half], ids["trainval"][half:]
    for split, names in ids.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return voc


def write_coco(root, rng, num_train, num_val, size, max_objects):
    coco = Path(root) / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    for split, count in (("train", num_train), ("val", num_val)):
        (coco / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, objects = _draw_scene(rng, size, max_objects)
            file_name = f"{split}{i:05d}.jpg"
            img.save(coco / split / file_name, quality=95)
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


def write_unlabeled(root, rng, count, size, max_objects):
    folder = Path(root) / "unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, _ = _draw_scene(rng, size, max_objects)
        img.save(folder / f"img{i:05d}.jpg", quality=95)
    return folder


def write_labeled(root, rng, per_class_train, per_class_val, size):
    """ImageFolder layout; each image holds one shape of its class (for kNN and linear probes)."""
    base = Path(root) / "labeled"
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for cls in CLASSES:
            folder = base / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img, _ = _draw_scene(rng, size, 1, classes=(cls,))
                img.save(folder / f"{cls}{i:04d}.jpg", quality=95)
    return base


def write_catalog(root):
    text = (
        "# Dataset catalog for the generated data (paths relative to this file).\n"
        "synthetic_voc_trainval:\n  format: voc\n  root: VOCdevkit/VOC2007\n  split: trainval\n"
        f"  classes: [{', '.join(CLASSES)}]\n  year: 2007\n"
        "synthetic_voc_test:\n  format: voc\n  root: VOCdevkit/VOC2007\n  split: test\n"
        f"  classes: [{', '.join(CLASSES)}]\n  year: 2007\n"
        "synthetic_coco_train:\n  format: coco\n  json: coco/annotations/instances_train.json\n"
        "  image_root: coco/train\n"
        "synthetic_coco_val:\n  format: coco\n  json: coco/annotations/instances_val.json\n"
        "  image_root: coco/val\n"
    )
    (Path(root) / "datasets.yaml").write_text(text)


def make_synthetic(out, seed=0, num_train=48, num_test=24, num_unlabeled=256, image_size=128,
                   max_objects=3, labeled_per_class=(40, 20)):
    """Write every generated dataset under ``out`` (replaced atomically as a whole)."""
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as tmp:
        write_voc(tmp, rng, num_train, num_test, image_size, max_objects)
        write_coco(tmp, rng, num_train, num_test, image_size, max_objects)
        write_unlabeled(tmp, rng, num_unlabeled, image_size, max_objects)
        write_labeled(tmp, rng, labeled_per_class[0], labeled_per_class[1], image_size)
        write_catalog(tmp)
    return Path(out)
