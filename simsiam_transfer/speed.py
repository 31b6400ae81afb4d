"""Speed and memory of the CPU-sized paths, as JSON (the numbers the README quotes).

    python -m simsiam_transfer.speed [--workdir DIR]

Measures, on generated data: SimSiam ResNet-18 training steps (64-px crops, batch 64),
the verified conversion of a ResNet-50 checkpoint, and the mini C4 Faster R-CNN fine-tune
(seconds per iteration as detectron2 reports it). Peak resident memory of each child process
is included. Prints one JSON object; exits 0.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(args):
    """Run ``simsiam-transfer ARGS`` in a child; (wall seconds, that child's peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "simsiam_transfer.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"speed: {' '.join(map(str, args[:2]))} failed: {stderr[-500:]}")
    return time.perf_counter() - start, round(usage.ru_maxrss / 1024, 1)


def measure(workdir):
    import torch
    import torchvision

    from simsiam_transfer.synthetic import make_synthetic
    from simsiam_transfer.versions import library_versions

    work = Path(workdir)
    data = make_synthetic(work / "data", num_unlabeled=512)
    steps = 8
    wall, rss = _timed(["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.TRAIN_DIR", data / "unlabeled",
                        "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", "DATA.NUM_WORKERS", 1, "SOLVER.EPOCHS", 1,
                        "SOLVER.MAX_ITERS_PER_EPOCH", steps, "OUTPUT_DIR", work / "pretrain"])
    epoch = json.loads((work / "pretrain/metrics.jsonl").read_text().splitlines()[0])
    pretrain = {"backbone": "resnet18", "crop_px": 64, "batch": 64, "steps": epoch["steps"],
                "s_per_step": round(epoch["time_s"] / epoch["steps"], 3),
                "wall_s_including_startup": round(wall, 1), "peak_rss_mib": rss}

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), work / "r50.pth")
    wall, rss = _timed(["convert", work / "r50.pth", work / "r50.pkl"])
    convert = {"backbone": "resnet50", "verified": True, "wall_s_including_startup": round(wall, 1), "peak_rss_mib": rss}

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), work / "r18.pth")
    _timed(["convert", work / "r18.pth", work / "r18.pkl"])
    wall, rss = _timed(["finetune", "--config", "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml",
                        "--weights", work / "r18.pkl", "--datasets", data / "datasets.yaml", "OUTPUT_DIR", work / "ft"])
    log = [json.loads(line) for line in (work / "ft/train_log.jsonl").read_text().splitlines()]
    iter_times = [r["time"] for r in log if "time" in r]
    finetune = {"config": "faster_rcnn_R_18_C4_voc07_mini", "iterations": 40,
                "s_per_iter": round(iter_times[-1], 3) if iter_times else None,
                "wall_s_including_eval": round(wall, 1), "peak_rss_mib": rss}
    return {"machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available()},
            "versions": library_versions(), "pretrain": pretrain, "convert": convert, "finetune": finetune}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.workdir:
        result = measure(args.workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(tmp)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
