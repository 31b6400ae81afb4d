"""Pretraining input: the official PIL pipeline against ``DATA.AUGMENT_ON device``'s CPU share, per core,
and (``--e2e``) the GPU rate end to end against the bare step (one JSON line).

    python benchmarks/loader.py                          # in-process, 1, 2 and all-core loader workers
    python benchmarks/loader.py --workers 0,1 --rounds 5 --images 400
    python benchmarks/loader.py --e2e                    # on CUDA: R50 224-px pretraining, device vs cpu vs bare step
    python benchmarks/loader.py --e2e --smoke            # the same at toy size on a CPU (checks the script)

The images are generated ImageNet-sized JPEGs (500x375 and 375x500, quality 90) cut from the colour
photographs shipped in scikit-image; nothing is downloaded.

Loader mode: per ``--workers`` value, interleaved rounds time passes over the folder with each
pipeline. ``0`` runs the dataset in this process (one torch thread); ``w > 0`` is a DataLoader with
``w`` workers and batch 32. Rates are steady-state: a full pass minus a pass of one batch per worker
(so the workers' start-up, once per epoch in training, is left out), per extra image. Per core = images
per CPU-second of every process involved (this one and its reaped workers), which other jobs on the
machine do not inflate. ``official`` = decode + two views of ``pretrain.data.simsiam_augmentation`` (float tensors);
``ours`` = decode + two views of ``pretrain.data.crop_and_params`` (uint8 crops and their parameters).
``ratio_per_core`` = median over rounds of ours / official (target >= 4).

``--e2e``: ``Pretrainer`` steps of SimSiam R50 at 224 px (AMP: bf16 on GPUs that have it, fp16 elsewhere), with ``--e2e-workers`` loader
workers, ``DATA.AUGMENT_ON`` device and cpu, against the same trainer's steps on tensors already on the
GPU (``bare``). Each rate is taken over ``--steps`` steps after ``--warmup`` steps (by default more than
the loader's prefetched batches, so a backlog built during warm-up cannot flatter the rate);
``ratio_vs_bare`` = rate / bare rate (target >= 0.9 for device); GPU utilisation is nvidia-smi's, sampled
every 200 ms over the timed steps (null without nvidia-smi).
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import emit, machine, median

from pretrain.config import load_cfg
from pretrain.data import TwoViewDataset, crop_and_params, simsiam_augmentation
from pretrain.engine import Pretrainer
from pretrain.hooks import TrainMetrics
from simsiam_transfer.synthetic import COLOR_SCENES, texture_sources

IMAGENET_SIZES = ((500, 375), (375, 500))  # the two commonest ImageNet shapes
GRAIN = 12.0  # std of the added noise, in levels
PIPELINES = {"official": simsiam_augmentation, "ours": crop_and_params}


def make_jpegs(folder: Path, count: int, unique: int, sizes=IMAGENET_SIZES, seed: int = 0) -> list:
    """``count`` JPEGs (quality 90): ``unique`` random crops of the scikit-image photographs, landscape and
    portrait in turn, with grain so that they weigh about what ImageNet's do (~80 KiB; the clean photos
    give ~50 KiB and decode faster), then hard links to them up to ``count`` (decoding is the same work)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [texture_sources()[name] for name in COLOR_SCENES]
    files = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        if i < unique:
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img = Image.fromarray(np.ascontiguousarray(photo[y:y + ch, x:x + cw])).resize(sizes[i % len(sizes)])
            grain = np.asarray(img, dtype=np.float32) + rng.normal(0.0, GRAIN, (img.height, img.width, 3))
            Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        else:
            os.link(files[i % unique], path)
        files.append(path)
    return files


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (loader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def one_pass(dataset, workers: int, batch: int) -> tuple:
    """(wall s, CPU s) to produce every item of ``dataset`` once, in process or with ``workers`` workers."""
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    if workers == 0:
        for i in range(len(dataset)):
            dataset[i]
    else:
        it = iter(torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers))
        for _ in it:
            pass
        del it  # joins the workers, so their CPU time is counted
    return time.perf_counter() - start, _cpu_seconds() - start_cpu


def per_image(dataset, workers: int, batch: int) -> tuple:
    """(wall s, CPU s) per image in the steady state: a full pass minus a pass of one batch per worker
    (the workers' start-up, which a real epoch of thousands of steps spreads thin), per extra image."""
    base = batch * max(workers, 1)
    small_wall, small_cpu = one_pass(torch.utils.data.Subset(dataset, range(base)), workers, batch)
    wall, cpu = one_pass(dataset, workers, batch)
    extra = len(dataset) - base
    return (wall - small_wall) / extra, (cpu - small_cpu) / extra


def loader_rates(folder: Path, workers_list, rounds: int, size: int, batch: int) -> dict:
    datasets = {name: TwoViewDataset(folder, make(size), as_tensor=name == "ours") for name, make in PIPELINES.items()}
    results = {}
    for workers in workers_list:
        wall = {name: [] for name in datasets}
        cpu = {name: [] for name in datasets}
        for dataset in datasets.values():  # untimed warm-up: page cache, lazy imports
            one_pass(torch.utils.data.Subset(dataset, range(batch)), workers, batch)
        for r in range(rounds):
            for name in list(datasets)[r % 2:] + list(datasets)[:r % 2]:
                w, c = per_image(datasets[name], workers, batch)
                wall[name].append(w)
                cpu[name].append(c)
        results[str(workers)] = {
            "img_per_s": {k: round(1 / median(v), 1) for k, v in wall.items()},
            "img_per_cpu_s": {k: round(1 / median(v), 1) for k, v in cpu.items()},
            "ratio_per_core": round(median([o / u for o, u in zip(cpu["official"], cpu["ours"])]), 2),
            "ratio_wall": round(median([o / u for o, u in zip(wall["official"], wall["ours"])]), 2),
        }
        print(f"loader workers {workers}: {results[str(workers)]}", file=sys.stderr, flush=True)
    return results


# -- end to end on the GPU -------------------------------------------------------------------------------
class GpuUtilisation:
    """nvidia-smi's utilization.gpu (%) sampled every 200 ms between ``start`` and ``stop``; ``mean`` is
    None on a CPU or without nvidia-smi."""

    def __init__(self, device: torch.device):
        self.device, self.samples = device, []
        self.proc = self.reader = None

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200",
                 "-i", str(self.device.index or 0)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=2)

    @property
    def mean(self):
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, batches, warmup: int, steps: int) -> dict:
    """img/s over ``steps`` steps after ``warmup`` steps of ``batches`` ((x1, x2, index) each)."""
    trainer.epoch = 0
    trainer._call("before_epoch")
    trainer.ddp.train()
    util = GpuUtilisation(trainer.device)
    start = None
    for trainer.iter, (x1, x2, index) in enumerate(batches):
        if trainer.iter == warmup:
            _sync(trainer.device)
            util.start()
            start = time.perf_counter()
        trainer.step_outputs = trainer.run_step((x1, x2, index))
        trainer._call("after_step")
    _sync(trainer.device)
    elapsed = time.perf_counter() - start
    util.stop()
    return {"img_per_s": round(steps * trainer.per_process_batch / elapsed, 1), "gpu_util_pct": util.mean}


def augment_ms(trainer, repeats: int = 10) -> float:
    """ms for the device augmentation of one batch's two views (from a real loader batch)."""
    (x1, x2, _), _ = next(iter(trainer.epoch_batches(0)))
    trainer.to_device(x1)
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(repeats):
        trainer.to_device(x1), trainer.to_device(x2)
    _sync(trainer.device)
    return round(1000 * (time.perf_counter() - start) / repeats, 2)


def e2e(args, work: Path) -> dict:
    backbone, size, batch = ("resnet18", 32, 8) if args.smoke else ("resnet50", 224, args.batch or 128)
    workers = args.e2e_workers if args.e2e_workers is not None else (1 if args.smoke else os.cpu_count() or 1)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2 * workers + 4)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 30)
    images = (warmup + steps) * batch
    sizes = ((96, 72), (72, 96)) if args.smoke else IMAGENET_SIZES
    make_jpegs(work / "e2e", images, min(images, 256), sizes)
    record = {"backbone": backbone, "crop_px": size, "batch": batch, "workers": workers, "amp": not args.smoke,
              "warmup_steps": warmup, "timed_steps": steps, "images": images,
              "source_px": [list(s) for s in sizes], "results": {}}
    trainer = None
    for augment_on in ("device", "cpu"):
        cfg = load_cfg(None, ["MODEL.BACKBONE", backbone, "DATA.IMAGE_SIZE", size, "SOLVER.BATCH_SIZE", batch,
                              "SOLVER.AMP", not args.smoke, "DATA.NUM_WORKERS", workers,
                              "DATA.TRAIN_DIR", str(work / "e2e"), "DATA.CHECK_IMAGES", "never",
                              "DATA.AUGMENT_ON", augment_on, "SOLVER.EPOCHS", 1,
                              "SOLVER.MAX_ITERS_PER_EPOCH", warmup + steps, "OUTPUT_DIR", str(work / augment_on)])
        trainer = Pretrainer(cfg, hooks=[TrainMetrics()])
        if augment_on == "device":
            record["augment_ms_per_batch_two_views"] = augment_ms(trainer)
        record["results"][augment_on] = timed_steps(trainer, (b for b, _ in trainer.epoch_batches(0)), warmup, steps)
        print(f"e2e AUGMENT_ON {augment_on}: {record['results'][augment_on]}", file=sys.stderr, flush=True)
    # The bare step: the same trainer on normalised tensors already on the device.
    shape = (batch, 3, size, size)
    x1, x2 = (trainer.to_device(torch.randn(shape)) for _ in range(2))
    index = torch.arange(batch)
    record["results"]["bare"] = timed_steps(trainer, ((x1, x2, index) for _ in range(warmup + steps)), warmup, steps)
    print(f"e2e bare: {record['results']['bare']}", file=sys.stderr, flush=True)
    bare = record["results"]["bare"]["img_per_s"]
    record["ratio_vs_bare"] = {k: round(record["results"][k]["img_per_s"] / bare, 3) for k in ("device", "cpu")}
    record["gpu"] = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else None
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=f"0,1,2,{os.cpu_count()}",
                        help="loader workers to compare (0 = in this process); default 0, 1, 2 and all cores")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int,
                        help="JPEGs per pass (loader mode; default 256, or 4 batches per worker if more)")
    parser.add_argument("--size", type=int, default=224, help="crop size of the views")
    parser.add_argument("--batch", type=int, help="batch: of the loader (default 32), of the --e2e step (default 128)")
    parser.add_argument("--e2e", action="store_true", help="end-to-end GPU pretraining rates instead")
    parser.add_argument("--e2e-workers", type=int, help="loader workers for --e2e (default: all cores)")
    parser.add_argument("--warmup", type=int, help="--e2e: untimed steps first (default 2 x workers + 4)")
    parser.add_argument("--steps", type=int, help="--e2e: timed steps (default 30)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (with --e2e: on a CPU), to check the script")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.e2e and not args.smoke and not torch.cuda.is_available():
        parser.error("--e2e measures a GPU run and this machine has no CUDA device; on a CPU use --e2e --smoke")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        if args.e2e:
            record = {"benchmark": "loader_e2e", "machine": machine(), **e2e(args, work),
                      "targets": {"ratio_vs_bare.device": 0.9}}
            record["met"] = record["ratio_vs_bare"]["device"] >= 0.9
        else:
            info = machine()  # before the run: its load figure is the start's
            torch.set_num_threads(1)  # per core: the in-process pass uses one thread, as a worker does
            workers = sorted({int(w) for w in ("0,1" if args.smoke else args.workers).split(",")})
            batch = args.batch or (4 if args.smoke else 32)
            least = 2 * batch * max(workers[-1], 1)  # the steady state needs passes beyond one batch per worker
            images = 24 if args.smoke else args.images or max(256, 2 * least)
            rounds = 1 if args.smoke else args.rounds
            if images < least:
                parser.error(f"--images must be at least {least} for {workers[-1]} workers of batch {batch}")
            files = make_jpegs(work / "jpegs", images, min(images, 256))
            rates = loader_rates(work / "jpegs", workers, rounds, args.size, batch)
            record = {"benchmark": "loader", "machine": info, "images": images, "loader_batch": batch,
                      "crop_px": args.size,
                      "source_px": [list(s) for s in IMAGENET_SIZES], "jpeg_quality": 90,
                      "mean_jpeg_kib": round(sum(f.stat().st_size for f in files[:256]) / len(files[:256]) / 1024, 1),
                      "rounds": rounds, "workers": rates, "targets": {"ratio_per_core": 4.0}}
            record["met"] = all(r["ratio_per_core"] >= 4.0 for r in rates.values())
    emit(record)


if __name__ == "__main__":
    main()
