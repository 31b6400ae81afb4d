"""Stopping a long command cleanly: SIGTERM is handled like SIGINT, and no child outlives its driver.

- ``install_handlers()`` turns SIGTERM (what Slurm, schedulers and ``kill`` send) and SIGINT into
  ``Stopped``, a ``KeyboardInterrupt``: the same unwinding as Ctrl-C, so every ``finally`` runs, atomic
  writes leave no partial file and the run stays resumable. The CLI prints one line and exits
  128 + signal (143 for SIGTERM, 130 for SIGINT). ``deferred_stop()`` lets a short piece of
  bookkeeping finish first.
- ``Children`` starts subprocesses in their own process group and, when the driver stops, sends the
  signal to each group (detectron2's spawned workers and loader workers included) and waits for them
  before the driver goes on (and releases its folder lock).
- ``watch_parent()`` runs in a child started with ``child_env()``: when the driver disappears (even by
  SIGKILL) the child stops itself the same way.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional

STOP_WITH_PARENT = "SIMSIAM_TRANSFER_STOP_WITH_PARENT"
# Seconds a stopping child gets to unwind (write its last lines, end its loader workers) before SIGKILL.
GRACE_S = 30.0


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; unwinds like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_number(exc: BaseException) -> int:
    return exc.signum if isinstance(exc, Stopped) else int(signal.SIGINT)


_deferred: List[int] = []  # stop signals that arrived inside ``deferred_stop``
_deferring = False


_installed_in: List[int] = []  # the pid that installed the handlers


def _raise_stopped(signum, _frame):
    if _installed_in and os.getpid() != _installed_in[0]:
        # A forked helper (a pool or loader worker) inherited the handler: it ends as it would by default,
        # or a worker holding a queue's lock would unwind instead of dying and its pool could hang.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _deferring:
        _deferred.append(signum)
        return
    raise Stopped(signum)


def install_handlers() -> None:
    """SIGTERM and SIGINT raise ``Stopped`` in the main thread of this process (forked helpers keep the
    default behaviour)."""
    if threading.current_thread() is threading.main_thread():
        _installed_in[:] = [os.getpid()]
        signal.signal(signal.SIGTERM, _raise_stopped)
        signal.signal(signal.SIGINT, _raise_stopped)


@contextlib.contextmanager
def deferred_stop():
    """Finish a short piece of bookkeeping (an epoch's checkpoint and records) before stopping, so
    what is on disk stays consistent; a stop that arrived meanwhile is raised at the end."""
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    if _deferred:
        raise Stopped(_deferred.pop())


def child_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for a child that must stop when this process is gone."""
    return {**os.environ, **(env or {}), STOP_WITH_PARENT: "1"}


def watch_parent(poll_s: float = 1.0) -> None:
    """In a child started with ``child_env``: SIGTERM ourselves once our parent has changed (it died
    and we were re-parented), so an orphaned trainer stops as if its driver had stopped it."""
    if os.environ.get(STOP_WITH_PARENT) != "1":
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


class Children:
    """The subprocesses a driver started; ``stop()`` ends them all, process groups included."""

    def __init__(self):
        self._procs: List[subprocess.Popen] = []
        self._lock = threading.Lock()
        self.stopping = False

    def popen(self, cmd, env=None, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self.stopping:
                raise Stopped(signal.SIGTERM)
            proc = subprocess.Popen(cmd, env=child_env(env), start_new_session=True, **kwargs)
            self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def stop(self, signum: int = signal.SIGTERM, grace_s: float = GRACE_S) -> None:
        """Signal every child's group, wait up to ``grace_s`` for them, then SIGKILL what is left."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            _signal_group(proc, signum)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            # The group may outlive its leader (a loader worker still unwinding): end it too.
            _signal_group(proc, signal.SIGKILL)


@contextlib.contextmanager
def worker_pool(start_method: str, workers: int):
    """A multiprocessing pool that ends by closing (its workers finish and exit on their own) and is
    terminated only when the work fails or is stopped. ``Pool.__exit__`` terminates: it SIGTERMs workers
    that may have just forked, and a signal that arrives before a Python child has set itself up is lost,
    leaving a worker that never exits and a pool that waits for it forever."""
    import multiprocessing

    pool = multiprocessing.get_context(start_method).Pool(workers)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
