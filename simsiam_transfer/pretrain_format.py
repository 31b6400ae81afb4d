"""The pretraining checkpoint format: its writer and its readers, in the floor so that every stage reads it
the same way (``pretrain`` writes and resumes from it; ``convert`` reads its weights and training record).

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

from typing import Optional

from simsiam_transfer.checkpoints import describe_load_error
from simsiam_transfer.errors import UserError
from simsiam_transfer.versions import library_versions
from simsiam_transfer.yaml_files import parse_yaml

FORMAT = "simsiam-transfer/pretrain-v1"
LAST = "checkpoint_last.pth"


def numbered_name(epochs_done):
    return f"checkpoint_{epochs_done:04d}.pth"


def build_payload(model, optimizer, scaler, targets, epoch: int, config_text: str, history: list,
                  rng: list) -> dict:
    """The checkpoint dict in the format documented above (model without any DDP wrapper)."""
    return {
        # contiguous: the file does not depend on the training memory format (channels_last)
        "format": FORMAT, "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config_text, "versions": library_versions(),
        "history": list(history), "rng": rng, "scaler": scaler.state_dict(),
        "targets": targets.state_dict() if targets is not None else None,
    }


def load(path):
    """A checkpoint of this format for resuming, or one line saying why not."""
    import torch

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
    saved = dict(saved) if isinstance(saved, dict) else {}
    saved.setdefault("METHOD", "simsiam")  # checkpoints from before MODEL.METHOD existed were SimSiam's
    return sorted(f"MODEL.{k}: {saved.get(k)!r} -> {v!r}" for k, v in cfg.MODEL.items() if saved.get(k) != v)


def training_record(checkpoint) -> Optional[dict]:
    """What a checkpoint of this format says about its training: the per-epoch ``history`` (loss, z_std,
    lr, steps) and, from its config, the method (``MODEL.METHOD``), the projector dim d, the weight decay and momentum, and whether the
    residual branches' last BN started at zero (None where the config does not say). None for
    checkpoints of other projects."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("history"), list):
        return None
    record = {"history": checkpoint["history"], "method": "simsiam", "dim": 0, "weight_decay": 0.0,
              "momentum": 0.0, "zero_init_residual": None}
    try:
        cfg = parse_yaml(str(checkpoint.get("config") or ""), "the checkpoint's config")
        record["method"] = str(cfg.get("MODEL", {}).get("METHOD", "simsiam"))  # before methods: SimSiam
        record["dim"] = int(cfg.get("MODEL", {}).get("DIM", 0))
        record["weight_decay"] = float(cfg.get("SOLVER", {}).get("WEIGHT_DECAY", 0.0))
        record["momentum"] = float(cfg.get("SOLVER", {}).get("MOMENTUM", 0.0))
        zero_init = cfg.get("MODEL", {}).get("ZERO_INIT_RESIDUAL")
        record["zero_init_residual"] = zero_init if isinstance(zero_init, bool) else None
    except (UserError, AttributeError, TypeError, ValueError):
        pass
    return record
