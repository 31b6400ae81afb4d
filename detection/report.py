"""``simsiam-transfer report``: the paper's Table 5 layout from one or more bench folders.

Rows are pretrained models (their ``--name``), column groups are benchmarks (COCO benchmarks
give a detection and an instance-segmentation group), each named by what it measured (test set,
AP definition, architecture and schedule); cells ``AP50 / AP / AP75`` as mean +/- sample std
over the counted trials at the selected LR, with the trial count, and a setup column per
benchmark (world size x images per GPU, BN group, selected LR, and a flag when the setup is not
the protocol's). A per-benchmark LR-search table follows; ``--per-trial`` adds every trial,
``--reference paper`` the SimSiam paper's Table 5 rows and our differences to them. Numbers are
recomputed from each folder's run store. Formats: md, csv, latex.
"""

import csv
import io
import json
from pathlib import Path

from detection.batch_policy import SETUP_FIELDS
from detection.protocol import selection_bias
from detection.protocol import (CELL_METRICS, CLASSIFIER_METRIC, CLASSIFIER_MIN, DEFAULT_METRIC, REPORTED_METRICS,
                                RULES, TASKS, build_summary, classifier_warning, counts_as_done,
                                reported_records)
from detection.runstore import RunStore
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

TITLES = {"voc07": "VOC 07", "voc0712": "VOC 07+12", "coco_1x": "COCO 1x", "coco_2x": "COCO 2x"}
TASK_TITLES = dict(zip(TASKS, ("det.", "seg.")))
# The SimSiam paper's Table 5 (Chen & He, CVPR 2021): AP50 / AP / AP75 per column; VOC is the
# mean over 5 trials; COCO is Mask R-CNN R50-C4 1x. Keys: our benchmark name (without _mini), task.
_PAPER_COLUMNS = ("voc07", "voc0712", "coco_1x/bbox", "coco_1x/segm")
_PAPER_ROWS = (
    ("scratch", (35.9, 16.8, 13.0), (60.2, 33.8, 33.1), (44.0, 26.4, 27.8), (46.9, 29.3, 30.8)),
    ("ImageNet supervised", (74.4, 42.4, 42.7), (81.3, 53.5, 58.8), (58.2, 38.2, 41.2), (54.7, 33.3, 35.2)),
    ("SimCLR (repro.+)", (75.9, 46.8, 50.1), (81.8, 55.5, 61.4), (57.7, 37.9, 40.9), (54.6, 33.3, 35.3)),
    ("MoCo v2 (repro.+)", (77.1, 48.5, 52.5), (82.3, 57.0, 63.3), (58.8, 39.2, 42.5), (55.5, 34.3, 36.6)),
    ("BYOL (repro.)", (77.1, 47.0, 49.9), (81.4, 55.3, 61.1), (57.8, 37.9, 40.9), (54.3, 33.2, 35.0)),
    ("SwAV (repro.+)", (75.5, 46.5, 49.6), (81.5, 55.4, 61.4), (57.6, 37.6, 40.3), (54.2, 33.1, 35.1)),
    ("SimSiam, base", (75.5, 47.0, 50.2), (82.0, 56.4, 62.8), (57.5, 37.9, 40.9), (54.2, 33.2, 35.2)),
    ("SimSiam, optimal", (77.3, 48.5, 52.5), (82.4, 57.0, 63.7), (59.3, 39.2, 42.1), (56.0, 34.4, 36.7)),
)
PAPER_TABLE5 = {name: dict(zip(_PAPER_COLUMNS, cells)) for name, *cells in _PAPER_ROWS}
COMPARED_TO = ("SimSiam, base", "SimSiam, optimal")


def load_bench(directory):
    directory = Path(directory)
    settings_path = directory / "bench.json"
    if not settings_path.is_file():
        raise UserError(f"{directory}: no bench.json; not a folder written by `simsiam-transfer bench`")
    try:
        settings = json.loads(settings_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{settings_path}: malformed JSON ({exc})") from None
    records = list(RunStore(directory).records().values())
    return {"dir": str(directory), "settings": settings, "records": records,
            "summary": build_summary(settings, records)}


def _base(benchmark):
    return benchmark[:-5] if benchmark.endswith("_mini") else benchmark


def benchmark_title(benchmark):
    title = TITLES.get(_base(benchmark), benchmark)
    return f"{title} (mini)" if benchmark.endswith("_mini") else title


def _columns(benches):
    """Ordered (benchmark, column label, task) groups present in any summary."""
    cols = []
    for b in benches:
        s = b["summary"]
        for task in TASK_TITLES:
            key = (s["benchmark"], s.get("column"), task)
            if any(k.startswith(task + "/") for k in s["metrics"]) and key not in cols:
                cols.append(key)
    return cols


def _groups(cols):
    return list(dict.fromkeys((bm, label) for bm, label, _ in cols))


def _header(bm, label, task):
    return f"{benchmark_title(bm)} {TASK_TITLES[task]} ({label or 'setup not recorded'}) AP50 / AP / AP75"


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
    prior = " †" if classifier_warning(summary) else ""
    return " / ".join(_fmt(s, latex) for s in stats) + f" (n={n}){prior}"


def setup_text(summary):
    """``8×2, BN 16, LR 0.02`` (+ the effective LR and flags when the setup is not the protocol's)."""
    st = summary.get("setup") or {}
    if st.get("world_size") is None:
        return "setup not recorded"
    group = "frozen" if st.get("bn_group") is None else st["bn_group"]
    text = f"{st['world_size']}×{st['ims_per_gpu']}, BN {group}"
    lr = summary["selected_lr"]
    if lr is not None:
        text += f", LR {lr:g}"
        if (st.get("lr_scale") or 1.0) != 1.0:
            text += f" (×{st['lr_scale']:g} = {summary['selected_effective_lr']:g})"
    if st.get("flags"):
        text += " ⚠ " + "; ".join(st["flags"])
    return text


def _paper_key(benchmark, task):
    base = _base(benchmark)
    return f"{base}/{task}" if base.startswith("coco") else base


def _paper(row, benchmark, task):
    return PAPER_TABLE5[row].get(_paper_key(benchmark, task))


def _diff(summary, task, row):
    ref = _paper(row, summary["benchmark"], task)
    ours = [summary["metrics"].get(f"{task}/{m}") for m in CELL_METRICS]
    if ref is None or any(o is None or o["mean"] is None for o in ours):
        return None
    return [o["mean"] - r for o, r in zip(ours, ref)]


def _bias_notes(benches):
    """What choosing the LR on the same trials does to each reported mean (``protocol.selection_bias``)."""
    groups = {}
    for b in benches:
        s = b["summary"]
        lrs, n, search = len(s["lr_search"]), s["metrics"].get(s["selection"]["metric"], {}).get("n") or 0, \
            s["selection"]["search"]
        bias = selection_bias(search, lrs, max(n, 1))
        if lrs > 1 and n and bias > 0:
            groups.setdefault((search, lrs, n, round(bias, 2)), []).append(f"{s['name']} on {s['benchmark']}")
    notes = []
    for (search, lrs, n, bias), cells in groups.items():
        if n == 1:
            how = f"each is the best of {lrs} runs at 1 trial"
        elif search == "best-then-repeat":
            how = f"the mean of {n} trials includes the selecting trial 0 (best of {lrs} LRs)"
        else:
            how = f"the LR with the best {n}-trial mean of {lrs} was kept"
        notes.append(f"Selection bias ({', '.join(cells)}): {how}; if the LRs were equally good the reported mean "
                     f"would sit about +{bias:.2f} σ (one trial's std) above a fresh trial's.")
    return notes


def _mixed_setup_notes(benches):
    """Rows of one benchmark fine-tuned under different setups: their padding and BN statistics differ."""
    notes = []
    by_benchmark = {}
    for b in benches:
        by_benchmark.setdefault(b["summary"]["benchmark"], set()).add(_setup_text(b["summary"]))
    for benchmark, setups in by_benchmark.items():
        if len(setups) > 1:
            notes.append(f"Rows of {benchmark} mix setups ({'; '.join(sorted(setups))}): images per GPU set how "
                         "much padding enters BN and PreciseBN statistics, so these rows are not like with like.")
    return notes


def _setup_text(summary):
    st = summary.get("setup") or {}
    return f"{st.get('world_size')}×{st.get('ims_per_gpu')}, BN {st.get('bn_group')}"


def _notes(benches, reference):
    searches = {b["summary"]["selection"]["search"]: b["summary"]["selection"]["metric"] for b in benches}
    notes = ["Cells: mean ± sample std over the counted trials at the selected fine-tuning LR; n = trials. "
             "Setup: world size × images per GPU, the BN group (images one BN normalises over) and the "
             "selected LR; ⚠ marks a batch, BN group or schedule that differs from the config's protocol."]
    notes += [f"Search {s}: {RULES[s].format(m=m)}." for s, m in searches.items()]
    at_prior = [b["summary"] for b in benches if classifier_warning(b["summary"])]
    if at_prior:
        shares = ", ".join(f"{s['name']} on {s['benchmark']} {100 * s['classifier']['fg_cls_accuracy']['mean']:.0f} %"
                           for s in at_prior)
        notes.append(f"† The box classifier never left the class prior: at the end of training it gave under "
                     f"{100 * CLASSIFIER_MIN:.0f} % of foreground RoIs their own class ({shares}). Such a cell "
                     "scores proposals and boxes, not classification, and does not rank pre-trainings by what "
                     "they learned of the classes: fine-tune longer (SOLVER.MAX_ITER).")
    smoke = [f"{b['summary']['name']} on {b['summary']['benchmark']}" for b in benches if b["summary"].get("smoke")]
    if smoke:
        notes.append(f"Smoke runs ({', '.join(smoke)}): a schedule that proves the fine-tuning and evaluation path "
                     "(with masks on Mask R-CNN benchmarks) but is too short to rank pre-trainings; compare rows "
                     "in the other columns.")
    notes += _bias_notes(benches) + _mixed_setup_notes(benches)
    non_finite = sum(len(b["summary"]["trials"]["non_finite"]) for b in benches)
    if non_finite:
        notes.append(f"{non_finite} trial(s) with a NaN/inf selection metric are counted as failed.")
    if reference:
        notes.append("Paper: SimSiam (Chen & He, 2021) Table 5, 200-epoch ImageNet pre-training, VOC the "
                     "mean of 5 trials, COCO Mask R-CNN R50-C4 1x. Its scratch and ImageNet supervised rows are "
                     "MoCo's numbers, fine-tuned at LR 0.02 without a search, and the supervised one may come "
                     "from other ImageNet weights than a row of ours. Mini benchmarks (generated data) are "
                     "not comparable with it.")
    return notes


def _table(benches, reference, latex=False):
    """(headers, our rows, paper rows, difference rows) of the main table."""
    cols = _columns(benches)
    groups = _groups(cols)
    names = list(dict.fromkeys(b["summary"]["name"] for b in benches))
    by = {(b["summary"]["name"], b["summary"]["benchmark"], b["summary"].get("column")): b["summary"]
          for b in benches}
    headers = ["pre-train"] + [_header(bm, label, t) for bm, label, t in cols] + \
        [f"{benchmark_title(bm)} setup" for bm, _ in groups]
    body = []
    for name in names:
        cells = [_cell(by[(name, bm, label)], t, latex) if (name, bm, label) in by else "–" for bm, label, t in cols]
        setups = [setup_text(by[(name, bm, label)]) if (name, bm, label) in by else "–" for bm, label in groups]
        body.append([name] + cells + setups)
    paper, diffs = [], []
    if reference:
        for row in PAPER_TABLE5:
            cells = []
            for bm, _, t in cols:
                ref = _paper(row, bm, t)
                cells.append("–" if ref is None else " / ".join(f"{v:.1f}" for v in ref))
            paper.append([f"paper: {row}"] + cells + ["8×2, BN 16 (MoCo's code)"] * len(groups))
        for name in names:
            for row in COMPARED_TO:
                cells = []
                for bm, label, t in cols:
                    d = _diff(by[(name, bm, label)], t, row) if (name, bm, label) in by else None
                    cells.append("–" if d is None else " / ".join(f"{v:+.1f}" for v in d))
                diffs.append([f"{name} − {row}"] + cells + [""] * len(groups))
    return headers, body, paper, diffs


def _trial_rows(benches):
    header = ["name", "benchmark", "trial id", "LR", "trial", "seed", "status", "setup"] + list(REPORTED_METRICS)
    rows = []
    for b in benches:
        s = b["summary"]
        for r in sorted(b["records"], key=lambda r: (r["lr"], r["trial"])):
            setup = f"{r['world_size']}×{r['ims_per_gpu']}" if r.get("world_size") and r.get("ims_per_gpu") else "–"
            values = [(r.get("metrics") or {}).get(k) for k in REPORTED_METRICS]
            status = r["status"]
            if status == "done" and not counts_as_done(r, s["selection"]["metric"]):
                status = "failed (non-finite)"
            rows.append([s["name"], s["benchmark"], r["id"], f"{r['lr']:g}", str(r["trial"]), str(r["seed"]),
                         status, setup] + ["–" if v is None else f"{v:.1f}" for v in values])
    keep = [i for i, h in enumerate(header) if "/" not in h or any(row[i] != "–" for row in rows)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


def render(benches, fmt="md", per_trial=False, reference=None):
    if fmt == "csv":
        return _csv(benches, per_trial, reference)
    headers, body, paper, diffs = _table(benches, reference, fmt == "latex")
    if fmt == "latex":
        return _latex(headers, body, paper, diffs, benches, per_trial, reference)
    lines = _md_table(headers, body + paper)
    if diffs:
        lines += ["", "Difference to the paper (ours − paper, AP50 / AP / AP75):", "",
                  *_md_table(headers[:1 + len(_columns(benches))], [d[:1 + len(_columns(benches))] for d in diffs])]
    lines += ["", *_notes(benches, reference)]
    for b in benches:
        lines += ["", *_lr_table_md(b["summary"])]
    if per_trial:
        header, rows = _trial_rows(benches)
        lines += ["", "Trials:", "", *_md_table(header, rows)]
    return "\n".join(lines) + "\n"


def _md_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _lr_rows(summary):
    """Header and rows of an LR-search table; the first value column is what the LR was judged by."""
    metrics = [k for k in REPORTED_METRICS if k in summary["metrics"]]
    sel = summary["selection"]
    judged = f"{sel['metric']} ({'mean' if sel['search'] == 'full' else 'trial 0'})"
    header = ["LR", judged] + metrics + ["done", "failed"]
    rows = [[f"{e['lr']:g}" + (" *" if e["selected"] else ""),
             "–" if e.get("selection_value") is None else f"{e['selection_value']:.1f}"]
            + [_fmt(e.get(k)) for k in metrics] + [str(e["trials"]["done"]), str(e["trials"]["failed"])]
            for e in summary["lr_search"]]
    return header, rows


def _lr_title(summary):
    sel = summary["selection"]
    return (f"LR search: {summary['name']} on {benchmark_title(summary['benchmark'])} "
            f"(* selected by {sel['metric']}: {sel['rule']})")


def _lr_table_md(summary):
    header, rows = _lr_rows(summary)
    return [_lr_title(summary), "", *_md_table(header, rows)]


CSV_FIELDS = ("table", "name", "benchmark", "column", "lr", "selected", "trial", "seed", "status", "metric",
              "mean", "std", "n", "failed", "search", *SETUP_FIELDS)


def _csv(benches, per_trial, reference):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for b in benches:
        s = b["summary"]
        setup = {k: v for k, v in (s.get("setup") or {}).items() if k in CSV_FIELDS}
        setup["flags"] = "; ".join(setup.get("flags") or [])
        common = {"name": s["name"], "benchmark": s["benchmark"], "column": s.get("column"),
                  "search": s["selection"]["search"], **setup}
        for key, st in s["metrics"].items():
            writer.writerow({**common, "table": "main", "lr": s["selected_lr"], "selected": True, "metric": key,
                             "mean": st["mean"], "std": st["std"], "n": st["n"], "failed": s["trials"]["failed"]})
        if s.get("classifier"):
            st = s["classifier"]["fg_cls_accuracy"]
            writer.writerow({**common, "table": "main", "lr": s["selected_lr"], "selected": True,
                             "metric": CLASSIFIER_METRIC, "mean": st["mean"], "std": st["std"], "n": st["n"],
                             "failed": s["trials"]["failed"]})
        for entry in s["lr_search"]:
            for key in sorted(k for k in entry if "/" in k):
                st = entry[key]
                writer.writerow({**common, "table": "lr_search", "lr": entry["lr"], "selected": entry["selected"],
                                 "metric": key, "mean": st["mean"], "std": st["std"], "n": st["n"],
                                 "failed": entry["trials"]["failed"]})
        if per_trial:
            for r in b["records"]:
                for key, value in sorted((r.get("metrics") or {}).items()):
                    if key in REPORTED_METRICS:
                        writer.writerow({**common, "table": "trial", "lr": r["lr"], "trial": r["trial"],
                                         "seed": r["seed"], "status": r["status"], "metric": key, "mean": value,
                                         "n": 1, "world_size": r.get("world_size"),
                                         "ims_per_gpu": r.get("ims_per_gpu")})
        if reference:
            for row in COMPARED_TO:
                for task in TASKS:
                    d = _diff(s, task, row)
                    for m, v in zip(CELL_METRICS, d or []):
                        writer.writerow({**common, "table": f"difference to {row}", "metric": f"{task}/{m}",
                                         "mean": round(v, 3)})
    if reference:
        for row, values in PAPER_TABLE5.items():
            for key, triple in values.items():
                bm, _, task = key.partition("/")
                for m, v in zip(CELL_METRICS, triple):
                    writer.writerow({"table": "paper", "name": row, "benchmark": bm, "metric": f"{task or 'bbox'}/{m}",
                                     "mean": v, "world_size": 8, "ims_per_gpu": 2, "bn_group": 16})
    return buf.getvalue()


def _esc(text):
    return (text.replace("_", r"\_").replace("±", r"$\pm$").replace("×", r"$\times$").replace("−", "$-$")
            .replace("⚠", r"\textbf{!}").replace("†", r"\dag{}").replace("≠", r"$\neq$").replace("%", r"\%")
            .replace("&", r"\&"))


def _latex_tabular(header, rows, split_after=None):
    lines = [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_esc(h) for h in header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if split_after is not None and i == split_after:
            lines.append(r"\midrule")
        lines.append(" & ".join(_esc(c) for c in row) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}"]


def _latex(headers, body, paper, diffs, benches, per_trial, reference):
    lines = _latex_tabular(headers, body + paper, split_after=len(body) if paper else None)
    if diffs:
        n = 1 + len(_columns(benches))
        lines += ["", "% Difference to the paper (ours - paper, AP50 / AP / AP75)",
                  *_latex_tabular(headers[:n], [d[:n] for d in diffs])]
    lines += ["", r"\par\noindent\footnotesize " + " ".join(_esc(n) for n in _notes(benches, reference))]
    for b in benches:
        header, rows = _lr_rows(b["summary"])
        lines += ["", f"% {_lr_title(b['summary'])}", *_latex_tabular(header, rows)]
    if per_trial:
        header, rows = _trial_rows(benches)
        lines += ["", "% Trials", *_latex_tabular(header, rows)]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, path):
    """The figure as a PNG at ``path``, written atomically, then closed."""
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_ap_vs_lr(benches, path, metric=DEFAULT_METRIC):
    plt = _pyplot()
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
    _save_png(plt, fig, path)


def _reported_values(bench, metric):
    """``metric`` of each trial the summary's cell counts (``protocol.reported_records``)."""
    s = bench["summary"]
    counted = reported_records(bench["records"], s["selected_lr"], s["selection"]["metric"], s["selection"]["search"])
    return [r["metrics"][metric] for r in counted if counts_as_done(r, metric)]


def plot_rows(benches, path, metric=DEFAULT_METRIC):
    """One panel per benchmark: each row's mean ± std at its selected LR as a bar, its trials as dots."""
    plt = _pyplot()
    groups = list(dict.fromkeys(b["summary"]["benchmark"] for b in benches))
    names = list(dict.fromkeys(b["summary"]["name"] for b in benches))
    fig, axes = plt.subplots(1, len(groups), figsize=(1.2 * len(names) * len(groups) + 1.5, 3.8), squeeze=False)
    for ax, bm in zip(axes[0], groups):
        smoke = False
        for x, name in enumerate(names):
            bench = next((b for b in benches if b["summary"]["benchmark"] == bm and b["summary"]["name"] == name), None)
            if bench is None:
                continue
            smoke = smoke or bench["summary"].get("smoke")
            stat = bench["summary"]["metrics"].get(metric)
            if stat and stat["mean"] is not None:
                ax.bar(x, stat["mean"], yerr=stat["std"] or 0, capsize=4, color=f"C{x}", alpha=0.6)
            values = _reported_values(bench, metric)
            ax.plot([x] * len(values), values, "o", color="black", markersize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(benchmark_title(bm) + (" (smoke run)" if smoke else ""), fontsize=10)
    _save_png(plt, fig, path)


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
    if args.out:
        atomic.check_output_file(args.out, "--out")
    benches = load_benches(args.dirs)
    text = render(benches, args.format, per_trial=args.per_trial, reference=args.reference)
    if args.out:
        atomic.write_text(args.out, text)
        plot_path = Path(args.out).with_name(Path(args.out).stem + "_ap_vs_lr.png")
        plot_ap_vs_lr(benches, plot_path)
        print(f"wrote {args.out} and {plot_path}")
    else:
        print(text, end="")
    return 0
