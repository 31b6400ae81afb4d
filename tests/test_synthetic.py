"""Generated data: deterministic bytes, textures really taken from the installed scikit-image, valid layouts."""

import hashlib
import json

import numpy as np
import pytest

from conftest import cli_main
from simsiam_transfer.errors import UserError
from simsiam_transfer.synthetic import CLASS_TEXTURES, CLASSES, make_synthetic, texture_sources


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _small(out, workers):
    return make_synthetic(out, seed=3, num_train=10, num_test=6, num_unlabeled=40, image_size=64,
                          labeled_per_class=(4, 2), workers=workers)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path, synthetic):
    one, two = _small(tmp_path / "a", workers=1), _small(tmp_path / "b", workers=2)
    digest = _digest(one)
    assert len(digest) > 80 and digest == _digest(two)
    assert _digest(_small(tmp_path / "c", workers=1)) == digest
    other = make_synthetic(tmp_path / "d", seed=4, num_train=10, num_test=6, num_unlabeled=40, image_size=64,
                           labeled_per_class=(4, 2), workers=1)
    assert _digest(other) != digest


def test_textures_come_from_the_installed_scikit_image():
    from skimage import data

    sources = texture_sources()
    for cls in CLASSES:
        name = CLASS_TEXTURES[cls]
        assert np.array_equal(sources[name], getattr(data, name)())
    assert len(set(CLASS_TEXTURES.values())) == len(CLASSES)  # each class its own surface
    assert any(a.ndim == 3 for a in sources.values())  # colour photographs among the scenes


def test_layouts_pass_data_check(synthetic):
    assert cli_main("data", "check", "--voc", synthetic / "VOCdevkit/VOC2007", "--classes", ",".join(CLASSES)) == 0
    for split in ("train", "val"):
        assert cli_main("data", "check", "--coco", synthetic / f"coco/annotations/instances_{split}.json",
                        "--image-root", synthetic / f"coco/{split}") == 0
    doc = json.loads((synthetic / "coco/annotations/instances_train.json").read_text())
    assert len(doc["images"]) == 24 and {a["category_id"] for a in doc["annotations"]} <= {1, 2, 3}
    labeled = sorted(p.parent.name for p in (synthetic / "labeled/train").rglob("*.jpg"))
    assert labeled == sorted(list(CLASSES) * 12)
    assert len(list((synthetic / "unlabeled").glob("*.jpg"))) == 96


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_of_the_users_is_never_replaced(tmp_path, capsys):
    """Only a folder the generator marked as its own is replaced; anything else is refused untouched."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2,3")
    before = _tree(mine)
    assert cli_main("data", "make-synthetic", "--out", mine, "--num-unlabeled", 4) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not write" in err[0] and str(mine) in err[0]
    assert _tree(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp left

    generated = _small(tmp_path / "gen", workers=1)
    assert _small(generated, workers=1) == generated  # a generated folder is replaced as a whole
    (generated / "VOCdevkit" / "notes.txt").write_text("my notes")  # the user added a file into it
    with pytest.raises(UserError, match=r"VOCdevkit/notes\.txt \(1 file\(s\) in all\) was not written"):
        _small(generated, workers=1)
    assert (generated / "VOCdevkit" / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0"], "--image-size 0: use an integer from 16 to 2048"),
    (["--image-size", "100000"], "--image-size 100000: use an integer from 16 to 2048"),
    (["--num-train", "-3"], "--num-train -3: use an integer >= 1"),
])
def test_impossible_sizes_are_one_line(tmp_path, capsys, args, message):
    assert cli_main("data", "make-synthetic", "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert cli_main("data", "make-synthetic", "--out", target) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {target}: is an existing file; give a folder path"
    assert target.read_text() == "keep me"


def test_the_catalog_is_rendered_from_its_one_schema(tmp_path):
    from simsiam_transfer.catalog import CATALOG_SCHEMA, load_catalog, write_catalog
    from simsiam_transfer.synthetic import write_catalog as write_generated_catalog

    specs = load_catalog(write_generated_catalog(tmp_path))
    assert {s["format"] for s in specs.values()} == set(CATALOG_SCHEMA)
    for spec in specs.values():
        assert set(spec) - {"format"} <= set(CATALOG_SCHEMA[spec["format"]])
    with pytest.raises(ValueError, match="does not follow CATALOG_SCHEMA"):
        write_catalog(tmp_path / "bad.yaml", {"x": {"format": "coco", "json": "a.json"}})  # image_root missing
    assert not (tmp_path / "bad.yaml").exists()
