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
    rng          torch / CUDA / numpy / python RNG states, so a resumed run continues the stream
    scaler, targets   AMP scaler state; the Sec. 5.2 moving-average memory (or None)

All of it loads with ``torch.load(..., weights_only=True)``.
"""

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

FORMAT = "simsiam-transfer/pretrain-v1"
LAST = "checkpoint_last.pth"


def numbered_name(epochs_done):
    return f"checkpoint_{epochs_done:04d}.pth"


def rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def save(out_dir, payload, numbered):
    """Write ``checkpoint_last.pth`` atomically, then copy it to the numbered name if asked."""
    out_dir = Path(out_dir)
    last = out_dir / LAST
    atomic.torch_save(payload, last)
    if numbered:
        with atomic.atomic_path(out_dir / numbered_name(payload["epoch"])) as tmp:
            shutil.copyfile(last, tmp)
    return last


def load(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        from convert.sources import describe_load_error

        raise UserError(f"{path}: unreadable checkpoint ({describe_load_error(exc)}); move it away "
                        "to resume from an earlier numbered checkpoint, or use a new OUTPUT_DIR") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a simsiam-transfer pretraining checkpoint; use a new OUTPUT_DIR")
    return ckpt


def model_settings_changed(saved_config_text, cfg):
    """MODEL.* keys whose value differs between a checkpoint's config and ``cfg``."""
    import yaml

    saved = yaml.safe_load(saved_config_text).get("MODEL", {})
    return sorted(f"MODEL.{k}: {saved.get(k)!r} -> {v!r}" for k, v in cfg.MODEL.items() if saved.get(k) != v)
