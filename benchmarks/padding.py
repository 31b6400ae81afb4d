"""Padding: the same fine-tunes (same weights, LR and seeds) under two setups of one global batch, AP side by
side, so the effect of the images per GPU is measured, not assumed (one JSON line on stdout).

detectron2 pads each GPU's images to the largest of them before the backbone, whose BN (and PreciseBN)
statistics then include the padding: MoCo's 8 GPUs x 2 images pad less than 1 GPU x 16 images, and the
faithful batch policy's 1x16 is therefore close to 8x2, not identical.

    python benchmarks/padding.py --weights w.pkl                       # VOC07, 8x2 against 1x16, 5 seeds
    python benchmarks/padding.py --weights w.pkl --setups 8x2,2x8 --seeds 1000,1001,1002

A setup is GPUs x images per GPU and must multiply to the config's ``SOLVER.IMS_PER_BATCH``; one that needs
more GPUs than this machine shows is skipped with the reason. On a CPU the script runs at toy size
(``--config voc07_mini`` with ``--setups 1x4,1x4``), which checks it, not padding.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import emit, machine

METRICS = ("bbox/AP50", "bbox/AP", "bbox/AP75")


def parse_setup(text):
    gpus, _, per_gpu = text.partition("x")
    if not (gpus.isdigit() and per_gpu.isdigit()) or int(gpus) < 1 or int(per_gpu) < 1:
        raise SystemExit(f"--setups: {text!r} is not GPUSxIMAGES (e.g. 8x2)")
    return int(gpus), int(per_gpu)


def paired(first, second):
    """Per metric, mean and sample std of (first - second) over the seeds both setups finished."""
    out = {}
    for metric in METRICS:
        diffs = [a[metric] - b[metric] for a, b in zip(first, second)
                 if a and b and a.get(metric) is not None and b.get(metric) is not None]
        out[metric] = {"mean": statistics.fmean(diffs) if diffs else None,
                       "std": statistics.stdev(diffs) if len(diffs) > 1 else None, "n": len(diffs)}
    return out


def run_one(args, gpus, out_dir, seed):
    cmd = [sys.executable, "-m", "app.cli", "finetune", "--config", args.config, "--weights", args.weights,
           "--num-gpus", str(gpus if args.cuda else 0)]
    for flag in ("datasets", "data_root"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    cmd += ["OUTPUT_DIR", str(out_dir), "SEED", str(seed), "SOLVER.BASE_LR", str(args.lr), *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    metrics = Path(out_dir) / "metrics.json"
    if proc.returncode or not metrics.is_file():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
        return None, f"exit {proc.returncode}: {lines[-1][:300]}"
    record = json.loads(metrics.read_text())
    return {k: record.get(k) for k in (*METRICS, "ims_per_gpu", "world_size", "seed")}, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--config", default="voc07")
    parser.add_argument("--datasets")
    parser.add_argument("--data-root")
    parser.add_argument("--setups", default="8x2,1x16")
    parser.add_argument("--seeds", default="1000,1001,1002,1003,1004")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", default="runs/padding")
    parser.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    args = parser.parse_args(argv)
    import torch

    args.cuda = torch.cuda.is_available()
    visible = torch.cuda.device_count() if args.cuda else 1
    setups = [parse_setup(s) for s in args.setups.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results, skipped, errors = {}, {}, []
    for index, (gpus, per_gpu) in enumerate(setups):
        name = f"{gpus}x{per_gpu}"
        if gpus > visible:
            skipped[name] = f"needs {gpus} GPUs, this machine shows {visible if args.cuda else 0}"
            continue
        runs = []
        for seed in seeds:
            record, error = run_one(args, gpus, Path(args.out) / f"{index}_{name}" / f"seed{seed}", seed)
            if record is not None and record["ims_per_gpu"] != per_gpu:
                error, record = f"the config gives {record['ims_per_gpu']} images per GPU, not {per_gpu}", None
            runs.append(record)
            if error:
                errors.append(f"{name} seed {seed}: {error}")
        results[f"{index}_{name}"] = runs
    names = list(results)
    emit({"benchmark": "padding", "config": args.config, "weights": args.weights, "lr": args.lr, "seeds": seeds,
          "setups": results, "skipped": skipped, "errors": errors,
          "paired_difference": paired(results[names[0]], results[names[1]]) if len(names) == 2 else None,
          "machine": machine()})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
