"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Files and folders are created as any ordinary file is, honouring the user's umask (0644 / 0755 under
umask 022), so colleagues in a shared lab can read a checkpoint. A full disk (or quota) is one line
naming the file, the space it needs and the space free; the previous file is kept, no partial one left.
"""

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from simsiam_transfer.errors import UserError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _create_beside(path: Path, make: Callable[[Path], None]) -> Path:
    """A new ``.<name>.<8 hex>.tmp`` beside ``path``, made by ``make``. Not ``tempfile``: its files are
    0600 whatever the umask; created with mode 0666/0777, the kernel applies the umask (and default ACLs)."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue


def _new_file(candidate: Path) -> None:
    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_folder(candidate: Path) -> None:
    os.mkdir(candidate, 0o777)


def human_bytes(n: float) -> str:
    units = ("bytes", "kB", "MB", "GB", "TB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n, step = n / 1000, step + 1
    return f"{n:.0f} bytes" if step == 0 else f"{n:.1f} {units[step]}"


def _free_space(folder: Path) -> str:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return "unknown space"
    return human_bytes(stat.f_bavail * stat.f_frsize)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _no_space(path: Path, exc: OSError, tmp: Optional[Path], size: Optional[int]) -> UserError:
    """One line for a write that ran out of space: what, how much it needs, how much is free."""
    written = _tree_bytes(tmp) if tmp is not None and tmp.exists() else 0
    needed = f"needs about {human_bytes(size)}" if size else f"needs more than the {human_bytes(written)} written"
    kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
    return UserError(f"{path}: could not be written: {exc.strerror} ({needed}, {_free_space(path.parent)} free "
                     f"in {path.parent}); {kept}. Free some space or write elsewhere")


def _beside(path: Path, make: Callable[[Path], None], size: Optional[int]) -> Path:
    """The temporary beside ``path`` (its folder created first); a full disk already here is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _create_beside(path, make)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _no_space(path, exc, None, size) from None
        raise


def payload_bytes(obj, _seen=None) -> int:
    """Bytes of the tensors and arrays in a (nested) dict/list/tuple: the size a checkpoint will need."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(payload_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v, seen) for v in obj)
    storage = getattr(obj, "untyped_storage", None)  # a torch tensor; views share one storage
    if callable(storage):
        data = storage()
        key = ("storage", data.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return int(data.nbytes())
    return int(getattr(obj, "nbytes", 0) or 0)  # a numpy array


@contextlib.contextmanager
def atomic_path(path, size: Optional[int] = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success. ``size``: the
    bytes about to be written, named if the disk fills up."""
    path = Path(path)
    tmp = _beside(path, _new_file, size)
    try:
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space(path, exc, tmp, size) from None
            raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory beside ``path``; move it onto ``path`` only on success."""
    path = Path(path)
    tmp = _beside(path, _new_folder, None)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space(path, exc, tmp, None) from None
            raise
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path, text):
    data = text.encode()
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj, path):
    import torch

    with atomic_path(path, payload_bytes(obj)) as tmp:
        torch.save(obj, tmp)


# Names of ``atomic_path``/``atomic_dir`` temporaries: ".<target>.<8 random chars>.tmp" (older
# versions used mkstemp's [a-z0-9_] names).
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
