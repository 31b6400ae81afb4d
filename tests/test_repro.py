"""The paper's claims at mini scale: ``fig2`` shows the collapse direction; ``repro`` writes every
experiment's JSON, PNG and table, trains shared settings once, and a rerun resumes."""

import json
import math

import pytest

from conftest import cli_main
from pretrain.repro import EXPERIMENTS, plan_runs

TINY = ["DATA.IMAGE_SIZE", "32", "DATA.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "2",
        "SOLVER.MAX_ITERS_PER_EPOCH", "2", "MONITOR.KNN_PERIOD", "2"]


def test_runs_with_identical_settings_share_one_folder(tmp_path):
    plan = plan_runs("pretrain/simsiam_R_18_repro.yaml", tmp_path, [], list(EXPERIMENTS))
    folders = {name: cfg.OUTPUT_DIR for _e, name, cfg in plan}
    assert len(plan) == 10 and len(set(folders.values())) == 8
    assert folders["head_bn_default"] == folders["stop_gradient"] == folders["predictor_mlp_constant_lr"]
    assert [cfg.MODEL.HEAD_BN for e, _n, cfg in plan if e == "table3"] == ["none", "hidden", "default", "all"]


def test_repro_writes_json_png_and_table_and_resumes(synthetic, tmp_path):
    data = ["DATA.TRAIN_DIR", synthetic / "unlabeled", "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train",
            "DATA.KNN_VAL_DIR", synthetic / "labeled/val"]
    args = ["repro", "--output-dir", tmp_path, "--experiments", "fig2,table3", *data, *TINY]
    assert cli_main(*args) == 0
    for experiment in ("fig2", "table3"):
        summary = json.loads((tmp_path / f"{experiment}.json").read_text())
        assert sorted(summary["runs"]) == sorted(name for name, _o, _p in EXPERIMENTS[experiment])
        for run in summary["runs"].values():
            assert len(run["curve"]) == 2 and run["final_knn_top1"] is not None and run["paper_linear_top1"]
        assert (tmp_path / f"{experiment}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "repro.md").read_text()
    assert "| head_bn_all |" in table and "| no_stop_gradient |" in table and "paper" in table
    assert not (tmp_path / "head_bn_default").exists()  # the Fig. 2 stop-gradient run serves Table 3 (c)
    before = (tmp_path / "head_bn_none" / "metrics.jsonl").read_text()
    assert cli_main(*args) == 0  # every run complete: nothing retrained
    assert (tmp_path / "head_bn_none" / "metrics.jsonl").read_text() == before
    assert cli_main("repro", "--output-dir", tmp_path, "--experiments", "table9") == 2


def test_fig2_mini_shows_the_collapse_direction(synthetic, tmp_path):
    assert cli_main("fig2", "--config", "pretrain/simsiam_R_18_mini.yaml", "--output-dir", tmp_path,
                    "DATA.TRAIN_DIR", synthetic / "unlabeled", "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train",
                    "DATA.KNN_VAL_DIR", synthetic / "labeled/val", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0,
                    "SOLVER.EPOCHS", 12, "SOLVER.BATCH_SIZE", 32, "SOLVER.BASE_LR", 0.5, "MONITOR.KNN_PERIOD", 6,
                    "SOLVER.AMP", False) == 0
    summary = json.loads((tmp_path / "fig2.json").read_text())
    sg, no_sg = summary["runs"]["stop_gradient"], summary["runs"]["no_stop_gradient"]
    assert len(sg["curve"]) == len(no_sg["curve"]) == 12
    assert summary["reference_z_std"] == pytest.approx(1 / math.sqrt(512))
    assert no_sg["final_loss"] < sg["final_loss"] and no_sg["final_z_std"] < sg["final_z_std"]
    assert sg["final_z_std_times_sqrt_d"] == pytest.approx(1.0, abs=0.1)
    assert (tmp_path / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
