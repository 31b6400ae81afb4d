"""Benchmark runner: protocol logic, sweeps through both executors with SIGKILL + rerun,
failure handling, reports, and the pipeline."""

import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from conftest import cli_main
from detection import protocol
from simsiam_transfer.errors import UserError

SHORT = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
         "TEST.PRECISE_BN.NUM_ITER", "2"]


# -- protocol (pure) -----------------------------------------------------------------------------
def test_lr_grid_parsing_and_refusals():
    assert protocol.parse_lrs("0.02, 0.05,0.1") == [0.02, 0.05, 0.1]
    for bad, message in (("0.02,abc", "not a number"), ("-0.1", "positive"), ("0.02,0.02", "repeated"),
                         ("inf", "positive and finite"), ("", "not a number")):
        with pytest.raises(UserError, match=message):
            protocol.parse_lrs(bad)


def test_plans_full_versus_best_then_repeat():
    lrs = [0.01, 0.02, 0.05]
    assert len(protocol.search_plan(lrs, 5, "full")) == 15 and protocol.repeat_plan(0.02, 5, "full") == []
    first = protocol.search_plan(lrs, 5, "best-then-repeat")
    rest = protocol.repeat_plan(0.02, 5, "best-then-repeat")
    assert first == [(0.01, 0), (0.02, 0), (0.05, 0)] and rest == [(0.02, t) for t in range(1, 5)]
    assert len(first) + len(rest) == 3 + 5 - 1
    # Seeds depend on the trial index only: trial t has the same seed at every LR, trials differ.
    assert len({protocol.trial_seed(t) for t in range(5)}) == 5 and protocol.trial_seed(0) == protocol.SEED_BASE


def _rec(lr, trial, ap, status="done"):
    return {"lr": lr, "trial": trial, "status": status, "metrics": {"bbox/AP": ap} if ap is not None else {}}


def test_selection_and_aggregation():
    records = [_rec(0.02, 0, 40.0), _rec(0.05, 0, 42.0), _rec(0.05, 1, 30.0), _rec(0.1, 0, None, "failed")]
    assert protocol.select_lr(records, "bbox/AP", [0.02, 0.05, 0.1], "best-then-repeat") == 0.05
    assert protocol.select_lr(records, "bbox/AP", [0.02, 0.05, 0.1], "full") == 0.02
    assert protocol.select_lr([_rec(0.1, 0, None, "failed")], "bbox/AP", [0.1]) is None
    assert protocol.selection_values(records, "bbox/AP", [0.02, 0.05, 0.1], "best-then-repeat") == \
        {0.02: 40.0, 0.05: 42.0, 0.1: None}
    assert protocol.selection_values(records, "bbox/AP", [0.05], "full") == {0.05: 36.0}
    stats = protocol.mean_std([1.0, 2.0, 4.0])
    assert stats == {"mean": pytest.approx(7 / 3), "std": pytest.approx(statistics.stdev([1, 2, 4])), "n": 3}
    assert protocol.mean_std([5.0])["std"] is None


# -- sweeps --------------------------------------------------------------------------------------
def _bench_args(synthetic, weights, out, *extra, executor="local", lrs="0.02,0.05"):
    return ["bench", "--benchmark", "voc07_mini", "--weights", str(weights), "--output-dir", str(out),
            "--lrs", lrs, "--trials", "2", "--search", "full", "--executor", executor, "--name", "R18",
            "--datasets", str(synthetic / "datasets.yaml"), *extra, *SHORT]


def _events(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def _kill_after_first_done_then_rerun(args, out, trials=4):
    cmd = [sys.executable, "-m", "app.cli", *args]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "runs.jsonl").is_file() and any(e["status"] == "done" for e in _events(out)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {e["id"] for e in _events(out) if e["status"] == "done"}
    assert 0 < len(done_before) < trials
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    events = _events(out)
    for tid in done_before:  # finished trials were not started again
        assert sum(e["id"] == tid and e["status"] == "running" for e in events) == 1
    return events


def _check_summary_matches_store(out, trials=4):
    latest = {}
    for e in _events(out):
        latest[e["id"]] = e
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"done": trials, "failed": 0, "unfinished": 0, "non_finite": []}
    lr = summary["selected_lr"]
    for key in ("bbox/AP50", "bbox/AP", "bbox/AP75"):
        values = [r["metrics"][key] for r in latest.values() if r["lr"] == lr]
        assert summary["metrics"][key]["mean"] == pytest.approx(statistics.fmean(values))
        assert summary["metrics"][key]["std"] == pytest.approx(statistics.stdev(values))
        assert summary["metrics"][key]["n"] == 2
        cell = f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"
        assert cell in (out / "table.md").read_text()
    for r in latest.values():
        assert r["seed"] == protocol.trial_seed(r["trial"]) and r["config_hash"] and r["versions"]["torch"]
        assert r["weights_sha256"] and r["world_size"] == 1 and r["norm"] == "BN" and r["wall_time_s"] > 0
        assert (r["ims_per_gpu"], r["effective_batch"], r["bn_group"], r["max_iter"]) == (4, 4, 4, 4)
        assert r["flags"] == ["4 images per GPU: padding differs from 8x2"]
        assert (out / "trials" / r["id"] / "metrics.json").is_file()
        assert not list((out / "trials" / r["id"]).glob("model_0*.pth"))
    assert (out / "ap_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["setup"]["world_size"] == 1 and summary["setup"]["scaling"] == "faithful"
    return summary


@pytest.fixture(scope="module")
def local_sweep(synthetic, r18_pkl, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "local"
    events = _kill_after_first_done_then_rerun(_bench_args(synthetic, r18_pkl, out, "--cpu-jobs", "2"), out)
    return out, events


def test_local_sweep_survives_sigkill_and_matches_its_store(local_sweep):
    out, events = local_sweep
    _check_summary_matches_store(out)
    import yaml

    for event in events:  # a trial is its job file: the LR stays a float from --lrs to the trainer's config
        if event["status"] != "done":
            continue
        job = yaml.safe_load(open(event["job"]))
        trainer_cfg = yaml.safe_load((out / "trials" / event["id"] / "config.yaml").read_text())
        for lr in (job["detectron2"]["SOLVER"]["BASE_LR"], trainer_cfg["SOLVER"]["BASE_LR"]):
            assert type(lr) is float and lr == event["lr"]
        assert job["detectron2"]["SEED"] == event["seed"] == trainer_cfg["SEED"]
    settings = json.loads((out / "bench.json").read_text())
    assert settings["lrs"] == [0.02, 0.05] and settings["search"] == "full"
    # --cpu-jobs 2: two trials ran side by side, each on its share of the cores.
    order = [(e["id"], e["status"]) for e in events if e["status"] in ("running", "done")]
    first_done = next(i for i, (_, status) in enumerate(order) if status == "done")
    assert sum(status == "running" for _, status in order[:first_done]) == 2
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(e["cpu_threads"] == threads for e in events if e["status"] == "done")


def test_submitit_local_sweep_survives_sigkill(synthetic, r18_pkl, tmp_path):
    out = tmp_path / "submitit"
    args = _bench_args(synthetic, r18_pkl, out, executor="submitit-local", lrs="0.02")
    events = _kill_after_first_done_then_rerun(args, out, trials=2)
    _check_summary_matches_store(out, trials=2)
    assert all(e["job_id"] for e in events if e["status"] in ("running", "done"))


def test_rerun_of_a_finished_sweep_runs_nothing(local_sweep, synthetic, r18_pkl):
    out, _ = local_sweep
    before = len(_events(out))
    assert cli_main(*_bench_args(synthetic, r18_pkl, out)) == 0
    assert len(_events(out)) == before


def test_reports_in_markdown_csv_and_latex(local_sweep, tmp_path, capsys):
    def report(*args):  # in process: the command prints, nothing else is needed from a subprocess
        code = cli_main("report", *args)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    out, _ = local_sweep
    summary = json.loads((out / "summary.json").read_text())
    ap = summary["metrics"]["bbox/AP"]
    md = report(out)
    assert md.returncode == 0
    assert "| R18 | " in md.stdout and f"{ap['mean']:.1f} ± {ap['std']:.1f}" in md.stdout and "(n=2)" in md.stdout
    assert ("VOC 07 (mini) det. (synthetic_voc_test, 11-point AP, Faster R-CNN R18-C4 4 it) AP50 / AP / AP75"
            in md.stdout and "LR search: R18" in md.stdout and f"1×4, BN 4, LR {summary['selected_lr']:g}" in md.stdout)
    selected = next(e for e in summary["lr_search"] if e["selected"])
    assert selected["selection_value"] == pytest.approx(ap["mean"])  # full search: judged by the mean
    assert f"| {selected['lr']:g} * | {ap['mean']:.1f} |" in md.stdout and "bbox/AP (mean)" in md.stdout
    assert report(out, "--format", "csv", "--out", tmp_path / "t.csv").returncode == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    sel = [r for r in rows if r["table"] == "lr_search" and r["selected"] == "True" and r["metric"] == "bbox/AP"]
    assert len(sel) == 1 and float(sel[0]["mean"]) == pytest.approx(ap["mean"]) and sel[0]["n"] == "2"
    assert (tmp_path / "t_ap_vs_lr.png").is_file()
    twice = report(out, out)
    assert twice.returncode == 2 and "both hold 'R18' on voc07_mini" in twice.stderr
    latex = report(out, "--format", "latex")
    assert r"\begin{tabular}" in latex.stdout and rf"{ap['mean']:.1f} $\pm$ {ap['std']:.1f}" in latex.stdout
    assert "% LR search: R18 on VOC 07 (mini)" in latex.stdout and latex.stdout.count(r"\begin{tabular}") == 2
    full = report(out, "--per-trial", "--reference", "paper")
    assert full.returncode == 0 and "| paper: SimSiam, optimal | 77.3 / 48.5 / 52.5 |" in full.stdout
    assert "| R18 − SimSiam, base |" in full.stdout and "| R18 | voc07_mini | lr0.02_t1 | 0.02 | 1 | 1001 | done | 1×4 |" in full.stdout
    folder = report(out, "--out", tmp_path)
    assert folder.returncode == 2 and "is a folder" in folder.stderr


def test_failing_trials_are_recorded_and_do_not_stop_the_sweep(synthetic, r18_pkl, tmp_path):
    args = _bench_args(synthetic, r18_pkl, tmp_path, lrs="0.02,1000000")
    args[args.index("--trials") + 1] = "1"
    assert cli_main(*args) == 0
    latest = {}
    for e in _events(tmp_path):
        latest[e["id"]] = e
    bad, good = latest["lr1e+06_t0"], latest["lr0.02_t0"]
    assert bad["status"] == "failed" and bad["attempt"] == 2 and "diverged" in bad["error"]
    assert good["status"] == "done"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["selected_lr"] == 0.02 and summary["trials"]["failed"] == 1
    failed_entry = next(e for e in summary["lr_search"] if e["lr"] == 1e6)
    assert failed_entry["trials"] == {"done": 0, "failed": 1}


def test_bad_bench_inputs_exit_2_without_a_run_store(synthetic, r18_pkl, tmp_path, capsys):
    for lrs in ("0.02,abc", "0,0.1", "0.1,0.1"):
        assert cli_main(*_bench_args(synthetic, r18_pkl, tmp_path / "a", lrs=lrs)) == 2
        assert "--lrs" in capsys.readouterr().err
    args = _bench_args(synthetic, r18_pkl, tmp_path / "a")
    args[args.index("--trials") + 1] = "0"
    assert cli_main(*args) == 2 and "--trials 0: must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    args = _bench_args(synthetic, r18_pkl, tmp_path / "b")
    args[args.index("--benchmark") + 1] = "voc2099"
    assert cli_main(*args) == 2 and "--benchmark voc2099" in capsys.readouterr().err
    assert cli_main(*_bench_args(synthetic, r18_pkl, tmp_path / "c", "MODEL.BAD_KEY", "1")) == 2
    assert "MODEL.BAD_KEY" in capsys.readouterr().err
    assert cli_main(*_bench_args(synthetic, r18_pkl, tmp_path / "c", "--cpu-jobs", "0")) == 2
    assert "--cpu-jobs 0: must be an integer >= 1" in capsys.readouterr().err
    assert cli_main(*_bench_args(synthetic, r18_pkl, tmp_path / "c", "--cpu-jobs", "2", executor="slurm")) == 2
    assert "--cpu-jobs 2: runs CPU trials side by side" in capsys.readouterr().err
    for metric in ("bogus/AP", "segm/AP"):  # VOC has no masks: refused before any fine-tune
        assert cli_main(*_bench_args(synthetic, r18_pkl, tmp_path / "d", "--metric", metric)) == 2
        assert f"--metric {metric}: voc07_mini reports bbox/AP50, bbox/AP, bbox/AP75" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no refused bench left a folder behind


def test_a_folder_holds_one_sweep(local_sweep, synthetic, r18_pkl, capsys, tmp_path):
    out, _ = local_sweep
    assert cli_main(*_bench_args(synthetic, r18_pkl, out, "SOLVER.WEIGHT_DECAY", "0.001")) == 2
    assert "use a new --output-dir" in capsys.readouterr().err
    # The grid, trial count and search are pinned: a rerun cannot move the selection after its repeats ran.
    args = _bench_args(synthetic, r18_pkl, out)
    args[args.index("--trials") + 1] = "3"
    assert cli_main(*args) == 2
    assert "trials 2 (now 3)" in capsys.readouterr().err
    assert cli_main(*_bench_args(synthetic, r18_pkl, out, lrs="0.02,0.1")) == 2
    assert "lrs [0.02, 0.05] (now [0.02, 0.1])" in capsys.readouterr().err
    # A folder started on 8 GPUs (8 x 2 images) refuses a rerun on this 1-process machine.
    settings = json.loads((out / "bench.json").read_text())
    (tmp_path / "eight").mkdir()
    (tmp_path / "eight" / "bench.json").write_text(json.dumps({**settings, "world_size": 8, "ims_per_gpu": 2}))
    assert cli_main(*_bench_args(synthetic, r18_pkl, tmp_path / "eight")) == 2
    err = capsys.readouterr().err
    assert "world_size 8 (now 1)" in err and "ims_per_gpu 2 (now 4)" in err
    assert sorted(p.name for p in (tmp_path / "eight").iterdir()) == ["bench.json"]


def test_two_benches_cannot_share_a_folder(local_sweep, synthetic, r18_pkl, capsys):
    import fcntl

    out, _ = local_sweep
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli_main(*_bench_args(synthetic, r18_pkl, out)) == 2
        assert "another bench is writing into this folder" in capsys.readouterr().err
