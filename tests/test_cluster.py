"""Cluster runs that cannot corrupt a result: one writer per folder, jobs found again after their driver
died, launches that work whole or refuse in one line, and like-with-like comparisons."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, cli_main
from test_stopping import wait_until as _wait

CLI = [sys.executable, "-m", "app.cli"]
SHORT = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
         "TEST.PRECISE_BN.NUM_ITER", "2"]


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


def test_finetune_under_srun_is_one_distributed_run_or_one_line():
    from detection.finetune import under_srun
    from detection.spec import FinetuneJob
    from simsiam_transfer.errors import UserError

    job = FinetuneJob(config_file="voc07", weights="none", num_gpus=8)
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "1",
            "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    one_run = under_srun(job, step, first_host=lambda nodelist: "gpu07")
    assert (one_run.num_machines, one_run.machine_rank, one_run.dist_url) == (2, 1, f"tcp://gpu07:{15000 + 77}")
    with pytest.raises(UserError, match="finetune runs as 8 srun tasks, 8 per node") as err:  # srun -n 8 finetune
        under_srun(job, {**step, "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "1",
                         "SLURM_STEP_TASKS_PER_NODE": "8"}, first_host=lambda nodelist: "gpu07")
    assert "\n" not in str(err.value)
    assert under_srun(job, {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "1"}) is job  # a one-task step


@pytest.mark.slow
def test_the_padding_benchmark_pairs_seeds_across_setups(synthetic, r18_pkl, tmp_path):
    """At toy size on CPU (one setup twice): the plumbing, and that a seed gives the same AP twice."""
    proc = subprocess.run([sys.executable, "benchmarks/padding.py", "--weights", r18_pkl, "--config", "voc07_mini",
                           "--datasets", synthetic / "datasets.yaml", "--setups", "1x4,8x2,1x4", "--seeds", "1000",
                           "--out", tmp_path, *SHORT], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["skipped"] == {"8x2": "needs 8 GPUs, this machine shows 0"} and record["errors"] == []
    first, second = record["setups"]["0_1x4"][0], record["setups"]["2_1x4"][0]
    assert first["seed"] == second["seed"] == 1000 and first["ims_per_gpu"] == 4
    assert record["paired_difference"]["bbox/AP"] == {"mean": 0.0, "std": None, "n": 1}  # same seed, same AP


@pytest.mark.slow
def test_a_paper_scale_run_on_a_cpu_is_refused_unless_allowed(synthetic, tmp_path, capsys, monkeypatch):
    import torch

    from pretrain.config import load_cfg, paper_scale
    from simsiam_transfer.cpu_guard import refuse_on_cpu
    from simsiam_transfer.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main("pretrain", "--config", "pretrain/simsiam_R_50_100ep_b512.yaml", "DATA.TRAIN_DIR",
                    synthetic / "unlabeled", "SOLVER.BATCH_SIZE", 32, "OUTPUT_DIR", tmp_path / "p") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODEL.BACKBONE resnet50 on 224-px crops is a paper-scale pretraining" in err[0]
    assert "--allow-cpu" in err[0] and not (tmp_path / "p").exists()
    assert cli_main("pipeline", "--config", "pipeline/table5.yaml", "OUTPUT_DIR", tmp_path / "t") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ROWS.simsiam_base: MODEL.BACKBONE resnet50" in err[0] and not (tmp_path / "t").exists()
    paper = load_cfg("pretrain/simsiam_R_50_100ep_b512.yaml")
    with pytest.raises(UserError, match="paper-scale"):
        refuse_on_cpu(paper_scale(paper), allow_cpu=False)
    refuse_on_cpu(paper_scale(paper), allow_cpu=True)  # --allow-cpu: runs
    assert paper_scale(load_cfg("pretrain/simsiam_R_18_mini.yaml")) is None  # the mini configs are unaffected
    # A dry run plans protocol-scale sweeps anywhere.
    assert cli_main("bench", "--benchmark", "voc07", "--weights", "none", "--output-dir", tmp_path / "b",
                    "--dry-run", "--assume-gpus", "8") == 0
