"""Shared fixtures: generated data, small checkpoints, and CLI runners (in-process and subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Torch threads per test process, set before torch is imported (the subprocesses tests start inherit
# it). Under pytest-xdist (``make test`` runs two workers) each worker gets its share of the cores,
# whatever the controller process passed down: two workers of 2 threads on 2 cores spin against each
# other and ran the suite slower than one process.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(max(1, min(2, _share)))
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402


def run_cli(*args, cwd=None, timeout=900, env=None):
    """The installed console command as a user runs it; returns CompletedProcess (text)."""
    exe = Path(sys.executable).with_name("simsiam-transfer")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def cli_main(*args):
    """In-process CLI call (no interpreter start-up); returns the exit status."""
    from app.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    from simsiam_transfer.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", seed=0, num_train=24, num_test=12,
                          num_unlabeled=96, image_size=96, labeled_per_class=(12, 6))


def randomized_bn(model, seed=0):
    """Give every BN non-trivial statistics so numeric checks are meaningful."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


def torchvision_state(depth, seed=0):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    return randomized_bn(model, seed).state_dict()


@pytest.fixture(scope="session")
def r18_pkl(tmp_path_factory):
    """A converted (verified) detectron2 file of a ResNet-18 in the official SimSiam layout."""
    from convert.command import convert_checkpoint

    tmp = tmp_path_factory.mktemp("weights")
    src = tmp / "simsiam_r18.pth"
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in torchvision_state(18).items()}}, src)
    convert_checkpoint(src, tmp / "r18.pkl")
    return tmp / "r18.pkl"


# Tests that need the generated datasets or a converted checkpoint train, fine-tune or convert:
# they are the end-to-end half of the suite (`make test-fast` runs the other half).
SLOW_FIXTURES = {"synthetic", "r18_pkl", "local_sweep"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fresh_detectron2_loggers():
    """Each in-process fine-tune sets up detectron2's loggers on that test's captured stdout (a real
    run does it once per process); drop them afterwards so no later test logs to a closed stream."""
    yield
    import logging

    try:
        from detectron2.utils.logger import setup_logger
    except ImportError:
        return
    setup_logger.cache_clear()  # it is memoised: a cleared logger must be set up again next time
    for name in ("detectron2", "d2", "fvcore", "simsiam_transfer"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
