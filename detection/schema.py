"""The detection stage's config schema: ``FINETUNE`` (one fine-tune) and ``SWEEP`` (LR search x
trials), each default declared here once.

Every way in reads these nodes: a bench or pipeline YAML, and the command-line flags, which are
conveniences mapped to keys by ``FINETUNE_FLAGS`` / ``BENCH_FLAGS`` (the parser states no default of
its own). ``validate`` checks the values and names the key a value came from, or the flag when it
came from a flag. ``detection.spec`` builds the typed specs from validated nodes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from detection import protocol
from simsiam_transfer.atomic import check_output_dir
from simsiam_transfer.config import CfgNode as CN
from simsiam_transfer.config import resolve_config
from simsiam_transfer.errors import UserError

SCALINGS = ("faithful", "linear")
EXECUTORS = ("local", "slurm", "submitit-local")

FINETUNE = CN()
FINETUNE.CONFIG = ""            # a benchmark name (protocol.BENCHMARKS) or a detectron2 YAML
FINETUNE.WEIGHTS = ""           # a converted detectron2 .pkl, or none (random init); required
FINETUNE.DATASETS = ""          # dataset catalog YAML (docs/formats.md)
FINETUNE.DATA_ROOT = ""         # root of the standard VOC/COCO folders (default $DETECTRON2_DATASETS)
FINETUNE.SCALING = "faithful"   # faithful: the config's batch, LR and schedule on any GPU count; linear
FINETUNE.CFG = CN(new_allowed=True)  # detectron2 keys merged over CONFIG, values kept as typed
FINETUNE.LAUNCH = CN()          # one fine-tune's processes (bench sets them per trial)
FINETUNE.LAUNCH.NUM_GPUS = -1   # processes per machine, one GPU each; -1: every visible GPU (0 on CPU)
FINETUNE.LAUNCH.NUM_MACHINES = 1
FINETUNE.LAUNCH.MACHINE_RANK = 0
FINETUNE.LAUNCH.DIST_URL = "auto"  # tcp://HOST:PORT of machine rank 0 for multi-machine runs

SWEEP = CN()
SWEEP.NAME = ""                 # row label in reports; empty: the weights file's stem, or scratch
SWEEP.OUTPUT_DIR = ""           # the sweep folder; rerunning resumes it
SWEEP.LRS = []                  # SOLVER.BASE_LR values searched; empty: the config's own
SWEEP.TRIALS = 5                # trials at the selected LR (the paper averages 5 on VOC)
SWEEP.SEARCH = "best-then-repeat"
SWEEP.METRIC = protocol.DEFAULT_METRIC
SWEEP.MAX_RETRIES = 1           # reruns of a failed trial
SWEEP.KEEP_CHECKPOINTS = False  # keep finished trials' periodic checkpoints (else only model_final.pth)
SWEEP.SMOKE = False             # a smoke run: proves the path; reports label its column "too short to rank"
SWEEP.EXECUTOR = "local"        # local / slurm / submitit-local
SWEEP.GPUS_PER_TRIAL = -1       # -1: every visible GPU locally (one trial at a time), 8 on Slurm; 0: CPU
SWEEP.CPU_JOBS = 1              # without GPUs: trials (and the pipeline's pretrainings) side by side
SWEEP.SLURM = CN()
SWEEP.SLURM.PARTITION = ""
SWEEP.SLURM.TIME_MIN = 240      # per trial job; a timed-out trial is requeued and resumes
SWEEP.SLURM.CPUS_PER_GPU = 6    # detectron2's 4 loader workers + the trainer + one spare
SWEEP.SLURM.MEM_PER_GPU_GB = 32  # COCO's dataset dicts are held by every loader worker

BENCH = CN()
BENCH.FINETUNE = FINETUNE.clone()
BENCH.SWEEP = SWEEP.clone()


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line convenience for one schema key; its default is the key's."""

    names: Tuple[str, ...]
    key: str
    help: str
    kind: str = "value"  # value (typed like the key's default), lrs (comma list), switch (store_true)
    choices: Optional[Tuple[str, ...]] = None
    metavar: Optional[str] = None


_WEIGHTS = Flag(("--weights",), "FINETUNE.WEIGHTS", "converted detectron2 .pkl (simsiam-transfer convert), "
                "or 'none' for random init")
_DATASETS = Flag(("--datasets",), "FINETUNE.DATASETS", "dataset catalog YAML (format: docs/formats.md)")
_DATA_ROOT = Flag(("--data-root",), "FINETUNE.DATA_ROOT", "root of the standard VOC/COCO folders "
                  "(default $DETECTRON2_DATASETS)")
_SCALING = Flag(("--scaling",), "FINETUNE.SCALING", "faithful: the config's global batch, LR and schedule on "
                "any GPU count, BN synced over the trial's GPUs; linear: detectron2's REFERENCE_WORLD_SIZE "
                "rescaling (changes the batch and BN group)", choices=SCALINGS)

FINETUNE_FLAGS = (
    Flag(("--config",), "FINETUNE.CONFIG", "detectron2 YAML (a path, or relative to configs/), or a benchmark "
         "name"),
    _WEIGHTS, _DATASETS, _DATA_ROOT, _SCALING,
    Flag(("--num-gpus",), "FINETUNE.LAUNCH.NUM_GPUS", "processes per machine, one GPU each (-1: every visible "
         "GPU, 0 on CPU)"),
    Flag(("--num-machines",), "FINETUNE.LAUNCH.NUM_MACHINES", "machines of a multi-machine run"),
    Flag(("--machine-rank",), "FINETUNE.LAUNCH.MACHINE_RANK", "this machine's rank"),
    Flag(("--dist-url",), "FINETUNE.LAUNCH.DIST_URL", "tcp://HOST:PORT of machine rank 0 (needed with "
         "--num-machines > 1)"),
)

BENCH_FLAGS = (
    Flag(("--benchmark",), "FINETUNE.CONFIG", "voc07, voc0712, coco_1x, coco_2x (or *_mini for CPU), or a "
         "detectron2 config file"),
    _WEIGHTS, _DATASETS, _DATA_ROOT, _SCALING,
    Flag(("--output-dir",), "SWEEP.OUTPUT_DIR", "sweep folder; rerunning resumes it"),
    Flag(("--name",), "SWEEP.NAME", "row label in reports (empty: the weights file name, or 'scratch')"),
    Flag(("--lrs",), "SWEEP.LRS", "comma-separated SOLVER.BASE_LR values (empty: the config's)", kind="lrs",
         metavar="LR,LR,..."),
    Flag(("--trials",), "SWEEP.TRIALS", "trials at the selected LR (the paper: 5)"),
    Flag(("--search",), "SWEEP.SEARCH", "full: every LR x every trial; best-then-repeat: trial 0 per LR, then "
         "the rest at the best (the mean includes trial 0); best-then-repeat-independent: n more trials at "
         "the best, trial 0 left out of the mean", choices=protocol.SEARCHES),
    Flag(("--metric",), "SWEEP.METRIC", "LR selection metric (segm/* only for Mask R-CNN benchmarks)"),
    Flag(("--max-retries",), "SWEEP.MAX_RETRIES", "reruns of a failed trial"),
    Flag(("--keep-checkpoints",), "SWEEP.KEEP_CHECKPOINTS", "keep finished trials' periodic checkpoints "
         "(otherwise only model_final.pth)", kind="switch"),
    Flag(("--gpus-per-trial", "--num-gpus"), "SWEEP.GPUS_PER_TRIAL", "GPUs (processes) per trial (-1: every "
         "visible GPU, one trial at a time; 8 with --executor slurm; 0 on CPU); fewer than visible runs "
         "trials in parallel"),
    Flag(("--cpu-jobs",), "SWEEP.CPU_JOBS", "CPU-only trials side by side, each with cores/N threads (on 2 "
         "cores 2 single-thread mini trials finished 1.25x sooner than one after another)"),
    Flag(("--smoke",), "SWEEP.SMOKE", "a smoke run: a schedule that proves the path but is too short to rank "
         "backbones; reports label its column so", kind="switch"),
    Flag(("--executor",), "SWEEP.EXECUTOR", "where trials run", choices=EXECUTORS),
    Flag(("--slurm-partition",), "SWEEP.SLURM.PARTITION", "Slurm partition of the trial jobs"),
    Flag(("--slurm-time",), "SWEEP.SLURM.TIME_MIN", "minutes per trial job (a timed-out trial is requeued and "
         "resumes)"),
    Flag(("--slurm-cpus-per-gpu",), "SWEEP.SLURM.CPUS_PER_GPU", "CPUs per GPU of a trial job"),
    Flag(("--slurm-mem-per-gpu",), "SWEEP.SLURM.MEM_PER_GPU_GB", "GB of memory per GPU of a trial job"),
)


def get(node: CN, key: str) -> Any:
    for part in key.split("."):
        node = node[part]
    return node


def flag_default(defaults: CN, flag: Flag) -> Any:
    """The schema's default for ``flag`` (what ``--help`` shows)."""
    value = get(defaults, flag.key)
    if flag.kind == "lrs":
        return ",".join(f"{v:g}" for v in value) or "the config's"
    return value


def flag_values(flags: Sequence[Flag], args: Any) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``({key: value}, {key: flag})`` of the flags given on the command line (argparse leaves the
    others out), values converted to the key's type."""
    values, origins = {}, {}
    for flag in flags:
        dest = flag.names[0].lstrip("-").replace("-", "_")
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if flag.kind == "lrs":
            value = protocol.parse_lrs(value, flag.names[0])
        values[flag.key] = value
        origins[flag.key] = flag.names[0]
    return values, origins


def nest(values: Dict[str, Any]) -> dict:
    """``{"SWEEP.TRIALS": 3}`` -> ``{"SWEEP": {"TRIALS": 3}}``."""
    out: dict = {}
    for key, value in values.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


Namer = Callable[[str], str]


def namer(source: str, origins: Optional[Dict[str, str]] = None, prefix: str = "") -> Namer:
    """How an error names a key: the flag it came from, else ``source: PREFIX.KEY``."""
    origins = origins or {}

    def name(key: str) -> str:
        return origins.get(key) or f"{source}: {prefix}{key}"
    return name


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"{name} {value!r}: {rule}")


def _int_at_least(node: CN, key: str, lowest: int, name: Namer, leaf: str) -> None:
    value = get(node, leaf)
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= lowest, name(key), value,
           f"must be an integer >= {lowest}")


def validate_finetune(node: CN, name: Namer, prefix: str = "FINETUNE.") -> None:
    """FINETUNE values that need no file but the config."""
    _check(node.SCALING in SCALINGS, name(prefix + "SCALING"), node.SCALING, f"use one of {', '.join(SCALINGS)}")
    _check(bool(node.CONFIG), name(prefix + "CONFIG"), node.CONFIG, "name a benchmark "
           f"({', '.join(sorted(protocol.BENCHMARKS))}) or a detectron2 config file")
    resolved_config(node.CONFIG, name(prefix + "CONFIG"))
    _check(bool(node.WEIGHTS), name(prefix + "WEIGHTS"), node.WEIGHTS, "give a converted .pkl or 'none'")
    for leaf, lowest in (("LAUNCH.NUM_GPUS", -1), ("LAUNCH.NUM_MACHINES", 1), ("LAUNCH.MACHINE_RANK", 0)):
        _int_at_least(node, prefix + leaf, lowest, name, leaf)
    launch = node.LAUNCH
    if launch.NUM_MACHINES > 1 and launch.DIST_URL == "auto":
        raise UserError(f"{name(prefix + 'LAUNCH.DIST_URL')} auto: {launch.NUM_MACHINES} machines need the "
                        "address of machine rank 0 on every machine, e.g. tcp://node01:29500")
    if launch.MACHINE_RANK >= launch.NUM_MACHINES:
        raise UserError(f"{name(prefix + 'LAUNCH.MACHINE_RANK')} {launch.MACHINE_RANK}: must be below the "
                        f"{launch.NUM_MACHINES} machine(s)")


def validate_sweep(node: CN, name: Namer, prefix: str = "SWEEP.") -> None:
    """SWEEP values that need no file but the config."""
    _check(node.SEARCH in protocol.SEARCHES, name(prefix + "SEARCH"), node.SEARCH,
           f"use one of {', '.join(protocol.SEARCHES)}")
    _check(node.EXECUTOR in EXECUTORS, name(prefix + "EXECUTOR"), node.EXECUTOR, f"use one of {', '.join(EXECUTORS)}")
    _check(isinstance(node.KEEP_CHECKPOINTS, bool), name(prefix + "KEEP_CHECKPOINTS"), node.KEEP_CHECKPOINTS,
           "use true or false")
    lrs = list(node.LRS)
    if lrs:
        _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lrs), name(prefix + "LRS"),
               lrs, "give numbers, e.g. [0.02, 0.05]")
        protocol.check_lrs([float(v) for v in lrs], name(prefix + "LRS"))
    for leaf, lowest in (("TRIALS", 1), ("MAX_RETRIES", 0), ("GPUS_PER_TRIAL", -1), ("CPU_JOBS", 1),
                         ("SLURM.TIME_MIN", 1), ("SLURM.CPUS_PER_GPU", 1), ("SLURM.MEM_PER_GPU_GB", 1)):
        _int_at_least(node, prefix + leaf, lowest, name, leaf)
    if node.CPU_JOBS > 1 and node.EXECUTOR != "local":
        raise UserError(f"{name(prefix + 'CPU_JOBS')} {node.CPU_JOBS}: runs CPU trials side by side on this "
                        f"machine; it needs the local executor (got {node.EXECUTOR})")
    if node.OUTPUT_DIR:
        check_output_dir(node.OUTPUT_DIR, name(prefix + "OUTPUT_DIR"))


def validate_bench(cfg: CN, name: Namer) -> None:
    validate_finetune(cfg.FINETUNE, name)
    validate_sweep(cfg.SWEEP, name)
    _check(bool(cfg.SWEEP.OUTPUT_DIR), name("SWEEP.OUTPUT_DIR"), cfg.SWEEP.OUTPUT_DIR, "give the sweep folder")


def resolved_config(config: str, name: str = "FINETUNE.CONFIG") -> Tuple[str, str]:
    """(benchmark label, detectron2 config file) of a benchmark name or a config file."""
    if config in protocol.BENCHMARKS:
        return config, protocol.BENCHMARKS[config]
    if str(config).endswith((".yaml", ".yml")):
        try:
            resolve_config(config)
        except UserError:
            raise UserError(f"{name} {config}: config file not found (neither a file nor under configs/)") from None
        return Path(config).stem, config
    raise UserError(f"{name} {config}: not one of {sorted(protocol.BENCHMARKS)} nor a .yaml config file")
