"""The GPU check (issues 9 and 14): every GPU path once, one JSON line per check, then a summary.

    bash benchmarks/gpu_check.sh [OUT_DIR]          on a machine with >= 1 GPU and the project installed
    python benchmarks/gpu_check.py --smoke OUT      the same sequence at toy size on a CPU (checks the script)

Checks: SimSiam R50 20 steps fp32 and AMP; resume of the fp32 (AMP off) checkpoint with AMP on;
2 pretraining processes (torchrun) on whatever GPUs there are; convert + verify; R50-C4 VOC 100
iterations at 16 images on one GPU under the faithful batch policy (s/iter, peak memory); Mask R-CNN
C4 50 iterations; the pipeline's torchrun pretraining stage. Nothing is downloaded: the data is the
generated one, upscaled by detectron2's resize to the paper's input sizes.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml


def cli(*args):
    return [sys.executable, "-m", "app.cli", *map(str, args)]


def run(name, cmd, log_dir, measure=None, **extra):
    """Run one check and print its JSON record (rc, wall time, ``measure()``'s figures, or the log's
    tail on failure)."""
    log = Path(log_dir) / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    record = {"check": name, "rc": rc, "wall_s": round(time.perf_counter() - start, 1), **extra}
    if rc:
        record["tail"] = log.read_text()[-800:]
    elif measure is not None:
        record.update(measure())
    print(json.dumps(record), flush=True)
    return record


def pretrain_speed(out_dir, batch):
    """s/step and img/s of the last epoch in a pretraining run's metrics.jsonl."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    s_per_step = last["time_s"] / last["steps"]
    return {"s_per_step": round(s_per_step, 4), "img_per_s": round(batch / s_per_step, 1), "loss": last["loss"],
            **{k: last[k] for k in ("amp_skipped_steps",) if k in last}}


def detectron2_speed(out_dir):
    """Median s/iter and the peak memory detectron2's printer logged (``max_mem: NM``)."""
    log = (Path(out_dir) / "log.txt").read_text()
    times = [float(t) for t in re.findall(r"  time: ([0-9.]+)", log)]  # the per-iteration printer
    mem = [float(m) for m in re.findall(r"max_mem: ([0-9.]+)M", log)]
    times.sort()
    return {"s_per_iter": times[len(times) // 2] if times else None,
            "peak_mem_gib": round(max(mem) / 1024, 2) if mem else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU, to check the script itself")
    args = parser.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    smoke = args.smoke
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    print(json.dumps({"device": device, "gpus": gpus, "torch": torch.__version__}), flush=True)
    data = out / "data"
    results = [run("data", cli("data", "make-synthetic", "--out", data), out)]
    classes = len(next(iter(yaml.safe_load((data / "datasets.yaml").read_text()).values()))["classes"])

    backbone, size, batch, steps = ("resnet18", 32, 16, 2) if smoke else ("resnet50", 224, 64, 20)
    common = ["DATA.TRAIN_DIR", data / "unlabeled", "MODEL.BACKBONE", backbone, "DATA.IMAGE_SIZE", size,
              "SOLVER.BATCH_SIZE", batch, "SOLVER.MAX_ITERS_PER_EPOCH", steps, "DATA.NUM_WORKERS", 4,
              "SOLVER.CHECKPOINT_PERIOD", 1]
    for amp in (False, True):
        name = f"pretrain_{backbone}_{'amp' if amp else 'fp32'}"
        results.append(run(name, cli("pretrain", "OUTPUT_DIR", out / name, "SOLVER.EPOCHS", 1, "SOLVER.AMP", amp,
                                     *common), out, measure=lambda name=name: pretrain_speed(out / name, batch)))
    # A checkpoint written with AMP off resumes with AMP on (empty GradScaler state is skipped).
    results.append(run("resume_fp32_checkpoint_with_amp", cli(
        "pretrain", "OUTPUT_DIR", out / f"pretrain_{backbone}_fp32", "SOLVER.EPOCHS", 2, "SOLVER.AMP", True,
        *common), out))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    results.append(run("pretrain_2_processes", torchrun + cli("pretrain", "OUTPUT_DIR", out / "pretrain_ddp",
                                                              "SOLVER.EPOCHS", 1, *common)[1:], out,
                       gpus_visible=gpus))
    weights = out / "weights.pkl"
    results.append(run("convert_verify", cli("convert", out / f"pretrain_{backbone}_fp32" / "checkpoint_last.pth",
                                             weights), out))

    depth = "18" if smoke else "50"
    catalog = data / "datasets.yaml"
    voc = (f"detection/PascalVOC-Detection/faster_rcnn_R_{depth}_C4_voc07{'_mini' if smoke else ''}.yaml")
    coco = (f"detection/COCO-InstanceSegmentation/mask_rcnn_R_{depth}_C4_1x{'_mini' if smoke else ''}.yaml")
    common_d2 = ["MODEL.ROI_HEADS.NUM_CLASSES", classes, "SOLVER.WARMUP_ITERS", 10,
                 "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.PRECISE_BN.NUM_ITER", 2]
    # Faithful policy: the config's global batch (16) on the one GPU there is, BN over those 16.
    for name, config, split, iters in (
            ("finetune_voc_R50_C4_16img_1gpu", voc, ("synthetic_voc_trainval", "synthetic_voc_test"), 100),
            ("finetune_coco_mask_rcnn_C4", coco, ("synthetic_coco_train", "synthetic_coco_val"), 50)):
        iters = 2 if smoke else iters
        results.append(run(name, cli("finetune", "--config", config, "--weights", weights, "--datasets", catalog,
                                     "--num-gpus", min(gpus, 1), "OUTPUT_DIR", out / name, "SOLVER.MAX_ITER", iters,
                                     "SOLVER.STEPS", f"({iters - 1},)", "DATASETS.TRAIN", f"('{split[0]}',)",
                                     "DATASETS.TEST", f"('{split[1]}',)", *common_d2), out,
                           measure=lambda name=name: detectron2_speed(out / name)))

    pipeline = out / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "DATA": {"SYNTHETIC": True}, "PRETRAIN": {"NPROC_PER_NODE": 2},
        "ROWS": {"simsiam": {"PRETRAIN": {"CONFIG": "pretrain/simsiam_R_18_mini.yaml", "CFG": {
            "SOLVER": {"EPOCHS": 1, "MAX_ITERS_PER_EPOCH": 2, "BATCH_SIZE": 32}}}}},
        "BENCH": {"BENCHMARKS": ["voc07_mini"], "LRS": [0.02], "TRIALS": 1,
                  "CFG": {"SOLVER": {"MAX_ITER": 4, "STEPS": [3], "WARMUP_ITERS": 2}}}}))
    results.append(run("pipeline_torchrun_stage", cli("pipeline", "--config", pipeline, "OUTPUT_DIR",
                                                      out / "pipeline"), out))
    failed = [r["check"] for r in results if r["rc"]]
    print(json.dumps({"summary": True, "device": device, "checks": len(results), "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
