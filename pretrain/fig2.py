"""The paper's Fig. 2 at any scale: the same run with and without stop-gradient.

``simsiam-transfer fig2 --config FILE --output-dir DIR [KEY VALUE ...]`` trains
``DIR/stop_gradient`` and ``DIR/no_stop_gradient`` (each an ordinary, resumable pretraining run),
then writes ``DIR/fig2.json`` (both curves + final values + the 1/sqrt(d) reference) and
``DIR/fig2.png`` (loss, z_std and kNN top-1 per epoch, as the figure's three panels).
"""

import json
import math
from pathlib import Path

from pretrain.config import load_cfg
from pretrain.engine import run_pretrain
from simsiam_transfer import atomic

RUNS = {"stop_gradient": "True", "no_stop_gradient": "False"}


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(curves, dim):
    summary = {"reference_z_std": 1.0 / math.sqrt(dim), "runs": {}}
    for name, records in curves.items():
        last = records[-1]
        summary["runs"][name] = {
            "final_loss": last["loss"], "final_z_std": last["z_std"],
            "final_z_std_times_sqrt_d": last["z_std"] * math.sqrt(dim),
            "final_knn_top1": last.get("knn_top1"), "curve": records,
        }
    return summary


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"stop_gradient": "tab:blue", "no_stop_gradient": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run in summary["runs"].items():
        epochs = [r["epoch"] for r in run["curve"]]
        label = "w/ stop-grad" if name == "stop_gradient" else "w/o stop-grad"
        axes[0].plot(epochs, [r["loss"] for r in run["curve"]], color=colors[name], label=label)
        axes[1].plot(epochs, [r["z_std"] for r in run["curve"]], color=colors[name], label=label)
        knn = [(r["epoch"], r["knn_top1"]) for r in run["curve"] if "knn_top1" in r]
        if knn:
            axes[2].plot(*zip(*knn), color=colors[name], marker="o", label=label)
    axes[1].axhline(summary["reference_z_std"], color="gray", linestyle="--", label="1/sqrt(d)")
    for ax, title in zip(axes, ("training loss", "std of l2-normalised z", "kNN top-1 (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_fig2(config_file, output_dir, overrides=()):
    output_dir = Path(output_dir)
    curves = {}
    for name, stop_gradient in RUNS.items():
        cfg = load_cfg(config_file, list(overrides) + ["MODEL.STOP_GRADIENT", stop_gradient,
                                                        "OUTPUT_DIR", str(output_dir / name)])
        run_pretrain(cfg)
        curves[name] = read_metrics(output_dir / name)
    summary = summarize(curves, cfg.MODEL.DIM)
    atomic.write_json(output_dir / "fig2.json", summary)
    plot(summary, output_dir / "fig2.png")
    return summary
