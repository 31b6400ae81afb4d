"""The dataset catalog (``--datasets FILE``, ``FINETUNE.DATASETS``): its format declared once
(``CATALOG_SCHEMA``), the reader fine-tuning registers from, and the writer the generated data uses.

A catalog maps a dataset name to its description; relative paths are resolved against the catalog's
folder. The formats and their keys are exactly ``CATALOG_SCHEMA``'s (the ``detection.datasets``
docstring shows an example).
"""

from pathlib import Path

import yaml

from simsiam_transfer import atomic
from simsiam_transfer.config import safe_yaml
from simsiam_transfer.errors import UserError

# format -> {key: (required, kind)}; kind "path" is resolved against the catalog's folder.
CATALOG_SCHEMA = {
    "voc": {"root": (True, "path"), "split": (True, "str"), "classes": (True, "names"), "year": (False, "int")},
    "coco": {"json": (True, "path"), "image_root": (True, "path")},
}


def load_catalog(path):
    """Parse and validate a dataset catalog; relative paths are resolved against its folder."""
    path = Path(path)
    doc = safe_yaml(path)
    if not isinstance(doc, dict) or not doc:
        raise UserError(f"{path}: a dataset catalog is a mapping of name -> description "
                        "(format: docs/formats.md)")
    specs = {}
    for name, entry in doc.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with 'format' and its fields")
        fmt = entry.get("format")
        schema = CATALOG_SCHEMA.get(fmt)
        if schema is None:
            raise UserError(f"{where}: format must be one of {sorted(CATALOG_SCHEMA)}, got {fmt!r}")
        unknown = set(entry) - set(schema) - {"format"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {['format', *schema]}")
        missing = [k for k, (required, _) in schema.items() if required and k not in entry]
        if missing:
            raise UserError(f"{where}: missing key(s) {missing}")
        spec = dict(entry)
        for key, (_, kind) in schema.items():
            if key not in spec:
                continue
            value = spec[key]
            if kind == "path":
                spec[key] = (path.parent / Path(str(value)).expanduser()).resolve()
            elif kind == "names" and (not isinstance(value, list) or not value
                                      or not all(isinstance(c, str) for c in value)):
                raise UserError(f"{where}: '{key}' must be a non-empty list of names")
            elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f"{where}: '{key}' must be an integer, got {value!r}")
            elif kind == "str" and not isinstance(value, str):
                raise UserError(f"{where}: '{key}' must be a string, got {value!r}")
        if fmt == "voc":
            spec["year"] = int(spec.get("year", 2007))
        specs[str(name)] = spec
    return specs


def write_catalog(path, entries: dict, comment: str = "") -> Path:
    """Write ``entries`` (name -> description in ``CATALOG_SCHEMA``'s keys) as a catalog, refusing an
    entry the reader would refuse; paths are written as given (relative ones are read from ``path``'s folder)."""
    path = Path(path)
    for name, entry in entries.items():
        schema = CATALOG_SCHEMA.get(entry.get("format"))
        if schema is None or set(entry) - set(schema) - {"format"} or \
                any(required and key not in entry for key, (required, _) in schema.items()):
            raise ValueError(f"catalog entry {name!r} does not follow CATALOG_SCHEMA: {entry}")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    text = header + yaml.safe_dump({name: dict(entry) for name, entry in entries.items()}, sort_keys=False)
    atomic.write_text(path, text)
    return path
