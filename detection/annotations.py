"""Value checks of detection annotations, shared by ``data check`` (which lists every problem) and the
fine-tune loaders (which refuse the first corrupt record, before anything is trained).

A COCO json is checked record by record, not only for its keys: ids are integers, sizes and box
coordinates are finite numbers, a box has four of them, a polygon has at least 3 finite points, and an
RLE decodes (pycocotools) to exactly its image's size. Each problem names its record by id (or by
its index when the id itself is bad); nothing here reads an image file.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from simsiam_transfer.errors import UserError

# Problems ``data check`` reports but the loaders let through: detectron2 drops such boxes itself, and
# real datasets hold a few of them.
REPORTED_ONLY = frozenset({"duplicate category name", "zero-area box", "inverted box", "box outside the image"})


class RecordError(UserError):
    """A corrupt record (or file), refused with one line; ``kind`` groups it in ``data check``'s report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def shown(value) -> str:
    """A JSON value as a message shows it: short, whatever its size or nesting."""
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, list):
        return f"a list of {len(value)} value(s)"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def number(value) -> Optional[float]:
    """``value`` as a finite float, or None (bool, string, NaN, Infinity, an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def number_problem(value, name: str) -> Optional[Tuple[str, str]]:
    """``(kind, detail)`` of a value that should be a finite number, or None."""
    if number(value) is not None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "non-finite number", f"{name} is {shown(value)}"
    return "not a number", f"{name} is {shown(value)}, not a number"


def is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def box_problem(box, width, height, area_box=None) -> Optional[str]:
    """Kind of problem of an XYXY box in a ``width`` x ``height`` image, or None; the area is judged
    on ``area_box`` when given (VOC's own 1-based inclusive coordinates)."""
    x0, y0, x1, y1 = box
    a0, b0, a1, b1 = area_box or box
    if a1 < a0 or b1 < b0:
        return "inverted box"
    if a1 == a0 or b1 == b0:
        return "zero-area box"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return "box outside the image"
    return None


def _polygon_problem(segm: list) -> Optional[Tuple[str, str]]:
    for index, polygon in enumerate(segm):
        if not isinstance(polygon, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
            return "malformed segmentation", f"polygon {index} is not a list of numbers"
        bad = next((i for i, v in enumerate(polygon) if number(v) is None), None)
        if bad is not None:
            return "non-finite number", f"polygon {index} value {bad} is {shown(polygon[bad])}"
        if len(polygon) % 2:
            return "polygon with an odd number of values", f"polygon {index} has {len(polygon)} values"
        if len(polygon) < 6:
            return "polygon with fewer than 3 points", f"polygon {index} has {len(polygon)} values"
    return None


def _rle_problem(segm: dict, height: int, width: int) -> Optional[Tuple[str, str]]:
    """An RLE must decode to exactly the image's height x width (detectron2 stacks masks of that size)."""
    size, counts = segm["size"], segm["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(is_id(v) and v >= 0 for v in size)):
        return "malformed segmentation", f"RLE size is {shown(size)}, expected [height, width]"
    if list(size) != [height, width]:
        return "undecodable RLE segmentation", f"RLE size {size} is not the image's [height, width] {[height, width]}"
    if isinstance(counts, list):
        if not all(is_id(c) and c >= 0 for c in counts):
            return "undecodable RLE segmentation", "RLE counts are not all integers >= 0"
        if sum(counts) != height * width:
            return ("undecodable RLE segmentation",
                    f"RLE counts cover {sum(counts)} pixels, the {height}x{width} image has {height * width}")
        return None
    if not isinstance(counts, str):
        return "malformed segmentation", f"RLE counts are {shown(counts)}, expected a list or a string"
    limit = Image.MAX_IMAGE_PIXELS or 2**28
    if height * width > limit:
        return "undecodable RLE segmentation", f"RLE of {height}x{width} pixels is over the image size limit"
    try:
        rle = {"size": size, "counts": counts.encode("ascii")}
        mask = mask_util.decode(rle)
    except (ValueError, UnicodeEncodeError) as exc:
        return "undecodable RLE segmentation", f"pycocotools cannot decode its counts ({exc})"
    # decode() only refuses counts that run past the mask; ones that stop short leave garbage pixels.
    if mask_util.encode(np.asfortranarray(mask))["counts"] != rle["counts"]:
        return "undecodable RLE segmentation", f"RLE counts do not describe exactly a {height}x{width} mask"
    return None


def segmentation_problem(segm, height: int, width: int) -> Optional[Tuple[str, str]]:
    """``(kind, detail)`` of a COCO ``segmentation`` that would break training, or None."""
    if isinstance(segm, str):
        return "segmentation is a string", "expected a list of polygons or an RLE dict"
    if isinstance(segm, dict):
        if not {"counts", "size"} <= set(segm):
            return "malformed segmentation", "an RLE dict needs 'counts' and 'size'"
        return _rle_problem(segm, height, width)
    if not isinstance(segm, list):
        return "malformed segmentation", f"{shown(segm)}, expected a list of polygons or an RLE dict"
    return _polygon_problem(segm)


def read_coco_json(path) -> dict:
    """The parsed json, or a ``RecordError`` naming the file (unreadable, not JSON, nested too deep)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise RecordError("unreadable json", f"{path}: unreadable ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise RecordError("malformed JSON", f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise RecordError("malformed JSON", f"{path}: nested too deeply for Python's JSON parser") from None
    except ValueError as exc:  # JSONDecodeError, and integers of over 4300 digits
        raise RecordError("malformed JSON", f"{path}: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations",
                                                                                    "categories")):
        raise RecordError("malformed JSON", f"{path}: needs lists 'images', 'annotations', 'categories'")
    return doc


@dataclass
class CocoImage:
    file_name: str
    width: int
    height: int
    where: str


@dataclass
class CocoIndex:
    """What ``index_coco`` found: the usable images and categories, and every problem."""

    problems: List[Tuple[str, str]] = field(default_factory=list)
    images: Dict[int, CocoImage] = field(default_factory=dict)
    categories: Dict[int, str] = field(default_factory=dict)

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.problems.append((kind, f"{where}: {detail}" if detail else where))

    def corrupt(self) -> List[Tuple[str, str]]:
        return [p for p in self.problems if p[0] not in REPORTED_ONLY]


def _image(index: CocoIndex, json_path, position: int, img) -> None:
    where = f"{json_path}: images[{position}]"
    if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= set(img):
        index.add("malformed image entry", where, f"{shown(img)}; needs id, file_name, width, height")
        return
    if not is_id(img["id"]):
        index.add("malformed id", where, f"id is {shown(img['id'])}, not an integer")
        return
    where = f"{json_path}: image id {img['id']}"
    file_name = img["file_name"]
    if not isinstance(file_name, str) or not file_name:
        index.add("malformed image entry", where, f"file_name is {shown(file_name)}, not a file name")
        return
    for key in ("width", "height"):
        problem = number_problem(img[key], key)
        if problem is None and (number(img[key]) <= 0 or not float(img[key]).is_integer()):
            problem = "bad image size", f"{key} is {shown(img[key])}, not a whole number of pixels > 0"
        if problem:
            index.add(problem[0], where, problem[1])
            return
    if img["id"] in index.images:
        index.add("duplicate image id", where, f"{file_name} and {index.images[img['id']].file_name} "
                                               "(one would be dropped)")
        return
    index.images[img["id"]] = CocoImage(file_name, int(img["width"]), int(img["height"]), where)


def _categories(index: CocoIndex, json_path, categories: list) -> None:
    names: Dict[str, int] = {}
    for position, cat in enumerate(categories):
        where = f"{json_path}: categories[{position}]"
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            index.add("malformed category", where, shown(cat))
        elif not is_id(cat["id"]):
            index.add("malformed id", where, f"id is {shown(cat['id'])}, not an integer")
        elif not isinstance(cat["name"], str):
            index.add("malformed category", f"{json_path}: category id {cat['id']}",
                      f"name is {shown(cat['name'])}, not a string")
        elif cat["id"] in index.categories:
            index.add("duplicate category id", f"{json_path}: category id {cat['id']}")
        else:
            index.categories[cat["id"]] = cat["name"]
            if cat["name"] in names:
                index.add("duplicate category name", f"{json_path}: category {cat['name']!r} has ids "
                                                     f"{names[cat['name']]} and {cat['id']}")
            names.setdefault(cat["name"], cat["id"])


def _annotation_problem(ann: dict, image: CocoImage, categories) -> Optional[Tuple[str, str]]:
    if ann["category_id"] not in categories:
        return "unknown class", f"category {ann['category_id']}"
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        return "malformed bbox", f"bbox is {shown(bbox)}, expected [x, y, width, height]"
    for i, value in enumerate(bbox):
        problem = number_problem(value, f"bbox[{i}]")
        if problem:
            return problem[0], f"{problem[1]} (bbox {shown(bbox)})"
    if "area" in ann and number_problem(ann["area"], "area"):
        return number_problem(ann["area"], "area")
    crowd = ann.get("iscrowd", 0)
    if not isinstance(crowd, int) or crowd not in (0, 1):
        return "malformed annotation", f"iscrowd is {shown(crowd)}, expected 0 or 1"
    if ann.get("segmentation"):
        problem = segmentation_problem(ann["segmentation"], image.height, image.width)
        if problem:
            return problem
    x, y, w, h = (float(v) for v in bbox)
    kind = box_problem((x, y, x + w, y + h), image.width, image.height)
    return (kind, f"bbox {[x, y, w, h]} on {image.file_name}") if kind else None


def _annotations(index: CocoIndex, json_path, annotations: list) -> None:
    seen = set()
    for position, ann in enumerate(annotations):
        where = f"{json_path}: annotations[{position}]"
        if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox"} <= set(ann):
            index.add("malformed annotation", where, f"{shown(ann)}; needs id, image_id, category_id, bbox")
            continue
        bad_id = next((k for k in ("id", "image_id", "category_id") if not is_id(ann[k])), None)
        if bad_id:
            index.add("malformed id", where, f"{bad_id} is {shown(ann[bad_id])}, not an integer")
            continue
        where = f"{json_path}: annotation id {ann['id']} (image id {ann['image_id']})"
        if ann["id"] in seen:
            index.add("duplicate annotation id", where)
        seen.add(ann["id"])
        image = index.images.get(ann["image_id"])
        if image is None:
            index.add("annotation of unknown image", where)
            continue
        problem = _annotation_problem(ann, image, index.categories)
        if problem:
            index.add(problem[0], where, problem[1])


def index_coco(doc: dict, json_path) -> CocoIndex:
    """Check every record of a parsed COCO json (``read_coco_json``); image files are not looked at."""
    index = CocoIndex()
    for position, img in enumerate(doc["images"]):
        _image(index, json_path, position, img)
    _categories(index, json_path, doc["categories"])
    if not index.images:
        index.add("empty split", f"{json_path}: no images")
    _annotations(index, json_path, doc["annotations"])
    return index
