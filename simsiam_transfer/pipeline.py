"""``simsiam-transfer pipeline --config FILE [KEY VALUE ...]``: pretrain -> convert -> bench -> report.

Each stage is resumable on its own (pretraining resumes from its checkpoint, conversion is
skipped when its output is newer than the checkpoint, bench skips finished trials), so running
the same command again continues at the first unfinished stage. ``OUTPUT_DIR/pipeline.json``
records each stage's status; the layout is::

    OUTPUT_DIR/data/                  generated datasets (DATA.SYNTHETIC)
    OUTPUT_DIR/pretrain/              pretraining run
    OUTPUT_DIR/weights.pkl            converted + verified detectron2 weights (+ .report.json)
    OUTPUT_DIR/bench/<benchmark>/<row>/   one bench folder per benchmark and row
    OUTPUT_DIR/report.md (+ report_ap_vs_lr.png)
"""

import re
import time
from pathlib import Path

from simsiam_transfer import atomic
from simsiam_transfer.config import CfgNode as CN
from simsiam_transfer.config import load
from simsiam_transfer.errors import UserError

_P = CN()
_P.OUTPUT_DIR = "runs/pipeline"
_P.DATA = CN()
_P.DATA.SYNTHETIC = False        # generate the built-in mini data under OUTPUT_DIR/data
_P.DATA.SYNTHETIC_SEED = 0
_P.DATA.DATASETS = ""            # dataset catalog for fine-tuning (default with SYNTHETIC: the generated one)
_P.DATA.DATA_ROOT = ""           # root of the standard VOC/COCO folders
_P.PRETRAIN = CN()
_P.PRETRAIN.CONFIG = "pretrain/simsiam_R_50_200ep_b256_base.yaml"
_P.PRETRAIN.OVERRIDES = []
_P.CONVERT = CN()
_P.CONVERT.VERIFY = True
_P.BENCH = CN()
_P.BENCH.NAME = "SimSiam"
_P.BENCH.BENCHMARKS = ["voc07", "voc0712", "coco_1x"]
_P.BENCH.LRS = []                # fine-tuning SOLVER.BASE_LR grid; empty = each config's BASE_LR
_P.BENCH.TRIALS = 5
_P.BENCH.SEARCH = "best-then-repeat"
_P.BENCH.METRIC = "bbox/AP"
_P.BENCH.SCRATCH = False         # also bench random init (the paper's "scratch" row)
_P.BENCH.EXECUTOR = "local"
_P.BENCH.NUM_GPUS = -1           # -1 = all visible GPUs
_P.BENCH.MAX_RETRIES = 1
_P.BENCH.OVERRIDES = []
_P.REPORT = CN()
_P.REPORT.FORMAT = "md"


def load_pipeline_cfg(config_file, overrides=()):
    return load(_P, config_file, overrides)


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "row"


class Pipeline:
    STAGES = ("data", "pretrain", "convert", "bench", "report")

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.OUTPUT_DIR)
        self.state_path = self.out / "pipeline.json"
        self.state = {"stages": {}}

    def _mark(self, stage, status, **extra):
        self.state["stages"][stage] = {"status": status, "time": round(time.time(), 1), **extra}
        atomic.write_json(self.state_path, self.state)
        print(f"[pipeline] {stage}: {status}", flush=True)

    @property
    def data_dir(self):
        return self.out / "data"

    def stage_data(self):
        if not self.cfg.DATA.SYNTHETIC:
            return "skipped (DATA.SYNTHETIC False)"
        if (self.data_dir / "datasets.yaml").is_file():
            return "done earlier"
        from simsiam_transfer.synthetic import make_synthetic

        make_synthetic(self.data_dir, seed=self.cfg.DATA.SYNTHETIC_SEED)
        return "done"

    def pretrain_cfg(self):
        from pretrain.config import load_cfg

        overrides = list(self.cfg.PRETRAIN.OVERRIDES)
        if self.cfg.DATA.SYNTHETIC:
            overrides += ["DATA.TRAIN_DIR", str(self.data_dir / "unlabeled"),
                          "DATA.KNN_TRAIN_DIR", str(self.data_dir / "labeled/train"),
                          "DATA.KNN_VAL_DIR", str(self.data_dir / "labeled/val")]
        return load_cfg(self.cfg.PRETRAIN.CONFIG, overrides + ["OUTPUT_DIR", str(self.out / "pretrain")])

    def stage_pretrain(self):
        import torch

        from pretrain import checkpoint
        from pretrain.engine import run_pretrain

        cfg = self.pretrain_cfg()
        last = Path(cfg.OUTPUT_DIR) / checkpoint.LAST
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= cfg.SOLVER.EPOCHS:
            return "done earlier"
        run_pretrain(cfg)
        return "done"

    @property
    def weights(self):
        return self.out / "weights.pkl"

    def stage_convert(self):
        from convert.command import convert_checkpoint, print_summary, report_path
        from pretrain import checkpoint

        source = self.out / "pretrain" / checkpoint.LAST
        if (self.weights.is_file() and report_path(self.weights).is_file()
                and self.weights.stat().st_mtime >= source.stat().st_mtime):
            return "done earlier"
        print_summary(convert_checkpoint(source, self.weights, verify=self.cfg.CONVERT.VERIFY))
        return "done"

    def bench_rows(self):
        rows = [(self.cfg.BENCH.NAME, str(self.weights))]
        if self.cfg.BENCH.SCRATCH:
            rows.append(("scratch", "none"))
        return rows

    def bench_jobs(self):
        """(benchmark, row name, weights, bench folder) for every benchmark and row."""
        return [(bm, name, weights, self.out / "bench" / bm / _slug(name))
                for bm in self.cfg.BENCH.BENCHMARKS for name, weights in self.bench_rows()]

    def stage_bench(self):
        from detection.bench import Bench
        from simsiam_transfer.cli import build_parser

        b = self.cfg.BENCH
        datasets = self.cfg.DATA.DATASETS or (str(self.data_dir / "datasets.yaml") if self.cfg.DATA.SYNTHETIC else "")
        for bm, name, weights, folder in self.bench_jobs():
            argv = ["bench", "--benchmark", bm, "--weights", weights, "--name", name,
                    "--output-dir", str(folder), "--trials", str(b.TRIALS),
                    "--search", b.SEARCH, "--metric", b.METRIC, "--executor", b.EXECUTOR,
                    "--max-retries", str(b.MAX_RETRIES)]
            argv += ["--lrs", ",".join(repr(float(lr)) for lr in b.LRS)] if b.LRS else []
            argv += ["--datasets", datasets] if datasets else []
            argv += ["--data-root", self.cfg.DATA.DATA_ROOT] if self.cfg.DATA.DATA_ROOT else []
            argv += ["--num-gpus", str(b.NUM_GPUS)] if b.NUM_GPUS >= 0 else []
            summary = Bench(build_parser().parse_args(argv + list(b.OVERRIDES))).run()
            if summary["selected_lr"] is None:
                raise UserError(f"bench {bm} / {name}: every trial failed; see {folder}")
        return "done"

    def stage_report(self):
        from detection.report import load_benches, plot_ap_vs_lr, render

        benches = load_benches([folder for *_, folder in self.bench_jobs()])
        ext = {"md": "md", "csv": "csv", "latex": "tex"}[self.cfg.REPORT.FORMAT]
        path = self.out / f"report.{ext}"
        text = render(benches, self.cfg.REPORT.FORMAT)
        atomic.write_text(path, text)
        plot_ap_vs_lr(benches, self.out / "report_ap_vs_lr.png")
        print(text)
        return f"done ({path})"

    def run(self):
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.out / "pipeline_config.yaml", self.cfg.dump())
        for stage in self.STAGES:
            self._mark(stage, "running")
            self._mark(stage, getattr(self, f"stage_{stage}")())
        return self.state
