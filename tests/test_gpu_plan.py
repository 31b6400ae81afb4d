"""What the one-GPU machine relies on, checked on CPU: precision and TF32 choices with simulated device
properties, the refusals of two ranks on one GPU, the memory pre-flights, and the GPU check's plan and verdict."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_main
from pretrain import memory
from pretrain.config import get_cfg
from pretrain.distributed import check_one_gpu_per_process
from pretrain.engine import choose_precision, configure_backends
from simsiam_transfer.errors import UserError
from simsiam_transfer.tf32 import set_tf32, tf32_enabled


def _load(name):
    """A benchmarks/ script as a module (they import their neighbour ``_common``, last on sys.path)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.append(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def backend_flags():
    """Leave cudnn.benchmark and TF32 as they were (they are process-wide)."""
    benchmark, tf32 = torch.backends.cudnn.benchmark, tf32_enabled()
    yield
    torch.backends.cudnn.benchmark = benchmark
    set_tf32(tf32["conv"] and tf32["matmul"])


@pytest.mark.parametrize("capability, dtype, scaler", [((9, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
                                                       ((7, 0), torch.float16, True)])
def test_amp_is_bf16_without_a_scaler_where_the_gpu_has_bf16(monkeypatch, capability, dtype, scaler):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision = choose_precision(True, torch.device("cuda", 0))
    assert (precision.dtype, precision.grad_scaler) == (dtype, scaler)
    assert choose_precision(False, torch.device("cuda", 0)).name == "fp32"


@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_runs_set_cudnn_benchmark_and_tf32_as_configured(backend_flags, tf32):
    torch.backends.cudnn.benchmark = False
    set_tf32(not tf32)
    configure_backends(torch.device("cuda", 0), tf32)
    assert torch.backends.cudnn.benchmark is True
    assert tf32_enabled() == {"matmul": tf32, "conv": tf32}
    assert get_cfg().SOLVER.TF32 is False  # the paper's fp32 by default


def test_cpu_runs_leave_the_backends_alone(backend_flags):
    torch.backends.cudnn.benchmark = False
    configure_backends(torch.device("cpu"), True)
    assert torch.backends.cudnn.benchmark is False


def test_two_ranks_on_one_gpu_are_refused_before_any_process_group():
    with pytest.raises(UserError, match=r"2 processes on this machine share 1 GPU\(s\).*--nproc_per_node 1"):
        check_one_gpu_per_process({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 1)
    with pytest.raises(SystemExit) as exit_info:  # the other ranks stop quietly: the line is said once
        check_one_gpu_per_process({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1)
    assert exit_info.value.code == 2
    check_one_gpu_per_process({"LOCAL_WORLD_SIZE": "2"}, 2)
    check_one_gpu_per_process({"LOCAL_WORLD_SIZE": "2"}, 0)  # CPU: gloo processes, nothing shared
    check_one_gpu_per_process({}, 1)


def _fake_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_pretrain_with_two_local_ranks_on_one_gpu_is_one_line(monkeypatch, tmp_path, capsys):
    _fake_one_gpu(monkeypatch)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # as torchrun sets them
        monkeypatch.setenv(key, value)
    images = tmp_path / "images"
    images.mkdir()
    assert cli_main("pretrain", "DATA.TRAIN_DIR", images, "OUTPUT_DIR", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "share 1 GPU(s)" in err[0] and not (tmp_path / "run").exists()


def test_finetune_with_more_processes_than_gpus_is_refused_before_launch(monkeypatch, tmp_path, capsys, synthetic):
    _fake_one_gpu(monkeypatch)
    launched = []
    monkeypatch.setattr("detection.finetune.launch", lambda *a, **k: launched.append(a))
    assert cli_main("finetune", "--config", "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml",
                    "--weights", "none", "--datasets", synthetic / "datasets.yaml", "--num-gpus", 2,
                    "OUTPUT_DIR", tmp_path / "ft") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-gpus 2 but 1 GPU(s) visible" in err[0]
    assert not launched and not (tmp_path / "ft").exists()


def test_pretraining_memory_preflight_names_what_fits():
    cfg = get_cfg()  # ResNet-50, 224 px, batch 512: the paper's recipe
    params = 38_200_000
    assert memory.estimate_gib("resnet50", "fp32", 224, 512, params) == pytest.approx(100.7, abs=0.1)
    with pytest.raises(UserError, match=r"512 images per GPU; resnet50 at 224 px in fp32 needs about 101 GiB.*"
                                        r"at most 363 images per GPU fit; use SOLVER.BATCH_SIZE 363.*SOLVER.AMP True"):
        memory.check_fits(cfg, "fp32", 1, params, 79.6)
    memory.check_fits(cfg, "bf16", 1, params, 79.6)  # about 51 GiB
    memory.check_fits(cfg, "fp32", 8, params, 79.6)  # 64 per GPU, the paper's 8 GPUs
    memory.check_fits(cfg, "fp32", 1, params, None)  # CPU: nothing to check


def test_pretrainer_runs_the_memory_preflight(monkeypatch, tmp_path, synthetic, capsys):
    monkeypatch.setattr(memory, "gpu_gib", lambda device: 0.05)  # a 50 MiB card
    assert cli_main("pretrain", "DATA.TRAIN_DIR", synthetic / "unlabeled", "MODEL.BACKBONE", "resnet18",
                    "DATA.IMAGE_SIZE", 32, "SOLVER.BATCH_SIZE", 16, "OUTPUT_DIR", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SOLVER.BATCH_SIZE 16 on 1 process(es)" in err[0] and not (tmp_path / "run").exists()


def test_gpu_check_plan_fits_the_budget_and_the_script_states_it():
    gpu_check = _load("gpu_check")
    assert gpu_check.planned_total() <= gpu_check.BUDGET_S - 20
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert f"{gpu_check.planned_total()} of the {gpu_check.BUDGET_S}-second budget" in text
    for part, seconds in gpu_check.PLAN.items():
        assert f"{part} {seconds}" in text.replace("\n# ", " ")
    assert gpu_check.epochs_for(180, 4.0, (5, 200)) == 45 and gpu_check.epochs_for(1, 4.0, (5, 200)) == 5


def _row(ap50s, learned=0.5):
    return {"trials": [{"bbox/AP50": v, "bbox/AP": v / 2, "train/fg_cls_accuracy": learned} for v in ap50s]}


def test_claim_verdict_needs_a_margin_over_the_larger_std_and_learned_classifiers():
    gpu_check = _load("gpu_check")
    table = gpu_check.claim_table({"scratch": _row([20, 21, 22]), "simsiam": _row([25, 26, 27]),
                                   "no_stop_gradient": _row([18, 19, 20])})
    verdict = gpu_check.claim_verdict(table)
    assert verdict["held"] and verdict["margin"] == 5.0 and verdict["larger_std"] == 1.0
    close = gpu_check.claim_table({"scratch": _row([20, 22, 24]), "simsiam": _row([21, 23, 25]),
                                   "no_stop_gradient": _row([18, 19, 20])})
    assert gpu_check.claim_verdict(close)["simsiam_above_scratch_by_more_than_larger_std"] is False
    prior = gpu_check.claim_table({"scratch": _row([20, 21, 22], learned=0.0), "simsiam": _row([25, 26, 27]),
                                   "no_stop_gradient": _row([18, 19, 20])})
    assert not gpu_check.claim_verdict(prior)["held"]  # a classifier at the class prior ranks nothing
    assert "| simsiam | 26.0 ± 1.0 |" in gpu_check.claim_markdown(table, verdict)


def test_gpu_check_without_cuda_refuses_with_one_line_and_exit_3(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()
