"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from simsiam_transfer.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory beside ``path``; move it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj, path):
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# mkstemp/mkdtemp names of ``atomic_path``/``atomic_dir``: ".<target>.<8 random chars>.tmp".
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_tmp(folder, targets: Optional[Iterable[str]] = None) -> List[Path]:
    """Remove leftovers of our own atomic writes killed mid-way in ``folder`` (only those of ``targets``
    when given); call it at start-up of the one command that owns the folder. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else {str(t) for t in targets}
    removed = []
    for entry in folder.iterdir():
        match = _TMP_NAME.match(entry.name)
        if match is None or (wanted is not None and match.group("target") not in wanted):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def check_output_file(path, what: str) -> Path:
    """Refuse, before any work, an output file path that is a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a folder; give a file path (e.g. {path / 'out'}{path.suffix})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise UserError(f"{what} {path}: cannot write into {parent} (permission denied)")
            break
    return path


def check_output_dir(path, what: str) -> Path:
    """Refuse, before any work, an output folder that is an existing file or lies under a file."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is an existing file" if candidate == path else f"lies under the file {candidate}"
                raise UserError(f"{what} {path}: {where}; give a folder path")
            if not os.access(candidate, os.W_OK):
                raise UserError(f"{what} {path}: cannot write into {candidate} (permission denied)")
            break
    return path


def read_jsonl(path) -> List[Tuple[int, dict]]:
    """(line number, object) of each line of an append-only JSON-lines file. A text line that is not
    JSON is one cut short by a crash and is skipped; bytes that are not text, or JSON that is not an
    object, mean a foreign or damaged file: refused naming the file and the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror})") from None
    records = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: line {number} is binary, not JSON text; the file is damaged or "
                            "not written by simsiam-transfer (move it away)") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is JSON but not an object; the file is damaged or "
                            "not written by simsiam-transfer (move it away)")
        records.append((number, record))
    return records
