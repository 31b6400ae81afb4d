"""The import rule the layout shows, by package prefix and without exceptions:

    app                               the roof: the CLI and the pipeline; the only package importing stages
    pretrain/   convert/   detection/ stages: the floor and themselves only
    simsiam_transfer                  the floor: imports no stage and not the roof
"""

import ast
from pathlib import Path

import pytest

from conftest import REPO

FLOOR = "simsiam_transfer"
STAGES = ("pretrain", "convert", "detection")
ROOF = "app"
PACKAGES = (FLOOR, *STAGES, ROOF)


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
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


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top == FLOOR:
        return "floor"
    if top in STAGES:
        return "stage"
    return "roof" if top == ROOF else "outside"


def forbidden(importer: str, imported: str) -> bool:
    """The floor imports no stage and no roof; a stage imports the floor and itself; the roof anything."""
    own, target = layer(importer), layer(imported)
    if target == "outside" or own == "roof":
        return False
    if own == "floor":
        return target != "floor"
    return target == "roof" or (target == "stage" and imported.split(".")[0] != importer.split(".")[0])


def violations(root: Path = REPO):
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(path, root)
            for imported, line in imported_modules(path):
                if forbidden(importer, imported):
                    found.append(f"{path.relative_to(root)}:{line}: {importer} imports {imported}")
    return found


def test_layers_follow_the_import_rule():
    assert violations() == []


def test_the_floor_holds_no_command_line_or_pipeline():
    assert not (REPO / FLOOR / "cli.py").exists() and not (REPO / FLOOR / "pipeline.py").exists()


@pytest.mark.parametrize("importer, imported, bad", [
    ("pretrain.checkpoint", "convert.sources", True),
    ("convert.verify", "detection.heads", True),
    ("detection.finetune", "convert.verify", True),
    ("detection.bench", "app.cli", True),
    ("simsiam_transfer.checkpoints", "pretrain.model", True),
    ("simsiam_transfer.entry", "app.cli", True),
    ("pretrain.engine", "app.pipeline", True),
    ("pretrain.engine", "pretrain.model", False),
    ("convert.command", "simsiam_transfer.checkpoints", False),
    ("app.pipeline", "detection.bench", False),
    ("app.cli", "pretrain.engine", False),
    ("detection.bench", "torch", False),
])
def test_the_rule_itself(importer, imported, bad):
    assert forbidden(importer, imported) is bad


def test_a_planted_forbidden_import_is_caught(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "engine.py").write_text("def f():\n    from detection.bench import Bench\n")
    (tmp_path / "convert" / "ok.py").write_text("from simsiam_transfer.errors import UserError\n")
    (tmp_path / FLOOR / "low.py").write_text("import app.cli\n")
    (tmp_path / ROOF / "top.py").write_text("from pretrain.engine import run_pretrain\n")
    assert violations(tmp_path) == ["simsiam_transfer/low.py:1: simsiam_transfer.low imports app.cli",
                                    "pretrain/engine.py:2: pretrain.engine imports detection.bench"]
