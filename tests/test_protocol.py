"""Fast tests of the detection stage's pure parts: typed specs, batch policy plans, resume guard,
metric names, NaN-safe aggregation, reports with provenance, executors' GPU masks and Slurm requests."""

import csv
import io
import json
import math
import time
from pathlib import Path

import pytest

from conftest import cli_main
from detection import batch_policy, protocol
from detection.spec import ExecutorOptions, FinetuneJob
from simsiam_transfer.errors import UserError

VOC07 = "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc07.yaml"
VOC07_MINI = "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml"


def _plan(config, gpus, scaling="faithful", *overrides):
    from detection.finetune import build_cfg

    job = FinetuneJob(config_file=config, weights="none", num_gpus=gpus, scaling=scaling, overrides=overrides)
    return batch_policy.plan_batch(build_cfg(job, cuda=gpus > 0), job.world_size, scaling)


# -- batch policy --------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus,per_gpu", [(1, 16), (2, 8), (4, 4), (8, 2)])
def test_faithful_plan_keeps_batch_16_lr_and_schedule_and_syncs_bn_over_the_trial(gpus, per_gpu):
    plan = _plan(VOC07, gpus)
    assert (plan.world_size, plan.ims_per_gpu, plan.effective_batch, plan.bn_group) == (gpus, per_gpu, 16, 16)
    assert (plan.base_lr, plan.max_iter, plan.steps, plan.warmup_iters) == (0.02, 24000, (18000, 22000), 100)
    assert plan.bn_mode == ("SyncBN" if gpus > 1 else "naiveSyncBN")
    # Faithful to the batch, BN group and schedule; only more than 2 images per GPU pad differently from 8x2.
    assert plan.flags == ([] if per_gpu == 2 else [f"{per_gpu} images per GPU: padding differs from 8x2"])


def test_linear_scaling_is_opt_in_and_flagged():
    plan = _plan(VOC07, 1, "linear")
    assert (plan.ims_per_gpu, plan.effective_batch, plan.bn_group, plan.max_iter) == (2, 2, 2, 192000)
    assert plan.base_lr == pytest.approx(0.0025) and plan.lr_scale == pytest.approx(0.125)
    assert "batch 2 != 16" in plan.flags and "BN group 2 != 16" in plan.flags
    assert _plan(VOC07, 8, "linear").flags == []  # at the reference world size both policies agree


def test_cpu_plan_is_one_process_with_the_config_batch():
    plan = _plan(VOC07_MINI, 0)
    assert (plan.world_size, plan.ims_per_gpu, plan.effective_batch, plan.bn_mode, plan.bn_group) == (1, 4, 4, "BN", 4)


def test_batch_that_does_not_split_and_memory_that_does_not_fit_are_refused():
    with pytest.raises(UserError, match="cannot be split over 3 GPUs"):
        _plan(VOC07, 3)
    one_gpu = _plan(VOC07, 1)
    assert one_gpu.est_gib_per_gpu == pytest.approx(69.2)  # 0.4 + 16 x 4.3 GiB (CPU count, trainable BN)
    batch_policy.check_fits(one_gpu, 79.6)  # an 80 GB H100: 1x16 fits, at the edge
    batch_policy.check_fits(one_gpu, None)  # CPU / unknown: nothing to check
    with pytest.raises(UserError, match=r"8 image\(s\) per GPU fit; use 2 GPUs per trial \(2x8, --gpus-per-trial 2\)"
                                        ".*--scaling linear.*smaller input"):
        batch_policy.check_fits(one_gpu, 40)
    with pytest.raises(UserError, match=r"16 images per GPU need about 69.2 GiB.*4 image\(s\) per GPU fit; use 4 GPUs"):
        batch_policy.check_fits(one_gpu, 24)  # a 24 GB card
    batch_policy.check_fits(_plan(VOC07, 4), 24)


def test_dry_runs_print_the_plan_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli_main("bench", "--benchmark", "voc07", "--weights", "none", "--output-dir", out, "--lrs", "0.02,0.05",
                    "--dry-run", "--assume-gpus", "4") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["per_trial"]["setup"] == "4x4" and plan["per_trial"]["bn_group"] == 16
    assert plan["fine_tunes"] == 6 and [t["seed"] for t in plan["then_at_selected_lr"]] == [1001, 1002, 1003, 1004]
    assert plan["gpus_per_trial"] == 4 and plan["parallel_trials"] == 1
    assert not out.exists()
    assert cli_main("finetune", "--config", VOC07, "--weights", "none", "--dry-run", "--assume-gpus", "2",
                    "--scaling", "linear") == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world_size"], plan["ims_per_gpu"], plan["effective_batch"], plan["max_iter"]) == (2, 2, 4, 96000)
    assert plan["flags"]


# -- specs ---------------------------------------------------------------------------------------
def test_bench_flags_and_a_bench_yaml_build_the_same_spec(tmp_path):
    from app.cli import build_parser, sweep_spec_from_args

    out = str(tmp_path / "b")
    by_flags = sweep_spec_from_args(build_parser().parse_args(
        ["bench", "--benchmark", "voc07", "--weights", "none", "--output-dir", out, "--lrs", "0.02,0.05",
         "--trials", "3", "--search", "full", "--gpus-per-trial", "2", "--executor", "slurm", "--slurm-time",
         "120", "SOLVER.CHECKPOINT_PERIOD", "500"]))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"FINETUNE: {{CONFIG: voc07, WEIGHTS: none}}\nSWEEP:\n  OUTPUT_DIR: {out}\n  LRS: [0.02, 0.05]\n"
                     "  TRIALS: 3\n  SEARCH: full\n  GPUS_PER_TRIAL: 2\n  EXECUTOR: slurm\n  SLURM: {TIME_MIN: 120}\n")
    by_file = sweep_spec_from_args(build_parser().parse_args(["bench", "--config", str(sweep),
                                                              "SOLVER.CHECKPOINT_PERIOD", "500"]))
    assert by_flags == by_file and by_flags.name == "scratch" and by_flags.lrs == (0.02, 0.05)
    assert by_flags.executor == ExecutorOptions(kind="slurm", gpus_per_trial=2, slurm_time_min=120)
    assert by_flags.finetune.overrides == ("SOLVER.CHECKPOINT_PERIOD", "500")


def test_the_parser_restates_no_default_and_help_shows_the_schema_s():
    from app.cli import build_parser
    from detection import schema

    args = build_parser().parse_args(["bench"])
    assert schema.flag_values(schema.BENCH_FLAGS, args) == ({}, {})  # nothing given, nothing set
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    text = bench.format_help().replace("\n", " ")
    for flag in schema.BENCH_FLAGS:
        assert flag.key in text
    assert "default: 5]" in " ".join(text.split()) and f"default: {schema.SWEEP.SLURM.TIME_MIN}]" in text


@pytest.mark.parametrize("flags, yaml_text, message", [
    (["--trials", "0"], None, "--trials 0: must be an integer >= 1"),
    ([], "SWEEP: {TRIALS: 0}", "sweep.yaml: SWEEP.TRIALS 0: must be an integer >= 1"),
    (["--lrs", "0.1,0.1"], None, "--lrs 0.1,0.1: a learning rate is repeated"),
    ([], "SWEEP: {LRS: [0.1, 0.1]}", "sweep.yaml: SWEEP.LRS 0.1,0.1: a learning rate is repeated"),
    ([], "SWEEP: {LRS: [fast]}", "SWEEP.LRS: element 0 is str 'fast'"),
    (["--max-retries", "-1"], None, "--max-retries -1: must be an integer >= 0"),
    ([], "SWEEP: {SEARCH: best}", "sweep.yaml: SWEEP.SEARCH 'best': use one of"),
    ([], "FINETUNE: {SCALING: sqrt}", "sweep.yaml: FINETUNE.SCALING 'sqrt': use one of faithful, linear"),
    (["--benchmark", "voc2099"], None, "--benchmark voc2099: not one of"),
    ([], "FINETUNE: {CONFIG: voc2099}", "sweep.yaml: FINETUNE.CONFIG voc2099: not one of"),
    (["--cpu-jobs", "2", "--executor", "slurm"], None, "--cpu-jobs 2: runs CPU trials side by side"),
    ([], "SWEEP: {SLURM: {MEM_PER_GPU_GB: 0}}", "sweep.yaml: SWEEP.SLURM.MEM_PER_GPU_GB 0: must be an integer"),
])
def test_validation_names_the_flag_or_the_key(tmp_path, flags, yaml_text, message):
    from app.cli import build_parser, sweep_spec_from_args

    argv = ["bench", "--weights", "none", *flags]
    if "--benchmark" not in flags:
        argv += ["--benchmark", "voc07"]
    argv += ["--output-dir", str(tmp_path / "b")]
    if yaml_text is not None:
        (tmp_path / "sweep.yaml").write_text(yaml_text + "\n")
        argv += ["--config", str(tmp_path / "sweep.yaml")]
        argv = [a for a in argv if a not in ("--benchmark", "voc07")] if "CONFIG" in yaml_text else argv
    with pytest.raises(UserError) as err:
        sweep_spec_from_args(build_parser().parse_args(argv))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_trial_job_file_keeps_the_lr_a_float_and_holds_the_whole_config(tmp_path):
    from detection.batch_policy import plan_batch
    from detection.finetune import build_cfg, with_values
    from detection.job import read_job, write_job

    job = FinetuneJob(config_file="voc07_mini", weights="none", cfg={"SOLVER": {"MAX_ITER": 8}})
    cfg = with_values(build_cfg(job, cuda=False), {"SOLVER.BASE_LR": 0.05, "SEED": 1002,
                                                   "OUTPUT_DIR": str(tmp_path / "t")})
    path = write_job(tmp_path / "t", job, cfg, plan_batch(cfg, 1, "faithful"))
    import yaml

    written = yaml.safe_load(path.read_text())
    assert written["detectron2"]["SOLVER"]["BASE_LR"] == 0.05 and type(written["detectron2"]["SOLVER"]["BASE_LR"]) is float
    assert written["detectron2"]["SOLVER"]["MAX_ITER"] == 8 and written["plan"]["max_iter"] == 8
    loaded = read_job(path)
    assert type(loaded.cfg.SOLVER.BASE_LR) is float and loaded.cfg.SOLVER.BASE_LR == 0.05
    assert yaml.safe_load(loaded.cfg.dump()) == yaml.safe_load(cfg.dump())
    assert loaded.job.config_file.endswith("faster_rcnn_R_18_C4_voc07_mini.yaml")


def test_nothing_in_detection_imports_the_cli_or_the_pipeline():
    import ast

    root = Path(__file__).resolve().parent.parent / "detection"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(("app.cli", "app.pipeline"))], path


# -- protocol: metrics, search variants, non-finite values ---------------------------------------
def test_metric_names_by_benchmark():
    assert protocol.allowed_metrics(["pascal_voc"], False) == ["bbox/AP50", "bbox/AP", "bbox/AP75"]
    coco = protocol.allowed_metrics(["coco"], True)
    assert "segm/AP" in coco and "bbox/APs" in coco and "segm/APl" in coco
    with pytest.raises(UserError, match="--metric bogus/AP: voc07 reports bbox/AP50"):
        protocol.check_metric("bogus/AP", protocol.allowed_metrics(["pascal_voc"], False), "voc07")


def _rec(lr, trial, ap, status="done"):
    return {"id": protocol.trial_id(lr, trial), "lr": lr, "trial": trial, "seed": protocol.trial_seed(trial),
            "status": status, "metrics": {} if ap is None else {"bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/AP75": ap - 5}}


def _settings(search="best-then-repeat", lrs=(0.02, 0.05)):
    return {"name": "R18", "benchmark": "voc07_mini", "config": VOC07_MINI, "weights": "none", "lrs": list(lrs),
            "metric": "bbox/AP", "search": search, "column": "synthetic_voc_test, 11-point AP, Faster R-CNN R18-C4 4 it",
            "scaling": "faithful", "world_size": 1, "ims_per_gpu": 4, "effective_batch": 4, "bn_mode": "BN",
            "bn_group": 4, "lr_scale": 1.0, "max_iter": 4, "flags": []}


def test_non_finite_metrics_count_as_failed_and_never_win():
    records = [_rec(0.02, 0, 5.4), _rec(0.05, 0, math.nan), _rec(0.1, 0, math.inf)]
    assert protocol.select_lr(records, "bbox/AP", [0.02, 0.05, 0.1], "best-then-repeat") == 0.02
    summary = protocol.build_summary(_settings(lrs=(0.02, 0.05, 0.1)), records)
    assert summary["selected_lr"] == 0.02 and summary["trials"]["failed"] == 2
    assert summary["trials"]["non_finite"] == ["lr0.05_t0", "lr0.1_t0"]
    assert protocol.mean_std([1.0, math.nan, math.inf, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}


def test_independent_search_leaves_the_selecting_trial_out():
    assert protocol.repeat_plan(0.05, 3, "best-then-repeat") == [(0.05, 1), (0.05, 2)]
    assert protocol.repeat_plan(0.05, 3, "best-then-repeat-independent") == [(0.05, 1), (0.05, 2), (0.05, 3)]
    records = [_rec(0.02, 0, 10.0), _rec(0.05, 0, 30.0), _rec(0.05, 1, 20.0), _rec(0.05, 2, 22.0)]
    dependent = protocol.build_summary(_settings(), records)
    independent = protocol.build_summary(_settings("best-then-repeat-independent"), records)
    assert dependent["metrics"]["bbox/AP"]["mean"] == pytest.approx(24.0) and dependent["reported_trials"] == [0, 1, 2]
    assert independent["metrics"]["bbox/AP"]["mean"] == pytest.approx(21.0) and independent["reported_trials"] == [1, 2]
    assert "includes trial 0" in dependent["selection"]["rule"] and "leaves trial 0 out" in independent["selection"]["rule"]


def test_a_box_classifier_still_at_the_class_prior_is_flagged_in_bench_and_report():
    from detectron2.utils.events import EventStorage

    from detection.finetune import late_mean
    from detection.report import render

    with EventStorage(0) as storage:  # detectron2's own store of training scalars
        for it, value in enumerate([0.5] * 8 + [0.0, 0.0]):
            storage.iter = it
            storage.put_scalar("fast_rcnn/fg_cls_accuracy", value, smoothing_hint=False)
    assert late_mean(storage, "fast_rcnn/fg_cls_accuracy") == 0.0  # the last 20 %: what training ended on
    assert late_mean(storage, "fast_rcnn/fg_cls_accuracy", share=0.5) == pytest.approx(0.3)
    assert late_mean(storage, "never/logged") is None and late_mean(None, "x") is None

    def with_fg(records, values):
        for r, v in zip(records, values):
            r["metrics"][protocol.CLASSIFIER_METRIC] = v
        return records

    stuck = protocol.build_summary(_settings(), with_fg([_rec(0.02, 0, 1.0), _rec(0.05, 0, 2.0), _rec(0.05, 1, 1.5)],
                                                        [0.9, 0.0, 0.06]))
    assert stuck["classifier"]["fg_cls_accuracy"]["n"] == 2  # the selected LR's trials only
    assert stuck["classifier"]["fg_cls_accuracy"]["mean"] == pytest.approx(0.03) and not stuck["classifier"]["learned"]
    line = protocol.classifier_warning(stuck)
    assert "R18 on voc07_mini" in line and "3 %" in line and "SOLVER.MAX_ITER" in line
    learned = protocol.build_summary(_settings(), with_fg([_rec(0.02, 0, 1.0), _rec(0.05, 0, 2.0)], [0.1, 0.4]))
    assert learned["classifier"]["learned"] and protocol.classifier_warning(learned) is None
    unlogged = protocol.build_summary(_settings(), [_rec(0.05, 0, 2.0)])  # runs recorded before the check
    assert unlogged["classifier"] is None and protocol.classifier_warning(unlogged) is None

    settings = _settings()
    records = with_fg([_rec(0.05, 0, 2.0), _rec(0.05, 1, 1.5)], [0.0, 0.06])
    bench = {"dir": "x", "settings": settings, "records": records, "summary": protocol.build_summary(settings, records)}
    table = render([bench], "md")
    assert "(n=2) †" in table and "† The box classifier never left the class prior" in table and "R18 on voc07_mini 3 %" in table
    assert r"\dag{}" in render([bench], "latex")
    csv_rows = [r for r in render([bench], "csv").splitlines() if protocol.CLASSIFIER_METRIC in r]
    assert len(csv_rows) == 1 and ",0.03," in csv_rows[0]
    settings_ok = dict(settings, name="ok")
    ok_records = with_fg([_rec(0.05, 0, 2.0)], [0.5])
    ok = {"dir": "y", "settings": settings_ok, "records": ok_records, "summary": protocol.build_summary(settings_ok, ok_records)}
    assert "†" not in render([ok], "md")


def test_a_smoke_column_is_labelled_once_and_its_cells_carry_no_classifier_mark(tmp_path):
    from PIL import Image

    from detection.report import plot_rows, render

    def bench(name, smoke, fg, values):
        settings = dict(_settings(), name=name, smoke=smoke,
                        column="synthetic_voc_test, VOC07 11-point AP, Faster R-CNN R18-C4 140 it"
                               + (f", {protocol.SMOKE_LABEL}" if smoke else ""))
        records = [_rec(0.05, t, v) for t, v in enumerate(values)]
        for r in records:
            r["metrics"][protocol.CLASSIFIER_METRIC] = fg
        return {"dir": name, "settings": settings, "records": records, "summary": protocol.build_summary(settings, records)}

    smoke = bench("R18", True, 0.0, [2.0, 3.0])
    assert smoke["summary"]["smoke"] and protocol.classifier_warning(smoke["summary"]) is None
    table = render([smoke], "md")
    assert "140 it, smoke run: too short to rank) AP50 / AP / AP75" in table
    assert "†" not in table and "Smoke runs (R18 on voc07_mini)" in table
    stuck = bench("R18", False, 0.0, [2.0, 3.0])  # the same cells, not a smoke run: marked
    assert "(n=2) †" in render([stuck], "md")

    path = tmp_path / "rows.png"
    plot_rows([smoke, bench("R50", False, 0.5, [4.0, 5.0])], path, metric="bbox/AP")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200


# -- resume guard --------------------------------------------------------------------------------
def test_a_folder_checkpointed_under_another_schedule_is_refused(tmp_path):
    from detection.finetune import SCHEDULE, check_resume

    plan = _plan(VOC07, 8)
    check_resume(tmp_path, plan)  # empty folder: a fresh start
    (tmp_path / SCHEDULE).write_text(json.dumps(_plan(VOC07, 1, "linear").resume_record()))
    with pytest.raises(UserError, match=r"max_iter 192000 \(now 24000\).*use a new OUTPUT_DIR"):
        check_resume(tmp_path, plan)
    (tmp_path / SCHEDULE).write_text(json.dumps(plan.resume_record()))
    check_resume(tmp_path, plan)
    (tmp_path / SCHEDULE).unlink()  # no record: judge by the checkpoint's iteration
    (tmp_path / "last_checkpoint").write_text("model_0039999.pth")
    with pytest.raises(UserError, match="model_0039999.pth .* another schedule"):
        check_resume(tmp_path, plan)
    (tmp_path / "last_checkpoint").write_text("model_0000999.pth")
    check_resume(tmp_path, plan)


def test_wrapped_floating_point_error_is_still_divergence():
    from torch.multiprocessing.spawn import ProcessRaisedException

    from detection.finetune import diverged_reason

    wrapped = ProcessRaisedException("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent "
                                     "call last):\n  File \"x.py\", line 1\nFloatingPointError: Loss became infinite "
                                     "or NaN at iteration=7!\n", 1, 123)
    assert diverged_reason(wrapped) == "Loss became infinite or NaN at iteration=7!"
    assert diverged_reason(FloatingPointError("nan")) == "nan"
    assert diverged_reason(RuntimeError("CUDA out of memory")) is None


# -- executors -----------------------------------------------------------------------------------
def test_parallel_trials_stay_on_the_parents_gpus(monkeypatch):
    from detection import executors

    assert executors.device_slots("4,5,6,7", 4, 1) == [["4"], ["5"], ["6"], ["7"]]
    assert executors.device_slots("4,5,6,7", 4, 2) == [["4", "5"], ["6", "7"]]
    assert executors.device_slots(None, 2, 1) == [["0"], ["1"]]
    assert executors.device_slots("4,5,6,7", 4, 4) == [["4", "5", "6", "7"]]
    assert executors.device_slots(None, 0, 0) == [[]]
    # CPU trials side by side (--cpu-jobs); GPU trials keep their GPU groups whatever --cpu-jobs says.
    assert executors.local_slots(None, 0, 0, cpu_jobs=2) == [[], []]
    assert executors.local_slots("4,5", 2, 1, cpu_jobs=2) == [["4"], ["5"]]
    seen = []

    def fake_trial(trial, env=None, children=None):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        time.sleep(0.2)  # both slots busy at once
        return executors.TrialResult(True)

    monkeypatch.setattr(executors, "run_trial_process", fake_trial)
    ex = executors.LocalExecutor(gpus_per_trial=1, device_count=2, parent_mask="6,7")
    ex.run(["a", "b", "c", "d"], lambda *a: None, lambda *a: None)
    assert sorted(set(seen)) == ["6", "7"] and len(seen) == 4


def test_slurm_jobs_request_cpus_memory_and_a_common_time_limit(tmp_path, monkeypatch):
    from detection.executors import SubmititExecutor, slurm_parameters

    assert slurm_parameters(8) == {"timeout_min": 240, "tasks_per_node": 1, "nodes": 1, "cpus_per_task": 48,
                                   "mem_gb": 256, "gpus_per_node": 8}
    srun = tmp_path / "bin" / "srun"  # submitit checks for srun; no job is submitted
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{__import__('os').environ['PATH']}")
    ex = SubmititExecutor(tmp_path / "jobs", cluster="slurm", gpus_per_trial=4, options=ExecutorOptions(
        slurm_partition="gpu", slurm_time_min=120, slurm_cpus_per_gpu=10, slurm_mem_per_gpu_gb=64))
    params = ex.executor._executor.parameters
    assert (params["cpus_per_task"], params["mem"], params["gpus_per_node"], params["time"],
            params["partition"]) == (40, "256GB", 4, 120, "gpu")
    from detection.executors import TrialJob
    from submitit.helpers import Checkpointable

    assert issubclass(TrialJob, Checkpointable)  # submitit requeues a timed-out trial, which resumes


# -- reports -------------------------------------------------------------------------------------
def _bench_folder(path, settings, records):
    path.mkdir(parents=True)
    (path / "bench.json").write_text(json.dumps(settings))
    (path / "runs.jsonl").write_text("".join(json.dumps({**r, "time": 0}) + "\n" for r in records))
    return path


@pytest.fixture
def two_rows(tmp_path):
    ours = _bench_folder(tmp_path / "ours", _settings(), [
        _rec(0.02, 0, 40.0), _rec(0.05, 0, 45.0), _rec(0.05, 1, 47.0), _rec(0.05, 2, math.nan)])
    linear = {**_settings(), "name": "R18 linear", "scaling": "linear", "world_size": 1, "ims_per_gpu": 1,
              "effective_batch": 1, "bn_group": 1, "lr_scale": 0.25, "max_iter": 16,
              "flags": ["batch 1 != 4", "BN group 1 != 4"]}
    other = _bench_folder(tmp_path / "linear", linear, [_rec(0.02, 0, 30.0)])
    return ours, other


def test_markdown_report_names_columns_setup_trials_and_the_paper(two_rows):
    from detection.report import load_benches, render

    text = render(load_benches(two_rows), "md", per_trial=True, reference="paper")
    assert "VOC 07 (mini) det. (synthetic_voc_test, 11-point AP, Faster R-CNN R18-C4 4 it) AP50 / AP / AP75" in text
    assert "| R18 | 92.0 ± 2.8 / 46.0 ± 1.4 / 41.0 ± 1.4 (n=2) | 1×4, BN 4, LR 0.05 |" in text
    assert "1×1, BN 1, LR 0.02 (×0.25 = 0.005) ⚠ batch 1 != 4; BN group 1 != 4" in text
    assert "| paper: SimSiam, base | 75.5 / 47.0 / 50.2 |" in text
    assert "| R18 − SimSiam, base | +16.5 / -1.0 / -9.2 |" in text
    assert "| R18 − SimSiam, optimal | +14.7 / -2.5 / -11.5 |" in text
    assert "the mean includes trial 0, which selected the LR" in text and "NaN/inf" in text
    assert "| R18 | voc07_mini | lr0.05_t1 | 0.05 | 1 | 1001 | done | – | 94.0 | 47.0 | 42.0 |" in text


def test_csv_and_latex_reports_carry_the_same_provenance(two_rows):
    from detection.report import load_benches, render

    benches = load_benches(two_rows)
    rows = list(csv.DictReader(io.StringIO(render(benches, "csv", per_trial=True, reference="paper"))))
    main = [r for r in rows if r["table"] == "main" and r["name"] == "R18" and r["metric"] == "bbox/AP"]
    assert len(main) == 1 and float(main[0]["mean"]) == 46.0 and main[0]["world_size"] == "1"
    assert main[0]["bn_group"] == "4" and main[0]["column"].startswith("synthetic_voc_test, 11-point AP")
    assert {r["seed"] for r in rows if r["table"] == "trial" and r["name"] == "R18"} == {"1000", "1001", "1002"}
    paper = [r for r in rows if r["table"] == "paper" and r["name"] == "SimSiam, optimal" and r["benchmark"] == "voc07"]
    assert [float(r["mean"]) for r in paper] == [77.3, 48.5, 52.5]
    diff = [r for r in rows if r["table"] == "difference to SimSiam, base" and r["name"] == "R18"
            and r["metric"] == "bbox/AP"]
    assert len(diff) == 1 and float(diff[0]["mean"]) == pytest.approx(-1.0)
    flagged = [r for r in rows if r["table"] == "main" and r["name"] == "R18 linear"]
    assert flagged and "BN group 1 != 4" in flagged[0]["flags"]
    latex = render(benches, "latex", per_trial=True, reference="paper")
    assert r"1$\times$4, BN 4, LR 0.05" in latex and "paper: SimSiam, base" in latex
    assert "11-point AP" in latex and "% Trials" in latex and r"\textbf{!}" in latex
    assert "includes trial 0" in latex and latex.count(r"\begin{tabular}") == 5


def test_more_gpus_per_trial_than_visible_is_refused_before_any_write(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli_main("bench", "--benchmark", "voc07_mini", "--weights", "none", "--output-dir", tmp_path / "b",
                    "--gpus-per-trial", "2") == 2
    assert "--gpus-per-trial 2: this machine shows 1 GPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_selection_bias_of_each_mode_and_of_mixed_setups_is_stated_under_the_table(two_rows, tmp_path):
    from detection.report import load_benches, render

    assert protocol.expected_max_of_normals(3) == pytest.approx(0.8463, abs=1e-3)
    assert protocol.selection_bias("best-then-repeat", 3, 5) == pytest.approx(0.169, abs=1e-3)  # trial 0 in the mean
    assert protocol.selection_bias("full", 3, 1) == pytest.approx(0.846, abs=1e-3)  # COCO: best of 3 at 1 trial
    assert protocol.selection_bias("best-then-repeat-independent", 3, 5) == 0.0
    coco = _bench_folder(tmp_path / "coco", {**_settings(lrs=(0.02, 0.03, 0.05)), "name": "R18 coco"},
                         [_rec(0.02, 0, 40.0), _rec(0.03, 0, 41.0), _rec(0.05, 0, 42.0)])
    text = render(load_benches([*two_rows, coco]), "md")
    assert "Selection bias (R18 on voc07_mini): the mean of 2 trials includes the selecting trial 0 (best of 2 LRs)" \
           in text and "+0.28 σ" in text
    assert "Selection bias (R18 coco on voc07_mini): each is the best of 3 runs at 1 trial" in text and "+0.85 σ" in text
    assert "Rows of voc07_mini mix setups (1×1, BN 1; 1×4, BN 4)" in text
    single = render(load_benches([two_rows[0]]), "md")
    assert "mix setups" not in single


def test_a_multi_machine_finetune_without_a_rendezvous_address_is_one_line(capsys):
    assert cli_main("finetune", "--config", "voc07", "--weights", "none", "--num-machines", "2",
                    "--machine-rank", "1", "--dry-run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --dist-url auto: 2 machines need the address of machine rank 0 on every machine, "
                   "e.g. tcp://node01:29500"]
