"""Shared by the benchmark scripts: the machine record, interleaved timing, one JSON line out."""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Scripts run as ``python benchmarks/X.py`` from a fresh clone: the project must be importable, and
# benchmarks/convert.py must not shadow the ``convert`` package once this module is loaded.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))
# Last, not first: processes spawned by the data generator re-run the script, which imports _common.
sys.path.append(str(HERE))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What a reader needs to compare numbers: CPU, cores, threads, GPU, load, versions."""
    import torch

    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(), "avx512_bf16": " avx512_bf16" in flags,
        "amx_bf16": " amx_bf16" in flags, "torch": torch.__version__,
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }


def interleaved(variants: Dict[str, Callable[[], None]], rounds: int, steps: int,
                warmup: int = 1) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """(wall, process CPU) seconds per call of each variant, one entry per round. Rounds alternate
    the variants (rotating the order) so a load change on the shared machine hits all of them;
    CPU seconds are the contention-robust view (other jobs' load does not add to them)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                variants[name]()
            wall[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.process_time() - start_cpu) / steps)
    return wall, cpu


def median(values: List[float]) -> float:
    return statistics.median(values)


def paired_ratio(reference: List[float], ours: List[float]) -> float:
    """Median over rounds of reference time / our time (>1: ours is faster); pairs share a round's load."""
    return round(statistics.median(r / o for r, o in zip(reference, ours)), 3)


def emit(record: dict) -> None:
    record.setdefault("machine", {})["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record, sort_keys=False), flush=True)
