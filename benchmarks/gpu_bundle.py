"""The device bundle: wheels of every runtime dependency a GPU image with its own torch lacks.

    python benchmarks/gpu_bundle.py build [--out gpu_bundle] [--pythons 3.12,3.11]   (make gpu-bundle)
    python benchmarks/gpu_bundle.py install --bundle gpu_bundle --target DIR          (no network)
    python benchmarks/gpu_bundle.py check [--bundle gpu_bundle]                       (device tags)
    python benchmarks/gpu_bundle.py imports --target DIR       (under CPython 3.12 here: torch-free imports)

``build`` needs PyPI and a Python with torch (the project's .venv): compiled wheels are downloaded
for each ``--pythons`` version (manylinux x86-64), pure-Python ones once (built here with ``pip
wheel`` when PyPI has only an sdist), detectron2 is built from the sources the offline installer
uses (``simsiam_transfer.install_detectron2``: PyPI's pb1-detectron2 0.6 with its checked patches,
no compiled ops), and the project is built from this tree. ``manifest.json`` says why each wheel is
there. ``install`` runs ``pip install --no-index --no-deps --target DIR`` with pip's configuration
switched off, so only the bundle is read and the image's own torch stays in use; pip picks the
wheel of each name that fits the running Python. ``check`` asserts that every wheel meant for the
device installs on CPython 3.12, manylinux (glibc >= 2.28: the image runs torch's manylinux_2_28
build), x86-64.

Only the standard library is imported at module level: ``install`` runs before anything else is.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
LIMIT_BYTES = 48 * 2**20
DEVICE_PYTHON = "3.12"
DEVICE_GLIBC = (2, 28)
DEFAULT_PYTHONS = ("3.12",)
# Tags pip is told the target has when downloading for another Python (manylinux2014 = 2_17).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# (requirement, compiled, why). Versions are the ones the test suite runs with.
REQUIREMENTS = (
    ("fvcore==0.1.5.post20221221", False,
     "detectron2's CfgNode, checkpointer and PreciseBN; our config loader (PyPI has only an sdist: built here)"),
    ("iopath==0.1.9", False, "fvcore's and detectron2's PathManager (file I/O)"),
    ("yacs==0.1.8", False, "the CfgNode fvcore's config extends"),
    ("termcolor==3.3.0", False, "detectron2.utils.logger imports it at module level"),
    ("omegaconf==2.3.1", False, "detectron2.config imports LazyConfig (omegaconf) at import time"),
    ("antlr4-python3-runtime==4.9.3", False,
     "omegaconf 2.3's grammar parser, which needs 4.9.* (PyPI has only an sdist: built here)"),
    ("pycocotools==2.0.11", True, "COCO evaluation and mask encoding (detectron2's COCOEvaluator, our data check)"),
    ("submitit==1.5.4", False, "the submitit and Slurm executors of bench (detection.executors)"),
)
DETECTRON2_WHY = ("detectron2 0.6 as the offline installer builds it (pb1-detectron2 sources, checked "
                  "patches, no compiled ops: C4 R-CNN needs none)")
PROJECT_WHY = "this project (its console script and packages), built from the tree the bundle was made in"


class BundleError(RuntimeError):
    pass


def _log(msg):
    print(f"[gpu-bundle] {msg}", flush=True)


def _pip(*args, env=None):
    cmd = [sys.executable, "-m", "pip", *args]
    _log(" ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise BundleError(f"pip {args[0]} failed: {' '.join(tail)}")


def parse_wheel_name(filename):
    """``name-version(-build)?-python-abi-platform.whl`` -> (name, version, python tags, abi tags, platforms)."""
    stem = filename[:-len(".whl")] if filename.endswith(".whl") else None
    parts = stem.split("-") if stem else []
    if len(parts) not in (5, 6):
        raise BundleError(f"{filename}: not a wheel file name")
    name, version, py, abi, plat = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    return name.replace("_", "-").lower(), version, py.split("."), abi.split("."), plat.split(".")


def _python_tag(filename):
    """'any' for pure-Python wheels, else the CPython version the wheel is for ('3.12')."""
    _, _, pys, _, plats = parse_wheel_name(filename)
    if plats == ["any"]:
        return "any"
    tag = pys[0]
    return f"{tag[2]}.{tag[3:]}" if tag.startswith("cp") else tag


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _download(requirement, dest, python=None):
    """One wheel of ``requirement`` into ``dest`` (only binaries; for ``python`` when given)."""
    args = ["download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    if python:
        abi = "cp" + python.replace(".", "")
        args += ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3"]
        args += [a for plat in PLATFORMS for a in ("--platform", plat)]
    _pip(*args)


def _new_wheels(folder, before):
    return sorted(set(p.name for p in Path(folder).glob("*.whl")) - before)


def fetch_requirement(requirement, compiled, pythons, dest):
    """The wheel file names added to ``dest`` for ``requirement``."""
    before = set(p.name for p in Path(dest).glob("*.whl"))
    if compiled:
        for python in pythons:
            _download(requirement, dest, python)
        added = _new_wheels(dest, before)
        if len(added) < len(set(pythons)) and len(added) != 1:
            raise BundleError(f"{requirement}: expected a wheel for each of {', '.join(pythons)}, got {added}")
        return added
    try:
        _download(requirement, dest)
    except BundleError:
        _pip("wheel", "--no-deps", "-w", str(dest), requirement)  # sdist only: pure Python, built here
    added = _new_wheels(dest, before)
    if len(added) != 1 or _python_tag(added[0]) != "any":
        raise BundleError(f"{requirement}: expected one pure-Python wheel, got {added}")
    return added


def source_files():
    """The tree's files that git does not ignore (data, runs and environments stay behind)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BundleError(f"git ls-files failed in {REPO} ({exc}); the project wheel is built from a git checkout")
    return [name for name in listed if name and (REPO / name).is_file()]


def build_project_wheel(dest):
    before = set(p.name for p in Path(dest).glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="project-build-") as tmp:
        # A copy: building in place would leave build/ and *.egg-info in the tree.
        tree = Path(tmp) / "src"
        for name in source_files():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(tree))
    return _new_wheels(dest, before)


def git_commit():
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def build(out, pythons):
    """Write the bundle to ``out`` (replaced as a whole only when every wheel is there)."""
    sys.path.insert(0, str(REPO))
    from simsiam_transfer.atomic import atomic_dir
    from simsiam_transfer.install_detectron2 import InstallError, build_fallback_wheel

    entries = []
    with atomic_dir(out) as tmp:
        for requirement, compiled, why in REQUIREMENTS:
            for name in fetch_requirement(requirement, compiled, pythons, tmp):
                entries.append((name, why))
        before = set(p.name for p in tmp.glob("*.whl"))
        try:
            build_fallback_wheel(tmp)
        except InstallError as exc:
            raise BundleError(str(exc)) from None
        entries += [(name, DETECTRON2_WHY) for name in _new_wheels(tmp, before)]
        entries += [(name, PROJECT_WHY) for name in build_project_wheel(tmp)]
        manifest = make_manifest(tmp, entries, pythons)
        if manifest["total_bytes"] > LIMIT_BYTES:
            raise BundleError(f"the bundle is {manifest['total_bytes'] / 2**20:.1f} MiB, over the "
                              f"{LIMIT_BYTES // 2**20} MiB that travels with the tree")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def make_manifest(folder, entries, pythons):
    wheels = []
    for name, why in entries:
        dist, version, *_ = parse_wheel_name(name)
        python = _python_tag(name)
        wheels.append({"file": name, "name": dist, "version": version, "python": python,
                       "device": python in ("any", DEVICE_PYTHON), "why": why,
                       "bytes": (Path(folder) / name).stat().st_size, "sha256": _sha256(Path(folder) / name)})
    return {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "project_commit": git_commit(),
        "builder": f"Python {platform.python_version()}",
        "device_python": DEVICE_PYTHON,
        "pythons": list(pythons),
        "install": "pip install --no-index --no-deps --target DIR (benchmarks/gpu_bundle.py install)",
        "total_bytes": sum(w["bytes"] for w in wheels),
        "limit_bytes": LIMIT_BYTES,
        "wheels": wheels,
    }


def read_manifest(bundle):
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: build the bundle with `make gpu-bundle` and carry {bundle}/")
    manifest = json.loads(path.read_text())
    for wheel in manifest["wheels"]:
        file = Path(bundle) / wheel["file"]
        if not file.is_file() or _sha256(file) != wheel["sha256"]:
            raise BundleError(f"{file}: missing or not the file {MANIFEST} lists; rebuild with `make gpu-bundle`")
    return manifest


def offline_pip_env(environ=os.environ):
    """pip with no configuration file and no index or find-links from the environment: the device's view."""
    env = {k: v for k, v in environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def install(bundle, target):
    """Install every distribution of the bundle into ``target`` for the running Python, offline."""
    manifest = read_manifest(bundle)
    requirements = sorted({f"{w['name']}=={w['version']}" for w in manifest["wheels"]})
    Path(target).mkdir(parents=True, exist_ok=True)
    _pip("install", "--no-index", "--no-deps", "--upgrade", "--find-links", str(Path(bundle).resolve()),
         "--target", str(target), *requirements, env=offline_pip_env())
    return requirements


def device_tags(python=DEVICE_PYTHON, glibc=DEVICE_GLIBC):
    """The wheel tags CPython ``python`` on manylinux x86-64 with ``glibc`` accepts (packaging.tags)."""
    from packaging import tags

    version = tuple(int(p) for p in python.split("."))
    platforms = [f"manylinux_{glibc[0]}_{minor}_x86_64" for minor in range(glibc[1], 16, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    interpreter = f"cp{version[0]}{version[1]}"
    return (set(tags.cpython_tags(version, abis=[interpreter, "abi3", "none"], platforms=platforms))
            | set(tags.compatible_tags(version, interpreter, platforms)))


def wheels_not_for_device(filenames, python=DEVICE_PYTHON):
    """The file names among ``filenames`` that CPython ``python`` on the device would not install."""
    from packaging.utils import parse_wheel_filename

    supported = device_tags(python)
    return [f for f in filenames if not (parse_wheel_filename(f)[3] & supported)]


def check(bundle):
    manifest = read_manifest(bundle)
    device = [w for w in manifest["wheels"] if w["device"]]
    bad = wheels_not_for_device([w["file"] for w in device])
    if bad:
        raise BundleError(f"not installable on CPython {DEVICE_PYTHON} manylinux x86-64: {', '.join(bad)}")
    names = sorted({w["name"] for w in manifest["wheels"]})
    missing = sorted(set(names) - {w["name"] for w in device})
    if missing:
        raise BundleError(f"no wheel for the device's CPython {DEVICE_PYTHON}: {', '.join(missing)}")
    return device


# What imports without torch: the rehearsal runs them under CPython 3.12, whose torch is not on this disk.
TORCH_FREE_IMPORTS = ("pycocotools.mask", "pycocotools.coco", "omegaconf", "antlr4", "fvcore.common.config",
                      "iopath.common.file_io", "yacs.config", "submitit", "termcolor")


def imports(target):
    """Under the running Python: import the torch-free distributions and byte-compile every installed
    source file (detectron2's and ours included), so a syntax or import break shows without a GPU."""
    import compileall
    import importlib

    for name in TORCH_FREE_IMPORTS:
        importlib.import_module(name)
    from omegaconf import OmegaConf  # its grammar runs on antlr4

    OmegaConf.to_yaml(OmegaConf.create({"interpolated": "${x}", "x": 1}), resolve=True)
    bad = [str(p) for p in sorted(Path(target).iterdir())
           if p.is_dir() and not p.name.endswith(".dist-info") and p.name != "bin"
           and not compileall.compile_dir(str(p), quiet=1)]
    if bad:
        raise BundleError(f"Python {platform.python_version()} cannot compile: {', '.join(bad)}")
    return len(TORCH_FREE_IMPORTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and build the wheels (needs PyPI and torch)")
    b.add_argument("--out", default=str(REPO / "gpu_bundle"))
    b.add_argument("--pythons", default=",".join(DEFAULT_PYTHONS),
                   help="CPython versions of the compiled wheels, comma-separated (the device's 3.12 always)")
    i = sub.add_parser("install", help="offline install into a target folder")
    i.add_argument("--bundle", default=str(REPO / "gpu_bundle"))
    i.add_argument("--target", required=True)
    c = sub.add_parser("check", help="every device wheel installs on CPython 3.12 manylinux x86-64")
    c.add_argument("--bundle", default=str(REPO / "gpu_bundle"))
    m = sub.add_parser("imports", help="import the torch-free wheels, byte-compile everything (running Python)")
    m.add_argument("--target", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            pythons = list(dict.fromkeys([DEVICE_PYTHON] + [p.strip() for p in args.pythons.split(",") if p.strip()]))
            manifest = build(args.out, pythons)
            _log(f"{args.out}: {len(manifest['wheels'])} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB")
        elif args.command == "install":
            _log(f"installed {len(install(args.bundle, args.target))} distributions into {args.target}")
        elif args.command == "imports":
            _log(f"Python {platform.python_version()}: {imports(args.target)} modules import, every source compiles")
        else:
            _log(f"{len(check(args.bundle))} wheels install on CPython {DEVICE_PYTHON} manylinux x86-64")
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
