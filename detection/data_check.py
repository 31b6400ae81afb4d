"""``simsiam-transfer data check``: validate a VOC root or a COCO json before any run.

Problems are grouped by kind with counts and the first offending files; the exit status is
2 when any error is found, 0 otherwise.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from detection.voc import VOC_CLASSES, parse_annotation
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

SHOW_FIRST = 5


class Report:
    def __init__(self, dataset):
        self.dataset = dataset
        self.problems = defaultdict(list)
        self.counts = defaultdict(int)

    def add(self, kind, where):
        self.problems[kind].append(str(where))

    @property
    def ok(self):
        return not self.problems

    def as_dict(self):
        return {"dataset": self.dataset, "ok": self.ok, "counts": dict(self.counts),
                "problems": {k: {"count": len(v), "first": v[:SHOW_FIRST]} for k, v in self.problems.items()}}

    def print(self, out=None):
        out = out or sys.stdout
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        print(f"{self.dataset}: {counts}", file=out)
        if self.ok:
            print("OK: no problems found", file=out)
        for kind, items in self.problems.items():
            print(f"ERROR {kind}: {len(items)}", file=out)
            for item in items[:SHOW_FIRST]:
                print(f"    {item}", file=out)


def _box_problem(box, width, height):
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        return "empty or inverted box"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return "box outside the image"
    return None


def check_voc(root, splits=None, classes=VOC_CLASSES):
    root = Path(root)
    report = Report(f"VOC {root}")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        if not (root / sub).is_dir():
            report.add("missing folder", root / sub)
    if not report.ok:
        return report
    if splits is None:
        splits = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        if not splits:
            report.add("no split files", root / "ImageSets" / "Main")
    for split in splits:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            report.add("missing split file", split_file)
            continue
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        report.counts[f"{split} images"] = len(ids)
        if not ids:
            report.add("empty split", split_file)
        for file_id in ids:
            if not (root / "JPEGImages" / f"{file_id}.jpg").is_file():
                report.add("missing image", root / "JPEGImages" / f"{file_id}.jpg")
            xml_path = root / "Annotations" / f"{file_id}.xml"
            if not xml_path.is_file():
                report.add("missing annotation", xml_path)
                continue
            try:
                width, height, objects = parse_annotation(xml_path)
            except UserError as exc:
                report.add("malformed XML", exc)
                continue
            report.counts["objects"] += len(objects)
            for obj in objects:
                if obj["name"] not in classes:
                    report.add("unknown class", f"{xml_path}: {obj['name']!r}")
                problem = _box_problem(obj["box"], width, height)
                if problem:
                    report.add(problem, f"{xml_path}: {obj['name']} {obj['box']}")
    return report


def check_coco(json_path, image_root):
    json_path, image_root = Path(json_path), Path(image_root)
    report = Report(f"COCO {json_path}")
    try:
        doc = json.loads(json_path.read_text())
    except OSError as exc:
        report.add("unreadable json", f"{json_path}: {exc.strerror}")
        return report
    except json.JSONDecodeError as exc:
        report.add("malformed JSON", f"{json_path}: {exc}")
        return report
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        report.add("malformed JSON", f"{json_path}: needs lists 'images', 'annotations', 'categories'")
        return report
    images = {}
    for img in doc["images"]:
        try:
            images[img["id"]] = (img["file_name"], float(img["width"]), float(img["height"]))
        except (KeyError, TypeError, ValueError):
            report.add("malformed image entry", f"{json_path}: {str(img)[:80]}")
    categories = {c.get("id") for c in doc["categories"] if isinstance(c, dict)}
    report.counts["images"] = len(images)
    report.counts["annotations"] = len(doc["annotations"])
    report.counts["categories"] = len(categories)
    if not images:
        report.add("empty split", f"{json_path}: no images")
    for file_name, _, _ in images.values():
        if not (image_root / file_name).is_file():
            report.add("missing image", image_root / file_name)
    for ann in doc["annotations"]:
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image = images.get(ann["image_id"])
            category = ann["category_id"]
        except (KeyError, TypeError, ValueError):
            report.add("malformed annotation", f"{json_path}: {str(ann)[:80]}")
            continue
        if image is None:
            report.add("annotation of unknown image", f"{json_path}: annotation {ann.get('id')}")
            continue
        if category not in categories:
            report.add("unknown class", f"{json_path}: annotation {ann.get('id')} category {category}")
        problem = _box_problem((x, y, x + w, y + h), image[1], image[2])
        if problem:
            report.add(problem, f"{json_path}: annotation {ann.get('id')} on {image[0]}: {[x, y, w, h]}")
    return report


def data_check_command(args):
    if bool(args.voc) == bool(args.coco):
        raise UserError("give exactly one of --voc ROOT or --coco JSON --image-root DIR")
    if args.voc:
        classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else VOC_CLASSES
        splits = args.split.split(",") if args.split else None
        report = check_voc(args.voc, splits, classes)
    else:
        if not args.image_root:
            raise UserError("--coco needs --image-root DIR (the folder its file_name entries are relative to)")
        report = check_coco(args.coco, args.image_root)
    report.print()
    if args.json_out:
        atomic.write_json(args.json_out, report.as_dict())
    return 0 if report.ok else 2
