"""What Slurm's environment says about the step a process belongs to, for every stage that launches
processes (pretraining reads its ranks from it; fine-tuning its machines).

A step is what ``srun`` starts: ``SLURM_STEP_NUM_TASKS`` tasks on ``SLURM_STEP_NUM_NODES`` nodes.
The job's own ``SLURM_NTASKS`` describes the allocation, not a step: a batch script that runs a
command without ``srun`` is one process, whatever ``--ntasks`` asked for, so ``SLURM_NTASKS`` > 1
there is refused (the other ranks would never start), and a job's count never stands in for the
step's.
"""

import dataclasses
import re
import shutil
import subprocess
from typing import Mapping, Optional

from simsiam_transfer.errors import UserError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


@dataclasses.dataclass
class SlurmStep:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    nodes: int
    tasks_per_node: int
    rendezvous: dict  # MASTER_ADDR / MASTER_PORT to set (empty when exported already)


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """An integer launcher variable, or one line naming it (a typo in an export, a stale value)."""
    text = env.get(name, "").strip()
    if not text:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < minimum:
        raise UserError(f"{name}={text!r}: must be an integer >= {minimum}; unset it, or launch with torchrun "
                        "(which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    return int(text)


def check_ranks(rank: int, world_size: int, names: str) -> None:
    if rank >= world_size:
        raise UserError(f"{names}: rank {rank} does not exist in a world of {world_size} process(es); "
                        "ranks run from 0 to world size - 1")


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


def slurm_step(env: Mapping[str, str], first_host=first_slurm_host) -> Optional[SlurmStep]:
    """The multi-task srun step this process is a task of; None for one process (no step, or a step of
    one task). Refuses ``SLURM_NTASKS`` > 1 outside a step in one line."""
    if "SLURM_STEP_NUM_TASKS" not in env:
        ntasks = env_int(env, "SLURM_NTASKS", 1, 1)
        if ntasks > 1 and "SLURM_JOB_ID" in env:
            raise UserError(f"SLURM_NTASKS={ntasks} but this process is not a task of an srun step (no "
                            "SLURM_STEP_NUM_TASKS): the other ranks would never start; run the command under "
                            f"srun (srun --ntasks {ntasks} ...), or as one process with torchrun")
        return None
    world = env_int(env, "SLURM_STEP_NUM_TASKS", 1, 1)
    if world <= 1:
        return None
    rank, local = env_int(env, "SLURM_PROCID", 0, 0), env_int(env, "SLURM_LOCALID", 0, 0)
    check_ranks(rank, world, f"SLURM_PROCID={rank} SLURM_STEP_NUM_TASKS={world}")
    nodes = env_int(env, "SLURM_STEP_NUM_NODES", 1, 1)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
    tasks_per_node = int(per_node) if per_node.isdigit() else -(-world // nodes)
    step = SlurmStep(rank, world, local, env_int(env, "SLURM_NODEID", 0, 0), nodes, tasks_per_node, {})
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UserError(f"srun started {world} tasks but neither MASTER_ADDR nor SLURM_NODELIST is set; "
                            "export MASTER_ADDR and MASTER_PORT, or launch with torchrun")
        step.rendezvous["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env:
        step.rendezvous["MASTER_PORT"] = str(slurm_port(env.get("SLURM_JOB_ID", "")))
    return step
