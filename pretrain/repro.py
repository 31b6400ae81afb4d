"""The paper's pretraining claims at any scale: Fig. 2, Table 1 and Table 3 as ordinary runs.

``simsiam-transfer repro --output-dir DIR [--config FILE] [--experiments fig2,table1,table3] [KEY VALUE ...]``
trains each run of each experiment in ``DIR/<run>`` (an ordinary pretraining OUTPUT_DIR: a killed
repro resumes where it stopped; runs whose settings coincide, such as the Fig. 2 stop-gradient run
and Table 3's default BN, are trained once), then writes per experiment ``DIR/<experiment>.json``
(curves, final values, the paper's numbers) and ``DIR/<experiment>.png`` (loss, z_std*sqrt(d) and kNN
top-1 per epoch), and ``DIR/repro.md``, the final table of every experiment.
``simsiam-transfer fig2`` is the ``fig2`` experiment alone (``DIR/fig2.json``, ``DIR/fig2.png``).
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pretrain.config import load_cfg
from pretrain.engine import run_pretrain
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

# experiment -> [(run name, overrides, the paper's ImageNet linear top-1 (%) for that entry)].
# Table 1 puts the predictor's LR schedule in each row explicitly; the rest keep the config's.
EXPERIMENTS: Dict[str, List[Tuple[str, List[str], str]]] = {
    "fig2": [
        ("stop_gradient", ["MODEL.STOP_GRADIENT", "True"], "67.7"),
        ("no_stop_gradient", ["MODEL.STOP_GRADIENT", "False"], "0.1 (collapse)"),
    ],
    "table1": [
        ("predictor_mlp_lr_decay", ["MODEL.PREDICTOR", "mlp", "SOLVER.FIX_PRED_LR", "False"], "67.7"),
        ("predictor_mlp_constant_lr", ["MODEL.PREDICTOR", "mlp", "SOLVER.FIX_PRED_LR", "True"], "68.1"),
        ("predictor_none", ["MODEL.PREDICTOR", "none"], "0.1 (collapse)"),
        ("predictor_fixed_random", ["MODEL.PREDICTOR", "fixed_random"], "1.5 (does not converge)"),
    ],
    "table3": [
        ("head_bn_none", ["MODEL.HEAD_BN", "none"], "34.6"),
        ("head_bn_hidden", ["MODEL.HEAD_BN", "hidden"], "67.4"),
        ("head_bn_default", ["MODEL.HEAD_BN", "default"], "68.1"),
        ("head_bn_all", ["MODEL.HEAD_BN", "all"], "unstable"),
    ],
}
TITLES = {"fig2": "Fig. 2: stop-gradient", "table1": "Table 1: predictor", "table3": "Table 3: BN on MLP heads"}


def read_metrics(run_dir) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(curves: Dict[str, List[dict]], dim: int, paper: Optional[Dict[str, str]] = None,
              run_dirs: Optional[Dict[str, str]] = None) -> dict:
    """Final values and curves of each run; z_std*sqrt(d) is ~1 for spread-out outputs, ~0 collapsed."""
    runs: Dict[str, Dict[str, Any]] = {}
    summary = {"reference_z_std": 1.0 / math.sqrt(dim), "runs": runs}
    for name, records in curves.items():
        last = records[-1]
        runs[name] = {
            "final_loss": last["loss"], "final_z_std": last["z_std"],
            "final_z_std_times_sqrt_d": last["z_std"] * math.sqrt(dim),
            "final_knn_top1": last.get("knn_top1"), "curve": records,
        }
        if paper:
            runs[name]["paper_linear_top1"] = paper[name]
        if run_dirs:
            runs[name]["run_dir"] = run_dirs[name]
    return summary


def plot(summary: dict, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim = round(1.0 / summary["reference_z_std"] ** 2)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run in summary["runs"].items():
        epochs = [r["epoch"] for r in run["curve"]]
        line, = axes[0].plot(epochs, [r["loss"] for r in run["curve"]], marker=".", label=name)
        axes[1].plot(epochs, [r["z_std"] * math.sqrt(dim) for r in run["curve"]], marker=".",
                     color=line.get_color(), label=name)
        knn = [(r["epoch"], r["knn_top1"]) for r in run["curve"] if "knn_top1" in r]
        if knn:
            axes[2].plot(*zip(*knn), color=line.get_color(), marker="o", label=name)
    axes[1].axhline(1.0, color="gray", linestyle="--", label="1 (z_std = 1/sqrt(d))")
    for ax, label in zip(axes, ("training loss", "z_std * sqrt(d)  (0 = collapsed)", "kNN top-1 (%)")):
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def markdown_table(summaries: Dict[str, dict]) -> str:
    """One markdown table per experiment: final loss, z_std*sqrt(d), kNN, and the paper's number."""
    lines = []
    for experiment, summary in summaries.items():
        lines += [f"### {TITLES.get(experiment, experiment)}", "",
                  "| run | final loss | z_std·√d | kNN top-1 (%) | paper (ImageNet linear, %) |",
                  "|---|---|---|---|---|"]
        for name, run in summary["runs"].items():
            knn = "-" if run["final_knn_top1"] is None else f"{run['final_knn_top1']:.1f}"
            lines.append(f"| {name} | {run['final_loss']:.3f} | {run['final_z_std_times_sqrt_d']:.3f} | {knn} | "
                         f"{run.get('paper_linear_top1', '-')} |")
        lines.append("")
    return "\n".join(lines)


def _settings_key(cfg) -> str:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    return cfg.dump()


def plan_runs(config_file, output_dir, overrides: Sequence[str], experiments: Sequence[str]):
    """(experiment, run, cfg) for every run; runs with identical settings share the first one's folder."""
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise UserError(f"--experiments: unknown {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    seen: Dict[str, Any] = {}
    plan: List[Tuple[str, str, Any]] = []
    for experiment in experiments:
        for name, extra, _paper in EXPERIMENTS[experiment]:
            cfg = load_cfg(config_file, list(overrides) + extra + ["OUTPUT_DIR", str(Path(output_dir) / name)])
            key = _settings_key(cfg)
            if key in seen:
                cfg = seen[key]
            else:
                seen[key] = cfg
            plan.append((experiment, name, cfg))
    return plan


def run_experiments(config_file, output_dir, overrides: Sequence[str] = (),
                    experiments: Sequence[str] = tuple(EXPERIMENTS), write_table: bool = True) -> Dict[str, dict]:
    output_dir = Path(output_dir)
    plan = plan_runs(config_file, output_dir, overrides, experiments)
    trained = set()
    for _experiment, _name, cfg in plan:
        if cfg.OUTPUT_DIR not in trained:
            run_pretrain(cfg)  # resumes, or returns at once when the run is complete
            trained.add(cfg.OUTPUT_DIR)
    summaries = {}
    for experiment in experiments:
        runs = [(name, cfg) for e, name, cfg in plan if e == experiment]
        paper = {name: p for name, _extra, p in EXPERIMENTS[experiment]}
        summary = summarize({name: read_metrics(cfg.OUTPUT_DIR) for name, cfg in runs}, runs[0][1].MODEL.DIM,
                            paper, {name: cfg.OUTPUT_DIR for name, cfg in runs})
        atomic.write_json(output_dir / f"{experiment}.json", summary)
        plot(summary, output_dir / f"{experiment}.png", TITLES[experiment])
        summaries[experiment] = summary
    if write_table:
        atomic.write_text(output_dir / "repro.md", markdown_table(summaries))
    return summaries
