"""Stopping long commands: SIGTERM is handled like SIGINT, and a stopped driver leaves no process behind."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from simsiam_transfer.locks import folder_lock
from simsiam_transfer.stopping import Stopped

CLI = [sys.executable, "-m", "app.cli"]


def processes_mentioning(text: str):
    """Pids of live processes whose command line contains ``text`` (ours or orphaned: not a tree walk
    from the driver, whose orphans are re-parented away from it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_stop_exit_codes():
    assert Stopped(signal.SIGTERM).exit_code == 143 and Stopped(signal.SIGINT).exit_code == 130
    assert isinstance(Stopped(signal.SIGTERM), KeyboardInterrupt)


def test_a_child_stops_when_its_driver_is_killed(tmp_path):
    """The driver is SIGKILLed (no chance to clean up); its child notices and stops by itself."""
    marker = tmp_path / "child-stopped"
    child_script = tmp_path / "child.py"
    child_script.write_text(textwrap.dedent(f"""
        import time
        from simsiam_transfer.stopping import install_handlers, watch_parent
        install_handlers()
        watch_parent(poll_s=0.1)
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            open({str(marker)!r}, "w").write("stopped")
    """))
    driver = textwrap.dedent(f"""
        import sys, time
        from simsiam_transfer.stopping import Children
        child = Children().popen([sys.executable, {str(child_script)!r}])
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, cwd=REPO)
    child = int(proc.stdout.readline())
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    wait_until(lambda: marker.exists(), 30, "the orphaned child to stop")
    wait_until(lambda: not Path(f"/proc/{child}").exists() or
               Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 30, "the child to exit")


def test_folder_lock_names_its_holder_and_is_free_after_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from simsiam_transfer.locks import folder_lock
        with folder_lock({str(tmp_path)!r}, "test"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    from simsiam_transfer.errors import UserError

    with pytest.raises(UserError, match=rf"another test is writing into this folder \(pid {holder.pid} on "):
        with folder_lock(tmp_path, "test"):
            pass
    holder.kill()
    holder.wait()
    with folder_lock(tmp_path, "test"):  # a dead holder's lock file is simply taken over
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_sigterm_to_pretrain_is_one_line_exit_143_and_resumable(synthetic, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.TRAIN_DIR", synthetic / "unlabeled",
            "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train", "DATA.KNN_VAL_DIR", synthetic / "labeled/val",
            "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0, "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 50,
            "SOLVER.MAX_ITERS_PER_EPOCH", 2, "MODEL.DIM", 64, "MODEL.PRED_DIM", 16, "SOLVER.AMP", False,
            "OUTPUT_DIR", out]
    proc = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    wait_until(lambda: (out / "checkpoint_last.pth").exists() or proc.poll() is not None, 300, "a checkpoint")
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip() and "epoch" not in line]  # tqdm bars aside
    assert lines == [lines[-1]] and lines[-1].startswith("interrupted by SIGTERM"), lines
    done = torch.load(out / "checkpoint_last.pth", weights_only=True)["epoch"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= done < 50 and [r["epoch"] for r in records] == list(range(1, done + 1))
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_to_bench_stops_its_trials_and_leaves_no_process(synthetic, r18_pkl, tmp_path):
    out = tmp_path / "sweep"
    args = ["bench", "--benchmark", "voc07_mini", "--weights", r18_pkl, "--output-dir", out, "--lrs", "0.02,0.05",
            "--trials", "1", "--search", "full", "--cpu-jobs", "2", "--datasets", synthetic / "datasets.yaml",
            "SOLVER.MAX_ITER", 2000, "SOLVER.STEPS", "(1999,)", "SOLVER.WARMUP_ITERS", 2,
            "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.PRECISE_BN.NUM_ITER", 2]
    proc = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    trial_dirs = str(out / "trials")

    def both_training():
        return len(processes_mentioning(trial_dirs)) >= 2 and all(
            (out / "trials" / t / "log.txt").is_file() for t in ("lr0.02_t0", "lr0.05_t0"))
    wait_until(lambda: both_training() or proc.poll() is not None, 300, "two trials to start")
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)  # the driver only, as a scheduler or `kill PID` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted by SIGTERM")
    assert processes_mentioning(trial_dirs) == []  # no trainer left behind
    latest = {}
    for line in (out / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        latest[record["id"]] = record
    assert {r["status"] for r in latest.values()} == {"stopped"}
    with folder_lock(out, "bench"):  # released, and so is each trial's
        for trial in latest:
            with folder_lock(out / "trials" / trial, "fine-tune"):
                pass
