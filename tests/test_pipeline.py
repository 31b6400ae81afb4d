"""The pipeline: rows, nested configs, per-benchmark trials, pretraining under torchrun, resume."""

import json
import sys

import pytest

from conftest import REPO, cli_main, run_cli
from simsiam_transfer.config import config_root
from simsiam_transfer.errors import UserError
from app.pipeline import Pipeline, load_pipeline_cfg, pretrain_command

MINI = config_root() / "pipeline" / "mini.yaml"


def _write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_pipelines_plan_their_rows_and_trials():
    table5 = Pipeline(load_pipeline_cfg("pipeline/table5.yaml"))
    assert [r.name for r in table5.rows] == ["scratch", "ImageNet supervised (torchvision IMAGENET1K_V1)",
                                             "SimSiam, base", "SimSiam, optimal"]
    assert table5.trials("voc07") == 5 and table5.trials("voc0712") == 5 and table5.trials("coco_1x") == 1
    # The paper's reference rows are MoCo's protocol: LR 0.02, no search; SimSiam rows search 3 LRs.
    assert [table5.sweep_spec("voc07", row).lrs for row in table5.rows] == [(0.02,), (0.02,)] + [(0.02, 0.03, 0.05)] * 2
    assert table5.sweep_spec("voc07", table5.rows[0]).trials == 5
    optimal = table5.pretrain_cfg(table5.rows[3])
    assert (optimal.SOLVER.BASE_LR, optimal.SOLVER.WEIGHT_DECAY, optimal.SOLVER.FIX_PRED_LR) == (0.5, 1e-5, True)
    assert optimal.DATA.TRAIN_DIR == "datasets/imagenet/train"
    stages = [name for name, _ in table5.stages()]
    assert "pretrain:scratch" not in stages and "convert:scratch" not in stages
    assert stages.index("convert:simsiam_base") > stages.index("pretrain:simsiam_base")
    mini = Pipeline(load_pipeline_cfg("pipeline/mini.yaml"))
    no_sg = [r for r in mini.rows if r.id == "simsiam_no_sg"][0]
    assert mini.pretrain_cfg(no_sg).MODEL.STOP_GRADIENT is False
    assert mini.pretrain_cfg(mini.rows[1]).MODEL.STOP_GRADIENT is True


@pytest.mark.parametrize("rows, message", [
    ("  bad row: {WEIGHTS: none}", "ROWS.bad row: row ids name folders"),
    ("  r: {WEIGHTS: none, PRETRAIN: {CONFIG: pretrain/simsiam_R_18_mini.yaml}}", "ROWS.r: set exactly one"),
    ("  r: {NAME: x}", "ROWS.r: set exactly one"),
    ("  r: {WEIGHT: none}", "ROWS.r: Non-existent config key: WEIGHT"),
    ("  r: {PRETRAIN: {CONFIG: pretrain/simsiam_R_18_mini.yaml, CFG: {SOLVER: {EPOCS: 3}}}}",
     "ROWS.r.PRETRAIN.CFG: Non-existent config key: SOLVER.EPOCS"),
    ("  r: {PRETRAIN: {CONFIG: pretrain/simsiam_R_18_mini.yaml, CFG: {MODEL: {PREDICTOR: big}}}}",
     "ROWS.r.PRETRAIN.CFG: MODEL.PREDICTOR 'big' is not one of"),
])
def test_row_mistakes_are_refused_naming_the_key(tmp_path, rows, message):
    path = _write(tmp_path, f"ROWS:\n{rows}\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        p = Pipeline(load_pipeline_cfg(path))
        for row in p.rows:
            if row.pretrained_here:
                p.pretrain_cfg(row)


def test_cpu_jobs_pretrain_rows_and_trials_side_by_side(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    one = Pipeline(load_pipeline_cfg("pipeline/mini.yaml", ["SWEEP.CPU_JOBS", "1"]))
    assert [n for n, _ in one.stages() if n.startswith("pretrain")] == ["pretrain:supervised", "pretrain:simsiam",
                                                                         "pretrain:simsiam_no_sg"]
    assert one.sweep_spec("voc07_mini", one.rows[0]).executor.cpu_jobs == 1
    assert [n for n, _ in one.stages() if n.startswith("bench:voc07")] == [
        "bench:voc07_mini:scratch", "bench:voc07_mini:supervised", "bench:voc07_mini:simsiam",
        "bench:voc07_mini:simsiam_no_sg"]
    two = Pipeline(load_pipeline_cfg("pipeline/mini.yaml", ["SWEEP.CPU_JOBS", "2"]))
    assert [n for n, _ in two.stages() if n.startswith("pretrain")] == ["pretrain:supervised+simsiam",
                                                                         "pretrain:simsiam_no_sg"]
    assert two.sweep_spec("voc07_mini", two.rows[0]).executor.cpu_jobs == 2
    # Rows' sweeps side by side: one stage per benchmark.
    assert [n for n, _ in two.stages() if n.startswith("bench")] == [
        "bench:voc07_mini:scratch+supervised+simsiam+simsiam_no_sg",
        "bench:coco_1x_mini:scratch+supervised+simsiam+simsiam_no_sg"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # GPU machines: GPUs set the parallelism
    assert two.sweep_spec("voc07_mini", two.rows[0]).executor.cpu_jobs == 1
    assert len([n for n, _ in two.stages() if n.startswith("bench")]) == 8
    with pytest.raises(UserError, match="SWEEP.CPU_JOBS 0: must be an integer >= 1"):
        load_pipeline_cfg("pipeline/mini.yaml", ["SWEEP.CPU_JOBS", "0"])


def test_per_benchmark_trials_must_name_a_benchmark(tmp_path):
    path = _write(tmp_path, f"_BASE_: {MINI}\nBENCH:\n  TRIALS_PER_BENCHMARK: {{coco_2x_mini: 1}}\n")
    with pytest.raises(UserError, match="TRIALS_PER_BENCHMARK.coco_2x_mini: not in BENCH.BENCHMARKS"):
        load_pipeline_cfg(path)


@pytest.mark.parametrize("text, message", [
    ("SWEEP: {SERCH: full}", "Non-existent config key: SWEEP.SERCH"),
    ("SWEEP: {SEARCH: fulll}", "SWEEP.SEARCH 'fulll': use one of"),
    ("SWEEP: {EXECUTOR: slurmm}", "SWEEP.EXECUTOR 'slurmm': use one of"),
    ("SWEEP: {TRIALS: 0}", "SWEEP.TRIALS 0: must be an integer >= 1"),
    ("SWEEP: {LRS: [0.02, -1]}", "SWEEP.LRS 0.02,-1: learning rates must be positive"),
    ("SWEEP: {METRIC: bbox/APP}", "SWEEP.METRIC 'bbox/APP': use one of"),
    ("SWEEP: {SLURM: {PARTITON: gpu}}", "Non-existent config key: SWEEP.SLURM.PARTITON"),
    ("SWEEP: {KEEP_CHECKPOINTS: 3}", "SWEEP.KEEP_CHECKPOINTS"),
    ("FINETUNE: {SCALING: sqrt}", "FINETUNE.SCALING 'sqrt': use one of faithful, linear"),
    ("FINETUNE: {WEIGHTS: w.pkl}", "FINETUNE.WEIGHTS: the pipeline sets it for each row"),
    ("BENCH: {BENCHMARKS: [voc2099]}", "BENCH.BENCHMARKS voc2099: not one of"),
    ("BENCH: {LRS: [0.02]}", "BENCH.LRS: pipeline configs now set it as SWEEP.LRS"),
    ("CPU_JOBS: 2", "CPU_JOBS: pipeline configs now set it as SWEEP.CPU_JOBS"),
])
def test_a_sweep_typo_fails_in_one_line_before_any_stage_runs(tmp_path, capsys, text, message):
    path = _write(tmp_path, f"_BASE_: {MINI}\n{text}\n")
    assert cli_main("pipeline", "--config", path, "OUTPUT_DIR", tmp_path / "out") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_the_pipeline_and_bench_build_the_same_sweep_spec(tmp_path):
    from app.cli import build_parser, sweep_spec_from_args

    path = _write(tmp_path, f"_BASE_: {MINI}\nFINETUNE:\n  CFG: {{SOLVER: {{MAX_ITER: 8}}}}\nSWEEP: {{LRS: [0.02, 0.05]}}\n")
    pipeline = Pipeline(load_pipeline_cfg(path, ["OUTPUT_DIR", str(tmp_path / "out")]))
    row = pipeline.rows[2]
    sweep = _write(tmp_path, "FINETUNE:\n  CFG: {SOLVER: {MAX_ITER: 8}}\n", "sweep.yaml")
    argv = ["bench", "--config", str(sweep), "--benchmark", "coco_1x_mini",
            "--weights", str(tmp_path / "out/rows/simsiam/weights.pkl"), "--name", "SimSiam R18 (mini)",
            "--output-dir", str(tmp_path / "out/bench/coco_1x_mini/simsiam"), "--lrs", "0.02,0.05", "--trials", "1",
            "--smoke",
            "--search", "best-then-repeat", "--gpus-per-trial", "0",
            "--datasets", str(tmp_path / "out/data/datasets.yaml"), "--cpu-jobs", str(pipeline.cpu_jobs())]
    spec = pipeline.sweep_spec("coco_1x_mini", row)
    assert spec == sweep_spec_from_args(build_parser().parse_args(argv))
    assert spec.finetune.cfg == {"SOLVER": {"MAX_ITER": 8}} and type(spec.lrs[1]) is float


def test_pretraining_runs_as_its_own_process_group():
    assert pretrain_command("c.yaml", 1) == [sys.executable, "-m", "app.cli", "pretrain",
                                             "--config", "c.yaml", "--allow-cpu"]  # the pipeline checked
    cmd = pretrain_command("c.yaml", 8)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
    assert cmd[-5:] == ["app.cli", "pretrain", "--config", "c.yaml", "--allow-cpu"]


@pytest.mark.slow
def test_a_typo_in_a_row_costs_nothing(tmp_path):
    path = _write(tmp_path, f"_BASE_: {MINI}\nROWS:\n  simsiam:\n    PRETRAIN:\n      CFG:\n"
                            "        SOLVER: {BASE_LR: .nan}\n")
    proc = run_cli("pipeline", "--config", path, "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: ROWS.simsiam.PRETRAIN.CFG: SOLVER.BASE_LR must be > 0, got nan"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_pretrains_under_torchrun_then_resumes(tmp_path):
    """Two CPU processes pretrain (gloo DDP), then convert, bench and report run once."""
    path = _write(tmp_path, """DATA: {SYNTHETIC: True, SYNTHETIC_SIZE: {NUM_TRAIN: 24, NUM_TEST: 12, NUM_UNLABELED: 96}}
PRETRAIN: {NPROC_PER_NODE: 2}
ROWS:
  simsiam:
    NAME: "SimSiam R18 (mini)"
    PRETRAIN:
      CONFIG: "pretrain/simsiam_R_18_mini.yaml"
      CFG:
        SOLVER: {EPOCHS: 1, BATCH_SIZE: 32, MAX_ITERS_PER_EPOCH: 2, AMP: False}
        DATA: {IMAGE_SIZE: 32, NUM_WORKERS: 0}
  scratch: {NAME: "scratch", WEIGHTS: "none"}
BENCH:
  BENCHMARKS: ["coco_1x_mini"]
  TRIALS_PER_BENCHMARK: {coco_1x_mini: 1}
SWEEP:
  GPUS_PER_TRIAL: 0
  LRS: [0.02]
  TRIALS: 2
FINETUNE:
  CFG:
    SOLVER: {MAX_ITER: 4, STEPS: [3], WARMUP_ITERS: 2, CHECKPOINT_PERIOD: 2}
    TEST: {PRECISE_BN: {NUM_ITER: 2}}
""")
    out = tmp_path / "out"
    proc = run_cli("pipeline", "--config", path, "OUTPUT_DIR", out, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert state["pretrain:simsiam"]["status"] == "done (2 processes each: simsiam)"
    # Two steps learn nothing: the converter says so, once, before any fine-tune is spent on it.
    said = (proc.stdout + proc.stderr).count("WARNING: pretraining loss never went below")
    assert said == 1, proc.stdout + proc.stderr
    assert all(s["status"].startswith("done") or s["status"].startswith("skipped") for s in state.values())
    assert "pretrain:scratch" not in state and "convert:scratch" not in state
    # Both ranks trained: the checkpoint records the world size through its per-rank RNG states.
    import torch

    ckpt = torch.load(out / "rows/simsiam/pretrain/checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    summary = json.loads((out / "bench/coco_1x_mini/simsiam/summary.json").read_text())
    assert summary["metrics"]["bbox/AP"]["n"] == 1  # TRIALS_PER_BENCHMARK wins over TRIALS
    assert json.loads((out / "rows/simsiam/weights.pkl.report.json").read_text())["source"] == "simsiam-transfer"
    report = (out / "report.md").read_text()
    assert "SimSiam R18 (mini)" in report and "scratch" in report
    again = run_cli("pipeline", "--config", path, "OUTPUT_DIR", out, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert state["pretrain:simsiam"]["status"] == "done earlier"
    assert state["convert:simsiam"]["status"] == "done earlier"
    assert "running (attempt" not in again.stdout


@pytest.mark.slow
def test_rows_sweeps_run_side_by_side_each_in_its_log_and_resume(tmp_path):
    """SWEEP.CPU_JOBS 2 without GPUs: two rows' sweeps as two bench processes, one trial at a time each."""
    path = _write(tmp_path, """DATA: {SYNTHETIC: True, SYNTHETIC_SIZE: {NUM_TRAIN: 16, NUM_TEST: 8, NUM_UNLABELED: 8}}
ROWS:
  a: {NAME: "scratch a", WEIGHTS: "none"}
  b: {NAME: "scratch b", WEIGHTS: "none", SWEEP: {TRIALS: 1}}
BENCH: {BENCHMARKS: ["voc07_mini"]}
SWEEP: {GPUS_PER_TRIAL: 0, LRS: [0.02], TRIALS: 2, CPU_JOBS: 2}
FINETUNE:
  CFG:
    SOLVER: {MAX_ITER: 2, STEPS: [1], WARMUP_ITERS: 1, CHECKPOINT_PERIOD: 2}
    TEST: {PRECISE_BN: {NUM_ITER: 1}}
""")
    out = tmp_path / "out"
    proc = run_cli("pipeline", "--config", path, "OUTPUT_DIR", out, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert state["bench:voc07_mini:a+b"]["status"] == "done (2 sweeps, 2 side by side)"
    assert "[pipeline] bench voc07_mini: a beside 1 other(s); log:" in proc.stdout
    assert "[pipeline] bench voc07_mini: b done, bbox/AP50" in proc.stdout
    for row, trials in (("a", 2), ("b", 1)):
        log = (out / f"rows/{row}/bench_voc07_mini.log").read_text()
        assert f"[bench] trials: {trials} done, 0 failed" in log
        summary = json.loads((out / f"bench/voc07_mini/{row}/summary.json").read_text())
        assert summary["metrics"]["bbox/AP50"]["n"] == trials and summary["name"] == f"scratch {row}"
        ran = [json.loads(line) for line in (out / f"bench/voc07_mini/{row}/runs.jsonl").read_text().splitlines()]
        assert {r.get("cpu_threads") for r in ran if r["status"] == "done"} == {1}  # each sweep: its share
    assert "scratch a" in (out / "report.md").read_text() and (out / "report_rows.png").is_file()
    again = run_cli("pipeline", "--config", path, "OUTPUT_DIR", out, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "pipeline.json").read_text())["stages"]["bench:voc07_mini:a+b"]["status"] == "done earlier"


def test_a_labeled_method_s_row_pretrains_on_the_labeled_folders(tmp_path):
    path = _write(tmp_path, f"_BASE_: {MINI}\nROWS:\n  supervised:\n    PRETRAIN:\n"
                            "      CONFIG: pretrain/simsiam_R_18_mini.yaml\n      CFG: {MODEL: {METHOD: supervised}}\n")
    pipeline = Pipeline(load_pipeline_cfg(path, ["OUTPUT_DIR", str(tmp_path / "out")]))
    rows = {row.id: row for row in pipeline.rows}
    assert pipeline.pretrain_cfg(rows["supervised"]).DATA.TRAIN_DIR == str(tmp_path / "out/data/labeled/train")
    assert pipeline.pretrain_cfg(rows["simsiam"]).DATA.TRAIN_DIR == str(tmp_path / "out/data/unlabeled")
