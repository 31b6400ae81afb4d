"""Process-group set-up from the launcher's environment (torchrun, or Slurm's srun), and collectives.

``launch_env(environ)`` is a pure function of the environment: torchrun's ``RANK``/``WORLD_SIZE``
win; under an ``srun`` step with several tasks the ranks come from the step (``simsiam_transfer.slurm``):
``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and, without ``MASTER_ADDR``, the
first host of the step's node list on a port derived from ``SLURM_JOB_ID``. ``SLURM_NTASKS`` > 1
outside an srun step (an sbatch script without srun) is refused: those ranks would never start.
"""

import dataclasses
import os
import sys
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from simsiam_transfer.errors import UserError
from simsiam_transfer.slurm import check_ranks, env_int, first_slurm_host, slurm_step

@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclasses.dataclass
class LaunchEnv:
    """Ranks and the rendezvous variables to set (empty when the launcher already set them)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    rendezvous: dict = dataclasses.field(default_factory=dict)
    processes_per_node: int = 0  # srun: the step's tasks on this node (0: not known, torchrun tells it)


def launch_env(env: Mapping[str, str], first_host=first_slurm_host) -> LaunchEnv:
    rank, world_size = env_int(env, "RANK", 0, 0), env_int(env, "WORLD_SIZE", 1, 1)
    local_rank = env_int(env, "LOCAL_RANK", 0, 0)
    if ("RANK" in env) != ("WORLD_SIZE" in env) and (rank > 0 or world_size > 1):
        given, absent = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise UserError(f"{given} is set but {absent} is not; launch with torchrun, or set both with "
                        "MASTER_ADDR and MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        check_ranks(rank, world_size, f"RANK={rank} WORLD_SIZE={world_size}")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name, "").strip()]
        if world_size > 1 and missing:
            raise UserError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: the processes have "
                            "nowhere to meet; launch with torchrun, or export MASTER_ADDR and MASTER_PORT")
        if world_size > 1:
            env_int(env, "MASTER_PORT", 0, 1)
        return LaunchEnv(rank, world_size, local_rank)
    step = slurm_step(env, first_host)
    if step is None:
        return LaunchEnv()
    return LaunchEnv(step.rank, step.world_size, step.local_rank, step.rendezvous, step.tasks_per_node)


def device_for(local_rank: int, device_count: int) -> torch.device:
    """With ``--gpus-per-task 1`` each task sees one GPU whatever its local id, hence the modulo."""
    return torch.device("cuda", local_rank % device_count) if device_count else torch.device("cpu")


def check_one_gpu_per_process(env: Mapping[str, str], device_count: int) -> None:
    """Refuse, before any process group exists, more processes on this machine than visible GPUs:
    two ranks would share a GPU and NCCL stops at the first collective ("Duplicate GPU detected").
    torchrun tells each process how many share the machine (LOCAL_WORLD_SIZE); under srun each task
    may see its own GPU (--gpus-per-task), so nothing is refused there."""
    local_processes = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if not device_count or local_processes <= device_count:
        return
    if int(env.get("LOCAL_RANK", "0") or 0):
        raise SystemExit(2)  # local rank 0 says it once
    raise UserError(f"{local_processes} processes on this machine share {device_count} GPU(s): NCCL needs one GPU "
                    f"per process; start at most {device_count} (torchrun --nproc_per_node {device_count}) or "
                    "make more GPUs visible (CUDA_VISIBLE_DEVICES)")


def idle_gpu_warning(processes_per_node: int, device_count: int) -> Optional[str]:
    """A line when a node's processes use fewer of its GPUs than it shows (e.g. srun --ntasks-per-node 1 on an
    8-GPU node); None when each process sees only its own GPU (--gpus-per-task 1) or all are used."""
    if device_count <= 1 or not 0 < processes_per_node < device_count:
        return None
    return (f"warning: this node shows {device_count} GPUs but the run starts {processes_per_node} process(es) on "
            f"it, one GPU each, so {device_count - processes_per_node} stay idle; start one process per GPU "
            f"(srun --ntasks-per-node {device_count}, or torchrun --nproc_per_node {device_count})")


def init_distributed() -> DistInfo:
    """Join the process group if launched with several processes; one GPU per process, else CPU."""
    launch = launch_env(os.environ)
    device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_one_gpu_per_process(os.environ, device_count)
    per_node = launch.processes_per_node or env_int(os.environ, "LOCAL_WORLD_SIZE", 1, 1)
    warning = idle_gpu_warning(per_node, device_count)
    if warning and launch.local_rank == 0:
        print(warning, file=sys.stderr, flush=True)
    device = device_for(launch.local_rank, device_count)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size > 1 and not dist.is_initialized():
        os.environ.update(launch.rendezvous)
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=launch.rank, world_size=launch.world_size)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device)


def all_gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (identity on one process)."""
    if not info.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_varlen(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Like ``all_gather_cat`` for shards whose first dimension differs between ranks."""
    if not info.distributed:
        return tensor
    sizes = all_gather_cat(torch.tensor([tensor.shape[0]], device=tensor.device), info).tolist()
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = all_gather_cat(padded.unsqueeze(0), info)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(tensor)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, info: Optional[DistInfo]) -> range:
    """This rank's share of ``range(n)``, every index on exactly one rank (no padding)."""
    return range(n) if info is None or not info.distributed else range(info.rank, n, info.world_size)
