"""``simsiam-transfer data check``: validate a VOC root, a COCO json, or a pretraining image folder.

Problems are grouped by kind with counts and the first offending records (file, image id,
annotation id, line); the exit status is 2 when any error is found, 0 otherwise. Image sizes
are read from file headers (nothing decoded); ``--images`` decodes every file.
"""

import sys
from collections import defaultdict
from pathlib import Path

from detection.annotations import RecordError, box_problem, index_coco, read_coco_json
from detection.voc import VOC_CLASSES, parse_annotation, read_split_lines, split_path
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError, escape_controls
from simsiam_transfer.images import check_image_folder, image_size, parallel_map

SHOW_FIRST = 5


class Report:
    def __init__(self, dataset):
        self.dataset = dataset
        self.problems = defaultdict(list)
        self.counts = defaultdict(int)

    def add(self, kind, where):
        self.problems[kind].append(escape_controls(where))  # a hostile file name cannot forge a report line

    @property
    def ok(self):
        return not self.problems

    def as_dict(self):
        return {"dataset": self.dataset, "ok": self.ok, "counts": dict(self.counts),
                "problems": {k: {"count": len(v), "first": v[:SHOW_FIRST]} for k, v in self.problems.items()}}

    def print(self, out=None):
        out = out or sys.stdout
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        print(f"{escape_controls(self.dataset)}: {counts}", file=out)
        if self.ok:
            print("OK: no problems found", file=out)
        for kind, items in self.problems.items():
            print(f"ERROR {kind}: {len(items)}", file=out)
            for item in items[:SHOW_FIRST]:
                print(f"    {item}", file=out)


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
            except RecordError as exc:
                report.add(exc.kind, exc)
                continue
            sizes.append((image, (width, height), f"{xml_path}: <size>"))
            report.counts["objects"] += len(objects)
            for obj in objects:
                where = f"{xml_path}: line {obj['line']}: object {obj['name']!r}"
                if obj["name"] not in classes:
                    report.add("unknown class", where)
                x0, y0, x1, y1 = obj["box"]
                in_file = (x0 + 1, y0 + 1, x1, y1)  # xmin == xmax there is a line, not a box
                problem = box_problem(obj["box"], width, height, area_box=in_file)
                if problem:
                    report.add(problem, f"{where}: (xmin, ymin, xmax, ymax) = ({', '.join(f'{v:g}' for v in in_file)})")
    _check_sizes(report, sizes, workers)
    return report


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
        doc = read_coco_json(json_path)
    except RecordError as exc:
        report.add(exc.kind, exc)
        return report
    index = index_coco(doc, json_path)
    for kind, where in index.problems:
        report.add(kind, where)
    sizes = []
    for image in index.images.values():
        path = image_root / image.file_name
        if not _inside(path, image_root):
            report.add("file_name outside the image root", f"{image.where}: {image.file_name} is not under {image_root}")
        elif not path.is_file():
            report.add("missing image", f"{path} ({image.where})")
        else:
            sizes.append((path, (image.width, image.height), image.where))
    report.counts["images"] = len(index.images)
    report.counts["annotations"] = len(doc["annotations"])
    report.counts["categories"] = len(index.categories)
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
