"""Config-file plumbing shared by every stage: locate configs, merge files and KEY VALUE overrides."""

from pathlib import Path

from simsiam_transfer.errors import UserError

_CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# pyproject maps configs/ to the package data folder simsiam_transfer/configs in a wheel.
_INSTALLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_root():
    """``configs/`` of a checkout, or the copy installed as package data by ``pip install .``."""
    return _CHECKOUT_CONFIGS if _CHECKOUT_CONFIGS.is_dir() else _INSTALLED_CONFIGS


def resolve_config(name):
    """A path as given, else a path relative to the shipped configs (``detection/voc07_mini.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = config_root() / name
    if shipped.is_file():
        return shipped
    raise UserError(f"config file not found: {name} (neither a file nor under {config_root()})")


def _key_error_text(exc):
    return exc.args[0] if exc.args else str(exc)


def merge_config(cfg, config_file=None, overrides=()):
    """Merge a YAML file then ``KEY VALUE`` overrides into a yacs/fvcore CfgNode, with clear errors."""
    if config_file:
        path = resolve_config(config_file)
        try:
            cfg.merge_from_file(str(path))
        except KeyError as exc:
            raise UserError(f"{path}: {_key_error_text(exc)}; remove or rename that key") from None
        except (ValueError, AssertionError) as exc:
            raise UserError(f"{path}: {exc}") from None
        except Exception as exc:  # YAML syntax errors come from several libraries
            if type(exc).__name__.endswith(("YAMLError", "ScannerError", "ParserError")):
                raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
            raise
    overrides = list(overrides)
    if len(overrides) % 2:
        raise UserError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(overrides)}")
    for key, value in zip(overrides[0::2], overrides[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except KeyError as exc:
            raise UserError(f"override {key}: {_key_error_text(exc)}; check the key's spelling") from None
        except (ValueError, AssertionError) as exc:
            raise UserError(f"override {key} {value}: {exc}") from None
    return cfg
