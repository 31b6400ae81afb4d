"""Learning-rate schedule of the official recipe: linear scaling, cosine per epoch, optional warmup."""

import math


def initial_lr(base_lr, total_batch):
    """lr = base_lr x batch / 256 (linear scaling rule)."""
    return base_lr * total_batch / 256


def lr_at_epoch(init_lr, epoch, epochs, warmup_epochs=0):
    """lr for 0-based ``epoch``, set once at the epoch's start (as the official code does).

    Warmup (Table 2's large batches): linear over ``warmup_epochs``, then cosine over the rest.
    """
    if epoch < warmup_epochs:
        return init_lr * (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer, lr, init_lr):
    """Set every group's lr; groups flagged ``fix_lr`` (the predictor, Table 1c) keep ``init_lr``."""
    for group in optimizer.param_groups:
        group["lr"] = init_lr if group.get("fix_lr") else lr
