"""Install detectron2 into the running Python environment, idempotently.

Used by both set-up commands (``make demo``, ``make test``) and usable on its own::

    python -m simsiam_transfer.install_detectron2 [--source auto|upstream|fallback]

Order (``auto``):

1. detectron2 already importable (modeling, data, evaluation, engine) -> keep it.
2. The upstream repository at a pinned commit, when it answers within a short timeout.
   This is the path for users with network and GPUs: a full build with compiled ops.
3. Offline fallback: PyPI's ``pb1-detectron2==0.6`` (detectron2 v0.6 Python sources
   re-uploaded without ``detectron2/layers/csrc``; its sdist's sha256 is pinned), built
   without its C++ extension.
   Three text patches are applied to the unpacked sources before building, each checked
   to match exactly once:

   * ``setup.py``: ``ext_modules=[]`` (there are no C++ sources to compile);
   * ``detectron2/_C.py``: this project's shim (``detectron2_C_shim.py``) so that the
     module-level ``from detectron2 import _C`` imports succeed in every process,
     including workers spawned by detectron2's ``launch`` before any of our code runs,
     while every real use of a compiled op raises one error naming the op;
   * ``Image.LINEAR`` -> ``Image.BILINEAR`` and ``np.str`` -> ``str``: the two v0.6 lines
     that break on Pillow >= 10 and NumPy >= 1.24, fixed the same way upstream.

   Patching a copy of the sources we build (rather than monkeypatching at import time)
   keeps the change inside that one install, visible in its files, and removed by
   ``pip uninstall pb1-detectron2``.

Only the standard library is imported here: this runs before the project is installed.
"""

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

UPSTREAM_URL = "https://github.com/facebookresearch/detectron2.git"
UPSTREAM_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
FALLBACK_REQUIREMENT = "pb1-detectron2==0.6"
FALLBACK_SDIST = "pb1-detectron2-0.6.tar.gz"
FALLBACK_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
REACHABILITY_TIMEOUT_S = 20
IMPORT_CHECK = "import detectron2.modeling, detectron2.data, detectron2.evaluation, detectron2.engine"

# (file inside the source tree, text to find, replacement). Each must match exactly once.
FALLBACK_PATCHES = (
    ("setup.py", "ext_modules=get_extensions(),", "ext_modules=[],"),
    (
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR,",
        "interp=Image.BILINEAR,",
    ),
    (
        "detectron2/data/datasets/pascal_voc.py",
        "np.loadtxt(f, dtype=np.str)",
        "np.loadtxt(f, dtype=str)",
    ),
)


class InstallError(RuntimeError):
    pass


def _log(msg):
    print(f"[install-detectron2] {msg}", flush=True)


def _pip(*args, timeout=None):
    cmd = [sys.executable, "-m", "pip", *args]
    _log(" ".join(cmd))
    return subprocess.run(cmd, timeout=timeout, check=False).returncode


def detectron2_importable():
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1:] if proc.stderr else []


def upstream_reachable(timeout=REACHABILITY_TIMEOUT_S):
    if shutil.which("git") is None:
        return False
    try:
        proc = subprocess.run(
            ["git", "ls-remote", "--exit-code", UPSTREAM_URL, "HEAD"],
            capture_output=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def install_upstream():
    spec = f"detectron2 @ git+{UPSTREAM_URL}@{UPSTREAM_COMMIT}"
    # detectron2 builds against the torch already installed, hence no build isolation.
    if _pip("install", "--no-build-isolation", "--use-pep517", spec) != 0:
        raise InstallError(f"building upstream detectron2 ({UPSTREAM_COMMIT[:7]}) failed")


def apply_patch(tree, relpath, old, new):
    path = Path(tree) / relpath
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise InstallError(f"{relpath}: expected exactly one {old!r}, found {count}")
    path.write_text(text.replace(old, new))


def prepare_fallback_tree(tree):
    """Apply the fallback patches to an unpacked pb1-detectron2 0.6 source tree."""
    tree = Path(tree)
    if (tree / "detectron2" / "layers" / "csrc").exists():
        raise InstallError(f"{tree} has C++ sources; build it normally instead of the fallback")
    for relpath, old, new in FALLBACK_PATCHES:
        apply_patch(tree, relpath, old, new)
    shutil.copyfile(Path(__file__).with_name("detectron2_C_shim.py"), tree / "detectron2" / "_C.py")


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def download_from_simple_index(dest):
    """The sdist through the PEP 503 simple index. Recent pip refuses to prepare this package's
    metadata (it declares a direct-URL extra), so ``pip download`` is not always usable."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    with urllib.request.urlopen(f"{index}/pb1-detectron2/", timeout=60) as response:
        page = response.read().decode()
    links = [href for href in re.findall(r'href="([^"]+)"', page) if FALLBACK_SDIST in href]
    if not links:
        raise InstallError(f"{index}/pb1-detectron2/ lists no {FALLBACK_SDIST}")
    url = urllib.parse.urljoin(f"{index}/pb1-detectron2/", links[0].split("#")[0])
    _log(f"downloading {url}")
    target = Path(dest) / FALLBACK_SDIST
    with urllib.request.urlopen(url, timeout=120) as response:
        target.write_bytes(response.read())
    return target


def fetch_fallback_sdist(dest):
    """``pip download`` (honours pip's index settings), else the simple index; sha256-checked."""
    # Metadata preparation imports torch, so it must see the installed one.
    _pip("download", "--no-deps", "--no-build-isolation", FALLBACK_REQUIREMENT, "-d", str(dest))
    archive = Path(dest) / FALLBACK_SDIST
    if not archive.is_file():
        _log("pip download did not produce the source archive; trying the simple index directly")
        try:
            archive = download_from_simple_index(dest)
        except OSError as exc:
            raise InstallError(f"could not download {FALLBACK_REQUIREMENT}: {exc}") from None
    if _sha256(archive) != FALLBACK_SHA256:
        raise InstallError(f"{archive}: sha256 {_sha256(archive)} is not the pinned {FALLBACK_SHA256}")
    return archive


@contextlib.contextmanager
def fallback_tree():
    """The pinned pb1-detectron2 sources, unpacked and patched, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="d2-fallback-") as tmp:
        with tarfile.open(fetch_fallback_sdist(tmp)) as tar:
            tar.extractall(tmp, filter="data")
        tree = Path(tmp) / "pb1-detectron2-0.6"
        prepare_fallback_tree(tree)
        yield tree


def install_fallback():
    with fallback_tree() as tree:
        if _pip("install", "--no-build-isolation", str(tree)) != 0:
            raise InstallError(f"installing the patched {FALLBACK_REQUIREMENT} failed")


def build_fallback_wheel(dest):
    """A wheel of the patched fallback in ``dest`` (pure Python: the device bundle carries it)."""
    with fallback_tree() as tree:
        if _pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(dest), str(tree)) != 0:
            raise InstallError(f"building a wheel of the patched {FALLBACK_REQUIREMENT} failed")


def ensure_detectron2(source="auto"):
    ok, _ = detectron2_importable()
    if ok and source == "auto":
        _log("detectron2 already importable; keeping it")
        return "kept"
    if source in ("auto", "upstream"):
        if upstream_reachable():
            install_upstream()
            chosen = "upstream"
        elif source == "upstream":
            raise InstallError(f"{UPSTREAM_URL} is not reachable")
        else:
            _log(f"{UPSTREAM_URL} not reachable within {REACHABILITY_TIMEOUT_S}s; using the offline fallback")
            install_fallback()
            chosen = "fallback"
    else:
        install_fallback()
        chosen = "fallback"
    ok, err = detectron2_importable()
    if not ok:
        raise InstallError(f"detectron2 still does not import after the {chosen} install: {' '.join(err)}")
    _log(f"detectron2 installed ({chosen})")
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("auto", "upstream", "fallback"), default="auto",
                        help="auto: keep an importable detectron2, else upstream, else fallback")
    args = parser.parse_args(argv)
    try:
        ensure_detectron2(args.source)
    except (InstallError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
