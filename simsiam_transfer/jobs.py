"""submitit jobs an earlier driver left behind: found again from their folder and id, so a rerun waits
for a job that still runs (or takes its result) instead of starting a second one into the same folder.

Slurm jobs are asked for their state (submitit's ``SlurmJob``: sacct); jobs of submitit's local executor
are named by their controller's pid, which is alive exactly while the job runs.
"""

import os
import signal
from pathlib import Path

import submitit

# Slurm job states in which a job will still run or is running (sacct / squeue names).
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def process_mentions(pid, text) -> bool:
    try:
        return text in Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return False


class ReattachedJob:
    """A job of an earlier driver, seen through its folder: done once it no longer runs."""

    def __init__(self, job, alive: bool):
        self.job, self.job_id, self._alive = job, job.job_id, alive

    def _still_alive(self) -> bool:
        if isinstance(self.job, submitit.SlurmJob):
            return (self.job.state or "UNKNOWN").upper().split()[0] in SLURM_ALIVE
        return process_mentions(self.job_id, "submitit")

    def done(self) -> bool:
        if self._alive:
            self._alive = self._still_alive() and not self.job.paths.result_pickle.exists()
        return not self._alive

    def result(self):
        return self.job.result()

    def cancel(self, check=False):
        if isinstance(self.job, submitit.SlurmJob):
            self.job.cancel(check=check)
        elif process_mentions(self.job_id, "submitit"):
            os.kill(int(self.job_id), signal.SIGINT)  # what submitit's own LocalJob.cancel sends


def reattach_job(folder, cluster: str, job_id: str):
    """The job ``job_id`` submitted into ``folder`` if it still runs or left its result, else None (gone:
    cancelled, failed without a result, or unknown to the scheduler)."""
    if cluster == "slurm":
        job = submitit.SlurmJob(folder=Path(folder), job_id=str(job_id))
    else:
        job = submitit.LocalJob(folder=Path(folder), job_id=str(job_id))
    found = ReattachedJob(job, True)
    alive = found._still_alive()
    if alive or job.paths.result_pickle.exists():
        found._alive = alive and not job.paths.result_pickle.exists()
        return found
    return None
