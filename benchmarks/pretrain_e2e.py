"""Pretraining end to end: the engine's epochs with real loading against the same engine on
pre-loaded batches (the bare step), and where the difference goes (one JSON line).

    python benchmarks/pretrain_e2e.py                       # mini recipe, generated 128-px JPEGs
    python benchmarks/pretrain_e2e.py --workers 0,1 --rounds 4 --image-px 384
    python benchmarks/pretrain_e2e.py --workers 0,1 --images 2048 --amp   # 64-step epochs, as shipped

Generates the mini recipe's data (``make_synthetic``: ``--images`` unlabeled, 256 = 8 steps of 32, small
labeled kNN folders), then for each DATA.NUM_WORKERS builds the engine's ``Pretrainer`` for the
mini recipe and times, in interleaved rounds, one epoch with its DataLoader (``e2e``) and one epoch
whose loader is a list of already-augmented batches (``bare``: the engine's step and its per-step
work, no loading). Also reported, measured by timing each phase alone:
  data_ms_per_img   decode, and the two-view augmentation, in the main process
  sync_ms_per_step  what per-step host reads of a batch's outputs would cost (finite check, loss and
                    z_std ``.item()``): the engine now keeps them on the device and reads once per
                    ``SOLVER.LOG_PERIOD`` steps (on CPU an ``.item()`` waits for nothing; its cost is the
                    work it forces)
  knn_s             the kNN monitor once (the mini recipe runs it every epoch)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import emit, interleaved, machine, median, paired_ratio

from pretrain.config import load_cfg
from pretrain.data import TwoViewDataset, list_images, simsiam_augmentation
from pretrain.engine import Pretrainer
from pretrain.hooks import KnnMonitor, TrainMetrics
from pretrain.loss import normalized_std

MINI = "pretrain/simsiam_R_18_mini.yaml"


def data_costs(train_dir: Path, size: int, min_scale: float, limit: int = 64) -> dict:
    """Main-process ms per image: the dataset's item (decode + two views), and the two views alone."""
    from PIL import Image

    dataset = TwoViewDataset(train_dir, simsiam_augmentation(size, min_scale))
    n = min(limit, len(dataset))
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    item = (time.perf_counter() - start) / n
    images = [Image.open(f).convert("RGB") for f in dataset.files[:n]]
    start = time.perf_counter()
    for img in images:
        dataset.transform(img), dataset.transform(img)
    augment = (time.perf_counter() - start) / n
    return {"item": round(1000 * item, 2), "augment_two_views": round(1000 * augment, 2),
            "decode": round(1000 * (item - augment), 2), "source_px": list(images[0].size)}


def sync_cost(batch: int, dim: int, reps: int = 50) -> float:
    """ms per step of the engine's per-step host work on outputs shaped like one batch's."""
    z = torch.randn(batch, dim)
    loss = -(torch.nn.functional.normalize(z, dim=1) ** 2).sum(1).mean()
    start = time.perf_counter()
    for _ in range(reps):
        bool(torch.isfinite(loss.detach()).item())
        loss.item()
        normalized_std(z).item()
    return round(1000 * (time.perf_counter() - start) / reps, 3)


def mini_cfg(data: Path, out: Path, workers: int, amp: bool):
    return load_cfg(MINI, ["DATA.TRAIN_DIR", str(data / "unlabeled"),
                           "DATA.KNN_TRAIN_DIR", str(data / "labeled/train"),
                           "DATA.KNN_VAL_DIR", str(data / "labeled/val"),
                           "DATA.NUM_WORKERS", workers, "SOLVER.AMP", amp, "OUTPUT_DIR", str(out)])


def measure_workers(data: Path, work: Path, workers: int, rounds: int, warmup: int, amp: bool,
                    sync_ms: float) -> dict:
    """The engine's epoch (its loader, then ``run_step`` + the per-step metrics hook) against the same
    steps on batches already in memory; then the kNN monitor once."""
    trainer = Pretrainer(mini_cfg(data, work / f"w{workers}", workers, amp), hooks=[TrainMetrics()])
    steps = trainer.steps_per_epoch
    batches = [batch for batch, _ in trainer.epoch_batches(0)]
    epoch = iter(range(1, 1_000_000))

    def e2e():
        trainer.epoch = next(epoch)
        trainer._call("before_epoch")
        trainer.train_one_epoch()

    def bare():
        trainer._call("before_epoch")
        trainer.ddp.train()
        for trainer.iter, (x1, x2, index) in enumerate(batches):
            trainer.step_outputs = trainer.run_step((x1, x2, index))
            trainer._call("after_step")

    wall, cpu = interleaved({"e2e": e2e, "bare": bare}, rounds, steps=1, warmup=warmup)
    batch = trainer.per_process_batch
    knn = KnnMonitor()
    knn.trainer = trainer
    trainer.epoch, trainer.record = trainer.cfg.SOLVER.EPOCHS - 1, {}  # the last epoch always runs kNN
    knn_start = time.perf_counter()
    knn.after_epoch()
    knn_s = time.perf_counter() - knn_start
    e2e_s, bare_s = median(wall["e2e"]), median(wall["bare"])
    result = {
        "steps_per_epoch": steps, "batch": batch,
        "img_per_s": {"e2e": round(steps * batch / e2e_s, 1), "bare": round(steps * batch / bare_s, 1)},
        "ratio_e2e_vs_bare": paired_ratio(wall["bare"], wall["e2e"]),
        "loading_share_of_e2e": round(1 - bare_s / e2e_s, 3),
        "sync_share_of_bare": round(sync_ms * steps / 1000 / bare_s, 4),
        "knn_s": round(knn_s, 2),
        "knn_share_of_epoch_plus_knn": round(knn_s / (knn_s + e2e_s), 3),
        "main_process_cpu_s_per_epoch": {k: round(median(v), 2) for k, v in cpu.items()},
    }
    del trainer, batches
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="0,1,2", help="DATA.NUM_WORKERS values to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each kind first")
    parser.add_argument("--image-px", type=int, default=128, help="side of the generated JPEGs (demo: 128)")
    parser.add_argument("--images", type=int, default=256,
                        help="unlabeled images, i.e. steps per epoch x 32 (the demo: 4,000, 125 steps)")
    parser.add_argument("--amp", action="store_true",
                        help="SOLVER.AMP True, as the mini recipe ships (bf16 on CPUs with native bf16); default fp32")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from simsiam_transfer.synthetic import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data = make_synthetic(work / "data", num_train=4, num_test=4, num_unlabeled=args.images,
                              labeled_per_class=(20, 10), image_size=args.image_px)
        cfg = mini_cfg(data, work / "probe", 0, args.amp)
        record = {"benchmark": "pretrain_e2e", "machine": machine(), "config": MINI,
                  "images": len(list_images(data / "unlabeled")), "image_px": args.image_px, "amp": args.amp,
                  "rounds": args.rounds, "warmup_epochs": args.warmup,
                  "data_ms_per_img": data_costs(data / "unlabeled", cfg.DATA.IMAGE_SIZE, cfg.DATA.MIN_SCALE),
                  "sync_ms_per_step": sync_cost(cfg.SOLVER.BATCH_SIZE, cfg.MODEL.DIM),
                  "num_workers": {}}
        for workers in (int(w) for w in args.workers.split(",")):
            result = measure_workers(data, work, workers, args.rounds, args.warmup, args.amp,
                                     record["sync_ms_per_step"])
            record["num_workers"][str(workers)] = result
            print(f"pretrain_e2e NUM_WORKERS {workers}: {result}", file=sys.stderr, flush=True)
    emit(record)


if __name__ == "__main__":
    main()
