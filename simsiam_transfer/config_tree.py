"""A config file and its ``_BASE_`` chain read as fvcore reads them, and the values checked against the
config they will be merged into, before fvcore merges anything.

Refused with one line naming the file and the key: what ``yaml_files.read_yaml`` refuses, an empty
file, a top level that is not a mapping, a ``_BASE_`` cycle (the chain is named, a file pointing to
itself included), a ``_BASE_`` that is missing, a folder or a URL, a section where a single value
belongs and the reverse, and list elements of another type than the default's (``DATASETS.TRAIN: [1]``,
``SOLVER.STEPS: [a]``); yacs checks the rest (unknown keys, scalar types).
"""

import os
from typing import Callable, Dict, Optional, Tuple

from fvcore.common.config import BASE_KEY, CfgNode

from simsiam_transfer.errors import UserError
from simsiam_transfer.yaml_files import MAX_DEPTH, MAX_VALUES, read_yaml

MAX_BASE_FILES = 64  # files read for one config, _BASE_ chains included (a diamond's base is read twice)
# List keys whose default is empty, so that their elements have no example to follow.
EMPTY_LIST_EXAMPLES = {"DATASETS.TRAIN": "name", "DATASETS.TEST": "name", "DATASETS.PROPOSAL_FILES_TRAIN": "path",
                       "DATASETS.PROPOSAL_FILES_TEST": "path", "SWEEP.LRS": 0.0}

Keys = Tuple[str, ...]


def brief(value) -> str:
    """A value as a message shows it: short, whatever its size."""
    if isinstance(value, dict):
        return f"a section of {len(value)} key(s)"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} value(s)"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


class ConfigTree:
    """The merged dict of a config file and its ``_BASE_`` files, and the file each key came from."""

    def __init__(self, top: str):
        self.top = top
        self.files_read = 0
        self.origin: Dict[Keys, str] = {}

    def where(self, keys: Keys) -> str:
        """The file that set ``keys`` (or the closest section above it), else the top file."""
        for end in range(len(keys), 0, -1):
            if keys[:end] in self.origin:
                return self.origin[keys[:end]]
        return self.top

    def load(self, filename: str, chain: Tuple[str, ...] = ()) -> dict:
        self.files_read += 1
        if self.files_read > MAX_BASE_FILES:
            raise UserError(f"{self.top}: its {BASE_KEY} chain reads more than {MAX_BASE_FILES} files; "
                            "simplify the inheritance")
        doc = read_yaml(filename)
        if doc is None:
            raise UserError(f"{filename}: empty config; write KEY: value lines (or give no config file)")
        if not isinstance(doc, dict):
            raise UserError(f"{filename}: the top level is {brief(doc)}; a config is a mapping of KEY: value")
        if BASE_KEY not in doc:
            self._note(doc, filename, ())
            return doc
        bases = doc.pop(BASE_KEY)
        names = bases if isinstance(bases, list) else [bases]
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError(f"{filename}: {BASE_KEY} must be a file name or a list of them, got {brief(bases)}")
        merged: dict = {}
        for name in names:
            self._merge(self.load(*self._base(filename, name, chain or (filename,))), merged, filename, ())
        self._merge(doc, merged, filename, ())
        self._note(doc, filename, ())
        return merged

    @staticmethod
    def _base(filename: str, name: str, chain: Tuple[str, ...]) -> Tuple[str, Tuple[str, ...]]:
        """fvcore's rule: a ``_BASE_`` path is relative to the file naming it (``~`` expanded)."""
        if name.startswith(("https://", "http://")):
            raise UserError(f"{filename}: {BASE_KEY} {name}: configs are read from files only; download it")
        base = os.path.expanduser(name) if name.startswith("~") else name
        if not base.startswith("/"):
            base = os.path.join(os.path.dirname(filename), base)
        if os.path.realpath(base) in {os.path.realpath(f) for f in chain}:
            raise UserError(f"{BASE_KEY} cycle: {' -> '.join([*chain, base])}; a config cannot inherit from itself")
        if not os.path.exists(base):
            raise UserError(f"{filename}: {BASE_KEY} {name}: file not found ({base})")
        if not os.path.isfile(base):
            raise UserError(f"{filename}: {BASE_KEY} {name}: not a file ({base})")
        return base, (*chain, base)

    def _note(self, doc: dict, filename: str, keys: Keys) -> None:
        for key, value in doc.items():
            self.origin[(*keys, str(key))] = filename
            if isinstance(value, dict):
                self._note(value, filename, (*keys, str(key)))

    def _merge(self, a: dict, b: dict, filename: str, keys: Keys) -> None:
        """fvcore's ``merge_a_into_b``; a section over a base's single value is one line, not an assert."""
        for key, value in a.items():
            here = (*keys, str(key))
            if isinstance(value, dict) and key in b:
                if not isinstance(b[key], dict):
                    raise UserError(f"{filename}: {'.'.join(here)} is a section but {self.where(here)} sets it "
                                    f"to {brief(b[key])}")
                self._merge(value, b[key], filename, here)
            else:
                b[key] = value


def _kind(example) -> str:
    for kind, name in ((bool, "true/false"), (int, "integers"), (float, "numbers"), (str, "strings"),
                       ((list, tuple), "lists")):
        if isinstance(example, kind):
            return name
    return type(example).__name__


def _fits(value, example) -> bool:
    """yacs checks a list's type only; detectron2 and the stages need its elements' type as well."""
    if example is None:
        return True
    if isinstance(example, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(example, bool)
    if isinstance(example, float):
        return isinstance(value, (int, float))
    if isinstance(example, (list, tuple)):
        return isinstance(value, (list, tuple))
    return type(value) is type(example)


def _list_problem(values, examples, shown="") -> Optional[str]:
    """Why an element of ``values`` is not of the type of ``examples[0]`` (``shown``: the default)."""
    if not examples:
        return None
    example = examples[0]
    for index, value in enumerate(values):
        if not _fits(value, example):
            return f"element {index} is {brief(value)}; this list holds {_kind(example)}{shown}"
        if isinstance(example, (list, tuple)):
            inner = _list_problem(value, example)
            if inner:
                return f"element {index}: {inner}"
    return None


def value_problem(value, default, keys: Keys) -> Optional[Tuple[Keys, str]]:
    """``(key, why)`` when ``value`` cannot replace ``default`` at ``keys`` (sections and list elements;
    yacs checks the rest), else None. Keys the default lacks are left to yacs, which names them."""
    name = ".".join(keys)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            return keys, f"{name}: a section (KEY: value lines) belongs here, got {brief(value)}"
        for key, sub in value.items():
            if key in default:
                problem = value_problem(sub, default[key], (*keys, str(key)))
                if problem:
                    return problem
        return None
    if isinstance(value, dict):
        return keys, f"{name}: a single value belongs here (default {brief(default)}), got a section"
    if isinstance(value, (list, tuple)) and (isinstance(default, (list, tuple)) or default is None):
        examples = default or ([EMPTY_LIST_EXAMPLES[name]] if name in EMPTY_LIST_EXAMPLES else [])
        why = _list_problem(value, examples, f" (default {default!r})" if default else "")
        return (keys, f"{name}: {why}") if why else None
    return None


def check_tree(tree: dict, cfg: CfgNode, where: Callable[[Keys], str]) -> None:
    """Refuse the first value of ``tree`` (a file's, or a node's) that ``cfg`` cannot take, naming
    ``where(key)`` (the file that set it)."""
    problem = value_problem(tree, cfg, ())
    if problem:
        raise UserError(f"{where(problem[0])}: {problem[1]}")


def check_shape(value, where: str) -> None:
    """A nested value from outside a file (an override) within a config file's depth and size."""
    left = [MAX_VALUES]

    def walk(item, depth):
        left[0] -= 1
        if depth > MAX_DEPTH or left[0] < 0:
            raise UserError(f"{where}: nested deeper than {MAX_DEPTH} levels or over {MAX_VALUES:,} values")
        for child in (item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else ()):
            walk(child, depth + 1)

    walk(value, 1)
