"""The one config loader of every stage: fvcore ``CfgNode`` (as detectron2), loaded safely.

Every YAML the project reads as a config goes through ``load`` / ``merge_file``: ``_BASE_``
inheritance, ``KEY VALUE`` overrides, and safe loading only. A YAML tag that would build a Python
object (``!!python/object/apply:os.system``) is refused with one line naming the file and the tag;
nothing in it runs. detectron2's own ``merge_from_file`` defaults to unsafe loading, so detection
configs come through here too. What else is refused before fvcore merges anything (duplicate keys,
``_BASE_`` cycles, deep nesting, alias bombs, list elements of the wrong type): ``config_tree``.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Tuple

import yaml
from fvcore.common.config import CfgNode

from simsiam_transfer.config_tree import ConfigTree, check_shape, check_tree, value_problem
from simsiam_transfer.errors import UserError
from simsiam_transfer.yaml_files import read_yaml, yaml_error_line

__all__ = ["CfgNode", "config_root", "resolve_config", "merge_file", "merge_overrides", "merge_node", "load",
           "safe_yaml", "flatten"]

_CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# pyproject maps configs/ to the package data folder simsiam_transfer/configs in a wheel.
_INSTALLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_root() -> Path:
    """``configs/`` of a checkout, or the copy installed as package data by ``pip install .``."""
    return _CHECKOUT_CONFIGS if _CHECKOUT_CONFIGS.is_dir() else _INSTALLED_CONFIGS


def resolve_config(name) -> Path:
    """A path as given, else a path relative to the shipped configs (``detection/voc07_mini.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = config_root() / name
    if shipped.is_file():
        return shipped
    raise UserError(f"config file not found: {name} (neither a file nor under {config_root()})")


def _first_line(exc) -> str:
    """A library's message without what it appends on further lines (dumps of whole config nodes); a
    KeyError's message is the key itself, kept whole (``print_error`` escapes it to one line)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextmanager
def _one_line_errors(where, key_fix: str = "check the key's spelling"):
    """Turn what fvcore/yaml raise while reading or merging a config into one ``UserError`` line
    that names ``where`` (a file, an override, a pipeline node) and, for a bad key, the fix."""
    try:
        yield
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_line(where, exc)) from None
    except KeyError as exc:
        raise UserError(f"{where}: {_first_line(exc)}; {key_fix}") from None
    except (ValueError, AssertionError, TypeError) as exc:
        raise UserError(f"{where}: {_first_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: unreadable ({exc.__class__.__name__}: {exc})") from None


def safe_yaml(path):
    """A data file (catalogs, saved configs) read with ``yaml_files.read_yaml``'s checks."""
    return read_yaml(path)


def merge_file(cfg: CfgNode, config_file) -> Path:
    """Merge one YAML (with its ``_BASE_`` chain) into ``cfg``, safely; returns the resolved path.

    The chain is read and checked first (``config_tree``); fvcore's own ``merge_from_file`` then
    merges the checked files, so ``_BASE_`` order, key checks and detectron2's version upgrade stay
    theirs."""
    path = resolve_config(config_file)
    tree = ConfigTree(str(path))
    check_tree(tree.load(str(path)), cfg, tree.where)
    with _one_line_errors(path, "remove or rename that key"):
        cfg.merge_from_file(str(path), allow_unsafe=False)
    return path


_MISSING = object()


def _current(cfg: CfgNode, key: str):
    """The value at a dotted ``key`` of ``cfg``, or ``_MISSING`` (yacs then names the unknown key)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def merge_overrides(cfg: CfgNode, overrides: Iterable = ()) -> CfgNode:
    """Merge ``KEY VALUE`` pairs (values parsed as Python literals, never executed)."""
    overrides = [str(o) for o in overrides]
    if len(overrides) % 2:
        raise UserError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(overrides)}")
    for key, value in zip(overrides[0::2], overrides[1::2]):
        where = f"override {key} {value}"
        decoded = CfgNode._decode_cfg_value(value)
        check_shape(decoded, where)
        current = _current(cfg, key)
        problem = None if current is _MISSING else value_problem(decoded, current, tuple(key.split(".")))
        if problem:
            raise UserError(f"{where}: {problem[1]}")
        with _one_line_errors(where):
            cfg.merge_from_list([key, value])
    return cfg


def merge_node(cfg: CfgNode, node, where: str) -> CfgNode:
    """Merge a nested node (e.g. a pipeline's ``PRETRAIN.CFG``) into ``cfg``, naming ``where`` on error."""
    check_shape(node, where)
    check_tree(node, cfg, lambda keys: where)
    with _one_line_errors(where):
        cfg.merge_from_other_cfg(CfgNode(node) if not isinstance(node, CfgNode) else node)
    return cfg


def load(defaults: CfgNode, config_file=None, overrides: Iterable = (),
         validate: Optional[Callable[[CfgNode, str], None]] = None,
         nodes: Iterable[Tuple[Any, str]] = ()) -> CfgNode:
    """defaults <- config file (``_BASE_`` chain) <- nested ``(node, where)`` pairs <- ``KEY VALUE``
    overrides, then validated and frozen."""
    cfg = defaults.clone()
    source = "defaults"
    if config_file:
        source = str(merge_file(cfg, config_file))
    for node, where in nodes:
        merge_node(cfg, node, where)
        source = where
    merge_overrides(cfg, overrides)
    if validate is not None:
        validate(cfg, source)
    cfg.freeze()
    return cfg


def flatten(node, prefix: str = "") -> list:
    """A nested node as a ``KEY VALUE`` list (values as Python literals) for a process boundary."""
    out: list = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out += [f"{prefix}{key}", repr(value)]
    return out
