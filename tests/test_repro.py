"""``repro``: every experiment's JSON, PNG and table; shared settings trained once; a rerun resumes."""

import json

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
