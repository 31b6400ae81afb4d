"""Test suite: wall time of ``make test`` from a fresh clone, set-up and tests apart (one JSON line).

    python3 benchmarks/test_suite.py                 # clones this checkout's HEAD into a temporary folder
    python3 benchmarks/test_suite.py --ref main --keep /tmp/suite

Runs ``make setup`` (venv, pinned torch, detectron2, the package, ``doctor``) and then ``make test``
(which finds the set-up done and runs mypy and pytest), each timed on its own; the target is the sum
under 5 minutes on the 2-core CI machine. Needs only the standard library (a fresh machine has no torch
yet). PYTHONPATH and VIRTUAL_ENV are cleared for the children, so the clone's code is what runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE))
from _common import cpu_model  # noqa: E402  (the path set-up above must come first)

TARGET_S = 300


def timed(cmd, cwd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc


def measure(repo: Path, ref: str, clone: Path) -> dict:
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(repo), str(clone)], check=True)
    subprocess.run(["git", "checkout", "--quiet", ref], cwd=clone, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True,
                            capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    record = {"benchmark": "test_suite", "commit": commit,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_1m_start": round(os.getloadavg()[0], 2)}}
    setup_s, setup = timed(["make", "setup"], clone, env)
    record["setup_s"] = round(setup_s, 1)
    if setup.returncode != 0:
        record.update(error="make setup failed", tail=(setup.stdout + setup.stderr)[-1500:])
        return record
    tests_s, tests = timed(["make", "test"], clone, env)
    lines = [line for line in tests.stdout.splitlines() if line.strip()]
    record.update({
        "tests_s": round(tests_s, 1), "total_s": round(setup_s + tests_s, 1), "target_total_s": TARGET_S,
        "tests_rc": tests.returncode, "pytest_summary": lines[-1] if lines else "",
    })
    record["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(HERE.parent), help="repository to clone (default: this checkout)")
    parser.add_argument("--ref", default="HEAD", help="commit or branch to test (default: HEAD)")
    parser.add_argument("--keep", help="clone here and keep it (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.keep:
        record = measure(Path(args.repo), args.ref, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            record = measure(Path(args.repo), args.ref, Path(tmp) / "clone")
    print(json.dumps(record), flush=True)
    return 0 if record.get("tests_rc") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
