"""The GPU check: one prepared call on a machine with one GPU, at most 8 minutes with install and data.

    bash benchmarks/gpu_check.sh OUT              on the device: installs gpu_bundle/, then runs this
    bash benchmarks/gpu_check.sh --smoke OUT      the same sequence at toy sizes on a CPU (make gpu-rehearsal)

Writes into OUT (a few files, as the device returns at most 8): ``checks.jsonl`` (one JSON line per check,
also printed), ``summary.json`` (each part's planned and measured seconds, failed and skipped checks with
their reasons, the claim's table and verdict), ``claim.md`` (the table) and ``logs.tar.gz`` (each check's
log); ``gpu_check.sh`` adds ``install.log`` and ``console.log``. Data and runs go to ``--work``.

Parts, in order (planned seconds on one H100 in ``PLAN``; basis in docs/gpus-and-clusters.md):
  environment, data            the device, the versions, the generated data (VOC/COCO layouts, unlabeled, labeled)
  detector_memory              R50-C4 (protocol config: trainable BN, nothing frozen) at the protocol's
                               largest training size, 2/4/8 images, VOC's landscape and portrait shapes
  simsiam_r50_step             the SimSiam R50 step at 224 px, batch 64 and 128, fp32 and bf16
  loader_e2e                   benchmarks/loader.py --e2e (device-side against CPU augmentation, end to end)
  claim                        SimSiam R18 pretraining (~3 min) and the same without stop-gradient (~1 min),
                               kNN every epoch against the untrained backbone, 3 fine-tunes per row
                               (scratch, SimSiam, no stop-gradient, supervised when MODEL.METHOD has it)
  side checks (beside the pretrainings): DDP + SyncBN over NCCL at world size 1, the refusals of two
  ranks on one GPU (pretrain, finetune), fp32 -> AMP resume, Mask R-CNN R50-C4, the pipeline's
  torchrun stage at one process; checks needing 2+ GPUs are skipped with the reason where fewer exist.
A part that would overrun the budget is skipped with the reason; every subprocess has a timeout.
"""

import argparse
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import REPO

BUDGET_S = 480  # the whole check on the device, install and data generation included
# Planned seconds on one H100 per part; ``install`` runs in gpu_check.sh. The side checks run beside the
# pretrainings and are not added. Basis: docs/gpus-and-clusters.md ("Time plan").
PLAN = {"install": 15, "environment": 5, "data": 20, "detector_memory": 35, "simsiam_r50_step": 30,
        "loader_e2e": 25, "pretrain_no_stop_gradient": 60, "pretrain_simsiam": 180, "finetune_simsiam": 75,
        "report": 5}
SIDE_SLOTS = {"gpu": 4, "smoke": 2}  # subprocesses beside a pretraining (16 cores: its loader keeps 10)
TRIAL_SEEDS = (1000, 1001, 1002)
VOC_MINI = "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml"
CLAIM_ROWS = ("scratch", "simsiam", "no_stop_gradient", "supervised")

# Sizes on the GPU and in the CPU smoke run (which checks the script, not the numbers).
SIZES = {
    "gpu": dict(
        data=dict(num_train=300, num_test=100, num_unlabeled=20000, labeled_per_class=(1000, 100)),
        detector=("detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc07.yaml", "2,4,8"),
        step=("resnet50", "224", "64,128", "10"),
        # R18, 64-px crops of the 128-px scenes, batch 256: ~78 steps per epoch of 20,000 images; bf16 +
        # channels_last (SOLVER.AMP on an sm80+ GPU); lr 0.1 (2x the paper's per-sample lr: short run).
        pretrain=["MODEL.BACKBONE", "resnet18", "MODEL.ZERO_INIT_RESIDUAL", False, "MODEL.DIM", 512,
                  "MODEL.PRED_DIM", 128, "DATA.IMAGE_SIZE", 64, "SOLVER.BATCH_SIZE", 256, "SOLVER.BASE_LR", 0.1,
                  "SOLVER.FIX_PRED_LR", True, "SOLVER.AMP", True, "DATA.NUM_WORKERS", 10, "MONITOR.KNN_K", 20,
                  "SOLVER.CHECKPOINT_PERIOD", 1000, "SOLVER.LOG_PERIOD", 20,
                  "DATA.CHECK_IMAGES", "never"],  # just generated; the scan would cost ~4 s per run
        no_sg_epochs=15, simsiam_epochs=(5, 200), supervised_workers=5, supervised_warmup=2,
        # 900 iterations at batch 4 and the config's LR 0.02 (the CPU demo ranks at 500); 3 trials side by side.
        finetune=["SOLVER.MAX_ITER", 900, "SOLVER.STEPS", "(700,)", "SOLVER.WARMUP_ITERS", 50,
                  "SOLVER.CHECKPOINT_PERIOD", 10000, "DATALOADER.NUM_WORKERS", 1],
        mask=("detection/COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", 20, 4),
        resume=("resnet18", 32, 64, 4), timeout_scale=2.0),
    "smoke": dict(
        data=dict(num_train=40, num_test=20, num_unlabeled=256, labeled_per_class=(12, 6)),  # 36 >= one batch
        detector=(VOC_MINI, "1,2"),
        step=("resnet18", "32", "8", "2"),
        pretrain=["MODEL.BACKBONE", "resnet18", "MODEL.ZERO_INIT_RESIDUAL", False, "MODEL.DIM", 64,
                  "MODEL.PRED_DIM", 16, "DATA.IMAGE_SIZE", 32, "SOLVER.BATCH_SIZE", 32, "SOLVER.BASE_LR", 0.1,
                  "SOLVER.FIX_PRED_LR", True, "SOLVER.AMP", False, "DATA.NUM_WORKERS", 0, "MONITOR.KNN_K", 5,
                  "SOLVER.MAX_ITERS_PER_EPOCH", 2, "SOLVER.CHECKPOINT_PERIOD", 1000, "SOLVER.LOG_PERIOD", 1],
        no_sg_epochs=1, simsiam_epochs=(2, 2), supervised_workers=0, supervised_warmup=0,
        finetune=["SOLVER.MAX_ITER", 3, "SOLVER.STEPS", "(2,)", "SOLVER.WARMUP_ITERS", 1,
                  "SOLVER.CHECKPOINT_PERIOD", 10000, "TEST.PRECISE_BN.NUM_ITER", 1],
        mask=("detection/COCO-InstanceSegmentation/mask_rcnn_R_18_C4_1x_mini.yaml", 2, 2),
        resume=("resnet18", 32, 16, 2), timeout_scale=20.0),
}


# -- pure pieces (tested without running anything) ------------------------------------------------------
def planned_total(plan=PLAN) -> int:
    return sum(plan.values())


def epochs_for(budget_s: float, s_per_epoch: float, bounds) -> int:
    """Epochs of ``s_per_epoch`` that fill ``budget_s``, within ``bounds`` (min, max)."""
    lo, hi = bounds
    return max(lo, min(hi, int(budget_s // max(s_per_epoch, 1e-6))))


def claim_table(rows: dict) -> dict:
    """Per row: AP50/AP mean ± std over its trials, the classifier check, kNN, final loss, z_std."""
    from detection import protocol

    table = {}
    for name, row in rows.items():
        metrics = [m for m in row.get("trials", []) if m]
        entry = {key: protocol.mean_std([m.get(f"bbox/{key}") for m in metrics]) for key in ("AP50", "AP")}
        entry["classifier"] = protocol.classifier_summary([{"metrics": m} for m in metrics])
        for key in ("knn_top1", "knn_top1_untrained", "loss", "z_std", "epochs", "pretrain_s"):
            if key in row:
                entry[key] = row[key]
        table[name] = entry
    return table


def claim_verdict(table: dict, metric: str = "AP50") -> dict:
    """The paper's claim on this data: SimSiam above scratch by more than the larger std of the two, and
    the no-stop-gradient row below SimSiam; None where a row is missing."""
    def stat(row):
        return (table.get(row) or {}).get(metric) or {}

    s, scratch, no_sg = stat("simsiam"), stat("scratch"), stat("no_stop_gradient")
    verdict = {"metric": f"bbox/{metric}", "simsiam_above_scratch_by_more_than_larger_std": None,
               "no_stop_gradient_below_simsiam": None}
    if s.get("mean") is not None and scratch.get("mean") is not None:
        larger_std = max(s.get("std") or 0.0, scratch.get("std") or 0.0)
        verdict["simsiam_above_scratch_by_more_than_larger_std"] = s["mean"] - scratch["mean"] > larger_std
        verdict["margin"] = round(s["mean"] - scratch["mean"], 2)
        verdict["larger_std"] = round(larger_std, 2)
    if s.get("mean") is not None and no_sg.get("mean") is not None:
        verdict["no_stop_gradient_below_simsiam"] = no_sg["mean"] < s["mean"]
    learned = [(row.get("classifier") or {}).get("learned") for row in table.values()]
    verdict["classifiers_learned"] = bool(learned) and all(learned)
    verdict["held"] = bool(verdict["simsiam_above_scratch_by_more_than_larger_std"]
                           and verdict["no_stop_gradient_below_simsiam"] and verdict["classifiers_learned"])
    return verdict


def claim_markdown(table: dict, verdict: dict) -> str:
    def cell(stat):
        if not stat or stat.get("mean") is None:
            return "n/a"
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}" if stat.get("std") is not None else f"{stat['mean']:.1f}"

    lines = ["| row | AP50 | AP | n | classifier learned | kNN % (untrained) | final loss | z_std |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        knn = row.get("knn_top1")
        knn_text = "n/a" if knn is None else f"{knn:.1f} ({row.get('knn_top1_untrained', float('nan')):.1f})"
        cls = row.get("classifier") or {}
        lines.append(f"| {name} | {cell(row['AP50'])} | {cell(row['AP'])} | {row['AP50'].get('n', 0)} | "
                     f"{cls.get('learned', 'n/a')} | {knn_text} | {row.get('loss', 'n/a')} | {row.get('z_std', 'n/a')} |")
    lines.append("")
    lines.append(f"SimSiam above scratch by more than the larger std ({verdict['metric']}): "
                 f"{verdict['simsiam_above_scratch_by_more_than_larger_std']}; no stop-gradient below SimSiam: "
                 f"{verdict['no_stop_gradient_below_simsiam']}; classifiers learned: {verdict['classifiers_learned']}; "
                 f"claim held: {verdict['held']}")
    return "\n".join(lines) + "\n"


def supervised_supported() -> bool:
    """Whether the pretraining registry has the ``supervised`` method (the positive control)."""
    from pretrain.methods import METHODS

    return "supervised" in METHODS


# -- running checks ------------------------------------------------------------------------------------
class Check:
    """Runs subprocesses with logs and timeouts, writes one JSON line per check, keeps the budget."""

    def __init__(self, out: Path, work: Path, smoke: bool, start: float):
        self.out, self.work, self.smoke, self.start = out, work, smoke, start
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.records, self.lock = [], threading.Lock()
        self.sizes = SIZES["smoke" if smoke else "gpu"]
        (out / "checks.jsonl").write_text("")

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return BUDGET_S - self.elapsed()

    def emit(self, record: dict) -> dict:
        record.setdefault("t_s", round(self.elapsed(), 1))
        with self.lock:
            self.records.append(record)
            with open(self.out / "checks.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        return record

    def skip(self, name: str, reason: str, **extra) -> dict:
        return self.emit({"check": name, "status": "skipped", "reason": reason, **extra})

    def fits(self, name: str, planned: float) -> bool:
        """False (and a skipped record) when ``planned`` seconds would overrun the budget (never on smoke)."""
        if self.smoke or planned <= self.left():
            return True
        self.skip(name, f"time budget: {self.left():.0f} s of {BUDGET_S} s left, {planned:.0f} s planned")
        return False

    def run(self, name, cmd, planned, measure=None, expect_rc=0, env=None, **extra) -> dict:
        """One subprocess (own process group, killed on timeout); its record, with ``measure()``'s figures."""
        timeout = planned * self.sizes["timeout_scale"]
        if not self.smoke:
            timeout = max(10.0, min(timeout, self.left() + 30))
        log = self.logs / f"{name}.log"
        started = time.perf_counter()
        with open(log, "w") as f:
            f.write(" ".join(map(str, cmd)) + "\n")
            f.flush()
            proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                extra["timeout_s"] = round(timeout)
        record = {"check": name, "rc": rc, "wall_s": round(time.perf_counter() - started, 1), "planned_s": planned,
                  **extra}
        ok = rc == expect_rc and "timeout_s" not in extra
        if ok and measure is not None:
            try:
                record.update(measure(log))
            except Exception as exc:  # a missing figure fails the check, it does not stop the others
                ok, record["measure_error"] = False, f"{type(exc).__name__}: {exc}"
        record["status"] = "ok" if ok else "failed"
        if not ok:
            record["tail"] = log.read_text()[-1200:]
        return self.emit(record)

    def cli(self, *args):
        return [sys.executable, "-m", "app.cli", *args]

    def torchrun(self, nproc, *args):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, *args]

    def probe(self, *args):
        return [sys.executable, str(REPO / "benchmarks" / "gpu_probes.py"), *args]


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"{log.name}: no JSON line")


def last_epoch(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def pretrain_figures(run_dir: Path, batch: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    times = sorted(r["time_s"] for r in records[1:]) or [records[0]["time_s"]]  # epoch 1 holds the warm-up
    return {"epochs": last["epoch"], "loss": round(last["loss"], 4), "z_std": round(last["z_std"], 5),
            "knn_top1": last.get("knn_top1"), "knn_curve": [r.get("knn_top1") for r in records],
            "s_per_epoch": round(times[len(times) // 2], 2), "precision": last.get("precision"),
            "tf32": last.get("tf32"), "img_per_s": round(last["steps"] * batch / last["time_s"], 1)}


def override(overrides: list, key: str):
    return overrides[overrides.index(key) + 1]


def finetune_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# -- the parts -------------------------------------------------------------------------------------------
def environment(check: Check) -> dict:
    import torch

    import pretrain
    from simsiam_transfer.versions import library_versions

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    record = {"check": "environment", "status": "ok", "gpus": gpus, "cpus": os.cpu_count(),
              "versions": library_versions(), "code": str(Path(pretrain.__file__).resolve().parent.parent),
              "smoke": check.smoke, "budget_s": BUDGET_S, "planned_total_s": planned_total()}
    if gpus:
        props = torch.cuda.get_device_properties(0)
        record.update(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                      memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    if "GPU_INSTALL_MS" in os.environ:
        record["install"] = {"wall_s": int(os.environ["GPU_INSTALL_MS"]) / 1000, "planned_s": PLAN["install"],
                             "target": os.environ.get("GPU_SITE")}
    manifest = REPO / "gpu_bundle" / "manifest.json"
    if manifest.is_file():
        record["bundle_commit"] = json.loads(manifest.read_text()).get("project_commit")
    return check.emit(record)


def make_data(check: Check) -> Path:
    from simsiam_transfer.synthetic import make_synthetic

    data = check.work / "data"
    started = time.perf_counter()
    make_synthetic(data, workers=max(1, min(16, os.cpu_count() or 1)), **check.sizes["data"])
    check.emit({"check": "data", "status": "ok", "wall_s": round(time.perf_counter() - started, 1),
                "planned_s": PLAN["data"], **{k: list(v) if isinstance(v, tuple) else v
                                              for k, v in check.sizes["data"].items()}})
    return data


def measurements(check: Check, data: Path, gpus: int) -> None:
    """Item by item alone on the GPU, so that their figures are clean."""
    config, images = check.sizes["detector"]
    if check.fits("detector_memory", PLAN["detector_memory"]):
        check.run("detector_memory", check.probe("detector-memory", "--config", config, "--images", images),
                  PLAN["detector_memory"], measure=last_json)
    backbone, size, batches, steps = check.sizes["step"]
    if check.fits("simsiam_r50_step", PLAN["simsiam_r50_step"]):
        check.run("simsiam_r50_step", check.probe("simsiam-step", "--backbone", backbone, "--size", size,
                                                  "--batches", batches, "--steps", steps),
                  PLAN["simsiam_r50_step"], measure=last_json)
    loader = REPO / "benchmarks" / "loader.py"
    if check.smoke:
        check.skip("loader_e2e", "sized for the GPU; the test suite runs loader.py --e2e --smoke")
    elif check.fits("loader_e2e", PLAN["loader_e2e"]):
        # The bare step, then AUGMENT_ON device and cpu end to end with the device's 16 cores as loader workers.
        check.run("loader_e2e", [sys.executable, str(loader), "--e2e", "--e2e-workers", "16"], PLAN["loader_e2e"],
                  measure=last_json)


def pretrain_overrides(check: Check, data: Path, out_dir: Path, *extra) -> list:
    return ["OUTPUT_DIR", out_dir, "DATA.TRAIN_DIR", data / "unlabeled", "DATA.KNN_TRAIN_DIR", data / "labeled" / "train",
            "DATA.KNN_VAL_DIR", data / "labeled" / "val", *check.sizes["pretrain"], *extra]


def finetune_trial(check: Check, data: Path, row: str, weights, seed: int, planned: float) -> dict:
    out_dir = check.work / "finetune" / row / f"seed{seed}"
    record = check.run(f"finetune_{row}_seed{seed}", check.cli(
        "finetune", "--config", VOC_MINI, "--weights", weights, "--datasets", data / "datasets.yaml",
        "--num-gpus", 1 if not check.smoke else 0, "OUTPUT_DIR", out_dir, "SEED", seed, *check.sizes["finetune"]),
        planned, measure=lambda log: {k: v for k, v in finetune_metrics(out_dir).items()
                                      if k in ("bbox/AP50", "bbox/AP", "train/fg_cls_accuracy", "tf32", "wall_time_s")})
    return finetune_metrics(out_dir) if record["status"] == "ok" else None


def convert(check: Check, row: str, run_dir: Path) -> Path:
    weights = check.work / f"{row}.pkl"
    record = check.run(f"convert_{row}", check.cli("convert", run_dir / "checkpoint_last.pth", weights), 10)
    return weights if record["status"] == "ok" else None


def side_checks(check: Check, data: Path, gpus: int):
    """Short checks of the GPU code paths; each is a callable for the side pool."""
    jobs = []
    nccl = "NCCL" if gpus else "gloo"
    jobs.append(lambda: check.run("ddp_world1", check.torchrun(1, str(REPO / "benchmarks" / "gpu_probes.py"),
                                                               "ddp-world1"), 20, measure=last_json, backend=nccl))
    if gpus == 1:
        refused = check.work / "refused"
        jobs.append(lambda: check.run(
            "pretrain_two_ranks_one_gpu_refused", check.torchrun(2, "-m", "app.cli", "pretrain",
                                                                 *pretrain_overrides(check, data, refused / "p")),
            20, expect_rc=1, measure=lambda log: one_line_refusal(log, "share 1 GPU(s)")))
        jobs.append(lambda: check.run(
            "finetune_two_gpus_refused", check.cli("finetune", "--config", VOC_MINI, "--weights", "none",
                                                   "--datasets", data / "datasets.yaml", "--num-gpus", 2,
                                                   "OUTPUT_DIR", refused / "f"),
            15, expect_rc=2, measure=lambda log: one_line_refusal(log, "--num-gpus 2 but 1 GPU(s) visible")))
    else:
        reason = "needs exactly one GPU (there are none)" if not gpus else f"{gpus} GPUs: two ranks get two GPUs"
        check.skip("pretrain_two_ranks_one_gpu_refused", reason)
        check.skip("finetune_two_gpus_refused", reason)
    if gpus >= 2:
        jobs.append(lambda: check.run("pretrain_2_processes", check.torchrun(2, "-m", "app.cli", "pretrain",
                                      *pretrain_overrides(check, data, check.work / "ddp2", "SOLVER.EPOCHS", 1,
                                                          "SOLVER.MAX_ITERS_PER_EPOCH", 5)), 40))
    else:
        check.skip("pretrain_2_processes", f"needs 2 or more GPUs; {gpus} visible (NCCL wants one GPU per rank)")
        check.skip("finetune_2_gpus", f"needs 2 or more GPUs; {gpus} visible")
    backbone, size, batch, steps = check.sizes["resume"]
    resume_dir = check.work / "resume"
    common = ["OUTPUT_DIR", resume_dir, "DATA.TRAIN_DIR", data / "unlabeled", "MODEL.BACKBONE", backbone,
              "DATA.IMAGE_SIZE", size, "SOLVER.BATCH_SIZE", batch, "SOLVER.MAX_ITERS_PER_EPOCH", steps,
              "DATA.NUM_WORKERS", 0, "MODEL.DIM", 64, "MODEL.PRED_DIM", 16]

    def resume():
        first = check.run("resume_fp32_part", check.cli("pretrain", *common, "SOLVER.EPOCHS", 1, "SOLVER.AMP", False), 15)
        if first["status"] == "ok":
            check.run("resume_fp32_checkpoint_with_amp", check.cli("pretrain", *common, "SOLVER.EPOCHS", 2,
                                                                   "SOLVER.AMP", True), 15,
                      measure=lambda log: {"precision": last_epoch(resume_dir).get("precision"),
                                           "epochs": last_epoch(resume_dir)["epoch"]})
    jobs.append(resume)
    config, iters, batch = check.sizes["mask"]
    mask_dir = check.work / "mask_rcnn"
    jobs.append(lambda: check.run("finetune_mask_rcnn_C4", check.cli(
        "finetune", "--config", config, "--weights", "none", "--datasets", data / "datasets.yaml",
        "--num-gpus", min(gpus, 1), "OUTPUT_DIR", mask_dir, "SOLVER.MAX_ITER", iters, "SOLVER.STEPS", f"({iters - 1},)",
        "SOLVER.IMS_PER_BATCH", batch, "SOLVER.WARMUP_ITERS", 2, "MODEL.ROI_HEADS.NUM_CLASSES", 3,
        "DATASETS.TRAIN", "('synthetic_coco_train',)", "DATASETS.TEST", "('synthetic_coco_val',)",
        "TEST.PRECISE_BN.NUM_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1000), 45,
        measure=lambda log: {k: v for k, v in finetune_metrics(mask_dir).items() if k in ("bbox/AP", "segm/AP")}))
    pipeline = check.work / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "DATA": {"SYNTHETIC": True, "SYNTHETIC_SIZE": {"NUM_TRAIN": 24, "NUM_TEST": 12, "NUM_UNLABELED": 64}},
        "PRETRAIN": {"NPROC_PER_NODE": 1},
        "ROWS": {"simsiam": {"PRETRAIN": {"CONFIG": "pretrain/simsiam_R_18_mini.yaml", "CFG": {
            "SOLVER": {"EPOCHS": 1, "MAX_ITERS_PER_EPOCH": 2, "BATCH_SIZE": 32}}}}},
        "BENCH": {"BENCHMARKS": ["voc07_mini"]}, "SWEEP": {"LRS": [0.02], "TRIALS": 1},
        "FINETUNE": {"CFG": {"SOLVER": {"MAX_ITER": 4, "STEPS": [3], "WARMUP_ITERS": 2}}}}))
    jobs.append(lambda: check.run("pipeline_torchrun_stage", check.cli("pipeline", "--config", pipeline, "OUTPUT_DIR",
                                                                       check.work / "pipeline"), 45))
    return jobs


def one_line_refusal(log: Path, needle: str) -> dict:
    lines = [line for line in log.read_text().splitlines()[1:] if needle in line]
    if len(lines) != 1 or "Duplicate GPU" in log.read_text():
        raise ValueError(f"expected our refusal once ({needle!r}) and no NCCL error; found {len(lines)}")
    return {"refusal": lines[0][-300:]}


def claim(check: Check, data: Path, gpus: int, main_pool, pool) -> dict:
    """Pretrainings (``main_pool``), conversions and fine-tunes of the claim's rows, with the side checks
    beside them (``pool``)."""
    sizes, rows = check.sizes, {name: {"trials": []} for name in CLAIM_ROWS}
    supervised = supervised_supported()
    if not supervised:
        check.skip("claim_supervised", "pretraining has no MODEL.METHOD supervised in this tree")
        del rows["supervised"]
    knn = check.run("knn_untrained", check.probe("random-knn", *pretrain_overrides(check, data, check.work / "untrained")),
                    15, measure=last_json)
    for row in rows.values():
        row["knn_top1_untrained"] = knn.get("knn_top1")
    rows["scratch"]["knn_top1"] = knn.get("knn_top1")  # scratch is the untrained backbone
    side = [pool.submit(job) for job in side_checks(check, data, gpus)]
    trials = lambda row, weights: [pool.submit(finetune_trial, check, data, row, weights, seed, PLAN["finetune_simsiam"])
                                   for seed in TRIAL_SEEDS[:2 if check.smoke else 3]]
    scratch = trials("scratch", "none")
    run_dirs = {name: check.work / "pretrain" / name for name in rows if name != "scratch"}

    batch = override(sizes["pretrain"], "SOLVER.BATCH_SIZE")

    def pretrain(name, planned, *extra):
        return check.run(f"pretrain_{name}", check.cli("pretrain", *pretrain_overrides(check, data, run_dirs[name], *extra)),
                         planned, measure=lambda log: pretrain_figures(run_dirs[name], batch))

    pending = {}
    if check.fits("pretrain_no_stop_gradient", PLAN["pretrain_no_stop_gradient"]):
        pending["no_stop_gradient"] = main_pool.submit(pretrain, "no_stop_gradient", PLAN["pretrain_no_stop_gradient"],
                                                  "MODEL.STOP_GRADIENT", False, "SOLVER.EPOCHS", sizes["no_sg_epochs"])
    if supervised:
        pending["supervised"] = main_pool.submit(pretrain, "supervised", PLAN["pretrain_no_stop_gradient"],
                                            "MODEL.METHOD", "supervised", "DATA.TRAIN_DIR", data / "labeled" / "train",
                                            "SOLVER.EPOCHS", sizes["no_sg_epochs"],
                                            "SOLVER.WARMUP_EPOCHS", sizes["supervised_warmup"],
                                            "DATA.NUM_WORKERS", sizes["supervised_workers"])
    done = {name: future.result() for name, future in pending.items()}
    s_per_epoch = (done.get("no_stop_gradient") or {}).get("s_per_epoch") or PLAN["pretrain_no_stop_gradient"] / max(
        sizes["no_sg_epochs"], 1)
    budget = min(PLAN["pretrain_simsiam"], check.left() - PLAN["finetune_simsiam"] - PLAN["report"])
    epochs = epochs_for(budget, s_per_epoch, sizes["simsiam_epochs"])
    simsiam = None
    if check.smoke or budget > s_per_epoch * sizes["simsiam_epochs"][0]:
        simsiam = main_pool.submit(pretrain, "simsiam", PLAN["pretrain_simsiam"], "SOLVER.EPOCHS", epochs)
    else:
        check.skip("pretrain_simsiam", f"time budget: {check.left():.0f} s left")
    later = []
    for name, record in done.items():
        rows[name].update({k: record.get(k) for k in ("loss", "z_std", "knn_top1", "epochs") if k in record})
        if record["status"] == "ok":
            weights = convert(check, name, run_dirs[name])
            if weights:
                later += [(name, f) for f in trials(name, weights)]
    if simsiam is not None:
        record = simsiam.result()
        rows["simsiam"].update({k: record.get(k) for k in ("loss", "z_std", "knn_top1", "epochs") if k in record})
        weights = convert(check, "simsiam", run_dirs["simsiam"]) if record["status"] == "ok" else None
        if weights:
            later += [("simsiam", f) for f in trials("simsiam", weights)]
    rows["scratch"]["trials"] = [f.result() for f in scratch]
    for name, future in later:
        rows[name]["trials"].append(future.result())
    for future in side:
        future.result()
    table = claim_table(rows)
    verdict = claim_verdict(table)
    (check.out / "claim.md").write_text(claim_markdown(table, verdict))
    status = "ok" if verdict["classifiers_learned"] or check.smoke else "failed"  # smoke: toy fine-tunes
    check.emit({"check": "claim", "status": status, "table": table, "verdict": verdict,
                **({} if status == "ok" else {"reason": "a box classifier stayed at the class prior: fine-tune longer"})})
    return {"table": table, "verdict": verdict}


def write_logs(check: Check) -> None:
    """Each log's last 256 kB in one archive (the device returns few files)."""
    with tarfile.open(check.out / "logs.tar.gz", "w:gz") as tar:
        for log in sorted(check.logs.glob("*.log")):
            data = log.read_bytes()[-256 * 1024:]
            info = tarfile.TarInfo(log.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="results folder ($OUT on the device)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on a CPU: checks the script itself")
    parser.add_argument("--work", help="scratch folder for data and runs, kept afterwards (default: a temporary "
                                       "folder, removed at the end: a smoke run leaves about 1.5 GB there)")
    args = parser.parse_args(argv)
    start = float(os.environ.get("GPU_CHECK_START", time.time()))
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.smoke:
        print("gpu_check: no CUDA device is visible; run it on the GPU machine, or with --smoke on a CPU",
              file=sys.stderr)
        return 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        return run_checks(args, out, Path(args.work), start, gpus)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        return run_checks(args, out, Path(scratch), start, gpus)


def run_checks(args, out: Path, work: Path, start: float, gpus: int) -> int:
    """Every check, with data and runs under ``work``; results in ``out``. Returns the exit status."""
    check = Check(out, work, args.smoke, start)
    environment(check)
    data = make_data(check)
    measurements(check, data, gpus)
    with concurrent.futures.ThreadPoolExecutor(2) as main_pool, \
            concurrent.futures.ThreadPoolExecutor(SIDE_SLOTS["smoke" if args.smoke else "gpu"]) as side_pool:
        result = claim(check, data, gpus, main_pool, side_pool)
    write_logs(check)
    failed = [r["check"] for r in check.records if r.get("status") == "failed"]
    skipped = {r["check"]: r["reason"] for r in check.records if r.get("status") == "skipped"}
    measured = {r["check"]: r.get("wall_s") for r in check.records if "wall_s" in r}
    if "GPU_INSTALL_MS" in os.environ:
        measured["install"] = int(os.environ["GPU_INSTALL_MS"]) / 1000
    summary = {"summary": True, "smoke": args.smoke, "budget_s": BUDGET_S, "elapsed_s": round(check.elapsed(), 1),
               "plan_s": PLAN, "planned_total_s": planned_total(), "measured_s": measured, "checks": len(check.records),
               "failed": failed, "skipped": skipped, "claim": result}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("summary", "elapsed_s", "checks", "failed")}
                     | {"claim_held": result["verdict"]["held"]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
