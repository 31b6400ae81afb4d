"""Resuming pretraining from its checkpoints: RNG streams of every rank, restoring live objects, and
the atomic writes. The checkpoint format itself (writer and readers) is the floor's
``simsiam_transfer.pretrain_format``, which the converter reads too.
"""

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsiam_transfer import atomic
from simsiam_transfer.pretrain_format import (FORMAT, LAST, build_payload, load, model_settings_changed,
                                              numbered_name)

__all__ = ["FORMAT", "LAST", "build_payload", "load", "model_settings_changed", "numbered_name", "rng_state",
           "set_rng_state", "cuda_state_for_device", "restore", "save"]


def rng_state() -> dict:
    """This process's RNG streams; CUDA only for the current device, so a resume on a node with
    fewer visible GPUs still fits."""
    np_state: Any = np.random.get_state()  # the legacy 5-tuple (the default)
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = cuda_state_for_device(state["cuda"], torch.cuda.current_device() if torch.cuda.is_available() else None)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def cuda_state_for_device(saved: list, device_index):
    """The saved CUDA state to restore, or None (no GPU now, or none saved).

    One entry: this format's own device state. Several (older checkpoints stored every visible
    GPU): the current device's entry if it exists, else none, never an IndexError.
    """
    if device_index is None or not saved:
        return None
    if len(saved) == 1:
        return saved[0]
    return saved[device_index] if device_index < len(saved) else None


def restore(ckpt: dict, model, optimizer, scaler, targets, rank: int) -> None:
    """Load a checkpoint's training state into live objects (resume)."""
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():  # empty when written with fp16 AMP off
        scaler.load_state_dict(ckpt["scaler"])
    if targets is not None and ckpt.get("targets"):
        targets.load_state_dict(ckpt["targets"])
    if rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][rank])


def save(out_dir, payload, numbered):
    """Write ``checkpoint_last.pth`` atomically, then copy it to the numbered name if asked."""
    out_dir = Path(out_dir)
    last = out_dir / LAST
    atomic.torch_save(payload, last)
    if numbered:
        with atomic.atomic_path(out_dir / numbered_name(payload["epoch"]), last.stat().st_size) as tmp:
            shutil.copyfile(last, tmp)
    return last
