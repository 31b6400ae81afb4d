"""Process-group set-up from the launcher's environment (torchrun, or Slurm's srun), and collectives.

``launch_env(environ)`` is a pure function of the environment: torchrun's ``RANK``/``WORLD_SIZE``
win; under ``srun`` with several tasks the ranks come from ``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID`` and, without ``MASTER_ADDR``, the rendezvous is the first host of
``SLURM_NODELIST`` on a port derived from ``SLURM_JOB_ID``.
"""

import dataclasses
import os
import re
import shutil
import subprocess
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from simsiam_transfer.errors import UserError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


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


def expand_nodelist(nodelist: str) -> list:
    """Slurm's compact host list, e.g. ``node[01-03,7],gpu7`` -> node01 node02 node03 node7 gpu7."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise UserError(f"SLURM_NODELIST {nodelist!r}: cannot read the range {part!r}; "
                                "set MASTER_ADDR and MASTER_PORT")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """``scontrol show hostnames`` where Slurm's tools are installed, else our own parser."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(f"SLURM_NODELIST {nodelist!r}: no host; set MASTER_ADDR and MASTER_PORT")
    return hosts[0]


def slurm_port(job_id: str) -> int:
    """Same on every task of a job, different for concurrent jobs on one node."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else SLURM_PORT_BASE


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """An integer launcher variable, or one line naming it (a typo in an export, a stale value)."""
    text = env.get(name, "").strip()
    if not text:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < minimum:
        raise UserError(f"{name}={text!r}: must be an integer >= {minimum}; unset it, or launch with torchrun "
                        "(which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    return int(text)


def _check_ranks(rank: int, world_size: int, names: str) -> None:
    if rank >= world_size:
        raise UserError(f"{names}: rank {rank} does not exist in a world of {world_size} process(es); "
                        "ranks run from 0 to world size - 1")


def launch_env(env: Mapping[str, str], first_host=first_slurm_host) -> LaunchEnv:
    rank, world_size = _env_int(env, "RANK", 0, 0), _env_int(env, "WORLD_SIZE", 1, 1)
    local_rank = _env_int(env, "LOCAL_RANK", 0, 0)
    if ("RANK" in env) != ("WORLD_SIZE" in env) and (rank > 0 or world_size > 1):
        given, absent = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise UserError(f"{given} is set but {absent} is not; launch with torchrun, or set both with "
                        "MASTER_ADDR and MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        _check_ranks(rank, world_size, f"RANK={rank} WORLD_SIZE={world_size}")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name, "").strip()]
        if world_size > 1 and missing:
            raise UserError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: the processes have "
                            "nowhere to meet; launch with torchrun, or export MASTER_ADDR and MASTER_PORT")
        if world_size > 1:
            _env_int(env, "MASTER_PORT", 0, 1)
        return LaunchEnv(rank, world_size, local_rank)
    ntasks = _env_int(env, "SLURM_NTASKS", 1, 1)
    if "SLURM_PROCID" not in env or ntasks <= 1:
        return LaunchEnv()
    launch = LaunchEnv(_env_int(env, "SLURM_PROCID", 0, 0), ntasks, _env_int(env, "SLURM_LOCALID", 0, 0))
    _check_ranks(launch.rank, ntasks, f"SLURM_PROCID={launch.rank} SLURM_NTASKS={ntasks}")
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UserError(f"srun started {ntasks} tasks but neither MASTER_ADDR nor SLURM_NODELIST is set; "
                            "export MASTER_ADDR and MASTER_PORT, or launch with torchrun")
        launch.rendezvous["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env:
        launch.rendezvous["MASTER_PORT"] = str(slurm_port(env.get("SLURM_JOB_ID", "")))
    return launch


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


def init_distributed() -> DistInfo:
    """Join the process group if launched with several processes; one GPU per process, else CPU."""
    launch = launch_env(os.environ)
    device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_one_gpu_per_process(os.environ, device_count)
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
