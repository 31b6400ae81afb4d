"""Pretraining checkpoints: atomic writes, resume state, and the format the converter reads.

``checkpoint_last.pth`` (every epoch) and ``checkpoint_NNNN.pth`` (every SOLVER.CHECKPOINT_PERIOD
epochs and the last; NNNN = epochs completed) hold a dict:

    format       "simsiam-transfer/pretrain-v1"
    state_dict   model weights: backbone ``encoder.{conv1,bn1,layer1-4}.*``, projector
                 ``encoder.fc.*``, predictor ``predictor.*`` (no DDP ``module.`` prefix)
    optimizer    SGD state (param groups carry ``fix_lr``)
    epoch        epochs completed (= the 0-based index of the next epoch)
    config       the full resolved config (YAML text)
    versions     torch / torchvision / ... versions
    history      the per-epoch metrics records (metrics.jsonl is rewritten from it on resume)
    rng          per rank: torch / CUDA (the rank's own device only) / numpy / python RNG states,
                 so a resumed run continues the stream
    scaler       GradScaler state ({} when fp16 AMP was off: skipped on load)
    targets      the Sec. 5.2 moving-average memory {"memory": images x d} (or None)

All of it loads with ``torch.load(..., weights_only=True)``.
"""

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsiam_transfer import atomic
from simsiam_transfer.checkpoints import describe_load_error
from simsiam_transfer.errors import UserError
from simsiam_transfer.versions import library_versions
from simsiam_transfer.yaml_files import parse_yaml

FORMAT = "simsiam-transfer/pretrain-v1"
LAST = "checkpoint_last.pth"


def numbered_name(epochs_done):
    return f"checkpoint_{epochs_done:04d}.pth"


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


def build_payload(model, optimizer, scaler, targets, epoch: int, config_text: str, history: list,
                  rng: list) -> dict:
    """The checkpoint dict in the format documented above (model without any DDP wrapper)."""
    return {
        # contiguous: the file does not depend on the training memory format (channels_last)
        "format": FORMAT, "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
        "epoch": epoch, "config": config_text, "versions": library_versions(), "history": list(history),
        "rng": rng, "scaler": scaler.state_dict(),
        "targets": targets.state_dict() if targets is not None else None,
    }


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


def load(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: unreadable checkpoint ({describe_load_error(exc)}); move it away "
                        "to resume from an earlier numbered checkpoint, or use a new OUTPUT_DIR") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a simsiam-transfer pretraining checkpoint; use a new OUTPUT_DIR")
    return ckpt


def model_settings_changed(saved_config_text, cfg):
    """MODEL.* keys whose value differs between a checkpoint's config and ``cfg``."""
    doc = parse_yaml(str(saved_config_text), "the resume checkpoint's config")
    saved = doc.get("MODEL") if isinstance(doc, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    return sorted(f"MODEL.{k}: {saved.get(k)!r} -> {v!r}" for k, v in cfg.MODEL.items() if saved.get(k) != v)
