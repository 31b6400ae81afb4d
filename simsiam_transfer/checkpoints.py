"""Safe checkpoint reading for every stage: torch checkpoints and detectron2 pickles, loaded without
executing code, their layout recognised, and a torchvision-named ResNet extracted.

Layouts (auto-detected by key names; ``--source`` forces one):

===================  ===========================  =========================================
source               backbone prefix              dropped groups
===================  ===========================  =========================================
simsiam-transfer     ``encoder.`` (+ our keys)    projector ``encoder.fc.*``, ``predictor.*``
simsiam              ``module.encoder.``          projector ``module.encoder.fc.*``, predictor
moco                 ``module.encoder_q.``        ``encoder_q.fc.*`` head, key encoder, queue
byol                 ``backbone.``                projector, predictor, momentum nets, classifier
torchvision          (none)                       classifier ``fc.*``
===================  ===========================  =========================================
"""

import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import DEPTH_OF_LAYOUT

# torch is imported inside the functions that use it: the CLI reads SOURCES while building its parser.

SOURCES = {
    "simsiam-transfer": "encoder.",
    "simsiam": "module.encoder.",
    "moco": "module.encoder_q.",
    "byol": "backbone.",
    "torchvision": "",
}
_BACKBONE_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")
_PROBE_KEYS = ("conv1.weight", "layer1.0.conv1.weight")


def load_checkpoint(path):
    """``torch.load(weights_only=True)`` with a clear error for anything that is not a safe checkpoint."""
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of any non-zip file; the error below says what matters.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a checkpoint file") from None
    except Exception as exc:  # torch raises many types for truncated/foreign/unsafe files
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({describe_load_error(exc, path)})") from None
    return obj


def describe_load_error(exc, path=None):
    """One line for a failed ``torch.load``: the refused class of an unsafe pickle, what a plain pickle
    holds (read without running it), else the first line of torch's error."""
    text = str(exc)
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if refused:
        return f"unsafe pickle, refused by weights_only loading: it would build {refused.group(1)}"
    if path is not None:
        described = describe_plain_pickle(path)
        if described:
            return described
    detail = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", text, re.S)
    if detail:
        return f"refused by weights_only loading: {' '.join(detail.group(1).split())}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"truncated or foreign file: {first}"


def state_dict_of(obj, path):
    """The tensor dict inside a checkpoint: ``state_dict``, ``model``, or the object itself."""
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: no state dict found (expected a dict of tensors, or one under "
                        "'state_dict' / 'model')")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: the state dict holds no tensors")
    return tensors


def candidate_sources(state_dict, checkpoint):
    """Every source whose prefix holds a ResNet stem and first block."""
    found = []
    for name, prefix in SOURCES.items():
        if all(prefix + k in state_dict for k in _PROBE_KEYS):
            found.append(name)
    if "simsiam-transfer" in found and not (isinstance(checkpoint, dict) and "versions" in checkpoint):
        found.remove("simsiam-transfer")
    if "simsiam-transfer" in found and "simsiam" in found:
        found.remove("simsiam")
    return found


def detect_source(state_dict, checkpoint, path):
    found = candidate_sources(state_dict, checkpoint)
    if not found:
        sample = ", ".join(sorted(state_dict)[:4])
        raise UserError(f"{path}: no ResNet backbone found (looked for conv1.weight and layer1.0.conv1.weight "
                        f"under prefixes {[p or '(none)' for p in SOURCES.values()]}; keys start: {sample})")
    if len(found) > 1:
        raise UserError(f"{path}: ambiguous layout, matches sources {found}; pick one with --source")
    return found[0]


def split_backbone(state_dict, source):
    """(torchvision-named backbone tensors, {dropped group: tensor count})."""
    prefix = SOURCES[source]
    backbone, dropped = {}, {}
    for key, value in state_dict.items():
        inner = key[len(prefix):] if key.startswith(prefix) else None
        if inner is not None and _BACKBONE_KEY.match(inner):
            if inner.endswith("num_batches_tracked"):
                dropped["backbone BN counters"] = dropped.get("backbone BN counters", 0) + 1
            else:
                backbone[inner] = value
            continue
        group = _group_name(key, prefix)
        dropped[group] = dropped.get(group, 0) + 1
    return backbone, dropped


def _group_name(key, prefix):
    if key.startswith(prefix) and key[len(prefix):].startswith("fc."):
        return "classifier (fc)" if prefix == "" else "projector (fc)"
    head = key.split(".")[1 if key.startswith("module.") else 0]
    return {"predictor": "predictor", "projector": "projector", "encoder_k": "momentum encoder",
            "queue": "queue", "queue_ptr": "queue", "classifier": "classifier"}.get(
        head, "momentum encoder" if "momentum" in head else head)


def resnet_layout(backbone, path):
    """Infer (depth, block type) and check the stem, or refuse with what is wrong."""
    stem = backbone.get("conv1.weight")
    if stem is None or tuple(stem.shape) != (64, 3, 7, 7):
        shape = None if stem is None else tuple(stem.shape)
        raise UserError(f"{path}: conv1.weight has shape {shape}, not the ImageNet stem (64, 3, 7, 7); "
                        "detectron2's C4 backbone needs the 7x7 stride-2 stem")
    block = "bottleneck" if "layer1.0.conv3.weight" in backbone else "basic"
    counts = []
    for stage in range(1, 5):
        idx = {int(k.split(".")[1]) for k in backbone if k.startswith(f"layer{stage}.")}
        if not idx:
            raise UserError(f"{path}: backbone has no layer{stage} blocks; is this a truncated ResNet?")
        if idx != set(range(max(idx) + 1)):
            raise UserError(f"{path}: layer{stage} is missing block(s) {sorted(set(range(max(idx) + 1)) - idx)}")
        counts.append(max(idx) + 1)
    depth = DEPTH_OF_LAYOUT.get((block, tuple(counts)))
    if depth is None:
        # Blocks cut off the end of a stage: name the nearest ResNet that has them all.
        larger = sorted((sum(c), d, c) for (b, c), d in DEPTH_OF_LAYOUT.items()
                        if b == block and all(n <= m for n, m in zip(counts, c)))
        if larger:
            _, nearest, needed = larger[0]
            short = [f"layer{i + 1} has {n} of {m}" for i, (n, m) in enumerate(zip(counts, needed)) if n < m]
            raise UserError(f"{path}: missing blocks for ResNet-{nearest}: {', '.join(short)}; "
                            "the checkpoint is truncated or not a standard ResNet")
        known = ", ".join(f"ResNet-{d} {b} {list(c)}" for (b, c), d in DEPTH_OF_LAYOUT.items())
        raise UserError(f"{path}: {block} blocks per stage {counts} match no supported ResNet ({known})")
    return depth, block


def torchvision_resnet(depth):
    import torchvision

    return getattr(torchvision.models, f"resnet{depth}")(weights=None)


def reference_shapes(depth):
    """name -> shape of torchvision's ResNet-<depth>, built on the meta device (no memory, no random
    init: about half of a ``--no-verify`` R50 conversion was spent initialising a real one)."""
    import torch

    try:
        with torch.device("meta"):  # a context manager from torch 2.0
            model = torchvision_resnet(depth)
    except (AttributeError, TypeError):
        model = torchvision_resnet(depth)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_complete(backbone, depth, path):
    """Every torchvision ResNet-<depth> tensor (fc aside) must be present with its shape."""
    reference = {k: v for k, v in reference_shapes(depth).items()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing = sorted(set(reference) - set(backbone))
    if missing:
        raise UserError(f"{path}: ResNet-{depth} backbone lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    wrong = [k for k in reference if tuple(backbone[k].shape) != tuple(reference[k])]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: {k} has shape {tuple(backbone[k].shape)}, ResNet-{depth} needs "
                        f"{tuple(reference[k])} ({len(wrong)} mismatched)")
    extra = sorted(set(backbone) - set(reference))
    if extra:
        raise UserError(f"{path}: unexpected backbone tensor(s) {extra[:3]}; not a standard torchvision ResNet")


def extract_backbone(path, source="auto"):
    """Return ``(backbone, info)``: torchvision-named tensors and what was found and dropped."""
    import torch

    checkpoint = load_checkpoint(path)
    state_dict = state_dict_of(checkpoint, path)
    if source == "auto":
        source = detect_source(state_dict, checkpoint, path)
    elif not all(SOURCES[source] + k in state_dict for k in _PROBE_KEYS):
        raise UserError(f"{path}: --source {source} expects keys under {SOURCES[source]!r}, found none; "
                        f"detected candidates: {candidate_sources(state_dict, checkpoint) or 'none'}")
    backbone, dropped = split_backbone(state_dict, source)
    bad = [k for k, v in backbone.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: {len(bad)} backbone tensor(s) hold NaN/inf, first {bad[0]}; the run that "
                        "wrote it diverged: use an earlier checkpoint")
    depth, block = resnet_layout(backbone, path)
    check_complete(backbone, depth, path)
    backbone = {k: v.float() if v.is_floating_point() else v for k, v in backbone.items()}
    return backbone, {"source": source, "depth": depth, "block": block, "dropped": dropped,
                      "training": training_record(checkpoint)}


def training_record(checkpoint) -> Optional[dict]:
    """This project's pretraining checkpoints carry per-epoch ``history`` (loss, z_std, lr, steps) and
    their config: the projector dim d, the weight decay and momentum, and whether the residual
    branches' last BN started at zero (None where the config does not say)."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("history"), list):
        return None
    from simsiam_transfer.yaml_files import parse_yaml

    record = {"history": checkpoint["history"], "dim": 0, "weight_decay": 0.0, "momentum": 0.0,
              "zero_init_residual": None}
    try:
        cfg = parse_yaml(str(checkpoint.get("config") or ""), "the checkpoint's config")
        record["dim"] = int(cfg.get("MODEL", {}).get("DIM", 0))
        record["weight_decay"] = float(cfg.get("SOLVER", {}).get("WEIGHT_DECAY", 0.0))
        record["momentum"] = float(cfg.get("SOLVER", {}).get("MOMENTUM", 0.0))
        zero_init = cfg.get("MODEL", {}).get("ZERO_INIT_RESIDUAL")
        record["zero_init_residual"] = zero_init if isinstance(zero_init, bool) else None
    except (UserError, AttributeError, TypeError, ValueError):
        pass
    return record



def conversion_report_path(weights) -> Path:
    """``convert`` writes its report beside the weights file: ``OUTPUT.report.json``."""
    return Path(f"{weights}.report.json")


def conversion_warnings(weights) -> list:
    """The converter's warnings about ``weights`` (near-identity blocks, a pretraining that did not
    learn or collapsed), read from its report; [] when there is no report or nothing was wrong."""
    path = conversion_report_path(weights)
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return [f"{path}: unreadable conversion report; convert the checkpoint again to check it"]
    advice = (report.get("pretraining_check") or {}).get("advice")
    return [f"{Path(weights).name}: {w}" + (f"; {advice}" if advice else "") for w in report.get("warnings", [])]


# -- detectron2 pickles: an unpickler that only rebuilds numpy arrays and plain containers ------------
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _Refused(pickle.UnpicklingError):
    def __init__(self, name):
        super().__init__(f"refusing to load {name}")
        self.name = name


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_detectron2_pkl(path):
    """Return the ``model`` dict of a detectron2 .pkl, refusing anything but arrays."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except _Refused as exc:
        raise UserError(f"{path}: not a detectron2 weights file of plain arrays ({exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"{path}: truncated or corrupt pickle ({type(exc).__name__}); convert it again") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not model:
        raise UserError(f"{path}: no 'model' weights dict; produce it with `simsiam-transfer convert`")
    bad = [k for k, v in model.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise UserError(f"{path}: entries that are not arrays, e.g. {bad[0]!r}")
    bad = [k for k, v in model.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: {len(bad)} array(s) hold NaN/inf, first {bad[0]!r}; convert a checkpoint "
                        "from before the pretraining diverged")
    return data


def describe_plain_pickle(path):
    """What a plain pickle (not torch's zip format) holds, read without running it; None otherwise."""
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # pickle protocol 2+ opcode; anything else is not ours to describe
                return None
            f.seek(0)
            data = _ArraysOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except _Refused as exc:
        return f"a pickle that would build {exc.name}, refused: loading it could run code"
    except Exception:  # noqa: BLE001 - a file we cannot read this way is described by torch's error
        return None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return ("a detectron2 weights file (already converted); give it to `finetune --weights` or "
                "`bench --weights`, and give `convert` the pretraining checkpoint")
    return None
