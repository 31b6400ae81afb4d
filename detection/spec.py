"""Typed specs of the detection stage, built only from validated ``FINETUNE`` / ``SWEEP`` nodes
(``detection.schema``): ``FinetuneJob`` is one detectron2 fine-tune, ``SweepSpec`` one bench folder
(an LR search x trials), ``Trial`` one fine-tune of a sweep at one LR and seed in its own folder.
Values keep their types from the config to the solver; a trial reaches its worker as a ``job.yaml``
(``detection.job``), never as argv.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from detection import protocol
from detection.schema import SWEEP, resolved_config
from simsiam_transfer.config import CfgNode


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune: everything a worker needs; plain data so it pickles into spawned processes."""

    config_file: str  # a benchmark name or a detectron2 YAML
    weights: str  # a converted .pkl, or "none" for random init
    cfg: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # nested detectron2 keys, typed
    overrides: tuple[str, ...] = ()  # KEY VALUE strings from a command line (parsed as literals once)
    data_root: str | None = None
    datasets: str | None = None
    num_gpus: int = 0  # processes per machine, one GPU each; 0 = one CPU process
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    scaling: str = "faithful"

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(str(o) for o in self.overrides))
        object.__setattr__(self, "cfg", _plain(self.cfg))

    @property
    def world_size(self) -> int:
        return max(self.num_gpus, 1) * self.num_machines

    @property
    def config_path(self) -> str:
        return resolved_config(self.config_file)[1]

    def with_overrides(self, *extra: Any) -> FinetuneJob:
        return dataclasses.replace(self, overrides=self.overrides + tuple(str(e) for e in extra))

    @classmethod
    def from_config(cls, node: CfgNode, overrides: tuple[str, ...] = (), num_gpus: Optional[int] = None) -> FinetuneJob:
        """From a validated FINETUNE node; ``num_gpus`` replaces ``LAUNCH.NUM_GPUS`` (resolved -1)."""
        launch = node.LAUNCH
        return cls(config_file=node.CONFIG, weights=_abs_weights(node.WEIGHTS), cfg=node.CFG,
                   overrides=overrides, data_root=_abs(node.DATA_ROOT), datasets=_abs(node.DATASETS),
                   num_gpus=launch.NUM_GPUS if num_gpus is None else num_gpus,
                   num_machines=launch.NUM_MACHINES, machine_rank=launch.MACHINE_RANK, dist_url=launch.DIST_URL,
                   scaling=node.SCALING)


@dataclasses.dataclass(frozen=True)
class Trial:
    """A fine-tune of a sweep at one LR and seed, in ``output_dir`` (its ``job.yaml`` is written there)."""

    lr: float
    trial: int
    seed: int
    output_dir: str

    @property
    def id(self) -> str:
        return protocol.trial_id(self.lr, self.trial)


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """Where trials run and what each asks for (``SWEEP.EXECUTOR``, ``GPUS_PER_TRIAL``, ``CPU_JOBS``, ``SLURM``)."""

    kind: str = "local"  # local | slurm | submitit-local
    gpus_per_trial: int | None = None  # None: all visible GPUs locally, 8 (the protocol's) on Slurm
    cpu_jobs: int = 1  # CPU trials (no GPU) at once, locally; each gets cores // cpu_jobs threads
    slurm_partition: str | None = None
    slurm_time_min: int = SWEEP.SLURM.TIME_MIN
    slurm_cpus_per_gpu: int = SWEEP.SLURM.CPUS_PER_GPU
    slurm_mem_per_gpu_gb: int = SWEEP.SLURM.MEM_PER_GPU_GB


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """One bench folder: an LR search x trials of one fine-tune."""

    finetune: FinetuneJob
    output_dir: str
    name: str
    lrs: tuple[float, ...] | None = None  # None: the config's SOLVER.BASE_LR
    trials: int = 5
    search: str = "best-then-repeat"
    metric: str = protocol.DEFAULT_METRIC
    executor: ExecutorOptions = ExecutorOptions()
    max_retries: int = 1
    keep_checkpoints: bool = False
    smoke: bool = False  # reports label the column a smoke run, too short to rank
    # How errors found later (files, GPUs, metric) name a key: its flag, or ``source: KEY``.
    label: Callable[[str], str] = dataclasses.field(default=str, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: CfgNode, overrides: tuple[str, ...] = (),
                    label: Callable[[str], str] = str) -> SweepSpec:
        """From a validated bench node (``FINETUNE`` and ``SWEEP``); ``label`` names keys in errors."""
        s = cfg.SWEEP
        job = FinetuneJob.from_config(cfg.FINETUNE, overrides)
        name = s.NAME or ("scratch" if job.weights == "none" else Path(job.weights).stem)
        return cls(
            finetune=job, output_dir=str(_abs(s.OUTPUT_DIR)), name=name,
            lrs=tuple(float(lr) for lr in s.LRS) or None, trials=s.TRIALS, search=s.SEARCH, metric=s.METRIC,
            max_retries=s.MAX_RETRIES, keep_checkpoints=s.KEEP_CHECKPOINTS, smoke=s.SMOKE, label=label,
            executor=ExecutorOptions(kind=s.EXECUTOR, gpus_per_trial=None if s.GPUS_PER_TRIAL < 0 else s.GPUS_PER_TRIAL,
                                     cpu_jobs=s.CPU_JOBS, slurm_partition=s.SLURM.PARTITION or None,
                                     slurm_time_min=s.SLURM.TIME_MIN, slurm_cpus_per_gpu=s.SLURM.CPUS_PER_GPU,
                                     slurm_mem_per_gpu_gb=s.SLURM.MEM_PER_GPU_GB))

    @property
    def benchmark(self) -> str:
        return resolved_config(self.finetune.config_file)[0]

    def job(self, num_gpus: int) -> FinetuneJob:
        """The fine-tune every trial of this sweep runs (before its LR, seed and folder)."""
        return dataclasses.replace(self.finetune, num_gpus=num_gpus)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _plain(node: Any) -> Any:
    """A config node as plain dicts and lists (pickles and dumps without fvcore)."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _abs_weights(weights: str) -> str:
    return weights if weights == "none" else str(_abs(weights))
