"""Reading one YAML file that a user hands in (a config, a dataset catalog), refusing what
``yaml.safe_load`` would silently accept or crash on.

Refused, each with one line naming the file, the line and the key: a duplicate key at any depth
(``safe_load`` keeps the last block and drops the first), nesting deeper than ``MAX_DEPTH``
(``safe_load`` recurses until RecursionError), more than ``MAX_VALUES`` values once aliases are
expanded (the "billion laughs" alias bomb, and aliases that contain themselves), a file over
``MAX_BYTES``, bytes that are not text, and any tag that would build a Python object.
"""

from pathlib import Path
from typing import Any, Dict, List, Union

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from simsiam_transfer.errors import UserError

MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_BYTES = 16 * 1024 * 1024
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlShapeError(ValueError):
    """A document refused for its shape (depth, size, duplicates), with the line it was found at."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class _DepthCappedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stopped at ``MAX_DEPTH`` while composing (its composer recurses per level)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlShapeError(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _key_text(keys: List[str]) -> str:
    return ".".join(keys) if keys else "the top level"


class _NodeCheck:
    """Walks the composed document as it will be built (aliases expanded), before anything is built."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.left = MAX_VALUES

    def walk(self, node: Node, keys: List[str], depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise YamlShapeError(f"more than {MAX_VALUES:,} values once its aliases are expanded (an alias bomb, "
                                 "or an alias inside itself); write the values out", _line(node))
        if depth > MAX_DEPTH:
            raise YamlShapeError(f"{_key_text(keys)}: nested deeper than {MAX_DEPTH} levels once its aliases are "
                                 "expanded", _line(node))
        if isinstance(node, SequenceNode):
            for item in node.value:
                self.walk(item, keys, depth + 1)
        elif isinstance(node, MappingNode):
            self._mapping(node, keys, depth)

    def _mapping(self, node: MappingNode, keys: List[str], depth: int) -> None:
        first_line: Dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # "<<: *base": its keys may be overridden here, by design
                self.walk(value_node, keys, depth + 1)
                continue
            key = self.loader.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:
                raise YamlShapeError(f"{_key_text(keys)}: a key that is a {type(key).__name__}; keys are "
                                     "names", _line(key_node)) from None
            name = _key_text([*keys, str(key)])
            if seen is not None:
                raise YamlShapeError(f"duplicate key {name} (first at line {seen}); YAML would keep only the "
                                     "last one: merge the two blocks", _line(key_node))
            first_line[key] = _line(key_node)
            self.walk(value_node, [*keys, str(key)], depth + 1)


def _refused_tag_line(path, exc: yaml.YAMLError) -> str:
    """One line for a YAML error: a refused tag names the tag, a syntax error its position."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None and getattr(mark, "name", "")[:1] not in ("", "<"):
        path = mark.name  # the file of a _BASE_ chain that holds the problem
    where = f" (line {mark.line + 1})" if mark is not None else ""
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("tag", 1)[-1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return (f"{path}{where}: refused the YAML tag {tag}: configs are data and are loaded without "
                "building Python objects; remove the tag")
    context = getattr(exc, "context", None)
    return f"{path}{where}: not valid YAML ({f'{context}, ' if context else ''}{problem})"


def yaml_error_line(path, exc: Exception) -> str:
    if isinstance(exc, YamlShapeError):
        return f"{path} (line {exc.line}): {exc}"
    return _refused_tag_line(path, exc)


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a YAML file")
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: not a regular file (a device or a pipe); give a YAML file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: over {MAX_BYTES // 2**20} MiB; a YAML config or catalog is a small text file")
    return data


def parse_yaml(data: Union[bytes, str], name) -> Any:
    """The one document of YAML text ``data`` (None when it holds none), checked as the module
    docstring says; every refusal is a ``UserError`` line naming ``name``."""
    try:
        loader = _DepthCappedLoader(data)  # reads the first bytes: binary garbage fails here
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _NodeCheck(loader).walk(node, [], 1)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except (yaml.YAMLError, YamlShapeError) as exc:
        raise UserError(yaml_error_line(name, exc)) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:  # what a tagged value's constructor raises
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{name}: a value YAML cannot build ({message[:200]})") from None


def read_yaml(path) -> Any:
    """``parse_yaml`` of the file ``path`` (at most ``MAX_BYTES``, a regular file)."""
    path = Path(path)
    return parse_yaml(_read_bytes(path), path)
