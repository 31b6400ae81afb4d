"""SimSiam: loss, stop-gradient, the paper's ablations, schedule, engine runs, resume, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import cli_main, run_cli
from pretrain import SimSiam, simsiam_loss
from pretrain.config import load_cfg
from pretrain.loss import negative_cosine, normalized_std
from pretrain.schedule import apply_lr, initial_lr, lr_at_epoch
from pretrain.targets import MovingAverageTargets
from pretrain.distributed import DistInfo
from simsiam_transfer.errors import UserError


def test_loss_is_minus_one_for_identical_inputs():
    p = torch.randn(8, 16)
    assert simsiam_loss(p, p.clone(), p.clone(), p.clone()).item() == pytest.approx(-1.0, abs=1e-6)


def test_loss_matches_hand_computation():
    p1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    p2, z1 = torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    expected = -0.5 * (1 / math.sqrt(2)) - 0.5 * (8 / (2 * 5))
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)
    assert simsiam_loss(p1, p2, z1, z2, symmetric=False).item() == pytest.approx(-1 / math.sqrt(2), abs=1e-6)


def test_cross_entropy_similarity_matches_hand_computation():
    p, z = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    # -softmax(z) . log softmax(p) with softmax(z) = (1/2, 1/2), softmax(p) = (1/4, 3/4)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    got = simsiam_loss(p, p, z, z, similarity="cross_entropy").item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_stop_gradient_blocks_the_target_branch():
    p1, p2, z1, z2 = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None and p1.grad.abs().sum() > 0
    p1, p2, z1, z2 = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def _tiny(**kw):
    torch.manual_seed(0)
    return SimSiam("resnet18", dim=32, pred_dim=8, **kw)


def _encoder_grad(model, x1, x2, **loss_kw):
    model.zero_grad()
    p1, p2, z1, z2 = model(x1, x2)
    simsiam_loss(p1, p2, z1, z2, **loss_kw).backward()
    return torch.cat([p.grad.flatten() for p in model.encoder.parameters() if p.grad is not None])


def test_without_predictor_stop_gradient_equals_half_the_plain_gradient():
    """Sec. 4.2: with the symmetric loss and h = identity, stop-grad only halves the gradient."""
    model = _tiny(predictor="none")
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with_sg = _encoder_grad(model, x1, x2)
    without = _encoder_grad(model, x1, x2, stop_gradient=False)
    assert (with_sg - 0.5 * without).abs().max() < 1e-5 * without.abs().max()


def test_model_returns_p_and_z_and_predictor_variants():
    model = _tiny()
    p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert p1.shape == z1.shape == (4, 32)
    assert torch.equal(*(lambda o: (o[0], o[2]))(_tiny(predictor="none")(torch.ones(2, 3, 32, 32), torch.ones(2, 3, 32, 32))))
    fixed = _tiny(predictor="fixed_random")
    assert not any(p.requires_grad for p in fixed.predictor.parameters())
    groups = fixed.parameter_groups()
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in fixed.predictor.parameters())


def _bn_layout(model):
    def flags(seq):
        return [type(m).__name__ for m in seq if isinstance(m, nn.BatchNorm1d)]
    return len(flags(model.encoder.fc)), len(flags(model.predictor))


def test_head_bn_placements_follow_table_3():
    assert _bn_layout(_tiny(head_bn="none")) == (0, 0)
    assert _bn_layout(_tiny(head_bn="hidden")) == (2, 1)
    assert _bn_layout(_tiny(head_bn="default")) == (3, 1)
    assert _bn_layout(_tiny(head_bn="all")) == (3, 2)
    default = _tiny()
    out_bn = default.encoder.fc[-1]
    assert isinstance(out_bn, nn.BatchNorm1d) and not out_bn.affine
    assert not default.encoder.fc[-2].bias.requires_grad  # cancelled by the BN after it
    assert _tiny(head_bn="hidden").encoder.fc[-1].bias.requires_grad
    assert default.predictor[-1].bias is not None and default.predictor[0].bias is None


def test_official_key_layout_and_zero_init_residual():
    model = SimSiam("resnet50", dim=64, pred_dim=16)
    keys = set(model.state_dict())
    for k in ("encoder.conv1.weight", "encoder.layer4.2.bn3.weight", "encoder.fc.0.weight", "encoder.fc.7.running_mean",
              "predictor.0.weight", "predictor.3.bias"):
        assert k in keys
    assert model.encoder.layer1[0].bn3.weight.abs().sum() == 0
    assert SimSiam("resnet18", zero_init_residual=False).encoder.layer1[0].bn2.weight.abs().sum() > 0


def test_lr_schedule_scaling_cosine_warmup_and_fixed_predictor():
    assert initial_lr(0.05, 512) == pytest.approx(0.1)
    assert lr_at_epoch(0.1, 0, 100) == pytest.approx(0.1)
    assert lr_at_epoch(0.1, 50, 100) == pytest.approx(0.05)
    assert lr_at_epoch(0.1, 99, 100) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert [lr_at_epoch(1.0, e, 20, 10) for e in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at_epoch(1.0, 10, 20, 10) == pytest.approx(1.0)
    model = _tiny()
    opt = torch.optim.SGD(model.parameter_groups(fix_pred_lr=True), lr=0.1)
    apply_lr(opt, 0.01, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]


def test_moving_average_targets():
    bank = MovingAverageTargets(4, 2, 0.8, torch.device("cpu"))
    z1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    bank.initialize([(torch.eye(2)[[0, 1, 0, 1]], torch.eye(2)[[0, 0, 1, 1]], torch.arange(4))],
                    lambda x: x, DistInfo())
    # eta starts as the normalised mean of both views' outputs, for every image
    assert torch.allclose(bank.memory, torch.tensor([[1.0, 0.0], [0.5 ** 0.5] * 2, [0.5 ** 0.5] * 2, [0.0, 1.0]]))
    idx = torch.tensor([1])
    eta = bank.memory[1].clone()
    t1, t2 = bank.targets(idx, z1, z2, DistInfo())  # the first visit already uses m (no momentum-0 visit)
    assert torch.allclose(t1, 0.8 * eta + 0.2 * torch.tensor([0.0, 1.0]))
    assert torch.allclose(t2, 0.8 * eta + 0.2 * torch.tensor([1.0, 0.0]))


def test_invalid_values_name_the_key():
    with pytest.raises(UserError, match="MODEL.SIMILARITY"):
        load_cfg(None, ["MODEL.SIMILARITY", "dot"])
    with pytest.raises(UserError, match="override MODEL.NOPE"):
        load_cfg(None, ["MODEL.NOPE", "1"])


def _mini_args(synthetic, out, *extra):
    return ["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml",
            "DATA.TRAIN_DIR", synthetic / "unlabeled", "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train",
            "DATA.KNN_VAL_DIR", synthetic / "labeled/val", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0,
            "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 2, "SOLVER.MAX_ITERS_PER_EPOCH", 2,
            "MODEL.DIM", 64, "MODEL.PRED_DIM", 16, "SOLVER.AMP", False, "OUTPUT_DIR", out, *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_cpu_run_writes_metrics_and_checkpoints(synthetic, tmp_path):
    proc = run_cli(*_mini_args(synthetic, tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "loss", "z_std", "lr", "knn_top1"} <= set(r)
        assert 0 <= r["knn_top1"] <= 100 and 0 < r["z_std"] < 1 and r["steps"] == 2 and r["time_s"] > 0
        assert (r["precision"], r["tf32"]) == ("fp32", False)  # the arithmetic, in every record
    ckpt = torch.load(tmp_path / "run/checkpoint_last.pth", weights_only=True)
    assert {"state_dict", "optimizer", "epoch", "config", "versions"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and "encoder.layer1.0.conv1.weight" in ckpt["state_dict"]
    assert (tmp_path / "run/checkpoint_0001.pth").is_file() and (tmp_path / "run/config.yaml").is_file()
    assert list((tmp_path / "run/tb").glob("events.out.tfevents*"))


@pytest.mark.parametrize("ablation", [
    ["MODEL.PREDICTOR", "fixed_random"], ["MODEL.HEAD_BN", "none"], ["MODEL.SIMILARITY", "cross_entropy"],
    ["MODEL.SYMMETRIC", "False"], ["MODEL.ALTERNATION_STEPS", "2"],
    ["MODEL.PREDICTOR", "none", "MODEL.TARGET", "moving_average"], ["SOLVER.WARMUP_EPOCHS", "1", "SOLVER.EPOCHS", "2"],
])
def test_every_ablation_trains(synthetic, tmp_path, ablation):
    from app.cli import main

    assert main([str(a) for a in _mini_args(synthetic, tmp_path, "SOLVER.EPOCHS", 1, *ablation)]) == 0
    record = _metrics(tmp_path)[0]
    assert math.isfinite(record["loss"])


def test_resume_continues_exactly_where_it_stopped(synthetic, tmp_path):
    from app.cli import main

    assert main([str(a) for a in _mini_args(synthetic, tmp_path / "full", "SOLVER.EPOCHS", 3)]) == 0
    # Stop after epoch 1, then the same run with 3 epochs resumes from checkpoint_last.pth.
    args = [str(a) for a in _mini_args(synthetic, tmp_path / "cut")]
    assert main(args + ["SOLVER.EPOCHS", "1"]) == 0
    assert main(args + ["SOLVER.EPOCHS", "3"]) == 0
    full, cut = (torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True) for d in ("full", "cut"))
    assert [r["epoch"] for r in _metrics(tmp_path / "cut")] == [1, 2, 3]
    assert [r["loss"] for r in _metrics(tmp_path / "cut")] == pytest.approx([r["loss"] for r in _metrics(tmp_path / "full")])
    for key, value in full["state_dict"].items():
        assert torch.allclose(value.float(), cut["state_dict"][key].float(), atol=1e-5), key


def test_sigkill_mid_run_then_rerun_resumes(synthetic, tmp_path):
    args = _mini_args(synthetic, tmp_path, "SOLVER.EPOCHS", 6)
    exe = [sys.executable, "-m", "app.cli"]
    proc = subprocess.Popen(exe + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoint_0002.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)["epoch"]
    assert 2 <= done < 6
    rerun = subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from {tmp_path / 'checkpoint_last.pth'}: {done} epoch(s) done" in rerun.stdout
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic, tmp_path, capsys):
    assert cli_main(*_mini_args(synthetic, tmp_path, "SOLVER.EPOCHS", 1)) == 0
    good = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert cli_main(*_mini_args(synthetic, tmp_path, "SOLVER.EPOCHS", 2, "SOLVER.BASE_LR", "1e30")) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "last good checkpoint" in err
    kept = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["state_dict"]["encoder.conv1.weight"],
                                              good["state_dict"]["encoder.conv1.weight"])


def test_resume_refuses_other_model_settings(synthetic, tmp_path, capsys):
    assert cli_main(*_mini_args(synthetic, tmp_path, "SOLVER.EPOCHS", 1)) == 0
    capsys.readouterr()
    assert cli_main(*_mini_args(synthetic, tmp_path, "MODEL.PREDICTOR", "none")) == 2
    err = capsys.readouterr().err
    assert "MODEL.PREDICTOR" in err and "new OUTPUT_DIR" in err


def test_bad_train_dir_is_one_clear_error(tmp_path):
    proc = run_cli("pretrain", "DATA.TRAIN_DIR", tmp_path / "missing", "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "DATA.TRAIN_DIR" in proc.stderr
    assert not (tmp_path / "out" / "checkpoint_last.pth").exists()


def test_linear_probe_reports_top1(synthetic, tmp_path):
    assert cli_main(*_mini_args(synthetic, tmp_path, "SOLVER.EPOCHS", 1)) == 0
    assert cli_main("linear", "--config", "pretrain/simsiam_R_18_mini.yaml", "OUTPUT_DIR", tmp_path,
                    "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train", "DATA.KNN_VAL_DIR", synthetic / "labeled/val",
                    "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0, "MODEL.DIM", 64, "MODEL.PRED_DIM", 16,
                    "LINEAR.EPOCHS", 2, "LINEAR.BATCH_SIZE", 16) == 0
    result = json.loads((tmp_path / "linear/result.json").read_text())
    assert 0 <= result["top1"] <= 100
    assert len((tmp_path / "linear/metrics.jsonl").read_text().splitlines()) == 2


def test_normalized_std_of_collapsed_and_isotropic_outputs():
    assert normalized_std(torch.ones(64, 32)).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    assert normalized_std(torch.randn(4096, 256)).item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert negative_cosine(torch.ones(2, 3), -torch.ones(2, 3)).item() == pytest.approx(1.0)
