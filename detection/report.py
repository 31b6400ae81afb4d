"""``simsiam-transfer report``: the paper's Table 5 layout from one or more bench folders.

Rows are pretrained models (their ``--name``), column groups are benchmarks (COCO benchmarks
give a detection and an instance-segmentation group), cells ``AP50 / AP / AP75`` as
mean +/- sample std over the done trials at the selected LR, with the trial count. A per-benchmark
LR-search table follows. Numbers are recomputed from each folder's run store.
"""

import json
from pathlib import Path

from detection.protocol import build_summary
from detection.runstore import RunStore
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

TITLES = {"voc07": "VOC 07", "voc0712": "VOC 07+12", "coco_1x": "COCO 1x", "coco_2x": "COCO 2x"}
TASKS = {"bbox": "det.", "segm": "seg."}
CELL_METRICS = ("AP50", "AP", "AP75")


def load_bench(directory):
    directory = Path(directory)
    settings_path = directory / "bench.json"
    if not settings_path.is_file():
        raise UserError(f"{directory}: no bench.json; not a folder written by `simsiam-transfer bench`")
    try:
        settings = json.loads(settings_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{settings_path}: malformed JSON ({exc})") from None
    records = list(RunStore(directory).records().values())
    return {"dir": str(directory), "settings": settings, "records": records,
            "summary": build_summary(settings, records)}


def benchmark_title(benchmark):
    base = benchmark[:-5] if benchmark.endswith("_mini") else benchmark
    title = TITLES.get(base, benchmark)
    return f"{title} (mini)" if benchmark.endswith("_mini") else title


def _columns(benches):
    """Ordered (benchmark, task) column groups present in any summary."""
    cols = []
    for b in benches:
        s = b["summary"]
        for task in TASKS:
            if any(k.startswith(task + "/") for k in s["metrics"]) and (s["benchmark"], task) not in cols:
                cols.append((s["benchmark"], task))
    return cols


def _fmt(stat, latex=False):
    if stat is None or stat["mean"] is None:
        return "–"
    pm = r" $\pm$ " if latex else " ± "
    return f"{stat['mean']:.1f}" + (f"{pm}{stat['std']:.1f}" if stat["std"] is not None else "")


def _cell(summary, task, latex=False):
    stats = [summary["metrics"].get(f"{task}/{m}") for m in CELL_METRICS]
    if all(s is None or s["mean"] is None for s in stats):
        return "–"
    n = max(s["n"] for s in stats if s)
    return " / ".join(_fmt(s, latex) for s in stats) + f" (n={n})"


def render(benches, fmt="md"):
    if fmt == "csv":
        return _csv(benches)
    cols = _columns(benches)
    names = list(dict.fromkeys(b["summary"]["name"] for b in benches))
    by = {(b["summary"]["name"], b["summary"]["benchmark"]): b["summary"] for b in benches}
    headers = ["pre-train"] + [f"{benchmark_title(bm)} {TASKS[t]} AP50 / AP / AP75" for bm, t in cols]
    body = [[name] + [_cell(by[(name, bm)], t, fmt == "latex") if (name, bm) in by else "–" for bm, t in cols]
            for name in names]
    if fmt == "latex":
        return _latex(headers, body, benches)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines.append("")
    lines.append("Cells: mean ± sample std over the done trials at the selected fine-tuning LR; n = trials.")
    for b in benches:
        lines += ["", *_lr_table_md(b["summary"])]
    return "\n".join(lines) + "\n"


def _lr_rows(summary):
    """Header and rows of an LR-search table; the first value column is what the LR was judged by."""
    metrics = [k for k in ("bbox/AP50", "bbox/AP", "bbox/AP75", "segm/AP50", "segm/AP", "segm/AP75")
               if k in summary["metrics"]]
    sel = summary["selection"]
    judged = f"{sel['metric']} ({'trial 0' if sel['search'] == 'best-then-repeat' else 'mean'})"
    header = ["LR", judged] + metrics + ["done", "failed"]
    rows = [[f"{e['lr']:g}" + (" *" if e["selected"] else ""),
             "–" if e.get("selection_value") is None else f"{e['selection_value']:.1f}"]
            + [_fmt(e.get(k)) for k in metrics] + [str(e["trials"]["done"]), str(e["trials"]["failed"])]
            for e in summary["lr_search"]]
    return header, rows


def _lr_table_md(summary):
    header, rows = _lr_rows(summary)
    sel = summary["selection"]
    title = (f"LR search: {summary['name']} on {benchmark_title(summary['benchmark'])} "
             f"(* selected by {sel['metric']}: {sel['rule']})")
    return [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def _csv(benches):
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "benchmark", "lr", "selected", "metric", "mean", "std", "n", "failed"])
    for b in benches:
        s = b["summary"]
        for entry in s["lr_search"]:
            for key in sorted(k for k in entry if "/" in k):
                st = entry[key]
                writer.writerow([s["name"], s["benchmark"], entry["lr"], entry["selected"], key,
                                 st["mean"], st["std"], st["n"], entry["trials"]["failed"]])
    return buf.getvalue()


def _latex(headers, body, benches):
    esc = lambda t: t.replace("_", r"\_").replace("±", r"$\pm$")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "c" * (len(headers) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    for b in benches:
        header, rows = _lr_rows(b["summary"])
        sel = b["summary"]["selection"]
        lines += ["", f"% LR search: {b['summary']['name']} on {benchmark_title(b['summary']['benchmark'])} "
                      f"(* selected by {sel['metric']})",
                  r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
                  " & ".join(esc(h) for h in header) + r" \\", r"\midrule",
                  *[" & ".join(esc(c) for c in row) + r" \\" for row in rows], r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot_ap_vs_lr(benches, path, metric="bbox/AP"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(b["summary"]["benchmark"] for b in benches))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False)
    for ax, bm in zip(axes[0], groups):
        for b in (b for b in benches if b["summary"]["benchmark"] == bm):
            pts = [(e["lr"], e[metric]) for e in b["summary"]["lr_search"] if e.get(metric, {}).get("mean") is not None]
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] or 0 for p in pts],
                        marker="o", capsize=3, label=b["summary"]["name"])
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning base LR")
        ax.set_ylabel(metric)
        ax.set_title(benchmark_title(bm))
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def load_benches(dirs):
    """Bench folders for one table; two folders may not claim the same row and benchmark."""
    benches, seen = [], {}
    for directory in dirs:
        bench = load_bench(directory)
        key = (bench["summary"]["name"], bench["summary"]["benchmark"])
        if key in seen:
            raise UserError(f"{seen[key]} and {directory} both hold {key[0]!r} on {key[1]}; "
                            "give one of them another --name or leave it out")
        seen[key] = directory
        benches.append(bench)
    return benches


def report_command(args):
    benches = load_benches(args.dirs)
    text = render(benches, args.format)
    if args.out:
        atomic.write_text(args.out, text)
        plot_path = Path(args.out).with_name(Path(args.out).stem + "_ap_vs_lr.png")
        plot_ap_vs_lr(benches, plot_path)
        print(f"wrote {args.out} and {plot_path}")
    else:
        print(text, end="")
    return 0
