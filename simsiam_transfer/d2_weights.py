"""Converted weights: detectron2's pickle format and the conversion report beside it. The writers
(``convert``) and the readers (``detection``, the pipeline, verification) are both here.

    OUTPUT            a pickle ``{"model": {detectron2 name: ndarray}, "__author__", "matching_heuristics"}``,
                      what detectron2's checkpointer loads (``__author__`` keeps its Caffe2 renaming off,
                      ``matching_heuristics`` maps ``res5.*`` onto ``roi_heads.res5.*``)
    OUTPUT.report.json  the converter's report: source layout, depth, dropped groups, verification,
                      residual-BN statistics, the pretraining verdict and its ``warnings``

Reading never runs code: the unpickler rebuilds only numpy arrays and plain containers.
"""

import io
import json
import pickle
from pathlib import Path

import numpy as np

from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

AUTHOR = "simsiam-transfer"


def detectron2_payload(d2_state):
    """The dict detectron2's checkpointer reads, from detectron2-named tensors."""
    return {
        "model": {k: v.detach().cpu().numpy() for k, v in d2_state.items()},
        "__author__": AUTHOR,
        "matching_heuristics": True,
    }


def write_detectron2_pkl(path, payload):
    with atomic.atomic_path(path, atomic.payload_bytes(payload)) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)


def write_conversion_report(weights, report: dict) -> Path:
    path = conversion_report_path(weights)
    atomic.write_json(path, report)
    return path


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


# -- reading detectron2 pickles: an unpickler that only rebuilds numpy arrays and plain containers -----
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
