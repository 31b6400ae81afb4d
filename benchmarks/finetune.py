"""Fine-tuning: s/iteration of our ``finetune`` against detectron2's plain ``DefaultTrainer`` (one JSON line).

    python benchmarks/finetune.py                  # mini VOC config, 3 rounds of (ours, plain), 24 iterations each
    python benchmarks/finetune.py --rounds 2 --iters 40

Both sides train the same resolved mini config (``build_cfg``: our ExtraNorm head registered) on the
same registered generated datasets, from the same converted ResNet-18, and then evaluate. ``ours`` is
``detection.finetune.run_finetune`` (pre-flight, launch, our Trainer with its writers, progress bar,
metrics.json); ``plain`` is what detectron2's ``tools/train_net.py`` does: ``default_setup``, a
``DefaultTrainer`` whose only addition is the evaluator it requires, ``resume_or_load``, ``train``.
Each fine-tune runs in its own child process (fresh loggers and registries), ours and plain alternating.
The same timing hook is appended to both trainers; the first iterations are warm-up and excluded.
``overhead`` = median over rounds of ours / plain - 1 (target: <= 0.02).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import REPO, emit, machine

CONFIG = "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml"
WARMUP_ITERS = 4


def _timing_hook(times):
    from detectron2.engine import HookBase

    class StepTimer(HookBase):
        def before_step(self):
            self._start = time.perf_counter()

        def after_step(self):
            times.append(time.perf_counter() - self._start)
    return StepTimer()


def child(side: str, weights: str, datasets: str, out: str, iters: int) -> dict:
    """One fine-tune in this process; returns its per-iteration times and wall seconds."""
    from detection.finetune import FinetuneJob, argparse_namespace, build_cfg

    times = []
    overrides = ["SOLVER.MAX_ITER", str(iters), "OUTPUT_DIR", out]
    job = FinetuneJob(config_file=CONFIG, weights=weights, overrides=overrides, datasets=datasets)
    start = time.perf_counter()
    if side == "ours":
        from detection.finetune import run_finetune
        from detection.trainer import Trainer

        base_hooks = Trainer.build_hooks
        Trainer.build_hooks = lambda self: base_hooks(self) + [_timing_hook(times)]
        run_finetune(job)
    else:
        from detectron2.engine import DefaultTrainer, default_setup
        from detectron2.evaluation import PascalVOCDetectionEvaluator

        from detection.datasets import register_datasets

        class PlainTrainer(DefaultTrainer):
            @classmethod
            def build_evaluator(cls, cfg, dataset_name, output_folder=None):
                return PascalVOCDetectionEvaluator(dataset_name)

            def build_hooks(self):
                return super().build_hooks() + [_timing_hook(times)]

        register_datasets(None, datasets)
        cfg = build_cfg(job)
        default_setup(cfg, argparse_namespace(job))
        trainer = PlainTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    return {"iter_s": times, "wall_s": time.perf_counter() - start}


def run_child(side, weights, datasets, out, iters):
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--weights", weights, "--datasets", datasets,
                           "--out", out, "--iters", str(iters)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"finetune benchmark: {side} fine-tune failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=24)
    parser.add_argument("--child", choices=("ours", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--datasets", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.weights, args.datasets, args.out, args.iters)))
        return
    import torch
    import torchvision

    from convert.command import convert_checkpoint
    from simsiam_transfer.synthetic import make_synthetic

    record = {"benchmark": "finetune", "machine": machine(), "config": CONFIG, "iters": args.iters,
              "warmup_iters_excluded": WARMUP_ITERS, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_synthetic(work / "data", num_unlabeled=8, labeled_per_class=(2, 1))
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), work / "r18.pth")
        convert_checkpoint(work / "r18.pth", work / "r18.pkl")
        per_round = {"ours": [], "plain": []}
        walls = {"ours": [], "plain": []}
        for r in range(args.rounds):
            for side in (("ours", "plain") if r % 2 == 0 else ("plain", "ours")):
                result = run_child(side, str(work / "r18.pkl"), str(data / "datasets.yaml"),
                                   str(work / f"{side}{r}"), args.iters)
                per_round[side].append(statistics.median(result["iter_s"][WARMUP_ITERS:]))
                walls[side].append(result["wall_s"])
    ratios = [o / p for o, p in zip(per_round["ours"], per_round["plain"])]
    record.update({
        "s_per_iter": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "s_per_iter_rounds": {k: [round(x, 3) for x in v] for k, v in per_round.items()},
        "overhead": round(statistics.median(ratios) - 1, 4),
        "wall_s_train_and_eval": {k: round(statistics.median(v), 1) for k, v in walls.items()},
        "target_overhead": 0.02,
    })
    emit(record)


if __name__ == "__main__":
    main()
