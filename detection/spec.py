"""Typed specs between the CLI, the pipeline, the bench and its executors.

``SweepSpec`` describes one bench folder (benchmark, weights, LR grid, trials, search, metric,
batch policy, executor options); ``FinetuneJob`` one detectron2 fine-tune; ``Trial`` one job at
one LR and seed in its own folder. The CLI builds a ``SweepSpec`` from argv
(``sweep_spec_from_args``), the pipeline builds the same spec with keywords. Executors pickle
``Trial``s (submitit) or hand them to a subprocess as ``finetune`` argv (``Trial.argv``): that is
the only place where a spec becomes argv again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from detection import protocol
from simsiam_transfer import atomic
from simsiam_transfer.config import resolve_config
from simsiam_transfer.errors import UserError

SCALINGS = ("faithful", "linear")
EXECUTORS = ("local", "slurm", "submitit-local")
# Slurm defaults per GPU: detectron2's 4 loader workers + the trainer process + one spare; memory
# for COCO's dataset dicts held by each worker. Override with --slurm-cpus-per-gpu / --slurm-mem-per-gpu.
SLURM_CPUS_PER_GPU = 6
SLURM_MEM_PER_GPU_GB = 32
# Fits the MaxTime of common partitions; submitit requeues a timed-out trial, which resumes
# from its last checkpoint, so longer trials still finish.
SLURM_TIME_MIN = 240


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune: everything a worker needs; plain data so it pickles into spawned processes."""

    config_file: str
    weights: str  # a converted .pkl, or "none" for random init
    overrides: tuple[str, ...] = ()
    data_root: str | None = None
    datasets: str | None = None
    num_gpus: int = 0  # processes per machine, one GPU each; 0 = one CPU process
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    scaling: str = "faithful"

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(str(o) for o in self.overrides))

    @property
    def world_size(self) -> int:
        return max(self.num_gpus, 1) * self.num_machines

    def with_overrides(self, *extra: Any) -> FinetuneJob:
        return dataclasses.replace(self, overrides=self.overrides + tuple(str(e) for e in extra))

    def argv(self) -> list[str]:
        """``simsiam-transfer finetune`` arguments that rebuild this job (the subprocess boundary)."""
        args = ["finetune", "--config", self.config_file, "--weights", self.weights,
                "--num-gpus", str(self.num_gpus), "--scaling", self.scaling]
        if self.num_machines != 1:
            args += ["--num-machines", str(self.num_machines), "--machine-rank", str(self.machine_rank),
                     "--dist-url", self.dist_url]
        if self.datasets:
            args += ["--datasets", self.datasets]
        if self.data_root:
            args += ["--data-root", self.data_root]
        return args + list(self.overrides)


@dataclasses.dataclass(frozen=True)
class Trial:
    """A fine-tune job at one LR and seed, in ``output_dir``."""

    job: FinetuneJob
    lr: float
    trial: int
    seed: int
    output_dir: str

    @property
    def id(self) -> str:
        return protocol.trial_id(self.lr, self.trial)

    def finetune_job(self) -> FinetuneJob:
        return self.job.with_overrides("SOLVER.BASE_LR", repr(self.lr), "SEED", self.seed,
                                       "OUTPUT_DIR", self.output_dir)

    def argv(self) -> list[str]:
        return self.finetune_job().argv()


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """Where trials run and what each asks for."""

    kind: str = "local"  # local | slurm | submitit-local
    gpus_per_trial: int | None = None  # None: all visible GPUs locally, 8 (the protocol's) on Slurm
    cpu_jobs: int = 1  # CPU trials (no GPU) at once, locally; each gets cores // cpu_jobs threads
    slurm_partition: str | None = None
    slurm_time_min: int = SLURM_TIME_MIN
    slurm_cpus_per_gpu: int = SLURM_CPUS_PER_GPU
    slurm_mem_per_gpu_gb: int = SLURM_MEM_PER_GPU_GB


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """One bench folder: an LR search x trials of one weights file on one benchmark."""

    benchmark: str  # a protocol.BENCHMARKS name or a detectron2 config file
    weights: str  # a converted .pkl, or "none"
    output_dir: str
    name: str | None = None  # report row; default: the weights file's stem, or "scratch"
    lrs: tuple[float, ...] | None = None  # None: the config's SOLVER.BASE_LR
    trials: int = 5
    search: str = "best-then-repeat"
    metric: str = protocol.DEFAULT_METRIC
    overrides: tuple[str, ...] = ()
    datasets: str | None = None
    data_root: str | None = None
    scaling: str = "faithful"
    executor: ExecutorOptions = ExecutorOptions()
    max_retries: int = 1
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        # Normalised here so a spec from argv and one from keywords compare equal.
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("overrides", tuple(str(o) for o in self.overrides))
        if self.lrs is not None:
            set_("lrs", tuple(float(lr) for lr in self.lrs))
        set_("weights", self.weights if self.weights == "none" else _abs(self.weights))
        set_("datasets", _abs(self.datasets))
        set_("data_root", _abs(self.data_root))
        set_("output_dir", _abs(self.output_dir))
        if self.name is None:
            set_("name", "scratch" if self.weights == "none" else Path(self.weights).stem)

    def validate(self) -> None:
        """Every check that needs no file but the config: refused before anything is written."""
        if self.trials < 1:
            raise UserError(f"--trials must be >= 1, got {self.trials}")
        if self.max_retries < 0:
            raise UserError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.search not in protocol.SEARCHES:
            raise UserError(f"--search {self.search}: use one of {', '.join(protocol.SEARCHES)}")
        if self.scaling not in SCALINGS:
            raise UserError(f"--scaling {self.scaling}: use one of {', '.join(SCALINGS)}")
        if self.executor.kind not in EXECUTORS:
            raise UserError(f"--executor {self.executor.kind}: use one of {', '.join(EXECUTORS)}")
        if self.lrs is not None:
            protocol.check_lrs(self.lrs, ",".join(f"{lr:g}" for lr in self.lrs))
        gpus = self.executor.gpus_per_trial
        if gpus is not None and gpus < 0:
            raise UserError(f"--gpus-per-trial must be >= 0, got {gpus}")
        if self.executor.cpu_jobs < 1:
            raise UserError(f"--cpu-jobs must be >= 1, got {self.executor.cpu_jobs}")
        if self.executor.cpu_jobs > 1 and self.executor.kind != "local":
            raise UserError(f"--cpu-jobs {self.executor.cpu_jobs} runs CPU trials side by side on this machine; "
                            f"it needs --executor local (got {self.executor.kind})")
        for flag, value in (("--slurm-time", self.executor.slurm_time_min),
                            ("--slurm-cpus-per-gpu", self.executor.slurm_cpus_per_gpu),
                            ("--slurm-mem-per-gpu", self.executor.slurm_mem_per_gpu_gb)):
            if value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
        atomic.check_output_dir(self.output_dir, "--output-dir")
        self.resolved_benchmark()

    def resolved_benchmark(self) -> tuple[str, str]:
        """(benchmark label, config file) for ``benchmark``."""
        if self.benchmark in protocol.BENCHMARKS:
            return self.benchmark, protocol.BENCHMARKS[self.benchmark]
        if self.benchmark.endswith((".yaml", ".yml")):
            resolve_config(self.benchmark)
            return Path(self.benchmark).stem, self.benchmark
        raise UserError(f"--benchmark {self.benchmark}: not one of {sorted(protocol.BENCHMARKS)} "
                        "nor a .yaml config file")

    def job(self, num_gpus: int) -> FinetuneJob:
        """The fine-tune every trial of this sweep runs (before its LR, seed and folder)."""
        return FinetuneJob(config_file=self.resolved_benchmark()[1], weights=self.weights,
                           overrides=self.overrides, data_root=self.data_root, datasets=self.datasets,
                           num_gpus=num_gpus, scaling=self.scaling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def sweep_spec_from_args(args: Any) -> SweepSpec:
    """The ``bench`` command's argparse namespace -> SweepSpec (the only argv -> spec step)."""
    return SweepSpec(
        benchmark=args.benchmark, weights=args.weights, output_dir=args.output_dir, name=args.name,
        lrs=protocol.parse_lrs(args.lrs) if args.lrs else None, trials=args.trials, search=args.search,
        metric=args.metric, overrides=tuple(args.overrides), datasets=args.datasets, data_root=args.data_root,
        scaling=args.scaling, max_retries=args.max_retries, keep_checkpoints=args.keep_checkpoints,
        executor=ExecutorOptions(kind=args.executor, gpus_per_trial=args.gpus_per_trial, cpu_jobs=args.cpu_jobs,
                                 slurm_partition=args.slurm_partition, slurm_time_min=args.slurm_time,
                                 slurm_cpus_per_gpu=args.slurm_cpus_per_gpu,
                                 slurm_mem_per_gpu_gb=args.slurm_mem_per_gpu))


def finetune_job_from_args(args: Any, num_gpus: int) -> FinetuneJob:
    """The ``finetune`` command's namespace -> FinetuneJob."""
    return FinetuneJob(config_file=args.config, weights=args.weights, overrides=tuple(args.overrides),
                       data_root=args.data_root, datasets=args.datasets, num_gpus=num_gpus,
                       num_machines=args.num_machines, machine_rank=args.machine_rank,
                       dist_url=args.dist_url, scaling=args.scaling)
