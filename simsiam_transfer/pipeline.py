"""``simsiam-transfer pipeline --config FILE [KEY VALUE ...]``: the rows of a Table 5, end to end.

A pipeline config lists ``ROWS``; each row is one line of the table and gets its weights one way:

    PRETRAIN.CONFIG set   pretrained here (nested ``PRETRAIN.CFG`` keys merged over that YAML), run
                          as its own process group: ``torchrun --nproc_per_node PRETRAIN.NPROC_PER_NODE``
    WEIGHTS <file>        a checkpoint in any layout the converter reads (``SOURCE`` picks one)
    WEIGHTS none          random init, the paper's "scratch" row
    WEIGHTS torchvision:<NAME>   torchvision's ImageNet-supervised ResNet-50 (``IMAGENET1K_V1``);
                          the first run needs network, torchvision caches the file

then every row is converted (verified), benchmarked on every ``BENCH.BENCHMARKS`` entry (LR search
x trials, ``BENCH.TRIALS_PER_BENCHMARK`` per benchmark) and reported. Without GPUs, ``CPU_JOBS`` N
pretrains up to N rows and runs N fine-tuning trials at a time, each with cores/N threads. Each
stage resumes on its own, so running the same command again continues at the first unfinished
stage; ``pipeline.json`` records each stage's status. Layout::

    OUTPUT_DIR/data/                          generated datasets (DATA.SYNTHETIC)
    OUTPUT_DIR/rows/<row>/pretrain/           a row's pretraining run
    OUTPUT_DIR/rows/<row>/weights.pkl         its converted, verified weights (+ .report.json)
    OUTPUT_DIR/bench/<benchmark>/<row>/       one bench folder per benchmark and row
    OUTPUT_DIR/report.md (+ report_ap_vs_lr.png)
"""

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torchvision

from convert.command import check_pretraining_run, convert_checkpoint, print_summary
from detection import protocol
from detection.bench import Bench
from detection.executors import cpu_thread_env
from detection.report import load_benches, plot_ap_vs_lr, render
from detection.spec import ExecutorOptions, SweepSpec
from pretrain import checkpoint
from pretrain.config import load_cfg as load_pretrain_cfg
from simsiam_transfer import atomic
from simsiam_transfer.checkpoints import conversion_report_path
from simsiam_transfer.config import CfgNode as CN, flatten, load, merge_node
from simsiam_transfer.errors import UserError
from simsiam_transfer.stopping import Children, signal_number
from simsiam_transfer.synthetic import make_synthetic

_P = CN()
_P.OUTPUT_DIR = "runs/pipeline"
_P.DATA = CN()
_P.DATA.SYNTHETIC = False        # generate the built-in mini data under OUTPUT_DIR/data
_P.DATA.SYNTHETIC_SEED = 0
_P.DATA.SYNTHETIC_SIZE = CN()     # image counts of the generated data; 0 = the generator's default
_P.DATA.SYNTHETIC_SIZE.NUM_TRAIN = 0
_P.DATA.SYNTHETIC_SIZE.NUM_TEST = 0
_P.DATA.SYNTHETIC_SIZE.NUM_UNLABELED = 0
_P.DATA.DATASETS = ""            # dataset catalog for fine-tuning (default with SYNTHETIC: the generated one)
_P.DATA.DATA_ROOT = ""           # root of the standard VOC/COCO folders
_P.PRETRAIN = CN()
_P.PRETRAIN.NPROC_PER_NODE = -1  # pretraining processes: -1 = one per visible GPU (1 on CPU)
# Without GPUs: pretraining rows and fine-tuning trials run CPU_JOBS at a time, each with an equal
# share of the cores (on 2 cores, two single-thread jobs beat one 2-thread job after the other:
# 1.25x for mini fine-tunes, 1.48x for bf16 mini pretraining; README, Measured).
_P.CPU_JOBS = 1
_P.ROWS = CN(new_allowed=True)   # row id -> _ROW keys; ids name folders, so [A-Za-z0-9._-]
_P.CONVERT = CN()
_P.CONVERT.VERIFY = True
_P.BENCH = CN()
_P.BENCH.BENCHMARKS = ["voc07", "voc0712", "coco_1x"]
_P.BENCH.LRS = []                # fine-tuning SOLVER.BASE_LR grid; empty = each config's BASE_LR
_P.BENCH.TRIALS = 5              # trials at the selected LR
_P.BENCH.TRIALS_PER_BENCHMARK = CN(new_allowed=True)  # e.g. {coco_1x: 1}: the paper averages only VOC
_P.BENCH.SEARCH = "best-then-repeat"
_P.BENCH.METRIC = "bbox/AP"
_P.BENCH.EXECUTOR = "local"
_P.BENCH.GPUS_PER_TRIAL = -1     # -1 = bench's default: all visible GPUs (8 on Slurm), 0 on CPU
_P.BENCH.SCALING = "faithful"    # faithful (the config's batch 16 spread over the GPUs) or linear
_P.BENCH.MAX_RETRIES = 1
_P.BENCH.CFG = CN(new_allowed=True)  # nested detectron2 keys applied to every fine-tune
_P.REPORT = CN()
_P.REPORT.FORMAT = "md"
_P.REPORT.PER_TRIAL = False      # also list each trial's metrics and seed
_P.REPORT.REFERENCE = ""         # "paper": add the SimSiam paper's published Table 5 rows

_ROW = CN()
_ROW.NAME = ""                   # label in the report (default: the row id)
_ROW.WEIGHTS = ""                # none / a checkpoint / torchvision:<NAME>; empty = pretrain here
_ROW.SOURCE = "auto"             # the converter's --source for WEIGHTS files
_ROW.PRETRAIN = CN()
_ROW.PRETRAIN.CONFIG = ""        # pretraining YAML (a path, or relative to configs/)
_ROW.PRETRAIN.CFG = CN(new_allowed=True)  # nested pretraining keys merged over CONFIG

_ROW_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclasses.dataclass
class Row:
    """One line of the table and how its weights are made."""

    id: str
    name: str
    weights: str = ""            # "" when pretrained here
    source: str = "auto"
    pretrain_config: str = ""
    pretrain_cfg: Optional[CN] = None

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
    return Row(id=row_id, name=cfg.NAME or row_id, weights=cfg.WEIGHTS, source=cfg.SOURCE,
               pretrain_config=cfg.PRETRAIN.CONFIG, pretrain_cfg=cfg.PRETRAIN.CFG)


def _validate(cfg, source):
    if not len(cfg.ROWS):
        raise UserError(f"{source}: ROWS is empty; list at least one row (see configs/pipeline/mini.yaml)")
    for row_id, node in cfg.ROWS.items():
        _row(row_id, node)
    for bm in cfg.BENCH.BENCHMARKS:
        if bm not in protocol.BENCHMARKS and not bm.endswith((".yaml", ".yml")):
            raise UserError(f"{source}: BENCH.BENCHMARKS {bm!r} is not one of {sorted(protocol.BENCHMARKS)} "
                            "nor a .yaml config")
    for bm, trials in cfg.BENCH.TRIALS_PER_BENCHMARK.items():
        if bm not in cfg.BENCH.BENCHMARKS:
            raise UserError(f"{source}: BENCH.TRIALS_PER_BENCHMARK.{bm}: not in BENCH.BENCHMARKS")
        if not isinstance(trials, int) or trials < 1:
            raise UserError(f"{source}: BENCH.TRIALS_PER_BENCHMARK.{bm} must be an integer >= 1, got {trials!r}")
    if not isinstance(cfg.CPU_JOBS, int) or cfg.CPU_JOBS < 1:
        raise UserError(f"{source}: CPU_JOBS must be an integer >= 1, got {cfg.CPU_JOBS!r}")
    if cfg.BENCH.LRS:
        protocol.check_lrs([float(lr) for lr in cfg.BENCH.LRS], ",".join(f"{float(lr):g}" for lr in cfg.BENCH.LRS))
    if cfg.REPORT.REFERENCE not in ("", "paper"):
        raise UserError(f"{source}: REPORT.REFERENCE {cfg.REPORT.REFERENCE!r}: use \"paper\" or leave it empty")
    if cfg.REPORT.FORMAT not in ("md", "csv", "latex"):
        raise UserError(f"{source}: REPORT.FORMAT {cfg.REPORT.FORMAT!r} is not one of md, csv, latex")


def load_pipeline_cfg(config_file, overrides=()):
    return load(_P, config_file, overrides, _validate)


def pretrain_processes(requested: int) -> int:
    """Processes for a pretraining run: as configured, else one per visible GPU (1 on CPU)."""
    return requested if requested > 0 else max(1, torch.cuda.device_count())


def pretrain_command(config_path, nproc: int) -> List[str]:
    """One process runs the CLI directly; several run under torchrun on this node."""
    cli = ["-m", "simsiam_transfer.cli", "pretrain", "--config", str(config_path)]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cli]


class Pipeline:
    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.OUTPUT_DIR)
        self.rows = [_row(row_id, node) for row_id, node in cfg.ROWS.items()]
        self.state_path = self.out / "pipeline.json"
        self.state = {"stages": {}}

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
        if (self.data_dir / "datasets.yaml").is_file():
            return "done earlier"
        sizes = {k.lower(): v for k, v in self.cfg.DATA.SYNTHETIC_SIZE.items() if v > 0}
        make_synthetic(self.data_dir, seed=self.cfg.DATA.SYNTHETIC_SEED, **sizes)
        return "done"

    def pretrain_cfg(self, row: Row):
        """The row's resolved pretraining config; every key error names ``ROWS.<row>.PRETRAIN.CFG``."""
        overrides = ["OUTPUT_DIR", str(self.row_dir(row) / "pretrain")]
        if self.cfg.DATA.SYNTHETIC:
            overrides += ["DATA.TRAIN_DIR", str(self.data_dir / "unlabeled"),
                          "DATA.KNN_TRAIN_DIR", str(self.data_dir / "labeled/train"),
                          "DATA.KNN_VAL_DIR", str(self.data_dir / "labeled/val")]
        return load_pretrain_cfg(row.pretrain_config, overrides,
                                 nodes=[(row.pretrain_cfg, f"ROWS.{row.id}.PRETRAIN.CFG")])

    def cpu_jobs(self) -> int:
        """Jobs side by side: CPU_JOBS on a machine without GPUs, else 1 (GPU work has its own knobs)."""
        return self.cfg.CPU_JOBS if torch.cuda.device_count() == 0 else 1

    def stage_pretrain(self, rows: List[Row]):
        """Pretrain ``rows``: one after another in this terminal, or side by side (``CPU_JOBS``), each
        with its share of the cores and its output in ``rows/<row>/pretrain.log``."""
        todo = []
        for row in rows:
            cfg = self.pretrain_cfg(row)
            last = Path(cfg.OUTPUT_DIR) / checkpoint.LAST
            if last.is_file() and checkpoint.load(last)["epoch"] >= cfg.SOLVER.EPOCHS:
                continue
            config_path = self.row_dir(row) / "pretrain_config.yaml"
            atomic.write_text(config_path, cfg.dump())
            todo.append((row, cfg, last, config_path))
        if not todo:
            return "done earlier"
        nproc = pretrain_processes(self.cfg.PRETRAIN.NPROC_PER_NODE)
        side_by_side = len(todo) > 1
        running, children = [], Children()
        try:
            for row, cfg, last, config_path in todo:
                log_path = None
                if side_by_side:
                    log_path = self.row_dir(row) / "pretrain.log"
                    print(f"[pipeline] pretraining {row.id} beside {len(todo) - 1} other row(s); log: {log_path}",
                          flush=True)
                    with open(log_path, "a") as log:  # the child keeps its own handle
                        proc = children.popen(pretrain_command(config_path, nproc), stdout=log,
                                              stderr=subprocess.STDOUT, env=cpu_thread_env(len(todo)))
                else:
                    proc = children.popen(pretrain_command(config_path, nproc))
                running.append((row, cfg, last, log_path, proc))
            for *_, proc in running:
                proc.wait()
        except BaseException as exc:  # stopped: the pretrainings stop too, and keep their checkpoints
            children.stop(signal_number(exc))
            raise
        notes = []
        for row, cfg, last, log_path, proc in running:
            if proc.returncode:
                where = f"its log: {log_path}" if log_path else "its error is above"
                raise UserError(f"pretraining of row {row.id} stopped with exit {proc.returncode} ({where}); "
                                f"fix it and run the pipeline again, it resumes from {cfg.OUTPUT_DIR}")
            notes.append(f"{row.id}{self._warn_if_not_learned(row, last)}")
        each = f"{nproc} process{'es' if nproc > 1 else ''} each"
        return f"done ({each}{', side by side' if side_by_side else ''}: {', '.join(notes)})"

    def _warn_if_not_learned(self, row: Row, last: Path) -> str:
        """The converter's no-op/collapse verdict, right after pretraining: cheap, and before any
        fine-tune is spent on a run that learned nothing (a no-stop-gradient row collapses by design)."""
        check = check_pretraining_run(last)
        for problem in check["problems"]:
            print(f"[pipeline] WARNING: row {row.id}: {problem}", flush=True)
        if check["problems"] and check.get("advice"):
            print(f"[pipeline] {check['advice']}", flush=True)
        n = len(check["problems"])
        return f" ({n} warning{'s' if n > 1 else ''})" if n else ""

    def _source_checkpoint(self, row: Row) -> Path:
        if row.pretrained_here:
            return self.row_dir(row) / "pretrain" / checkpoint.LAST
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
        source = self._source_checkpoint(row)
        weights = Path(self.weights_path(row))
        if (weights.is_file() and conversion_report_path(weights).is_file()
                and weights.stat().st_mtime >= source.stat().st_mtime):
            return "done earlier"
        src = "torchvision" if row.weights.startswith("torchvision:") else row.source
        print_summary(convert_checkpoint(source, weights, source=src, verify=self.cfg.CONVERT.VERIFY))
        return "done"

    def trials(self, benchmark: str) -> int:
        return int(self.cfg.BENCH.TRIALS_PER_BENCHMARK.get(benchmark, self.cfg.BENCH.TRIALS))

    def bench_folder(self, benchmark: str, row: Row) -> Path:
        return self.out / "bench" / Path(benchmark).stem / row.id

    def bench_jobs(self):
        return [(bm, row, self.bench_folder(bm, row)) for bm in self.cfg.BENCH.BENCHMARKS for row in self.rows]

    def sweep_spec(self, benchmark: str, row: Row) -> SweepSpec:
        """The same spec ``bench`` builds from its arguments, for one benchmark and row."""
        b = self.cfg.BENCH
        datasets = self.cfg.DATA.DATASETS or (str(self.data_dir / "datasets.yaml") if self.cfg.DATA.SYNTHETIC else "")
        return SweepSpec(
            benchmark=benchmark, weights=self.weights_path(row), name=row.name,
            output_dir=str(self.bench_folder(benchmark, row)), trials=self.trials(benchmark), search=b.SEARCH,
            metric=b.METRIC, max_retries=b.MAX_RETRIES, lrs=tuple(b.LRS) or None, datasets=datasets or None,
            data_root=self.cfg.DATA.DATA_ROOT or None, scaling=b.SCALING, overrides=tuple(flatten(b.CFG)),
            executor=ExecutorOptions(kind=b.EXECUTOR, cpu_jobs=self.cpu_jobs() if b.EXECUTOR == "local" else 1,
                                     gpus_per_trial=b.GPUS_PER_TRIAL if b.GPUS_PER_TRIAL >= 0 else None))

    def stage_bench(self, benchmark: str, row: Row):
        summary = Bench(self.sweep_spec(benchmark, row)).run()
        if summary["selected_lr"] is None:
            raise UserError(f"bench {benchmark} / {row.id}: every trial failed; see {self.bench_folder(benchmark, row)}")
        return "done"

    def stage_report(self):
        benches = load_benches([folder for *_, folder in self.bench_jobs()])
        ext = {"md": "md", "csv": "csv", "latex": "tex"}[self.cfg.REPORT.FORMAT]
        path = self.out / f"report.{ext}"
        text = render(benches, self.cfg.REPORT.FORMAT, per_trial=self.cfg.REPORT.PER_TRIAL,
                      reference=self.cfg.REPORT.REFERENCE or None)
        atomic.write_text(path, text)
        plot_ap_vs_lr(benches, self.out / "report_ap_vs_lr.png")
        print(text)
        return f"done ({path})"

    def stages(self):
        """(stage name, callable) in order; each callable returns its status line."""
        plan = [("data", self.stage_data)]
        here = [row for row in self.rows if row.pretrained_here]
        jobs = 1 if pretrain_processes(self.cfg.PRETRAIN.NPROC_PER_NODE) > 1 else self.cpu_jobs()
        for i in range(0, len(here), jobs):
            group = here[i:i + jobs]
            name = f"pretrain:{'+'.join(r.id for r in group)}"
            plan.append((name, lambda group=group: self.stage_pretrain(group)))
        for row in self.rows:
            if not row.scratch:
                plan.append((f"convert:{row.id}", lambda row=row: self.stage_convert(row)))
        for bm, row, _ in self.bench_jobs():
            plan.append((f"bench:{bm}:{row.id}", lambda bm=bm, row=row: self.stage_bench(bm, row)))
        plan.append(("report", self.stage_report))
        return plan

    def run(self):
        # Every row's pretraining config must load before anything runs: a typo costs nothing.
        for row in self.rows:
            if row.pretrained_here:
                self.pretrain_cfg(row)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.out / "pipeline_config.yaml", self.cfg.dump())
        for name, stage in self.stages():
            self._mark(name, "running")
            try:
                status = stage()
            except KeyboardInterrupt:
                self._mark(name, "stopped")
                raise
            self._mark(name, status)
        return self.state

