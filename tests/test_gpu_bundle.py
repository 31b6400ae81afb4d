"""The device bundle: every wheel meant for the GPU machine installs on its CPython 3.12 (manylinux
x86-64), the bundle stays under what travels, and it installs offline over the running torch."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from test_gpu_plan import _load

gpu_bundle = _load("gpu_bundle")

PURE = "fvcore-0.1.5.post20221221-py3-none-any.whl"
COCO_312 = "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
COCO_311 = "pycocotools-2.0.11-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"


def test_device_tags_accept_cpython_312_manylinux_wheels_only():
    assert gpu_bundle.wheels_not_for_device([PURE, COCO_312]) == []
    refused = [COCO_311, "numpy-2.5.0-cp313-cp313-manylinux_2_28_x86_64.whl",
               "numpy-2.5.0-cp312-cp312-manylinux_2_34_x86_64.whl",  # newer glibc than torch's 2_28 floor
               "numpy-2.5.0-cp312-cp312-macosx_14_0_arm64.whl", "numpy-2.5.0-cp312-cp312-manylinux_2_28_aarch64.whl"]
    assert gpu_bundle.wheels_not_for_device(refused) == refused


def test_wheel_names_are_parsed_for_the_manifest():
    assert gpu_bundle.parse_wheel_name(COCO_312)[:2] == ("pycocotools", "2.0.11")
    assert gpu_bundle._python_tag(COCO_311) == "3.11" and gpu_bundle._python_tag(PURE) == "any"
    with pytest.raises(gpu_bundle.BundleError, match="not a wheel"):
        gpu_bundle.parse_wheel_name("fvcore.tar.gz")


def test_the_install_sees_no_index_and_no_pip_configuration():
    env = gpu_bundle.offline_pip_env({"PIP_FIND_LINKS": "/opt/wheels", "PIP_EXTRA_INDEX_URL": "x", "HOME": "/root"})
    assert env["PIP_NO_INDEX"] == "1" and env["PIP_CONFIG_FILE"] and "PIP_FIND_LINKS" not in env
    assert "PIP_EXTRA_INDEX_URL" not in env and env["HOME"] == "/root"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The real bundle, built from PyPI (downloads about 2 MB) for the device's 3.12 and this Python."""
    out = tmp_path_factory.mktemp("bundle") / "gpu_bundle"
    pythons = ["3.12", "%d.%d" % sys.version_info[:2]]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bundle.py"), "build", "--out", str(out),
                           "--pythons", ",".join(pythons)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_bundle_holds_a_device_wheel_of_every_dependency_and_installs_offline(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["total_bytes"] <= 48 * 2**20 and all(w["why"] for w in manifest["wheels"])
    names = {w["name"] for w in manifest["wheels"]}
    expected = {r.split("==")[0] for r, _, _ in gpu_bundle.REQUIREMENTS} | {"pb1-detectron2", "simsiam-transfer"}
    assert names == expected
    device = gpu_bundle.check(bundle)  # every device wheel's tags fit CPython 3.12 manylinux x86-64
    assert {w["name"] for w in device} == expected
    assert gpu_bundle.wheels_not_for_device([w["file"] for w in device]) == []
    target = tmp_path / "site"
    gpu_bundle.install(bundle, target)
    probe = ("import detectron2, fvcore, omegaconf, pycocotools.mask, submitit, simsiam_transfer, torch; "
             "print(detectron2.__file__, pycocotools.mask.__file__, simsiam_transfer.__file__)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(path.startswith(str(target)) for path in proc.stdout.split())  # the bundle's, not the venv's
