"""``simsiam-transfer data check``: validate a VOC root, a COCO json, or a pretraining image folder.

Problems are grouped by kind with counts and the first offending records (file, image id,
annotation id, line); the exit status is 2 when any error is found, 0 otherwise. Image sizes
are read from file headers (nothing decoded); ``--images`` decodes every file.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from detection.voc import VOC_CLASSES, parse_annotation, read_split_lines, split_path
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError
from simsiam_transfer.images import check_image_folder, image_size, parallel_map

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


def _box_problem(box, width, height, area_box=None):
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


def _check_sizes(report, entries, workers):
    """Compare header sizes with the real images (read from each file's header, nothing decoded).

    ``entries``: ``(image path, (width, height) claimed, where)``; missing files are reported elsewhere.
    """
    entries = [e for e in entries if Path(e[0]).is_file()]
    results = parallel_map(image_size, [str(e[0]) for e in entries], workers, "reading image sizes")
    for (path, claimed, where), (size, problem) in zip(entries, results):
        if problem is not None:
            report.add(problem[0], f"{path}: {problem[1]}")
        elif tuple(size) != tuple(int(c) for c in claimed):
            report.add("header size differs from the image",
                       f"{where}: says {int(claimed[0])}x{int(claimed[1])}, {path} is {size[0]}x{size[1]}")


def check_voc(root, splits=None, classes=VOC_CLASSES, workers=0):
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
    sizes, checked = [], set()
    for split in splits:
        split_file = split_path(root, split)
        if not split_file.is_file():
            report.add("missing split file", split_file)
            continue
        try:
            entries = read_split_lines(root, split)
        except UserError as exc:
            report.add("unreadable split file", exc)
            continue
        report.counts[f"{split} images"] = len(entries)
        if not entries:
            report.add("empty split", split_file)
        first_line = {}
        for number, file_id in entries:
            if file_id in first_line:
                report.add("duplicate image id in split",
                           f"{split_file}: line {number}: {file_id} (also line {first_line[file_id]})")
                continue
            first_line[file_id] = number
            if file_id in checked:
                continue  # an image in two splits (trainval and train) is checked once
            checked.add(file_id)
            image = root / "JPEGImages" / f"{file_id}.jpg"
            if not image.is_file():
                report.add("missing image", image)
            xml_path = root / "Annotations" / f"{file_id}.xml"
            if not xml_path.is_file():
                report.add("missing annotation", xml_path)
                continue
            try:
                width, height, objects = parse_annotation(xml_path)
            except UserError as exc:
                report.add("malformed XML", exc)
                continue
            sizes.append((image, (width, height), f"{xml_path}: <size>"))
            report.counts["objects"] += len(objects)
            for obj in objects:
                where = f"{xml_path}: line {obj['line']}: object {obj['name']!r}"
                if obj["name"] not in classes:
                    report.add("unknown class", where)
                x0, y0, x1, y1 = obj["box"]
                in_file = (x0 + 1, y0 + 1, x1, y1)  # xmin == xmax there is a line, not a box
                problem = _box_problem(obj["box"], width, height, area_box=in_file)
                if problem:
                    report.add(problem, f"{where}: (xmin, ymin, xmax, ymax) = ({', '.join(f'{v:g}' for v in in_file)})")
    _check_sizes(report, sizes, workers)
    return report


def _segmentation_problem(segm):
    """Why a COCO ``segmentation`` would break training, or None (polygons or an RLE dict are fine)."""
    if isinstance(segm, str):
        return "segmentation is a string", "expected a list of polygons or an RLE dict"
    if isinstance(segm, dict):
        if not {"counts", "size"} <= set(segm):
            return "malformed segmentation", "an RLE dict needs 'counts' and 'size'"
        return None
    if not isinstance(segm, list):
        return "malformed segmentation", f"a {type(segm).__name__}, expected a list of polygons or an RLE dict"
    for index, polygon in enumerate(segm):
        if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) for v in polygon):
            return "malformed segmentation", f"polygon {index} is not a list of numbers"
        if len(polygon) % 2:
            return "polygon with an odd number of values", f"polygon {index} has {len(polygon)} values"
        if len(polygon) < 6:
            return "polygon with fewer than 3 points", f"polygon {index} has {len(polygon)} values"
    return None


def _inside(path, root):
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def check_coco(json_path, image_root, workers=0):
    json_path, image_root = Path(json_path), Path(image_root)
    report = Report(f"COCO {json_path}")
    try:
        doc = json.loads(json_path.read_text())
    except OSError as exc:
        report.add("unreadable json", f"{json_path}: {exc.strerror}")
        return report
    except UnicodeDecodeError:
        report.add("malformed JSON", f"{json_path}: not UTF-8 text")
        return report
    except json.JSONDecodeError as exc:
        report.add("malformed JSON", f"{json_path}: {exc}")
        return report
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        report.add("malformed JSON", f"{json_path}: needs lists 'images', 'annotations', 'categories'")
        return report
    images, sizes = {}, []
    for index, img in enumerate(doc["images"]):
        try:
            image_id, file_name = img["id"], str(img["file_name"])
            width, height = float(img["width"]), float(img["height"])
        except (KeyError, TypeError, ValueError):
            report.add("malformed image entry", f"{json_path}: images[{index}]: {str(img)[:80]}")
            continue
        where = f"{json_path}: image id {image_id}"
        if image_id in images:
            report.add("duplicate image id", f"{where}: {file_name} and {images[image_id][0]} (one would be dropped)")
            continue
        images[image_id] = (file_name, width, height)
        path = image_root / file_name
        if not _inside(path, image_root):
            report.add("file_name outside the image root", f"{where}: {file_name} is not under {image_root}")
        elif not path.is_file():
            report.add("missing image", f"{path} ({where})")
        else:
            sizes.append((path, (width, height), where))
    categories, names = set(), {}
    for index, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            report.add("malformed category", f"{json_path}: categories[{index}]: {str(cat)[:80]}")
            continue
        if cat["id"] in categories:
            report.add("duplicate category id", f"{json_path}: category id {cat['id']}")
        categories.add(cat["id"])
        if cat["name"] in names:
            report.add("duplicate category name",
                       f"{json_path}: category {cat['name']!r} has ids {names[cat['name']]} and {cat['id']}")
        names.setdefault(cat["name"], cat["id"])
    report.counts["images"] = len(images)
    report.counts["annotations"] = len(doc["annotations"])
    report.counts["categories"] = len(categories)
    if not images:
        report.add("empty split", f"{json_path}: no images")
    annotation_ids = set()
    for index, ann in enumerate(doc["annotations"]):
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image = images.get(ann["image_id"])
            category = ann["category_id"]
        except (KeyError, TypeError, ValueError):
            report.add("malformed annotation", f"{json_path}: annotations[{index}]: {str(ann)[:80]}")
            continue
        where = f"{json_path}: annotation id {ann.get('id')} (image id {ann['image_id']})"
        if ann.get("id") in annotation_ids:
            report.add("duplicate annotation id", where)
        annotation_ids.add(ann.get("id"))
        if image is None:
            report.add("annotation of unknown image", where)
            continue
        if category not in categories:
            report.add("unknown class", f"{where}: category {category}")
        if "segmentation" in ann:
            problem = _segmentation_problem(ann["segmentation"])
            if problem:
                report.add(problem[0], f"{where}: {problem[1]}")
        problem = _box_problem((x, y, x + w, y + h), image[1], image[2])
        if problem:
            report.add(problem, f"{where} on {image[0]}: bbox {[x, y, w, h]}")
    _check_sizes(report, sizes, workers)
    return report


def check_images(root, workers=0):
    scan = check_image_folder(root, workers)
    report = Report(f"images {root}")
    report.counts["images"] = scan.files
    for path, kind, detail in scan.problems:
        report.add(kind, f"{path}: {detail}")
    print(f"decoded {scan.files} images in {scan.seconds:.1f} s on {max(scan.workers, 1)} process(es)")
    return report


def data_check_command(args):
    if sum(bool(x) for x in (args.voc, args.coco, args.images)) != 1:
        raise UserError("give exactly one of --voc ROOT, --coco JSON --image-root DIR, or --images DIR")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0 checks in this process), got {args.workers}")
    if args.json_out:
        atomic.check_output_file(args.json_out, "--json")
    if args.voc:
        classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else VOC_CLASSES
        splits = args.split.split(",") if args.split else None
        report = check_voc(args.voc, splits, classes, args.workers)
    elif args.coco:
        if not args.image_root:
            raise UserError("--coco needs --image-root DIR (the folder its file_name entries are relative to)")
        report = check_coco(args.coco, args.image_root, args.workers)
    else:
        report = check_images(args.images, args.workers)
    report.print()
    if args.json_out:
        atomic.write_json(args.json_out, report.as_dict())
    return 0 if report.ok else 2
