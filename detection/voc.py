"""Pascal VOC reader: ``<root>/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}`` -> detectron2 dicts.

Semantics follow detectron2's own VOC loader (difficult objects are kept for training and
flagged; the evaluator ignores them at test time; 1-based pixel indices become 0-based
XYXY boxes), with an error naming the file for every malformed annotation.
"""

import math
import re
from pathlib import Path
from typing import List, Tuple
from xml.etree import ElementTree as ET

from detectron2.structures import BoxMode

from detection.annotations import RecordError, shown
from simsiam_transfer.errors import UserError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def split_path(root, split) -> Path:
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def read_split_lines(root, split) -> List[Tuple[int, str]]:
    """``(line number, image id)`` of each entry of ``ImageSets/Main/<split>.txt``."""
    path = split_path(root, split)
    if not path.is_file():
        raise UserError(f"{path}: split file missing; a VOC root needs ImageSets/Main/{split}.txt")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable split file ({type(exc).__name__})") from None
    return [(number, line.split()[0]) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_split(root, split) -> List[str]:
    return [file_id for _, file_id in read_split_lines(root, split)]


def _coordinate(xml_path, line, obj_name, tag, text) -> float:
    """A box coordinate: a finite number, or a ``RecordError`` naming the file, the line and the field."""
    where = f"{xml_path}: line {line}: object {obj_name!r}"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise RecordError("malformed XML", f"{where}: <{tag}> is {shown(text)}, not a number") from None
    if not math.isfinite(value):
        raise RecordError("non-finite number", f"{where}: <{tag}> is {shown(text)}; coordinates are finite "
                                               "pixel positions")
    return value


def parse_annotation(xml_path):
    """Return ``(width, height, [ {name, box (xyxy, 0-based), difficult, line} ])`` of one XML file."""
    try:
        text = Path(xml_path).read_bytes()
        tree = ET.ElementTree(ET.fromstring(text))
    except (ET.ParseError, OSError) as exc:
        raise RecordError("malformed XML", f"{xml_path}: malformed annotation XML ({exc})") from None
    # ElementTree keeps no line numbers; the n-th <object> tag's line names the record in reports.
    object_lines = [text.count(b"\n", 0, m.start()) + 1 for m in re.finditer(rb"<object[\s>]", text)]
    try:
        size = tree.find("size")
        width, height = int(size.find("width").text), int(size.find("height").text)
        if width <= 0 or height <= 0:
            raise RecordError("bad image size", f"{xml_path}: <size> is {width}x{height}; width and height are "
                                                "pixel counts > 0")
        objects = []
        for index, obj in enumerate(tree.findall("object")):
            line = object_lines[index] if index < len(object_lines) else None
            name = obj.find("name").text.strip()
            bnd = obj.find("bndbox")
            x0, y0, x1, y1 = (_coordinate(xml_path, line, name, tag, bnd.find(tag).text)
                              for tag in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult")
            objects.append({
                "name": name,
                "box": [x0 - 1.0, y0 - 1.0, x1, y1],
                "difficult": int(difficult.text) if difficult is not None else 0,
                "line": line,
            })
    except (AttributeError, TypeError, ValueError) as exc:
        raise RecordError("malformed XML", f"{xml_path}: annotation lacks a required field or has a non-number "
                                           f"({exc})") from None
    return width, height, objects


def load_voc_instances(root, split, class_names):
    """detectron2 dataset dicts for one VOC split (difficult objects kept, flagged)."""
    root = Path(root)
    dicts = []
    for file_id in read_split(root, split):
        xml_path = root / "Annotations" / f"{file_id}.xml"
        width, height, objects = parse_annotation(xml_path)
        annotations = []
        for obj in objects:
            if obj["name"] not in class_names:
                raise UserError(f"{xml_path}: class {obj['name']!r} is not in the dataset's class list")
            annotations.append({
                "category_id": class_names.index(obj["name"]),
                "bbox": obj["box"],
                "bbox_mode": BoxMode.XYXY_ABS,
                "difficult": obj["difficult"],
            })
        image = root / "JPEGImages" / f"{file_id}.jpg"
        if not image.is_file():
            raise UserError(f"{image}: image listed in ImageSets/Main/{split}.txt is missing; "
                            f"run `simsiam-transfer data check --voc {root}`")
        dicts.append({
            "file_name": str(image),
            "image_id": file_id,
            "height": height,
            "width": width,
            "annotations": annotations,
        })
    return dicts
