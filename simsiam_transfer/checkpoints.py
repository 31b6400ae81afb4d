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

import re
import warnings

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
        from simsiam_transfer.d2_weights import describe_plain_pickle  # it reads this module's errors

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
    """Return ``(backbone, info)``: torchvision-named tensors and what was found and dropped, and the
    training record when the file is a pretraining checkpoint of this project."""
    import torch

    from simsiam_transfer.pretrain_format import training_record  # it reads this module's errors

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
