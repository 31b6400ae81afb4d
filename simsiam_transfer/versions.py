"""Library versions and the detectron2 flavour, recorded with every result."""

import importlib.metadata
import platform


def detectron2_info():
    """Return ``{"version", "origin", "compiled_ops", "path"}``; origin is upstream/fallback/missing."""
    try:
        import detectron2
    except ImportError as exc:
        return {"version": None, "origin": "missing", "compiled_ops": False, "error": str(exc)}
    try:
        from detectron2 import _C
    except ImportError:
        _C = None
    fallback = _C is not None and getattr(_C, "__dict__", {}).get("IS_SIMSIAM_TRANSFER_FALLBACK", False)
    try:
        dist = "pb1-detectron2" if fallback else "detectron2"
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    return {
        "version": detectron2.__version__,
        "origin": "fallback" if fallback else "upstream",
        "compiled_ops": _C is not None and not fallback,
        "path": detectron2.__path__[0],
        "distribution": dist,
    }


def compiled_ops_available():
    return detectron2_info()["compiled_ops"]


def library_versions():
    """Versions that decide whether two results are comparable."""
    import torch
    import torchvision

    from simsiam_transfer import __version__

    d2 = detectron2_info()
    return {
        "simsiam_transfer": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "detectron2": d2["version"],
        "detectron2_origin": d2["origin"],
    }
