"""Where trials run: local subprocesses (one trial at a time on all its GPUs, or one per GPU group in
parallel within the parent's ``CUDA_VISIBLE_DEVICES``) or submitit jobs (Slurm, or submitit's
local executor, which runs the same job code without a cluster).

A trial is one ``python -m detection.worker <trial>/job.yaml`` (the job file bench wrote) into its own
folder. A trial that is interrupted and started again resumes from the last detectron2 checkpoint in
that folder.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import submitit
import torch
from submitit.helpers import Checkpointable

from detection.job import NAME as JOB_NAME
from detection.spec import ExecutorOptions
from simsiam_transfer.jobs import reattach_job
from simsiam_transfer.stopping import Children, install_handlers, signal_number


@dataclasses.dataclass
class TrialResult:
    ok: bool
    metrics: dict = None
    error: str = None
    job_id: str = None
    stopped: bool = False  # ended because the driver was stopped: not a failure, rerun resumes it


def read_trial_metrics(trial):
    path = Path(trial.output_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _last_error_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def worker_command(trial):
    return [sys.executable, "-m", "detection.worker", str(Path(trial.output_dir) / JOB_NAME)]


def run_trial_process(trial, env=None, children=None):
    """Run one trial's job file in a worker process; logs go to the trial folder. The child runs in its
    own process group, stops with this process, and is stopped (group and all) when this call is
    interrupted."""
    children = children or Children()
    log_path = Path(trial.output_dir) / "finetune.log"
    with open(log_path, "a") as log:
        proc = children.popen(worker_command(trial), env=env, stdout=log, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = proc.communicate()
        except BaseException as exc:
            children.stop(signal_number(exc))
            raise
        finally:
            children.forget(proc)
        log.write(stderr)
    if children.stopping:
        return TrialResult(False, error="stopped with the driver", stopped=True)
    metrics = read_trial_metrics(trial)
    if proc.returncode == 0 and metrics is not None:
        return TrialResult(True, metrics)
    return TrialResult(False, error=f"exit {proc.returncode}: {_last_error_line(stderr)}")


def device_slots(parent_mask, device_count, gpus_per_trial):
    """Device lists for parallel trials, drawn from the parent's ``CUDA_VISIBLE_DEVICES`` when set
    (so trials stay on the GPUs this process was given), else from ``0..device_count-1``."""
    if parent_mask is not None and parent_mask.strip():
        devices = [d.strip() for d in parent_mask.split(",") if d.strip()][:device_count]
    else:
        devices = [str(i) for i in range(device_count)]
    if not gpus_per_trial:
        return [[]]
    slots = [devices[i:i + gpus_per_trial] for i in range(0, len(devices), gpus_per_trial)]
    return [s for s in slots if len(s) == gpus_per_trial] or [[]]


def cpu_thread_env(jobs):
    """Environment for one of ``jobs`` CPU processes sharing this machine: an equal share of the cores
    as torch's intra-op threads (OpenMP and MKL read these at start-up)."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def local_slots(parent_mask, device_count, gpus_per_trial, cpu_jobs=1):
    """The local executor's slots, one trial each at a time: ``cpu_jobs`` GPU-less slots for CPU
    trials, else ``device_slots``."""
    if not gpus_per_trial and cpu_jobs > 1:
        return [[] for _ in range(cpu_jobs)]
    return device_slots(parent_mask, device_count, gpus_per_trial)


class LocalExecutor:
    """Trials in sequence on CPU, or on all GPUs a trial asks for; when a trial asks for fewer GPUs
    than are visible, one trial per group of GPUs at once. CPU trials (no GPU) run ``cpu_jobs`` at
    once, each with an equal share of the cores."""

    def __init__(self, gpus_per_trial=0, device_count=None, parent_mask=None, cpu_jobs=1):
        if device_count is None:
            device_count = torch.cuda.device_count()
        if parent_mask is None:
            parent_mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.slots = local_slots(parent_mask, device_count, gpus_per_trial, cpu_jobs)
        self.cpu_env = cpu_thread_env(cpu_jobs) if not gpus_per_trial and cpu_jobs > 1 else None
        self.children = Children()

    def _env(self, gpus):
        return dict(self.cpu_env) if self.cpu_env is not None else {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}

    def run(self, trials, on_start, on_finish, recorded_jobs=None):
        """``recorded_jobs`` is not needed here: a trial orphaned by a killed driver stops itself, and the
        trial started again waits for its folder's lock."""
        if len(self.slots) == 1:
            for trial in trials:
                on_start(trial, None)
                on_finish(trial, run_trial_process(trial, children=self.children))
            return
        free = list(self.slots)

        def one(trial):
            if self.children.stopping:
                return
            gpus = free.pop()
            try:
                on_start(trial, None)
                result = run_trial_process(trial, self._env(gpus), self.children)
            finally:
                free.append(gpus)
            on_finish(trial, result)

        pool = ThreadPoolExecutor(len(self.slots))
        try:
            list(pool.map(one, trials))
        except BaseException as exc:  # stopped (SIGINT/SIGTERM): end the running trials before returning
            self.children.stop(signal_number(exc))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class TrialJob(Checkpointable):
    """submitit job body. On pre-emption or time-out submitit calls ``checkpoint`` and requeues the
    same call, which resumes from the trial folder's last checkpoint."""

    def __call__(self, trial):
        install_handlers()  # submitit (and Slurm on scancel) sends SIGTERM: stop the trial with it
        result = run_trial_process(trial)
        return dataclasses.asdict(result)


def slurm_parameters(gpus_per_trial, options: ExecutorOptions = ExecutorOptions()):
    """submitit parameters of one trial job: one task that launches a process per GPU, with CPUs and
    memory per GPU (a partition's default of ~1 CPU would starve detectron2's loaders)."""
    gpus = max(gpus_per_trial, 1)
    params = {"timeout_min": options.slurm_time_min, "tasks_per_node": 1, "nodes": 1,
              "cpus_per_task": options.slurm_cpus_per_gpu * gpus, "mem_gb": options.slurm_mem_per_gpu_gb * gpus}
    if gpus_per_trial:
        params["gpus_per_node"] = gpus_per_trial
    if options.slurm_partition:
        params["slurm_partition"] = options.slurm_partition
    return params


class SubmititExecutor:
    """One submitit job per trial: ``cluster="slurm"`` on a cluster, ``"local"`` for tests/demos."""

    def __init__(self, folder, cluster="slurm", gpus_per_trial=0, options: ExecutorOptions = ExecutorOptions(),
                 poll_s=1.0, max_parallel=None):
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.folder, self.cluster = Path(folder), cluster
        params = slurm_parameters(gpus_per_trial, options)
        if cluster != "slurm":  # submitit's local executor takes neither a partition nor memory
            params = {k: v for k, v in params.items() if k in ("timeout_min", "tasks_per_node", "nodes",
                                                                "gpus_per_node")}
        self.executor.update_parameters(**params)
        self.poll_s = poll_s
        # Slurm queues every trial at once; on one machine, jobs run one at a time by default.
        self.max_parallel = max_parallel or (None if cluster == "slurm" else 1)

    def reattach(self, job_id):
        """The recorded job ``job_id`` of an earlier driver, if it still runs or left its result; None when
        it is gone (the trial is then submitted again)."""
        return reattach_job(self.folder, self.cluster, job_id)

    def run(self, trials, on_start, on_finish, recorded_jobs=None):
        """Submit ``trials``; a trial whose ``recorded_jobs`` entry (from the run store) still runs or
        finished is waited for instead of submitted again, so no two jobs train into one folder."""
        pending = []
        waiting = []
        for trial in trials:
            job = self.reattach(recorded_jobs[trial.id]) if (recorded_jobs or {}).get(trial.id) else None
            if job is None:
                waiting.append(trial)
            else:
                on_start(trial, str(job.job_id), reattached=True)
                pending.append((trial, job))
        try:
            self._run(waiting, pending, on_start, on_finish)
        except BaseException:
            if self.cluster != "slurm":  # local jobs are this machine's processes: stop them
                for _, job in pending:
                    job.cancel(check=False)
                deadline = time.monotonic() + 60
                while any(not job.done() for _, job in pending) and time.monotonic() < deadline:
                    time.sleep(0.2)
            raise

    def _run(self, waiting, pending, on_start, on_finish):
        while waiting or pending:
            while waiting and (self.max_parallel is None or len(pending) < self.max_parallel):
                trial = waiting.pop(0)
                job = self.executor.submit(TrialJob(), trial)
                on_start(trial, str(job.job_id))
                pending.append((trial, job))
            for trial, job in list(pending):
                if job.done():
                    pending.remove((trial, job))
                    try:
                        result = TrialResult(**job.result())
                    except Exception as exc:  # the job itself crashed (node failure, OOM kill, ...)
                        result = TrialResult(False, error=f"job {job.job_id} failed: {_last_error_line(str(exc))}")
                    result.job_id = str(job.job_id)
                    on_finish(trial, result)
            if pending:
                time.sleep(self.poll_s)
