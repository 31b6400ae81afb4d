"""Install path, doctor, packaging and the generated datasets."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from conftest import REPO, cli_main, run_cli
from simsiam_transfer import install_detectron2 as inst
from simsiam_transfer.versions import detectron2_info


def test_doctor_reports_detectron2_origin_and_compiled_ops():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    info = detectron2_info()
    assert info["origin"] in ("upstream", "fallback")
    assert "detectron2 origin" in proc.stdout and "compiled ops" in proc.stdout
    expected = "offline fallback" if info["origin"] == "fallback" else "upstream build"
    assert expected in proc.stdout


def test_detectron2_model_stack_imports():
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401
    # model_zoo imports pkg_resources, which setuptools 81 removed: the set-up must keep it < 81
    # although torch's own requirement (setuptools >= 77.0.3) would upgrade it past that.
    import detectron2.model_zoo  # noqa: F401


@pytest.mark.skipif(detectron2_info()["origin"] != "fallback", reason="only the fallback lacks compiled ops")
def test_fallback_compiled_ops_fail_with_one_clear_error():
    import torch
    from detectron2 import _C
    from detectron2.layers import nms_rotated

    with pytest.raises(RuntimeError, match=r"deformable convolution .* needs detectron2's compiled extension"):
        _C.deform_conv_forward(torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"rotated-box NMS"):
        nms_rotated(torch.zeros(2, 5), torch.zeros(2), 0.5)
    from detectron2.evaluation.fast_eval_api import COCOeval_opt  # noqa: F401  (import must still work)


def _fake_fallback_tree(root):
    files = {
        "setup.py": "setup(\n    ext_modules=get_extensions(),\n)\n",
        "detectron2/data/transforms/transform.py": "def f(interp=Image.LINEAR, fill=0): pass\n",
        "detectron2/data/datasets/pascal_voc.py": "ids = np.loadtxt(f, dtype=np.str)\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_fallback_patches_apply_exactly_once_and_add_the_shim(tmp_path):
    _fake_fallback_tree(tmp_path)
    inst.prepare_fallback_tree(tmp_path)
    assert "ext_modules=[]," in (tmp_path / "setup.py").read_text()
    assert "Image.BILINEAR" in (tmp_path / "detectron2/data/transforms/transform.py").read_text()
    assert "dtype=str)" in (tmp_path / "detectron2/data/datasets/pascal_voc.py").read_text()
    assert "IS_SIMSIAM_TRANSFER_FALLBACK" in (tmp_path / "detectron2/_C.py").read_text()
    with pytest.raises(inst.InstallError, match="expected exactly one"):
        inst.prepare_fallback_tree(tmp_path)  # already patched: the patterns are gone


def test_fallback_refuses_a_tree_with_cpp_sources(tmp_path):
    _fake_fallback_tree(tmp_path)
    (tmp_path / "detectron2/layers/csrc").mkdir(parents=True)
    with pytest.raises(inst.InstallError, match="has C.. sources"):
        inst.prepare_fallback_tree(tmp_path)


def test_installer_keeps_an_importable_detectron2():
    proc = subprocess.run([sys.executable, "-m", "simsiam_transfer.install_detectron2"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already importable; keeping it" in proc.stdout


def test_wheel_ships_configs_as_package_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("simsiam_transfer-*.whl"))).namelist()
    for rel in ("detection/Base-RCNN-C4-BN.yaml", "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc07.yaml",
                "pretrain/simsiam_R_18_mini.yaml", "pipeline/mini.yaml"):
        assert f"simsiam_transfer/configs/{rel}" in names
    assert "simsiam_transfer/c4.py" in names and "pretrain/engine.py" in names and "convert/verify.py" in names
    # A non-editable install (no checkout beside it) finds the shipped configs.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(next(tmp_path.glob("simsiam_transfer-*.whl")))], check=True, capture_output=True)
    code = ("from simsiam_transfer.config import resolve_config; "
            "print(resolve_config('detection/Base-RCNN-C4-BN.yaml'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert out.strip() == str(target / "simsiam_transfer/configs/detection/Base-RCNN-C4-BN.yaml")


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_make_synthetic_is_deterministic_and_uses_real_layouts(tmp_path):
    args = ["--seed", "3", "--num-train", "6", "--num-test", "4", "--num-unlabeled", "5", "--image-size", "64"]
    for name in ("a", "b"):
        assert cli_main("data", "make-synthetic", "--out", tmp_path / name, *args) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert cli_main("data", "make-synthetic", "--out", tmp_path / "c", *args[:1], "4", *args[2:]) == 0
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")

    voc = tmp_path / "a/VOCdevkit/VOC2007"
    trainval = (voc / "ImageSets/Main/trainval.txt").read_text().split()
    assert len(trainval) == 6 and len((voc / "ImageSets/Main/test.txt").read_text().split()) == 4
    xml = ET.parse(voc / "Annotations" / f"{trainval[0]}.xml")
    objects = xml.findall("object")
    assert objects and all(o.find("difficult").text in ("0", "1") for o in objects)
    assert (voc / "JPEGImages" / f"{trainval[0]}.jpg").is_file()

    coco = json.loads((tmp_path / "a/coco/annotations/instances_train.json").read_text())
    assert len(coco["images"]) == 6 and len(coco["categories"]) == 3
    ann = coco["annotations"][0]
    assert len(ann["segmentation"][0]) >= 6 and len(ann["bbox"]) == 4 and ann["area"] > 0
    assert len(list((tmp_path / "a/unlabeled").glob("*.jpg"))) == 5
    assert (tmp_path / "a/datasets.yaml").is_file()


def test_cli_usage_errors_exit_2():
    proc = run_cli("finetune", "--config")
    assert proc.returncode == 2


def test_doctor_exits_1_when_detectron2_does_not_import(tmp_path):
    broken = tmp_path / "detectron2"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    proc = run_cli("doctor", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1
    assert "NOT IMPORTABLE: simulated broken install" in proc.stdout and "install_detectron2" in proc.stderr


def test_fallback_archive_with_another_checksum_is_refused(tmp_path, monkeypatch):
    def fake_pip(*args, timeout=None):
        (tmp_path / inst.FALLBACK_SDIST).write_bytes(b"not the real archive")
        return 0

    monkeypatch.setattr(inst, "_pip", fake_pip)
    with pytest.raises(inst.InstallError, match="is not the pinned"):
        inst.fetch_fallback_sdist(tmp_path)
