"""Fine-tuning: s/iteration of our ``finetune`` trainer against detectron2's plain ``DefaultTrainer``.

The JSON line is the last line of stdout (detectron2's logs come before it).

    python benchmarks/finetune.py                  # mini VOC config, 40 iterations of each, alternating
    python benchmarks/finetune.py --iters 20
    python benchmarks/finetune.py --amp            # ours in fp32 against ours with SOLVER.AMP.ENABLED

Both trainers are built in this process from the same resolved mini config (``build_cfg``: our
ExtraNorm head registered), the same registered generated datasets and the same converted ResNet-18.
``ours`` is built as ``finetune``'s worker builds it (``default_setup``, our ``Trainer`` with its
evaluators, writers and progress bar); ``plain`` is what detectron2's ``tools/train_net.py`` does
(``default_setup``, a ``DefaultTrainer`` whose only addition is the evaluator it requires). Their
iterations alternate (hooks included: before_step, run_step, after_step), so a load change on the shared
machine hits both; the first iterations are warm-up. ``overhead`` = median of ours / plain per
iteration pair - 1 (target <= 0.02). ``preflight_s`` is finetune's one-off pre-flight (config,
datasets, weights check), paid once per run; end-of-run evaluation is the same code on both sides.

``--amp`` times our trainer twice instead: fp32 (``plain`` side) against ``SOLVER.AMP.ENABLED`` (``ours``),
which on a CPU with native bf16 runs detectron2's step under bf16 autocast (``detection/cpu_amp.py``);
``speedup`` = median of fp32 / AMP per iteration pair; ``precision`` says what the AMP side ran in.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import emit, machine

CONFIG = "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml"
WARMUP_ITERS = 4


def build_trainers(weights: str, datasets: str, work: Path, iters: int, amp: bool = False):
    from detectron2.engine import DefaultTrainer, default_setup
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    from detection.datasets import register_datasets
    from detection.finetune import FinetuneJob, argparse_namespace, build_cfg, preflight
    from detection.trainer import Trainer

    class PlainTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return PascalVOCDetectionEvaluator(dataset_name)

    trainers, preflight_s = {}, None
    sides = (("ours", Trainer, amp), ("plain", Trainer if amp else PlainTrainer, False))
    for side, cls, side_amp in sides:
        job = FinetuneJob(config_file=CONFIG, weights=weights, datasets=datasets,
                          cfg={"SOLVER": {"MAX_ITER": iters, "AMP": {"ENABLED": side_amp}}, "OUTPUT_DIR": str(work / side)})
        if side == "ours":
            start = time.perf_counter()
            preflight(job)
            preflight_s = time.perf_counter() - start
        register_datasets(None, datasets)
        cfg = build_cfg(job)
        default_setup(cfg, argparse_namespace(job))
        trainer = cls(cfg)
        trainer.resume_or_load(resume=False)
        trainers[side] = trainer
    return trainers, preflight_s


def alternate_iterations(trainers: dict, iters: int) -> dict:
    """Seconds of each trainer's iterations (hooks included), the two trainers taking turns."""
    from detectron2.utils.events import EventStorage

    times = {side: [] for side in trainers}
    for trainer in trainers.values():
        trainer.iter = trainer.start_iter = 0
        trainer.storage = EventStorage(0)
        with trainer.storage:
            trainer.before_train()
    sides = list(trainers)
    for i in range(iters):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            trainer = trainers[side]
            trainer.iter = i
            with trainer.storage:
                start = time.perf_counter()
                trainer.before_step()
                trainer.run_step()
                trainer.after_step()
                times[side].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=40, help="iterations of each trainer (the mini config's 40)")
    parser.add_argument("--amp", action="store_true", help="time SOLVER.AMP.ENABLED against fp32, both our trainer")
    args = parser.parse_args(argv)
    import torch
    import torchvision

    from convert.command import convert_checkpoint
    from detection.cpu_amp import training_precision
    from simsiam_transfer.synthetic import make_synthetic

    record = {"benchmark": "finetune_amp" if args.amp else "finetune", "machine": machine(), "config": CONFIG,
              "iters": args.iters,
              "warmup_iters_excluded": WARMUP_ITERS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_synthetic(work / "data", num_unlabeled=8, labeled_per_class=(2, 1))
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), work / "r18.pth")
        convert_checkpoint(work / "r18.pth", work / "r18.pkl")
        trainers, preflight_s = build_trainers(str(work / "r18.pkl"), str(data / "datasets.yaml"), work, args.iters,
                                               args.amp)
        times = alternate_iterations(trainers, args.iters)
        precision = training_precision(trainers["ours"].cfg)
    ours, plain = times["ours"][WARMUP_ITERS:], times["plain"][WARMUP_ITERS:]
    ratios = [o / p for o, p in zip(ours, plain)]
    if args.amp:
        record.update({
            "precision": precision,
            "s_per_iter": {"fp32": round(statistics.median(plain), 3), "amp": round(statistics.median(ours), 3)},
            "speedup": round(statistics.median(p / o for o, p in zip(ours, plain)), 3),
            "speedup_of_sums": round(sum(plain) / sum(ours), 3),
        })
        emit(record)
        return
    record.update({
        "s_per_iter": {"ours": round(statistics.median(ours), 3), "plain": round(statistics.median(plain), 3)},
        "overhead": round(statistics.median(ratios) - 1, 4),
        "overhead_of_sums": round(sum(ours) / sum(plain) - 1, 4),
        "preflight_s": round(preflight_s, 2),
        "target_overhead": 0.02,
    })
    emit(record)


if __name__ == "__main__":
    main()
