"""What a pretraining run produces for its config, and whether it is finished: the stage's own answer,
so a driver (the pipeline) never reads inside the run's files.

``OUTPUT_DIR/checkpoint_last.pth`` is the weights every later stage takes; ``metrics.jsonl`` gains one
line per epoch right after that epoch's checkpoint is written, so its length never overstates what
the checkpoint holds (a run stopped in between is simply resumed: nothing is trained again).
"""

from pathlib import Path

from pretrain.checkpoint import LAST
from simsiam_transfer.atomic import read_jsonl

METRICS = "metrics.jsonl"


def checkpoint_path(cfg) -> Path:
    return Path(cfg.OUTPUT_DIR) / LAST


def epochs_done(cfg) -> int:
    metrics = Path(cfg.OUTPUT_DIR) / METRICS
    if not checkpoint_path(cfg).is_file() or not metrics.is_file():
        return 0
    epochs = [record.get("epoch") for _, record in read_jsonl(metrics)]
    return max((e for e in epochs if isinstance(e, int)), default=0)


def is_done(cfg) -> bool:
    return epochs_done(cfg) >= cfg.SOLVER.EPOCHS
