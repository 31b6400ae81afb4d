"""The dependency rule the layout shows: stages meet only through files.

    simsiam_transfer.cli, simsiam_transfer.pipeline   the top: may import anything
    pretrain/   convert/   detection/                 stages: the floor, and only themselves
    simsiam_transfer.* (the rest)                     the floor: imports no stage and not the top
"""

import ast
from pathlib import Path

import pytest

from conftest import REPO

STAGES = ("pretrain", "convert", "detection")
TOP = ("simsiam_transfer.cli", "simsiam_transfer.pipeline")
# Modules that install or diagnose the environment and never run a stage's code at import.
FLOOR = "simsiam_transfer"


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path):
    """Every module an import statement in ``path`` names (module level and inside functions)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def forbidden(importer: str, imported: str) -> bool:
    top = imported.split(".")[0]
    if top not in STAGES + (FLOOR,):
        return False  # third-party or stdlib
    if any(importer == t or importer.startswith(t + ".") for t in TOP):
        return False
    if any(imported == t or imported.startswith(t + ".") for t in TOP):
        return True  # nothing below the top imports the CLI or the pipeline
    own = importer.split(".")[0]
    if own == FLOOR:
        return top in STAGES  # the floor imports no stage
    return top in STAGES and top != own  # a stage imports the floor and itself only


def violations(root: Path = REPO):
    found = []
    for package in STAGES + (FLOOR,):
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(path) if root == REPO else ".".join(path.relative_to(root).with_suffix("").parts)
            for imported, line in imported_modules(path):
                if forbidden(importer, imported):
                    found.append(f"{path.relative_to(root)}:{line}: {importer} imports {imported}")
    return found


def test_stages_meet_only_through_files():
    assert violations() == []


@pytest.mark.parametrize("importer, imported, bad", [
    ("pretrain.checkpoint", "convert.sources", True),
    ("convert.verify", "detection.heads", True),
    ("detection.finetune", "convert.verify", True),
    ("detection.bench", "simsiam_transfer.cli", True),
    ("simsiam_transfer.checkpoints", "pretrain.model", True),
    ("pretrain.engine", "simsiam_transfer.pipeline", True),
    ("pretrain.engine", "pretrain.model", False),
    ("convert.command", "simsiam_transfer.checkpoints", False),
    ("simsiam_transfer.pipeline", "detection.bench", False),
    ("simsiam_transfer.cli", "pretrain.engine", False),
    ("detection.bench", "torch", False),
])
def test_the_rule_itself(importer, imported, bad):
    assert forbidden(importer, imported) is bad


def test_a_planted_forbidden_import_is_caught(tmp_path):
    for package in STAGES + (FLOOR,):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "engine.py").write_text("def f():\n    from detection.bench import Bench\n")
    (tmp_path / "convert" / "ok.py").write_text("from simsiam_transfer.errors import UserError\n")
    assert violations(tmp_path) == ["pretrain/engine.py:2: pretrain.engine imports detection.bench"]
