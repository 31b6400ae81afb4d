"""No-op pretraining diagnostics: they fire on an untrained or collapsed checkpoint, stay silent on a trained one,
and reach the converter's report, ``bench`` (before fine-tuning) and the pipeline's check."""

import json
import math

import pytest
import torch

from conftest import cli_main
from convert.command import check_pretraining_run
from simsiam_transfer.d2_weights import conversion_warnings
from convert.verify import LEARNED_LOSS, decay_only_scale, pretraining_check, residual_scale_stats


@pytest.fixture(scope="module")
def noop_checkpoint(synthetic, tmp_path_factory):
    """A real pretraining checkpoint of one step at a negligible LR: the weights stay at their init."""
    out = tmp_path_factory.mktemp("noop")
    assert cli_main("pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.TRAIN_DIR", synthetic / "unlabeled",
                    "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0,
                    "SOLVER.BATCH_SIZE", 16, "SOLVER.BASE_LR", 1e-6, "SOLVER.EPOCHS", 1,
                    "SOLVER.MAX_ITERS_PER_EPOCH", 1, "SOLVER.AMP", False, "OUTPUT_DIR", out) == 0
    return out / "checkpoint_last.pth"


def _edited(noop_checkpoint, path, history, scale_noise):
    """The no-op checkpoint with moved residual-BN scales and another training history."""
    ckpt = torch.load(noop_checkpoint, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():
        if key.startswith("encoder.layer") and key.endswith(".bn2.weight"):
            value.add_(scale_noise * torch.randn(value.shape, generator=g))
    ckpt["history"] = history
    torch.save(ckpt, path)
    return path


TRAINED = [{"epoch": 1, "loss": -0.21, "z_std": 0.030, "steps": 60},
           {"epoch": 2, "loss": -0.74, "z_std": 0.036, "steps": 60}]


def test_no_op_checkpoint_warns_in_convert_report_bench_check_and_pipeline_check(noop_checkpoint, tmp_path, capsys):
    assert cli_main("convert", noop_checkpoint, tmp_path / "noop.pkl") == 0
    err = capsys.readouterr().err
    assert "still at their 1.0 init in every stage" in err
    assert f"never went below {LEARNED_LOSS}" in err
    report = json.loads((tmp_path / "noop.pkl.report.json").read_text())
    assert report["pretraining_check"]["ok"] is False and len(report["pretraining_check"]["problems"]) == 2
    assert report["residual_bn_scale"]["res5"]["mean_abs_change_from_one"] < 1e-3
    warnings = conversion_warnings(tmp_path / "noop.pkl")
    assert len(warnings) == 2 and all("SOLVER.EPOCHS" in w for w in warnings)
    check = check_pretraining_run(noop_checkpoint)
    assert check["ok"] is False and check["epochs"] == 1 and check["best_loss"] > LEARNED_LOSS


def test_trained_checkpoint_is_silent(noop_checkpoint, tmp_path, capsys):
    trained = _edited(noop_checkpoint, tmp_path / "trained.pth", TRAINED, scale_noise=0.05)
    assert cli_main("convert", trained, tmp_path / "trained.pkl") == 0
    assert "WARNING" not in capsys.readouterr().err
    report = json.loads((tmp_path / "trained.pkl.report.json").read_text())
    assert report["warnings"] == [] and report["pretraining_check"]["ok"] is True
    assert conversion_warnings(tmp_path / "trained.pkl") == []
    assert check_pretraining_run(trained)["ok"] is True


def test_collapsed_output_is_flagged_even_with_a_low_loss(noop_checkpoint, tmp_path):
    collapsed = TRAINED[:1] + [{"epoch": 2, "loss": -0.99, "z_std": 0.0005, "steps": 60}]
    check = check_pretraining_run(_edited(noop_checkpoint, tmp_path / "c.pth", collapsed, scale_noise=0.05))
    assert not check["ok"] and len(check["problems"]) == 1 and "collapsed" in check["problems"][0]


def test_verdict_thresholds_are_pure_functions():
    one = {"weight": torch.ones(8)}
    stats = residual_scale_stats({f"layer{s}.0.bn2.weight": one["weight"] for s in range(1, 5)})
    assert len(pretraining_check(stats)["problems"]) == 1  # no history: only the scales speak
    moved = residual_scale_stats({f"layer{s}.0.bn2.weight": torch.full((8,), 0.9) for s in range(1, 5)})
    assert pretraining_check(moved, TRAINED, dim=512)["ok"]
    assert not pretraining_check(moved, [{"epoch": 1, "loss": -0.05, "z_std": 0.04}], dim=512)["ok"]


def test_scales_moved_by_weight_decay_alone_are_caught(noop_checkpoint, tmp_path):
    # The demo's recipe: 2 epochs of 125 steps, lr 0.0375 then its cosine value, wd 1e-4, momentum 0.9.
    history = [{"epoch": 1, "loss": -0.45, "z_std": 0.037, "lr": 0.0375, "steps": 125},
               {"epoch": 2, "loss": -0.81, "z_std": 0.029, "lr": 0.01875, "steps": 125}]
    decay = decay_only_scale(history, 1e-4, 0.9)
    assert decay == pytest.approx(math.exp(-1e-3 * (0.0375 + 0.01875) * 125)) and round(decay, 3) == 0.993

    def backbone(noise):  # every residual branch's last BN at the decay-only value, plus noise
        g = torch.Generator().manual_seed(1)
        return {f"layer{s}.{b}.bn2.weight": decay + noise * torch.randn(64, generator=g)
                for s in range(1, 5) for b in range(2)}
    quiet = residual_scale_stats(backbone(0.001), decay)
    check = pretraining_check(quiet, history, dim=512, decay_only=decay)
    assert not check["ok"] and len(check["problems"]) == 1 and "weight decay alone" in check["problems"][0]
    assert "0.9930" in check["problems"][0]
    trained = residual_scale_stats(backbone(0.05), decay)  # gradient moved them apart
    assert pretraining_check(trained, history, dim=512, decay_only=decay)["ok"]
    assert pretraining_check(quiet, history, dim=512)["ok"]  # no prediction (zero-init or foreign): no verdict
    # Through the checkpoint: the real run's config (ZERO_INIT_RESIDUAL False, wd, momentum) is read.
    ckpt = torch.load(noop_checkpoint, map_location="cpu", weights_only=True)
    for key in ckpt["state_dict"]:
        if key.startswith("encoder.layer") and key.endswith(".bn2.weight"):
            ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], decay)
    ckpt["history"] = history
    torch.save(ckpt, tmp_path / "decay.pth")
    check = check_pretraining_run(tmp_path / "decay.pth")
    assert check["problems"] == [p for p in check["problems"] if "weight decay alone" in p] and len(check["problems"]) == 1
    assert check["residual_bn_scale"]["res5"]["mean_abs_change_from_decay_only"] < 1e-6


def test_bench_warns_before_fine_tuning(noop_checkpoint, synthetic, tmp_path, capsys):
    assert cli_main("convert", noop_checkpoint, tmp_path / "noop.pkl") == 0
    capsys.readouterr()
    # One 1-iteration trial: the warning is printed before it starts.
    cli_main("bench", "--benchmark", "voc07_mini", "--weights", tmp_path / "noop.pkl", "--output-dir", tmp_path / "b",
             "--lrs", "0.02", "--trials", "1", "--datasets", synthetic / "datasets.yaml",
             "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "TEST.PRECISE_BN.ENABLED", "False")
    err = capsys.readouterr().err
    assert "[bench] WARNING: noop.pkl: residual-branch BN scales still at their 1.0 init" in err
    assert "train longer" in err
