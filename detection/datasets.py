"""Dataset names for fine-tuning: the standard VOC/COCO names under a data root, and a YAML catalog.

Standard names (resolved under ``--data-root`` or ``$DETECTRON2_DATASETS``, default ``datasets``)::

    voc_2007_trainval, voc_2007_test  -> <root>/VOC2007       (VOC07 11-point metric)
    voc_2012_trainval                 -> <root>/VOC2012
    coco_2017_train, coco_2017_val    -> <root>/coco/annotations/instances_{train,val}2017.json
                                         and <root>/coco/{train,val}2017/

They replace detectron2's built-in registrations of the same names, so VOC is read by
this project's reader (``detection.voc``). A catalog (``--datasets FILE``) adds or overrides
names. Its format (declared once, with its reader and writer, in ``simsiam_transfer.catalog``; paths
may be absolute or relative to the catalog file)::

    my_voc_trainval:
      format: voc            # <root>/JPEGImages, Annotations, ImageSets/Main/<split>.txt
      root: /data/VOCdevkit/VOC2007
      split: trainval
      classes: [cat, dog]    # order defines the class ids
      year: 2007             # optional; 2007 selects the VOC07 11-point metric (default 2007)
    my_coco_val:
      format: coco
      json: /data/coco/annotations/instances_val.json
      image_root: /data/coco/val
"""

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from detection.annotations import RecordError, index_coco, read_coco_json
from detection.voc import VOC_CLASSES, load_voc_instances
from simsiam_transfer.catalog import load_catalog
from simsiam_transfer.errors import UserError

STANDARD_VOC = {
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2007_test": ("VOC2007", "test", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
}
STANDARD_COCO = {
    "coco_2017_train": ("coco/annotations/instances_train2017.json", "coco/train2017"),
    "coco_2017_val": ("coco/annotations/instances_val2017.json", "coco/val2017"),
}


def resolve_data_root(data_root=None):
    return Path(data_root or os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


def standard_specs(data_root):
    root = resolve_data_root(data_root)
    specs = {}
    for name, (sub, split, year) in STANDARD_VOC.items():
        specs[name] = {"format": "voc", "root": root / sub, "split": split,
                       "classes": list(VOC_CLASSES), "year": year}
    for name, (json_file, image_root) in STANDARD_COCO.items():
        specs[name] = {"format": "coco", "json": root / json_file, "image_root": root / image_root}
    return specs


def _data_check_hint(json_file, image_root) -> str:
    return f"run `simsiam-transfer data check --coco {json_file} --image-root {image_root}`"


# (file, mtime, size) of the COCO jsons this process found sound: the pre-flight's check is not redone
# by an in-process worker's loader.
_SOUND_COCO = set()


def check_coco_file(json_file, image_root):
    """Refuse a COCO json with a corrupt record (``annotations.index_coco``) or a missing image: one line
    naming the record, before training; the geometry ``data check`` also reports is left to detectron2."""
    hint = _data_check_hint(json_file, image_root)
    try:
        stat = os.stat(json_file)
    except OSError as exc:
        raise UserError(f"{json_file}: unreadable ({exc.strerror}); {hint}") from None
    key = (os.path.realpath(json_file), stat.st_mtime_ns, stat.st_size, str(image_root))
    if key in _SOUND_COCO:
        return
    try:
        index = index_coco(read_coco_json(json_file), json_file)
    except RecordError as exc:
        kind = "malformed COCO json" if exc.kind == "malformed JSON" else exc.kind
        raise RecordError(exc.kind, f"{exc} ({kind}); {hint}") from None
    corrupt = index.corrupt()
    if corrupt:
        kind, where = corrupt[0]
        more = f", and {len(corrupt) - 1} more corrupt record(s)" if len(corrupt) > 1 else ""
        raise RecordError(kind, f"{where} ({kind}{more}); {hint}")
    for image in index.images.values():
        path = os.path.join(image_root, image.file_name)
        if not os.path.isfile(path):
            raise UserError(f"{path}: image listed in {json_file} is missing; {hint}")
    _SOUND_COCO.add(key)


def load_coco_instances(json_file, image_root, name):
    """detectron2's COCO loader, on a json ``check_coco_file`` found sound."""
    check_coco_file(json_file, image_root)
    try:
        return load_coco_json(json_file, image_root, name)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise UserError(f"{json_file}: malformed COCO json ({type(exc).__name__}: {str(exc)[:120]}); "
                        f"{_data_check_hint(json_file, image_root)}") from None


def check_dataset_contents(spec):
    """Read a dataset's annotations as its loader will, refusing the first corrupt record (pre-flight)."""
    if spec["format"] == "voc":
        try:
            load_voc_instances(spec["root"], spec["split"], list(spec["classes"]))
        except RecordError as exc:
            raise RecordError(exc.kind, f"{exc} ({exc.kind}); run `simsiam-transfer data check --voc {spec['root']} "
                                        f"--split {spec['split']}`") from None
    else:
        check_coco_file(str(spec["json"]), str(spec["image_root"]))


def _replace(name, loader, **metadata):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_spec(name, spec):
    if spec["format"] == "voc":
        root, split, classes = Path(spec["root"]), spec["split"], list(spec["classes"])
        _replace(name, lambda: load_voc_instances(root, split, classes),
                 thing_classes=classes, dirname=str(root), split=split,
                 year=int(spec.get("year", 2007)), evaluator_type="pascal_voc")
    else:
        json_file, image_root = str(spec["json"]), str(spec["image_root"])
        _replace(name, lambda: load_coco_instances(json_file, image_root, name),
                 json_file=json_file, image_root=image_root, evaluator_type="coco")


def register_datasets(data_root=None, catalog=None):
    """Register the standard names and every catalog entry; returns {name: spec}."""
    specs = standard_specs(data_root)
    if catalog:
        specs.update(load_catalog(catalog))
    for name, spec in specs.items():
        register_spec(name, spec)
    return specs


def check_dataset_names(names, specs, catalog=None):
    """Refuse unknown names and missing files before any training starts."""
    for name in names:
        if name not in specs:
            hint = f" or add it to {catalog}" if catalog else " or declare it in a catalog (--datasets FILE)"
            raise UserError(f"unknown dataset {name!r}: use one of {sorted(specs)}{hint}")
        spec = specs[name]
        required = [spec["root"]] if spec["format"] == "voc" else [spec["json"], spec["image_root"]]
        for path in required:
            if not Path(path).exists():
                raise UserError(
                    f"dataset {name!r}: {path} does not exist; set --data-root / DETECTRON2_DATASETS "
                    "or fix the catalog path"
                )
