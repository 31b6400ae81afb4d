"""The benchmark protocol as pure functions: LR grid, trial plan, seeds, LR selection, aggregation."""

import math
import statistics

from simsiam_transfer.errors import UserError

# --benchmark names -> detectron2 configs (relative to configs/). The mini forms run on CPU
# against the generated data (simsiam-transfer data make-synthetic).
BENCHMARKS = {
    "voc07": "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc07.yaml",
    "voc0712": "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc0712.yaml",
    "coco_1x": "detection/COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
    "coco_2x": "detection/COCO-InstanceSegmentation/mask_rcnn_R_50_C4_2x.yaml",
    "voc07_mini": "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml",
    "voc0712_mini": "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc0712_mini.yaml",
    "coco_1x_mini": "detection/COCO-InstanceSegmentation/mask_rcnn_R_18_C4_1x_mini.yaml",
    "coco_2x_mini": "detection/COCO-InstanceSegmentation/mask_rcnn_R_18_C4_2x_mini.yaml",
}
DEFAULT_METRIC = "bbox/AP"  # AP for VOC, box AP for COCO
SEED_BASE = 1000


def parse_lrs(text):
    """``"0.02,0.05"`` -> ``[0.02, 0.05]``; refuses empty, non-numeric, non-positive or repeated values."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            lr = float(part)
        except ValueError:
            raise UserError(f"--lrs {text}: {part!r} is not a number; give e.g. --lrs 0.02,0.05,0.1") from None
        if not math.isfinite(lr) or lr <= 0:
            raise UserError(f"--lrs {text}: learning rates must be positive and finite, got {part}")
        values.append(lr)
    if len(set(values)) != len(values):
        raise UserError(f"--lrs {text}: a learning rate is repeated; list each once")
    return values


def trial_seed(trial):
    """Trial index -> seed; the same index always gets the same seed, whatever the LR."""
    return SEED_BASE + trial


def lr_tag(lr):
    return f"lr{lr:g}"


def trial_id(lr, trial):
    return f"{lr_tag(lr)}_t{trial}"


def search_plan(lrs, trials, mode):
    """Phase 1 as (lr, trial) pairs; phase 2 is ``repeat_plan`` once an LR is chosen."""
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if mode == "full":
        return [(lr, t) for lr in lrs for t in range(trials)]
    return [(lr, 0) for lr in lrs]


def repeat_plan(lr, trials, mode):
    return [] if mode == "full" else [(lr, t) for t in range(1, trials)]


def mean_std(values):
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def per_lr_stats(records, metric_keys):
    """{lr: {metric: mean_std}} over the done trials of each LR."""
    out = {}
    for lr in sorted({r["lr"] for r in records}):
        done = [r for r in records if r["lr"] == lr and r["status"] == "done"]
        out[lr] = {k: mean_std([r["metrics"].get(k) for r in done]) for k in metric_keys}
        out[lr]["trials"] = {"done": len(done), "failed": sum(1 for r in records if r["lr"] == lr and r["status"] == "failed")}
    return out


def selection_values(records, metric, lrs, mode="full"):
    """{lr: the value the LR is judged by}: the mean ``metric`` over all done trials (full) or the
    trial-0 value (best-then-repeat, so later trials at the chosen LR cannot change the choice)."""
    out = {}
    for lr in lrs:
        values = [r["metrics"].get(metric) for r in records if r["lr"] == lr and r["status"] == "done"
                  and (mode == "full" or r["trial"] == 0)]
        values = [v for v in values if v is not None]
        out[lr] = statistics.fmean(values) if values else None
    return out


def select_lr(records, metric, lrs, mode="full"):
    """The LR with the highest selection value (see ``selection_values``); None if no LR has one."""
    scored = {lr: v for lr, v in selection_values(records, metric, lrs, mode).items() if v is not None}
    return max(scored, key=scored.get) if scored else None


REPORTED_METRICS = ("bbox/AP50", "bbox/AP", "bbox/AP75", "segm/AP50", "segm/AP", "segm/AP75")


def build_summary(settings, records):
    """summary.json from the bench settings and the run store's latest records (pure)."""
    records = [r for r in records if r["lr"] in settings["lrs"]]
    present = [k for k in REPORTED_METRICS if any(k in (r.get("metrics") or {}) for r in records)]
    by_lr = per_lr_stats(records, present)
    judged_by = selection_values(records, settings["metric"], settings["lrs"], settings["search"])
    selected = select_lr(records, settings["metric"], settings["lrs"], settings["search"])
    at_selected = [r for r in records if r["lr"] == selected and r["status"] == "done"]
    rule = ("highest mean {m} over all trials of each LR" if settings["search"] == "full"
            else "highest {m} of trial 0 at each LR, then the remaining trials at that LR only")
    return {
        "name": settings["name"],
        "benchmark": settings["benchmark"],
        "config": settings["config"],
        "weights": settings["weights"],
        "selected_lr": selected,
        "selection": {"search": settings["search"], "metric": settings["metric"],
                      "rule": rule.format(m=settings["metric"])},
        "metrics": {k: mean_std([r["metrics"].get(k) for r in at_selected]) for k in present},
        "lr_search": [{"lr": lr, "selected": lr == selected, "selection_value": judged_by.get(lr), **stats}
                      for lr, stats in by_lr.items()],
        "trials": {"done": sum(r["status"] == "done" for r in records),
                   "failed": sum(r["status"] == "failed" for r in records),
                   "unfinished": sum(r["status"] in ("queued", "running") for r in records)},
    }
