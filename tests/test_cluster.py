"""Cluster runs that cannot corrupt a result: one writer per folder, jobs found again after their driver
died, launches that work whole or refuse in one line, and like-with-like comparisons."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, cli_main

CLI = [sys.executable, "-m", "app.cli"]
SHORT = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
         "TEST.PRECISE_BN.NUM_ITER", "2"]


def _wait(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_second_pretraining_into_a_held_folder_is_refused_naming_the_holder(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from simsiam_transfer.locks import folder_lock
        with folder_lock({str(out)!r}, "pretraining"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "SLURM_JOB_ID": "4242"})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_main("pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.TRAIN_DIR",
                        synthetic / "unlabeled", "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", "DATA.IMAGE_SIZE", 32,
                        "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 1, "SOLVER.MAX_ITERS_PER_EPOCH", 1,
                        "OUTPUT_DIR", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another pretraining is writing into this folder" in err[0]
        assert f"pid {holder.pid} on " in err[0] and "Slurm job 4242" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_bench_rerun_waits_for_a_recorded_job_that_still_runs(synthetic, r18_pkl, tmp_path):
    """The driver dies (SIGKILL) while its submitit job trains; the rerun finds that job again, waits for it
    and takes its result instead of starting a second job into the same trial folder."""
    out = tmp_path / "sweep"
    args = ["bench", "--benchmark", "voc07_mini", "--weights", r18_pkl, "--output-dir", out, "--lrs", "0.02",
            "--trials", "1", "--executor", "submitit-local", "--datasets", synthetic / "datasets.yaml",
            "SOLVER.MAX_ITER", 40, "SOLVER.STEPS", "(39,)", "SOLVER.WARMUP_ITERS", 2, "SOLVER.CHECKPOINT_PERIOD", 100,
            "TEST.PRECISE_BN.NUM_ITER", 2]
    driver = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=REPO)
    log = out / "trials" / "lr0.02_t0" / "log.txt"
    _wait(lambda: log.is_file() and "Starting training" in log.read_text() or driver.poll() is not None, 300,
          "the trial to train")
    assert driver.poll() is None
    driver.kill()  # the driver alone: its job goes on
    driver.wait()
    assert _events(out / "runs.jsonl")[-1]["status"] == "running"
    rerun = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reattached to its running job" in rerun.stdout
    events = _events(out / "runs.jsonl")
    started = {e["job_id"] for e in events if e["status"] == "running"}
    assert len(started) == 1 and events[-1]["status"] == "done" and events[-1]["attempt"] == 1
    assert len(list((out / "submitit").glob("*_submitted.pkl"))) == 1  # one job was ever submitted


@pytest.mark.slow
def test_the_pipeline_submits_pretraining_as_a_job_and_finds_it_again(tmp_path):
    """PRETRAIN.EXECUTOR submitit-local: a 2-task job (gloo); the pipeline is killed while the job runs and,
    run again, waits for that job instead of submitting another."""
    config = tmp_path / "p.yaml"
    config.write_text(textwrap.dedent("""
        DATA: {SYNTHETIC: True, SYNTHETIC_SIZE: {NUM_TRAIN: 24, NUM_TEST: 12, NUM_UNLABELED: 96}}
        PRETRAIN: {EXECUTOR: submitit-local, NPROC_PER_NODE: 2}
        ROWS:
          simsiam:
            PRETRAIN:
              CONFIG: "pretrain/simsiam_R_18_mini.yaml"
              CFG:
                SOLVER: {EPOCHS: 6, BATCH_SIZE: 32, MAX_ITERS_PER_EPOCH: 2, AMP: False}
                DATA: {IMAGE_SIZE: 32, NUM_WORKERS: 0}
                MONITOR: {KNN_PERIOD: 100}
        BENCH: {BENCHMARKS: ["voc07_mini"]}
        SWEEP: {GPUS_PER_TRIAL: 0, LRS: [0.02], TRIALS: 1}
        FINETUNE:
          CFG:
            SOLVER: {MAX_ITER: 2, STEPS: [1], WARMUP_ITERS: 1, CHECKPOINT_PERIOD: 2}
            TEST: {PRECISE_BN: {NUM_ITER: 2}}
    """))
    out = tmp_path / "out"
    cmd = CLI + ["pipeline", "--config", str(config), "OUTPUT_DIR", str(out)]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    state = out / "pipeline.json"

    def job_recorded():
        try:
            return bool(json.loads(state.read_text())["stages"]["pretrain:simsiam"].get("jobs"))
        except (OSError, ValueError, KeyError):
            return False
    _wait(lambda: job_recorded() or driver.poll() is not None, 300, "the pretraining job")
    assert driver.poll() is None
    job_id = json.loads(state.read_text())["stages"]["pretrain:simsiam"]["jobs"]["simsiam"]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"pretraining simsiam: waiting for its earlier job {job_id}" in rerun.stdout
    submitted = list((out / "rows" / "simsiam" / "submitit").glob("*_submitted.pkl"))
    assert [p.name.split("_")[0] for p in submitted] == [job_id]
    import torch

    ckpt = torch.load(out / "rows/simsiam/pretrain/checkpoint_last.pth", weights_only=True)
    assert ckpt["epoch"] == 6 and len(ckpt["rng"]) == 2  # both tasks trained, to the end
