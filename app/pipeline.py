"""``simsiam-transfer pipeline --config FILE [KEY VALUE ...]``: the rows of a Table 5, end to end.

A pipeline config lists ``ROWS``; each row is one line of the table and gets its weights one way:

    PRETRAIN.CONFIG set   pretrained here (nested ``PRETRAIN.CFG`` keys merged over that YAML), run
                          as its own process group: ``torchrun --nproc_per_node PRETRAIN.NPROC_PER_NODE``
    WEIGHTS <file>        a checkpoint in any layout the converter reads (``SOURCE`` picks one)
    WEIGHTS none          random init, the paper's "scratch" row
    WEIGHTS torchvision:<NAME>   torchvision's ImageNet-supervised ResNet-50 (``IMAGENET1K_V1``);
                          the first run needs network, torchvision caches the file

then every row is converted (verified), benchmarked on every ``BENCH.BENCHMARKS`` entry (LR search
x trials, ``BENCH.TRIALS_PER_BENCHMARK`` per benchmark) and reported. The sweeps take the detection
stage's own nodes, ``SWEEP`` and ``FINETUNE`` (``detection.schema``), and every row's sweep is
validated when the config loads, before anything runs. Without GPUs, ``SWEEP.CPU_JOBS`` N pretrains
up to N rows and runs N fine-tuning trials at a time, each with cores/N threads. Each stage answers
whether its outputs are finished, so running the same command again continues at the first
unfinished stage; ``pipeline.json`` records each stage's status. Layout::

    OUTPUT_DIR/data/                          generated datasets (DATA.SYNTHETIC)
    OUTPUT_DIR/rows/<row>/pretrain/           a row's pretraining run
    OUTPUT_DIR/rows/<row>/weights.pkl         its converted, verified weights (+ .report.json)
    OUTPUT_DIR/bench/<benchmark>/<row>/       one bench folder per benchmark and row
    OUTPUT_DIR/report.md (+ report_rows.png: AP per row; report_ap_vs_lr.png when an LR was searched)
"""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torchvision

from convert.command import convert_checkpoint, is_converted, print_summary
from detection import protocol, schema
from detection.bench import Bench, finished_summary
from detection.executors import cpu_thread_env
from detection.finetune import build_cfg
from detection.finetune import paper_scale as paper_scale_finetune
from detection.report import load_benches, plot_ap_vs_lr, plot_rows, render
from detection.spec import FinetuneJob, SweepSpec
from pretrain import outputs as pretrain_outputs
from pretrain.config import load_cfg as load_pretrain_cfg
from pretrain.config import paper_scale as paper_scale_pretraining
from pretrain.launch import submit_pretraining
from pretrain.methods import method_class
from simsiam_transfer import atomic
from simsiam_transfer.config import CfgNode as CN
from simsiam_transfer.config import load, merge_node
from simsiam_transfer.cpu_guard import refuse_on_cpu
from simsiam_transfer.errors import UserError
from simsiam_transfer.jobs import reattach_job
from simsiam_transfer.stopping import Children, signal_number
from simsiam_transfer.synthetic import is_generated, make_synthetic

_P = CN()
_P.OUTPUT_DIR = "runs/pipeline"
_P.DATA = CN()
_P.DATA.SYNTHETIC = False        # generate the built-in mini data under OUTPUT_DIR/data
_P.DATA.SYNTHETIC_SEED = 0
_P.DATA.SYNTHETIC_SIZE = CN()     # image counts of the generated data; 0 = the generator's default
_P.DATA.SYNTHETIC_SIZE.NUM_TRAIN = 0
_P.DATA.SYNTHETIC_SIZE.NUM_TEST = 0
_P.DATA.SYNTHETIC_SIZE.NUM_UNLABELED = 0
_P.DATA.SYNTHETIC_SIZE.NUM_LABELED = 0  # labeled training images per class (kNN, supervised rows)
_P.PRETRAIN = CN()
_P.PRETRAIN.EXECUTOR = ""        # local (torchrun on this node) / slurm / submitit-local; "" = SWEEP.EXECUTOR
_P.PRETRAIN.NPROC_PER_NODE = -1  # processes (GPUs) per node: -1 = every visible GPU (1 on CPU), 8 on Slurm
_P.PRETRAIN.NODES = 1            # Slurm nodes of one pretraining job
_P.PRETRAIN.SLURM = schema.SWEEP.SLURM.clone()  # the job's partition, time limit (requeued: it resumes), CPUs, memory
_P.ROWS = CN(new_allowed=True)   # row id -> _ROW keys; ids name folders, so [A-Za-z0-9._-]
_P.CONVERT = CN()
_P.CONVERT.VERIFY = True
_P.BENCH = CN()
_P.BENCH.BENCHMARKS = ["voc07", "voc0712", "coco_1x"]
_P.BENCH.TRIALS_PER_BENCHMARK = CN(new_allowed=True)  # e.g. {coco_1x: 1}: the paper averages only VOC
_P.BENCH.SMOKE = []              # benchmarks run as smoke runs (SWEEP.SMOKE): reported as too short to rank
# The detection stage's nodes, as they are: every sweep of the table takes them. The pipeline fills
# FINETUNE.CONFIG (each benchmark), FINETUNE.WEIGHTS, SWEEP.NAME and SWEEP.OUTPUT_DIR (each row), and
# FINETUNE.DATASETS with the generated data's catalog when DATA.SYNTHETIC is on and it is empty.
_P.SWEEP = schema.SWEEP.clone()
_P.FINETUNE = schema.FINETUNE.clone()
_P.REPORT = CN()
_P.REPORT.FORMAT = "md"
_P.REPORT.PER_TRIAL = False      # also list each trial's metrics and seed
_P.REPORT.REFERENCE = ""         # "paper": add the SimSiam paper's published Table 5 rows
# Keys of earlier pipeline configs and where they live now (one line points there).
_MOVED = {"BENCH.LRS": "SWEEP.LRS", "BENCH.TRIALS": "SWEEP.TRIALS", "BENCH.SEARCH": "SWEEP.SEARCH",
          "BENCH.METRIC": "SWEEP.METRIC", "BENCH.EXECUTOR": "SWEEP.EXECUTOR",
          "BENCH.GPUS_PER_TRIAL": "SWEEP.GPUS_PER_TRIAL", "BENCH.MAX_RETRIES": "SWEEP.MAX_RETRIES",
          "BENCH.SCALING": "FINETUNE.SCALING", "BENCH.CFG": "FINETUNE.CFG", "CPU_JOBS": "SWEEP.CPU_JOBS",
          "DATA.DATASETS": "FINETUNE.DATASETS", "DATA.DATA_ROOT": "FINETUNE.DATA_ROOT"}
# Filled per row and benchmark; a pipeline config that sets them would be silently overwritten.
_PER_SWEEP = ("FINETUNE.CONFIG", "FINETUNE.WEIGHTS", "SWEEP.NAME", "SWEEP.OUTPUT_DIR", "SWEEP.SMOKE")

_ROW = CN()
_ROW.NAME = ""                   # label in the report (default: the row id)
_ROW.WEIGHTS = ""                # none / a checkpoint / torchvision:<NAME>; empty = pretrain here
_ROW.SOURCE = "auto"             # the converter's --source for WEIGHTS files
_ROW.PRETRAIN = CN()
_ROW.PRETRAIN.CONFIG = ""        # pretraining YAML (a path, or relative to configs/)
_ROW.PRETRAIN.CFG = CN(new_allowed=True)  # nested pretraining keys merged over CONFIG
_ROW.SWEEP = CN(new_allowed=True)  # SWEEP keys for this row's sweeps only (e.g. a reference row's fixed LR)

_ROW_ID = re.compile(r"^[A-Za-z0-9._-]+$")
PROTOCOL_GPUS = 8  # a node of the paper's setup (8 V100)
POLL_S = 5.0


@dataclasses.dataclass
class Row:
    """One line of the table and how its weights are made."""

    id: str
    name: str
    weights: str = ""            # "" when pretrained here
    source: str = "auto"
    pretrain_config: str = ""
    pretrain_cfg: Optional[CN] = None
    sweep: Optional[CN] = None

    @property
    def pretrained_here(self) -> bool:
        return not self.weights

    @property
    def scratch(self) -> bool:
        return self.weights == "none"


def _row(row_id: str, node) -> Row:
    where = f"ROWS.{row_id}"
    if not _ROW_ID.match(row_id):
        raise UserError(f"{where}: row ids name folders; use letters, digits, '.', '_' or '-' (put the label in NAME)")
    cfg = merge_node(_ROW.clone(), node, where)
    if bool(cfg.WEIGHTS) == bool(cfg.PRETRAIN.CONFIG):
        raise UserError(f"{where}: set exactly one of WEIGHTS (none, a checkpoint, torchvision:<NAME>) "
                        "and PRETRAIN.CONFIG")
    if cfg.WEIGHTS and len(cfg.PRETRAIN.CFG):
        raise UserError(f"{where}.PRETRAIN.CFG: only rows pretrained here (PRETRAIN.CONFIG) take pretraining keys")
    for key in ("NAME", "OUTPUT_DIR"):
        if key in cfg.SWEEP:
            raise UserError(f"{where}.SWEEP.{key}: the pipeline sets it for each row; use ROWS.{row_id}.NAME")
    return Row(id=row_id, name=cfg.NAME or row_id, weights=cfg.WEIGHTS, source=cfg.SOURCE,
               pretrain_config=cfg.PRETRAIN.CONFIG, pretrain_cfg=cfg.PRETRAIN.CFG, sweep=cfg.SWEEP)


def _validate(cfg, source):
    name = schema.namer(source)
    schema.validate_sweep(cfg.SWEEP, name)
    if not len(cfg.ROWS):
        raise UserError(f"{source}: ROWS is empty; list at least one row (see configs/pipeline/mini.yaml)")
    for key in _PER_SWEEP:
        if schema.get(cfg, key) != schema.get(_P, key):
            raise UserError(f"{name(key)}: the pipeline sets it for each row and benchmark; remove it")
    for bm in cfg.BENCH.BENCHMARKS:
        schema.resolved_config(bm, name("BENCH.BENCHMARKS"))
    for bm, trials in cfg.BENCH.TRIALS_PER_BENCHMARK.items():
        if bm not in cfg.BENCH.BENCHMARKS:
            raise UserError(f"{source}: BENCH.TRIALS_PER_BENCHMARK.{bm}: not in BENCH.BENCHMARKS")
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            raise UserError(f"{source}: BENCH.TRIALS_PER_BENCHMARK.{bm} must be an integer >= 1, got {trials!r}")
    for bm in cfg.BENCH.SMOKE:
        if bm not in cfg.BENCH.BENCHMARKS:
            raise UserError(f"{source}: BENCH.SMOKE {bm}: not in BENCH.BENCHMARKS")
    if cfg.PRETRAIN.EXECUTOR not in ("", *schema.EXECUTORS):
        raise UserError(f"{name('PRETRAIN.EXECUTOR')} {cfg.PRETRAIN.EXECUTOR!r}: use one of "
                        f"{', '.join(schema.EXECUTORS)}, or leave it empty for SWEEP.EXECUTOR")
    for key in ("PRETRAIN.NODES", "PRETRAIN.SLURM.TIME_MIN", "PRETRAIN.SLURM.CPUS_PER_GPU",
                "PRETRAIN.SLURM.MEM_PER_GPU_GB"):
        value = schema.get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name(key)} {value!r}: must be an integer >= 1")
    if cfg.PRETRAIN.NODES > 1 and (cfg.PRETRAIN.EXECUTOR or cfg.SWEEP.EXECUTOR) != "slurm":
        raise UserError(f"{name('PRETRAIN.NODES')} {cfg.PRETRAIN.NODES}: several nodes need the slurm executor "
                        "(the local path is torchrun on this node)")
    allowed = protocol.allowed_metrics(["coco"], True)
    if cfg.SWEEP.METRIC not in allowed:
        raise UserError(f"{name('SWEEP.METRIC')} {cfg.SWEEP.METRIC!r}: use one of {', '.join(allowed)}")
    if cfg.REPORT.REFERENCE not in ("", "paper"):
        raise UserError(f"{source}: REPORT.REFERENCE {cfg.REPORT.REFERENCE!r}: use \"paper\" or leave it empty")
    if cfg.REPORT.FORMAT not in ("md", "csv", "latex"):
        raise UserError(f"{source}: REPORT.FORMAT {cfg.REPORT.FORMAT!r} is not one of md, csv, latex")
    pipeline = Pipeline(cfg)
    for bm, row, _ in pipeline.bench_jobs():  # every sweep of the table, before anything runs
        schema.validate_bench(pipeline.bench_node(bm, row), name)


def load_pipeline_cfg(config_file, overrides=()):
    try:
        return load(_P, config_file, overrides, _validate)
    except UserError as exc:
        for old, new in _MOVED.items():
            if f"Non-existent config key: {old}" in str(exc):
                raise UserError(f"{str(exc).split(';')[0]}: pipeline configs now set it as {new} (the detection "
                                "stage's own SWEEP / FINETUNE nodes)") from None
        raise


def with_train_dir(cfg, folder):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATA.TRAIN_DIR = str(folder)
    cfg.freeze()
    return cfg


def pretrain_processes(requested: int, executor: str = "local") -> int:
    """Processes per node of a pretraining run: as configured, else one per visible GPU (1 on CPU); on
    Slurm the protocol's 8 GPUs of a node (the submitting host need not have any)."""
    if requested > 0:
        return requested
    return PROTOCOL_GPUS if executor == "slurm" else max(1, torch.cuda.device_count())


def pretrain_command(config_path, nproc: int) -> List[str]:
    """One process runs the CLI directly; several run under torchrun on this node. The pipeline has
    decided already whether a paper-scale row may run on this machine (``--allow-cpu``)."""
    cli = ["-m", "app.cli", "pretrain", "--config", str(config_path), "--allow-cpu"]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cli]


def bench_command(config_path) -> List[str]:
    """One row's sweep as its own process (rows side by side); the pipeline checked the scale already."""
    return [sys.executable, "-m", "app.cli", "bench", "--config", str(config_path), "--allow-cpu"]


def side_by_side_run(jobs, slots: int, what: str, on_done=None) -> Dict[str, int]:
    """Run ``jobs`` ((id, command, log path or None), in order), at most ``slots`` at a time, each with its
    share of the cores; a job with a log writes there, one without writes to this terminal. The next job
    starts when one ends. Stopping the pipeline stops them all, and they keep what they finished (every
    command here resumes). ``on_done(id, status)`` is called as each ends. Returns each job's exit status."""
    children, queue = Children(), list(jobs)
    running: List[Tuple[str, subprocess.Popen]] = []
    codes: Dict[str, int] = {}
    env = cpu_thread_env(slots) if slots > 1 else None
    try:
        while queue or running:
            while queue and len(running) < slots:
                job_id, command, log_path = queue.pop(0)
                if log_path is None:
                    proc = children.popen(command, env=env)
                else:
                    beside = len(running) + min(len(queue), slots - len(running) - 1)
                    print(f"[pipeline] {what} {job_id}" + (f" beside {beside} other(s)" if beside else "")
                          + f"; log: {log_path}", flush=True)
                    with open(log_path, "a") as log:  # the child keeps its own handle
                        proc = children.popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((job_id, proc))
            time.sleep(0.2)
            for job_id, proc in [r for r in running if r[1].poll() is not None]:
                running.remove((job_id, proc))
                children.forget(proc)
                codes[job_id] = proc.returncode
                if on_done:
                    on_done(job_id, proc.returncode)
    except BaseException as exc:  # stopped: the children stop too, and keep their checkpoints
        children.stop(signal_number(exc))
        raise
    return codes


class Pipeline:
    def __init__(self, cfg, allow_cpu: bool = False):
        self.cfg = cfg
        self.allow_cpu = allow_cpu
        self.out = Path(cfg.OUTPUT_DIR)
        self.rows = [_row(row_id, node) for row_id, node in cfg.ROWS.items()]
        self.state_path = self.out / "pipeline.json"
        self.state: dict = {"stages": {}}
        self._pretrain_cfgs: Dict[str, CN] = {}
        self._stage = ""
        self.earlier_state: dict = {}

    def _mark(self, stage, status, **extra):
        self.state["stages"][stage] = {"status": status, "time": round(time.time(), 1), **extra}
        atomic.write_json(self.state_path, self.state)
        print(f"[pipeline] {stage}: {status}", flush=True)

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def row_dir(self, row: Row) -> Path:
        return self.out / "rows" / row.id

    def weights_path(self, row: Row) -> str:
        return "none" if row.scratch else str(self.row_dir(row) / "weights.pkl")

    # -- stages ---------------------------------------------------------------------------------
    def stage_data(self):
        if not self.cfg.DATA.SYNTHETIC:
            return "skipped (DATA.SYNTHETIC False)"
        if is_generated(self.data_dir):
            return "done earlier"
        sizes = {k.lower(): v for k, v in self.cfg.DATA.SYNTHETIC_SIZE.items() if v > 0}
        make_synthetic(self.data_dir, seed=self.cfg.DATA.SYNTHETIC_SEED, **sizes)
        return "done"

    def pretrain_cfg(self, row: Row):
        """The row's resolved pretraining config, loaded once; key errors name ``ROWS.<row>.PRETRAIN.CFG``."""
        if row.id not in self._pretrain_cfgs:
            overrides = ["OUTPUT_DIR", str(self.row_dir(row) / "pretrain")]
            if self.cfg.DATA.SYNTHETIC:
                overrides += ["DATA.TRAIN_DIR", str(self.data_dir / "unlabeled"),
                              "DATA.KNN_TRAIN_DIR", str(self.data_dir / "labeled/train"),
                              "DATA.KNN_VAL_DIR", str(self.data_dir / "labeled/val")]
            cfg = load_pretrain_cfg(row.pretrain_config, overrides,
                                    nodes=[(row.pretrain_cfg, f"ROWS.{row.id}.PRETRAIN.CFG")])
            if self.cfg.DATA.SYNTHETIC and method_class(cfg.MODEL.METHOD).labeled:
                cfg = with_train_dir(cfg, self.data_dir / "labeled/train")  # a labeled method's class folders
            self._pretrain_cfgs[row.id] = cfg
        return self._pretrain_cfgs[row.id]

    def cpu_jobs(self) -> int:
        """Jobs side by side: SWEEP.CPU_JOBS on a machine without GPUs, else 1 (GPU work has its own knobs)."""
        return self.cfg.SWEEP.CPU_JOBS if torch.cuda.device_count() == 0 else 1

    def stage_pretrain(self, rows: List[Row]):
        """Pretrain ``rows``: one after another in this terminal, or side by side (``SWEEP.CPU_JOBS``),
        each with its share of the cores and its output in ``rows/<row>/pretrain.log``."""
        todo = []
        for row in rows:
            cfg = self.pretrain_cfg(row)
            if pretrain_outputs.is_done(cfg):
                continue
            config_path = self.row_dir(row) / "pretrain_config.yaml"
            atomic.write_text(config_path, cfg.dump())
            todo.append((row, cfg, config_path))
        if not todo:
            return "done earlier"
        if self.pretrain_executor() != "local":
            return self._pretrain_as_jobs(todo)
        nproc = pretrain_processes(self.cfg.PRETRAIN.NPROC_PER_NODE)
        side_by_side = len(todo) > 1
        logs = {row.id: self.row_dir(row) / "pretrain.log" if side_by_side else None for row, *_ in todo}
        jobs = [(row.id, pretrain_command(config_path, nproc), logs[row.id]) for row, _, config_path in todo]
        codes = side_by_side_run(jobs, len(todo), "pretraining")
        for row, cfg, _ in todo:
            if codes[row.id]:
                where = f"its log: {logs[row.id]}" if side_by_side else "its error is above"
                raise UserError(f"pretraining of row {row.id} stopped with exit {codes[row.id]} ({where}); "
                                f"fix it and run the pipeline again, it resumes from {cfg.OUTPUT_DIR}")
        each = f"{nproc} process{'es' if nproc > 1 else ''} each"
        return f"done ({each}{', side by side' if side_by_side else ''}: {', '.join(r.id for r, *_ in todo)})"

    def pretrain_executor(self) -> str:
        return self.cfg.PRETRAIN.EXECUTOR or self.cfg.SWEEP.EXECUTOR

    def _recorded_jobs(self) -> Dict[str, str]:
        """Job ids an earlier run of this stage submitted (pipeline.json), to wait for instead of resubmitting."""
        earlier = self.earlier_state.get(self._stage)
        jobs = earlier.get("jobs") if isinstance(earlier, dict) else None
        return {str(k): str(v) for k, v in jobs.items()} if isinstance(jobs, dict) else {}

    def _pretrain_as_jobs(self, todo):
        """Each row's pretraining as a submitit job (Slurm: ``PRETRAIN.NODES`` x a task per GPU), waited for.
        A stopped pipeline leaves Slurm jobs running and finds them again when run anew."""
        kind = self.pretrain_executor()
        cluster = "slurm" if kind == "slurm" else "local"
        nproc = pretrain_processes(self.cfg.PRETRAIN.NPROC_PER_NODE, kind)
        gpus = kind == "slurm" or torch.cuda.device_count() > 0
        recorded, jobs = self._recorded_jobs(), {}
        for row, _, config_path in todo:
            folder = self.row_dir(row) / "submitit"
            job = reattach_job(folder, cluster, recorded[row.id]) if row.id in recorded else None
            if job is not None:
                print(f"[pipeline] pretraining {row.id}: waiting for its earlier job {job.job_id}", flush=True)
            else:
                job = submit_pretraining(config_path, folder, cluster, self.cfg.PRETRAIN.NODES, nproc, gpus,
                                         self.cfg.PRETRAIN.SLURM)
                print(f"[pipeline] pretraining {row.id}: submitted job {job.job_id} ({self.cfg.PRETRAIN.NODES} "
                      f"node(s) x {nproc} task(s), {kind}); log: {folder}", flush=True)
            jobs[row.id] = job
        self._mark(self._stage, "running", jobs={row_id: str(job.job_id) for row_id, job in jobs.items()})
        try:
            while not all(job.done() for job in jobs.values()):
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            if cluster == "local":
                for job in jobs.values():
                    job.cancel(check=False)
            else:
                print(f"[pipeline] the Slurm job(s) {', '.join(str(j.job_id) for j in jobs.values())} keep running; "
                      "run the pipeline again to wait for them", flush=True)
            raise
        for (row, cfg, _), job in zip(todo, jobs.values()):
            try:
                job.result()
            except Exception as exc:  # the job's own error (its traceback is in the job's log)
                lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                raise UserError(f"pretraining of row {row.id} failed in job {job.job_id} "
                                f"({lines[-1][:300] if lines else type(exc).__name__}); see "
                                f"{self.row_dir(row) / 'submitit'}; run the pipeline again to resume") from None
        return f"done ({kind}: {', '.join(f'{row_id} job {job.job_id}' for row_id, job in jobs.items())})"

    def _source_checkpoint(self, row: Row) -> Path:
        if row.pretrained_here:
            return pretrain_outputs.checkpoint_path(self.pretrain_cfg(row))
        if row.weights.startswith("torchvision:"):
            return self._torchvision_checkpoint(row)
        path = Path(row.weights)
        if not path.is_file():
            raise UserError(f"ROWS.{row.id}.WEIGHTS {row.weights}: file not found")
        return path

    def _torchvision_checkpoint(self, row: Row) -> Path:
        name = row.weights.split(":", 1)[1]
        try:
            weights = torchvision.models.ResNet50_Weights[name]
        except KeyError:
            names = [w.name for w in torchvision.models.ResNet50_Weights]
            raise UserError(f"ROWS.{row.id}.WEIGHTS {row.weights}: torchvision has no ResNet-50 weights "
                            f"{name!r}; one of {names}") from None
        path = self.row_dir(row) / f"torchvision_resnet50_{name}.pth"
        if not path.is_file():
            try:
                state = weights.get_state_dict(progress=True)
            except Exception as exc:  # no network, proxy, or a corrupt cache
                raise UserError(f"ROWS.{row.id}.WEIGHTS {row.weights}: could not get torchvision's weights "
                                f"({type(exc).__name__}: {exc}); run once with network, or give the saved "
                                "file as WEIGHTS with SOURCE torchvision") from None
            atomic.torch_save(state, path)
        return path

    def stage_convert(self, row: Row):
        """Convert (and verify) the row's checkpoint; its summary prints the converter's verdict on the
        pretraining (no-op, collapse) once, before any fine-tune is spent on it."""
        source = self._source_checkpoint(row)
        weights = self.weights_path(row)
        if is_converted(source, weights):
            return "done earlier"
        src = "torchvision" if row.weights.startswith("torchvision:") else row.source
        report = convert_checkpoint(source, weights, source=src, verify=self.cfg.CONVERT.VERIFY)
        print_summary(report)
        n = len(report["warnings"])
        return "done" + (f" ({n} warning{'s' if n > 1 else ''})" if n else "")

    def trials(self, benchmark: str) -> int:
        return int(self.cfg.BENCH.TRIALS_PER_BENCHMARK.get(benchmark, self.cfg.SWEEP.TRIALS))

    def bench_folder(self, benchmark: str, row: Row) -> Path:
        return self.out / "bench" / Path(benchmark).stem / row.id

    def bench_jobs(self):
        return [(bm, row, self.bench_folder(bm, row)) for bm in self.cfg.BENCH.BENCHMARKS for row in self.rows]

    def bench_node(self, benchmark: str, row: Row) -> CN:
        """The detection stage's bench node (FINETUNE + SWEEP) of one benchmark and row."""
        node = schema.BENCH.clone()
        node.FINETUNE = self.cfg.FINETUNE.clone()
        node.SWEEP = self.cfg.SWEEP.clone()
        node.defrost()
        if row.sweep:
            merge_node(node.SWEEP, row.sweep, f"ROWS.{row.id}.SWEEP")
        node.FINETUNE.CONFIG = benchmark
        node.FINETUNE.WEIGHTS = self.weights_path(row)
        if not node.FINETUNE.DATASETS and self.cfg.DATA.SYNTHETIC:
            node.FINETUNE.DATASETS = str(self.data_dir / "datasets.yaml")
        node.SWEEP.NAME = row.name
        node.SWEEP.OUTPUT_DIR = str(self.bench_folder(benchmark, row))
        node.SWEEP.SMOKE = benchmark in self.cfg.BENCH.SMOKE
        node.SWEEP.TRIALS = self.trials(benchmark) if not (row.sweep and "TRIALS" in row.sweep) else row.sweep.TRIALS
        node.SWEEP.CPU_JOBS = self.cpu_jobs() if node.SWEEP.EXECUTOR == "local" else 1
        node.freeze()
        return node

    def sweep_spec(self, benchmark: str, row: Row) -> SweepSpec:
        return SweepSpec.from_config(self.bench_node(benchmark, row), label=schema.namer("pipeline config"))

    def bench_groups(self):
        """(benchmark, rows) of each bench stage. Without GPUs, with ``SWEEP.CPU_JOBS`` N > 1 and local trials,
        one stage runs every row's sweep of a benchmark, N sweeps side by side, each one trial at a time on
        its share of the cores: the cores stay busy where one sweep alone would wait on its selecting trial
        or last trial. Otherwise one stage per sweep, whose executor spreads the trials."""
        rows = list(self.rows)
        for bm in self.cfg.BENCH.BENCHMARKS:
            local = all(self.bench_node(bm, row).SWEEP.EXECUTOR == "local" for row in rows)
            if self.cpu_jobs() > 1 and local and len(rows) > 1:
                yield bm, rows
            else:
                yield from ((bm, [row]) for row in rows)

    def stage_bench_side_by_side(self, benchmark: str, rows: List[Row]):
        """Every row's sweep of ``benchmark`` as its own ``bench`` process, ``SWEEP.CPU_JOBS`` at a time;
        each logs to ``rows/<row>/bench_<benchmark>.log`` and resumes like any sweep."""
        specs = {row.id: self.sweep_spec(benchmark, row) for row in rows}
        todo = [row for row in rows if finished_summary(specs[row.id]) is None]
        if not todo:
            return "done earlier"
        stem = Path(benchmark).stem
        jobs = []
        for row in todo:
            node = self.bench_node(benchmark, row).clone()
            node.defrost()
            node.SWEEP.CPU_JOBS = 1  # one trial at a time in each sweep: the sweeps are what run side by side
            path = self.row_dir(row) / f"bench_{stem}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, node.dump())
            jobs.append((row.id, bench_command(path), self.row_dir(row) / f"bench_{stem}.log"))
        summaries = {}

        def said(row_id, code):
            summaries[row_id] = finished_summary(specs[row_id]) if code == 0 else None
            stat = ((summaries[row_id] or {}).get("metrics") or {}).get("bbox/AP50") or {}
            result = f"exit {code}" if code else "done"
            if stat.get("mean") is not None:
                spread = f" ± {stat['std']:.1f}" if stat.get("std") is not None else ""
                result += f", bbox/AP50 {stat['mean']:.1f}{spread} (n={stat['n']})"
            print(f"[pipeline] bench {stem}: {row_id} {result}", flush=True)

        codes = side_by_side_run(jobs, min(self.cpu_jobs(), len(jobs)), f"bench {stem}:", said)
        for row in todo:
            summary = summaries[row.id]
            if codes[row.id] or summary is None or summary["selected_lr"] is None:
                raise UserError(f"bench {benchmark} / {row.id} stopped with exit {codes[row.id]} (its log: "
                                f"{self.row_dir(row) / f'bench_{stem}.log'}); fix it and run the pipeline again, "
                                f"it resumes from {specs[row.id].output_dir}")
        return f"done ({len(todo)} sweeps, {min(self.cpu_jobs(), len(todo))} side by side)"

    def stage_bench(self, benchmark: str, row: Row):
        spec = self.sweep_spec(benchmark, row)
        summary = finished_summary(spec)
        status = "done earlier"
        if summary is None:
            summary, status = Bench(spec, echo_conversion_warnings=False, allow_cpu=True).run(), "done"
        if summary["selected_lr"] is None:
            raise UserError(f"bench {benchmark} / {row.id}: every trial failed; see {spec.output_dir}")
        return status

    def stage_report(self):
        benches = load_benches([folder for *_, folder in self.bench_jobs()])
        ext = {"md": "md", "csv": "csv", "latex": "tex"}[self.cfg.REPORT.FORMAT]
        path = self.out / f"report.{ext}"
        text = render(benches, self.cfg.REPORT.FORMAT, per_trial=self.cfg.REPORT.PER_TRIAL,
                      reference=self.cfg.REPORT.REFERENCE or None)
        atomic.write_text(path, text)
        plot_rows(benches, self.out / "report_rows.png", metric="bbox/AP50")
        if any(len(b["summary"]["lr_search"]) > 1 for b in benches):
            plot_ap_vs_lr(benches, self.out / "report_ap_vs_lr.png")
        print(text)
        return f"done ({path})"

    def stages(self):
        """(stage name, callable) in order; each callable returns its status line."""
        plan = [("data", self.stage_data)]
        here = [row for row in self.rows if row.pretrained_here]
        local = self.pretrain_executor() == "local"
        jobs = self.cpu_jobs() if local and pretrain_processes(self.cfg.PRETRAIN.NPROC_PER_NODE) == 1 else 1
        if not local:
            jobs = len(here) or 1  # submitted together, waited for together
        for i in range(0, len(here), jobs):
            group = here[i:i + jobs]
            name = f"pretrain:{'+'.join(r.id for r in group)}"
            plan.append((name, lambda group=group: self.stage_pretrain(group)))
        for row in self.rows:
            if not row.scratch:
                plan.append((f"convert:{row.id}", lambda row=row: self.stage_convert(row)))
        for bm, rows in self.bench_groups():
            if len(rows) == 1:
                plan.append((f"bench:{bm}:{rows[0].id}", lambda bm=bm, row=rows[0]: self.stage_bench(bm, row)))
            else:
                plan.append((f"bench:{bm}:{'+'.join(r.id for r in rows)}",
                             lambda bm=bm, rows=rows: self.stage_bench_side_by_side(bm, rows)))
        plan.append(("report", self.stage_report))
        return plan

    def refuse_paper_scale_on_cpu(self) -> None:
        """Before anything runs: a paper-scale pretraining or fine-tune that would run on this CPU is refused
        in one line (``--allow-cpu`` runs it anyway); rows and trials sent to Slurm run on its GPU nodes."""
        if self.allow_cpu or torch.cuda.is_available():
            return
        reasons = []
        if self.pretrain_executor() != "slurm":
            reasons += [f"ROWS.{row.id}: {paper_scale_pretraining(self.pretrain_cfg(row))}" for row in self.rows
                        if row.pretrained_here and paper_scale_pretraining(self.pretrain_cfg(row))]
        if self.cfg.SWEEP.EXECUTOR != "slurm":
            for benchmark in self.cfg.BENCH.BENCHMARKS:
                job = FinetuneJob(config_file=benchmark, weights="none", cfg=self.cfg.FINETUNE.CFG)
                reason = paper_scale_finetune(build_cfg(job, cuda=False))
                if reason:
                    reasons.append(f"BENCH.BENCHMARKS {benchmark}: {reason}")
        if reasons:
            refuse_on_cpu(reasons[0], allow_cpu=False)

    def run(self):
        # Every row's pretraining config must load before anything runs: a typo costs nothing.
        for row in self.rows:
            if row.pretrained_here:
                self.pretrain_cfg(row)
        self.refuse_paper_scale_on_cpu()
        try:  # what an earlier run recorded (the jobs it submitted), before this run rewrites it
            self.earlier_state = dict(json.loads(self.state_path.read_text())["stages"])
        except (OSError, ValueError, KeyError, TypeError):
            self.earlier_state = {}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.out / "pipeline_config.yaml", self.cfg.dump())
        for name, stage in self.stages():
            self._stage = name
            self._mark(name, "running")
            try:
                status = stage()
            except KeyboardInterrupt:
                kept = {k: v for k, v in self.state["stages"].get(name, {}).items() if k not in ("status", "time")}
                self._mark(name, "stopped", **kept)  # submitted jobs stay recorded for the next run
                raise
            self._mark(name, status)
        return self.state
