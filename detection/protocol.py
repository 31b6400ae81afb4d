"""The benchmark protocol as pure functions: LR grid, trial plan, seeds, metric names, LR selection,
aggregation (non-finite values count as failed trials)."""

import math
import statistics

from detection.batch_policy import SETUP_FIELDS
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
# Metric names: the one home for them (report, bench and finetune import these).
TASKS = ("bbox", "segm")
CELL_METRICS = ("AP50", "AP", "AP75")  # Table 5's three columns per task
COCO_SIZE_METRICS = ("APs", "APm", "APl")  # COCOEvaluator only; the VOC evaluator has none
REPORTED_METRICS = tuple(f"{task}/{m}" for task in TASKS for m in CELL_METRICS)
# best-then-repeat: the mean at the selected LR includes trial 0, which chose the LR;
# best-then-repeat-independent: n more trials at the selected LR, trial 0 left out of the mean.
SEARCHES = ("best-then-repeat", "best-then-repeat-independent", "full")


def parse_lrs(text, name="--lrs"):
    """``"0.02,0.05"`` -> ``[0.02, 0.05]``; refuses empty, non-numeric, non-positive or repeated values."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            values.append(float(part))
        except ValueError:
            raise UserError(f"{name} {text}: {part!r} is not a number; give e.g. 0.02,0.05,0.1") from None
    return check_lrs(values, name)


def check_lrs(values, name="--lrs"):
    """The LR grid's rules; ``name`` is the flag or key the values came from."""
    shown = ",".join(f"{v:g}" for v in values)
    if not values:
        raise UserError(f"{name}: give at least one learning rate")
    for lr in values:
        if not math.isfinite(lr) or lr <= 0:
            raise UserError(f"{name} {shown}: learning rates must be positive and finite, got {lr:g}")
    if len(set(values)) != len(values):
        raise UserError(f"{name} {shown}: a learning rate is repeated; list each once")
    return list(values)


def allowed_metrics(evaluator_types, mask_on):
    """Metric names a benchmark's evaluation reports: bbox/* always, segm/* with masks,
    the COCO size breakdown only when every test set is evaluated by COCOEvaluator."""
    names = list(CELL_METRICS)
    if evaluator_types and all(t == "coco" for t in evaluator_types):
        names += COCO_SIZE_METRICS
    tasks = TASKS if mask_on else ("bbox",)
    return [f"{task}/{m}" for task in tasks for m in names]


def check_metric(metric, allowed, benchmark, name="--metric"):
    if metric not in allowed:
        raise UserError(f"{name} {metric}: {benchmark} reports {', '.join(allowed)}")
    return metric


def is_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def trial_seed(trial):
    """Trial index -> seed; the same index always gets the same seed, whatever the LR."""
    return SEED_BASE + trial


def lr_tag(lr):
    return f"lr{lr:g}"


def trial_id(lr, trial):
    return f"{lr_tag(lr)}_t{trial}"


def search_plan(lrs, trials, mode):
    """Phase 1 as (lr, trial) pairs; phase 2 is ``repeat_plan`` once an LR is chosen."""
    if mode == "full":
        return [(lr, t) for lr in lrs for t in range(trials)]
    return [(lr, 0) for lr in lrs]


def repeat_plan(lr, trials, mode):
    if mode == "full":
        return []
    last = trials + 1 if mode == "best-then-repeat-independent" else trials
    return [(lr, t) for t in range(1, last)]


def reported_trial(record, mode):
    """Whether a trial at the selected LR enters the reported mean (independent: not trial 0)."""
    return not (mode == "best-then-repeat-independent" and record["trial"] == 0)


def reported_records(records, selected, metric, search):
    """The trials a cell counts: done at the selected LR with a finite ``metric``, trial 0 left out by the
    independent search."""
    return [r for r in records if r["lr"] == selected and counts_as_done(r, metric) and reported_trial(r, search)]


def counts_as_done(record, metric):
    """Done with a finite selection metric; a NaN/inf (or missing) metric counts as failed."""
    return record["status"] == "done" and is_finite((record.get("metrics") or {}).get(metric))


def mean_std(values):
    """Mean and sample standard deviation (n - 1) of the finite values; std is None for one value."""
    values = [v for v in values if is_finite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def per_lr_stats(records, metric_keys, metric):
    """{lr: {metric: mean_std}} over the trials of each LR that count as done (see ``counts_as_done``)."""
    out = {}
    for lr in sorted({r["lr"] for r in records}):
        at_lr = [r for r in records if r["lr"] == lr]
        done = [r for r in at_lr if counts_as_done(r, metric)]
        failed = sum(r["status"] == "failed" or (r["status"] == "done" and not counts_as_done(r, metric))
                     for r in at_lr)
        out[lr] = {k: mean_std([r["metrics"].get(k) for r in done]) for k in metric_keys}
        out[lr]["trials"] = {"done": len(done), "failed": failed}
    return out


def selection_values(records, metric, lrs, mode="full"):
    """{lr: the value the LR is judged by}: the mean ``metric`` over all done trials (full) or the
    trial-0 value (best-then-repeat, so later trials at the chosen LR cannot change the choice)."""
    out = {}
    for lr in lrs:
        values = [r["metrics"][metric] for r in records if r["lr"] == lr and counts_as_done(r, metric)
                  and (mode == "full" or r["trial"] == 0)]
        out[lr] = statistics.fmean(values) if values else None
    return out


def select_lr(records, metric, lrs, mode="full"):
    """The LR with the highest selection value (see ``selection_values``); None if no LR has one."""
    scored = {lr: v for lr, v in selection_values(records, metric, lrs, mode).items() if v is not None}
    return max(scored, key=scored.get) if scored else None


def expected_max_of_normals(k: int) -> float:
    """E[max of k independent standard normals] (0 for k = 1; 0.85 for 3): how far the best of k equally
    good runs sits above their mean, in units of one run's std."""
    if k <= 1:
        return 0.0
    step, total = 0.001, 0.0
    for i in range(-8000, 8001):  # the integrand is negligible beyond 8 std
        x = i * step
        density = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        total += x * k * density * (0.5 * (1 + math.erf(x / math.sqrt(2)))) ** (k - 1) * step
    return total


def selection_bias(search: str, lrs: int, trials: int) -> float:
    """Expected upward bias of the reported mean from choosing the LR on the same trials, in units of one
    trial's std, when every LR is equally good: full judges LRs by their n-trial means; best-then-repeat
    by trial 0, which stays in the mean (1/n of its bias); the independent mode leaves it out."""
    best = expected_max_of_normals(lrs)
    if search == "full":
        return best / math.sqrt(trials)
    if search == "best-then-repeat":
        return best / trials
    return 0.0


RULES = {
    "full": "highest mean {m} over all trials of each LR",
    "best-then-repeat": "highest {m} of trial 0 at each LR, then the remaining trials at that LR only; "
                        "the mean includes trial 0, which selected the LR",
    "best-then-repeat-independent": "highest {m} of trial 0 at each LR, then n more trials at that LR; "
                                    "the mean leaves trial 0 out, so it is independent of the selection",
}
# detectron2's box predictor logs the share of foreground RoIs it gives their own class. A fine-tune
# that ends with it near 0 still predicts the class prior: its AP scores proposals and boxes, not
# classification, and cannot rank backbones by what they know of the classes (docs/mini-benchmark.md).
CLASSIFIER_METRIC = "train/fg_cls_accuracy"   # mean over the last 20 % of training iterations
CLASSIFIER_MIN = 0.1
# A smoke sweep (SWEEP.SMOKE) runs a schedule that proves the path but is too short to rank backbones:
# its column says so once, and its cells carry no classifier warning.
SMOKE_LABEL = "smoke run: too short to rank"


def classifier_summary(records):
    """``{"fg_cls_accuracy": mean_std, "learned": bool}`` of the counted trials; None when not logged."""
    stat = mean_std([(r.get("metrics") or {}).get(CLASSIFIER_METRIC) for r in records])
    if stat["mean"] is None:
        return None
    return {"fg_cls_accuracy": stat, "learned": stat["mean"] >= CLASSIFIER_MIN}


def classifier_warning(summary):
    """One line when the selected trials' box classifier never left the class prior, else None."""
    check = summary.get("classifier")
    if not check or check["learned"] or summary.get("smoke"):
        return None
    return (f"{summary['name']} on {summary['benchmark']}: the box classifier never left the class prior "
            f"(foreground RoIs given their own class over the last 20 % of training: "
            f"{100 * check['fg_cls_accuracy']['mean']:.0f} %, under {100 * CLASSIFIER_MIN:.0f} %); the AP "
            "scores proposals and boxes, not classification: fine-tune longer (SOLVER.MAX_ITER) before "
            "comparing pre-trainings")


def build_summary(settings, records):
    """summary.json from the bench settings and the run store's latest records (pure)."""
    metric, search = settings["metric"], settings["search"]
    records = [r for r in records if r["lr"] in settings["lrs"]]
    present = [k for k in REPORTED_METRICS if any(k in (r.get("metrics") or {}) for r in records)]
    by_lr = per_lr_stats(records, present, metric)
    judged_by = selection_values(records, metric, settings["lrs"], search)
    selected = select_lr(records, metric, settings["lrs"], search)
    at_selected = reported_records(records, selected, metric, search)
    non_finite = [r["id"] for r in records if r["status"] == "done" and not counts_as_done(r, metric)]
    return {
        "name": settings["name"],
        "benchmark": settings["benchmark"],
        "config": settings["config"],
        "weights": settings["weights"],
        "column": settings.get("column"),
        "smoke": bool(settings.get("smoke")),
        "setup": {k: settings.get(k) for k in SETUP_FIELDS},
        "selected_lr": selected,
        "selected_effective_lr": None if selected is None else selected * (settings.get("lr_scale") or 1.0),
        "selection": {"search": search, "metric": metric, "rule": RULES[search].format(m=metric)},
        "metrics": {k: mean_std([r["metrics"].get(k) for r in at_selected]) for k in present},
        "classifier": classifier_summary(at_selected),
        "reported_trials": sorted(r["trial"] for r in at_selected),
        "lr_search": [{"lr": lr, "selected": lr == selected, "selection_value": judged_by.get(lr), **stats}
                      for lr, stats in by_lr.items()],
        "trials": {"done": sum(counts_as_done(r, metric) for r in records),
                   "failed": sum(r["status"] == "failed" for r in records) + len(non_finite),
                   "unfinished": sum(r["status"] in ("queued", "running", "stopped") for r in records),
                   "non_finite": non_finite},
    }
