"""One writer per folder: an advisory lock on ``<folder>/.lock`` held for the whole run.

The kernel releases an ``flock`` when its holder dies (SIGKILL, node crash with a local disk), so a
lock file left behind by a dead process is simply taken over; only a live holder refuses a second
run. While held, the file names the holder (host, pid, Slurm job id), which the refusal prints.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from simsiam_transfer.errors import UserError

LOCK_NAME = ".lock"


def holder_record() -> dict:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv[:3])}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        record["slurm_job_id"] = job
    return record


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        where = f"pid {holder['pid']} on {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
    job = holder.get("slurm_job_id")
    return where + (f", Slurm job {job}" if job else "")


@contextlib.contextmanager
def folder_lock(folder, what: str, wait_s: float = 0.0):
    """Hold ``folder``'s lock (creating the folder) or refuse with one line naming the holder.

    ``wait_s``: how long to wait for a holder that is about to end (an orphaned trial stopping itself)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    raise UserError(f"{folder}: another {what} is writing into this folder "
                                    f"({describe_holder(f.read())}); wait for it to end, or use another "
                                    "folder") from None
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder_record()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
