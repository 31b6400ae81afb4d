"""The process entry every command and worker shares: stop handling and the exit-status contract.

Exit status (README, "Commands"): 0 success; 2 bad input or usage (one line on stderr, no traceback,
no partial output); 1 anything else (a diverged run included); 128 + signal when stopped (130 for
SIGINT, 143 for SIGTERM), with what finished kept and the run resumable.
"""

import logging
import signal
import warnings
from typing import Any, Callable

from simsiam_transfer.errors import TrainingDiverged, UserError, print_error
from simsiam_transfer.stopping import install_handlers, signal_number, watch_parent


def quiet_library_noise() -> None:
    # detectron2 0.6 scripts ops at import; torch now warns about that on every run.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # torch logs "No CUDA runtime is found" whenever detectron2 imports cpp_extension on a CPU machine.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def run_entry(fn: Callable[..., Any], *args: Any) -> int:
    """Run ``fn(*args)`` as a process's work and turn its outcome into the exit status."""
    quiet_library_noise()
    install_handlers()
    watch_parent()
    try:
        return int(fn(*args) or 0)
    except UserError as exc:
        print_error(exc)
        return exc.exit_code
    except TrainingDiverged as exc:
        print_error(f"training diverged: {exc}")
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM from a scheduler or kill (``Stopped``)
        signum = signal_number(exc)
        print_error(f"interrupted by {signal.Signals(signum).name}: finished work is kept; run the same command "
                    "again to resume", prefix="")
        return 128 + signum
