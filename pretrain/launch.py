"""Pretraining as a submitit job: on Slurm (one task per GPU, one node or several) or with submitit's local
executor. A job that times out or is pre-empted is requeued by submitit and resumes from its
``OUTPUT_DIR``'s last checkpoint; a driver that was stopped finds its job again (``simsiam_transfer.jobs``).
"""

from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, TorchDistributedEnvironment

from pretrain.config import load_cfg
from pretrain.engine import run_pretrain
from simsiam_transfer.stopping import install_handlers


class PretrainJob(Checkpointable):
    """The job body, run by every task: the rendezvous from submitit's environment, then the pretraining."""

    def __call__(self, config_path: str) -> int:
        install_handlers()
        TorchDistributedEnvironment().export(set_cuda_visible_devices=True)
        history = run_pretrain(load_cfg(config_path))
        return len(history)


def job_parameters(cluster: str, nodes: int, tasks_per_node: int, gpus: bool, slurm) -> dict:
    """submitit parameters: a task per GPU (per process on CPU), CPUs and memory per GPU, the time limit."""
    params = {"nodes": nodes, "tasks_per_node": tasks_per_node, "timeout_min": slurm.TIME_MIN}
    if cluster != "slurm":  # submitit's local executor takes neither a partition nor memory
        return params
    params.update(cpus_per_task=slurm.CPUS_PER_GPU, mem_gb=slurm.MEM_PER_GPU_GB * tasks_per_node)
    if gpus:
        params["gpus_per_node"] = tasks_per_node
    if slurm.PARTITION:
        params["slurm_partition"] = slurm.PARTITION
    return params


def submit_pretraining(config_path, folder, cluster: str, nodes: int, tasks_per_node: int, gpus: bool, slurm):
    """Submit one pretraining run (its resolved config file) as a submitit job into ``folder``."""
    executor = submitit.AutoExecutor(folder=str(Path(folder)), cluster=cluster)
    executor.update_parameters(**job_parameters(cluster, nodes, tasks_per_node, gpus, slurm))
    return executor.submit(PretrainJob(), str(config_path))
