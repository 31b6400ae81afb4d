"""Where trials run: local subprocesses (one per GPU in parallel) or submitit jobs (Slurm, or submitit's
local executor, which runs the same job code without a cluster).

A trial is one ``simsiam-transfer finetune`` into its own folder. A trial that is interrupted
and started again resumes from the last detectron2 checkpoint in that folder.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from submitit.helpers import Checkpointable


@dataclasses.dataclass
class TrialSpec:
    id: str
    lr: float
    trial: int
    seed: int
    config: str
    weights: str
    output_dir: str
    overrides: list = dataclasses.field(default_factory=list)
    datasets: str = None
    data_root: str = None
    num_gpus: int = 0

    def finetune_args(self):
        args = ["finetune", "--config", self.config, "--weights", self.weights, "--num-gpus", str(self.num_gpus)]
        if self.datasets:
            args += ["--datasets", self.datasets]
        if self.data_root:
            args += ["--data-root", self.data_root]
        return args + list(self.overrides) + ["SOLVER.BASE_LR", repr(self.lr), "SEED", str(self.seed),
                                              "OUTPUT_DIR", self.output_dir]


@dataclasses.dataclass
class TrialResult:
    ok: bool
    metrics: dict = None
    error: str = None
    job_id: str = None


def read_trial_metrics(spec):
    path = Path(spec.output_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _last_error_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def run_trial_process(spec, env=None):
    """Run one trial as ``python -m simsiam_transfer.cli finetune ...``; logs go to the trial folder."""
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(spec.output_dir) / "finetune.log"
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "simsiam_transfer.cli", *spec.finetune_args()],
                              stdout=log, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        log.write(proc.stderr)
    metrics = read_trial_metrics(spec)
    if proc.returncode == 0 and metrics is not None:
        return TrialResult(True, metrics)
    return TrialResult(False, error=f"exit {proc.returncode}: {_last_error_line(proc.stderr)}")


class LocalExecutor:
    """Trials in sequence on CPU or one GPU; with several GPUs, one single-GPU trial per GPU at once."""

    def __init__(self, gpus_per_trial=0):
        visible = torch.cuda.device_count()
        self.slots = max(1, visible // gpus_per_trial) if gpus_per_trial and visible else 1
        self.gpus_per_trial = gpus_per_trial

    def run(self, specs, on_start, on_finish):
        if self.slots == 1:
            for spec in specs:
                on_start(spec, None)
                on_finish(spec, run_trial_process(spec))
            return
        from concurrent.futures import ThreadPoolExecutor

        free = [list(range(i * self.gpus_per_trial, (i + 1) * self.gpus_per_trial)) for i in range(self.slots)]

        def one(spec):
            gpus = free.pop()
            try:
                on_start(spec, None)
                result = run_trial_process(spec, {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))})
            finally:
                free.append(gpus)
            on_finish(spec, result)

        with ThreadPoolExecutor(self.slots) as pool:
            list(pool.map(one, specs))


class TrialJob(Checkpointable):
    """submitit job body. On pre-emption or time-out submitit calls ``checkpoint`` and requeues the
    same call, which resumes from the trial folder's last checkpoint."""

    def __call__(self, spec):
        result = run_trial_process(spec)
        return dataclasses.asdict(result)


class SubmititExecutor:
    """One submitit job per trial: ``cluster="slurm"`` on a cluster, ``"local"`` for tests/demos."""

    def __init__(self, folder, cluster="slurm", gpus_per_trial=0, partition=None, timeout_min=4320,
                 cpus_per_task=None, poll_s=1.0, max_parallel=None):
        import submitit

        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params = {"timeout_min": timeout_min, "tasks_per_node": 1, "nodes": 1}
        if gpus_per_trial:
            params["gpus_per_node"] = gpus_per_trial
        if cluster == "slurm":
            if partition:
                params["slurm_partition"] = partition
            if cpus_per_task:
                params["cpus_per_task"] = cpus_per_task
        self.executor.update_parameters(**params)
        self.poll_s = poll_s
        # Slurm queues every trial at once; on one machine, jobs run one at a time by default.
        self.max_parallel = max_parallel or (None if cluster == "slurm" else 1)

    def run(self, specs, on_start, on_finish):
        waiting, pending = list(specs), []
        while waiting or pending:
            while waiting and (self.max_parallel is None or len(pending) < self.max_parallel):
                spec = waiting.pop(0)
                job = self.executor.submit(TrialJob(), spec)
                on_start(spec, str(job.job_id))
                pending.append((spec, job))
            for spec, job in list(pending):
                if job.done():
                    pending.remove((spec, job))
                    try:
                        result = TrialResult(**job.result())
                    except Exception as exc:  # the job itself crashed (node failure, OOM kill, ...)
                        result = TrialResult(False, error=f"job {job.job_id} failed: {_last_error_line(str(exc))}")
                    result.job_id = str(job.job_id)
                    on_finish(spec, result)
            if pending:
                time.sleep(self.poll_s)
