"""Fine-tuning LR search x trials for one converted checkpoint (``simsiam-transfer bench``).

``DIR/bench.json`` holds the sweep's settings, ``DIR/runs.jsonl`` the run store (see
``detection.runstore``), ``DIR/trials/<id>/`` each trial's ``job.yaml`` (the resolved detectron2
config, built once per trial) and detectron2 output, and after the sweep ``DIR/summary.json``,
``DIR/table.md`` and ``DIR/ap_vs_lr.png``. Rerunning the same sweep skips finished trials, reruns
unfinished ones (they resume from their checkpoints) and retries failed ones up to ``MAX_RETRIES``.
"""

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import torch
from detectron2.data import MetadataCatalog
from tqdm import tqdm

from detection import protocol
from detection.executors import LocalExecutor, SubmititExecutor, local_slots
from detection.batch_policy import SETUP_FIELDS, plan_batch
from detection.finetune import evaluator_types, paper_scale, plan, preflight, with_values
from detection.job import NAME as JOB_NAME
from detection.job import write_job
from detection.report import load_bench, plot_ap_vs_lr, render
from detection.runstore import RunStore
from detection.spec import SweepSpec, Trial
from simsiam_transfer import atomic
from simsiam_transfer.d2_weights import conversion_warnings
from simsiam_transfer.config import flatten
from simsiam_transfer.cpu_guard import refuse_on_cpu
from simsiam_transfer.errors import UserError
from simsiam_transfer.locks import folder_lock

SETTINGS = "bench.json"
# Settings that change what a trial computes: a DIR holds one value of each (the effective
# batch setup included, so trials made with another batch, LR scale or BN group never mix).
FIXED_SETTINGS = ("benchmark", "config", "weights_sha256", "overrides", "lrs", "trials", "search", "metric",
                  "datasets", "data_root", *(k for k in SETUP_FIELDS if k != "flags"))
PROTOCOL_WORLD_SIZE = 8  # MoCo's detection runs: 8 GPUs x 2 images; a Slurm trial's default
__all__ = ["Bench", "SweepSpec", "run_bench", "write_outputs"]


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _iterations(n):
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n} it"


def column_label(cfg, batch, evaluators):
    """What a report column measured, e.g. "voc_2007_test, VOC07 11-point AP, Faster R-CNN R50-C4 24k"."""
    names = {"voc_2007_test": "VOC 07 test", "coco_2017_val": "COCO val2017"}
    test = " + ".join(names.get(n, n) for n in cfg.DATASETS.TEST)
    kinds = []
    for name, kind in zip(cfg.DATASETS.TEST, evaluators):
        if kind == "pascal_voc":
            year = MetadataCatalog.get(name).get("year", 2007)
            kinds.append("11-point AP" if year == 2007 else "area AP")
        else:
            kinds.append("COCO AP")
    arch = "Mask R-CNN" if cfg.MODEL.MASK_ON else "Faster R-CNN"
    return (f"{test}, {' / '.join(dict.fromkeys(kinds))}, {arch} R{cfg.MODEL.RESNETS.DEPTH}-C4 "
            f"{_iterations(batch.max_iter)}")


class Bench:
    """Runs one ``SweepSpec``: checks everything, then trials through an executor into ``output_dir``."""

    def __init__(self, spec: SweepSpec, echo_conversion_warnings: bool = True, allow_cpu: bool = True):
        self.spec = spec
        self.allow_cpu = allow_cpu  # False: refuse a protocol-scale sweep whose trials would run on this CPU
        self.out = Path(spec.output_dir)
        self.label, self.config = spec.benchmark, spec.finetune.config_path
        # The pipeline already printed the converter's verdict once; bench alone prints it here.
        self.echo_conversion_warnings = echo_conversion_warnings
        self.store = RunStore(self.out)
        self._lock = threading.Lock()

    def gpus_per_trial(self, visible):
        """--gpus-per-trial as given; else 8 per Slurm job (the protocol's world size), and locally
        every visible GPU (one trial at a time; 0 on CPU)."""
        requested = self.spec.executor.gpus_per_trial
        if requested is not None:
            return requested
        return PROTOCOL_WORLD_SIZE if self.spec.executor.kind == "slurm" else visible

    # -- plan & pre-flight ------------------------------------------------------------------------
    def _check_metric(self, cfg):
        kinds = evaluator_types(cfg)
        protocol.check_metric(self.spec.metric, protocol.allowed_metrics(kinds, cfg.MODEL.MASK_ON), self.label,
                              self.spec.label("SWEEP.METRIC"))
        return kinds

    def plan(self, assume_gpus=None):
        """The sweep as ``bench --dry-run`` prints it; checks the config and arguments, runs nothing."""


        visible = torch.cuda.device_count() if assume_gpus is None else assume_gpus
        gpus = self.gpus_per_trial(visible)
        job = self.spec.job(gpus)
        cfg, batch = plan(job, cuda=gpus > 0)
        self._check_metric(cfg)
        lrs = list(self.spec.lrs or [float(cfg.SOLVER.BASE_LR)])
        first = protocol.search_plan(lrs, self.spec.trials, self.spec.search)
        later = protocol.repeat_plan("SELECTED", self.spec.trials, self.spec.search)
        slots = local_slots(os.environ.get("CUDA_VISIBLE_DEVICES") if assume_gpus is None else None,
                            visible, gpus, self.spec.executor.cpu_jobs) if self.spec.executor.kind == "local" else None
        return {
            "name": self.spec.name, "benchmark": self.label, "config": self.config,
            "weights": self.spec.finetune.weights, "output_dir": str(self.out), "executor": self.spec.executor.kind, "visible_gpus": visible,
            "gpus_per_trial": gpus, "cpu_jobs": self.spec.executor.cpu_jobs,
            "parallel_trials": len(slots) if slots else None,
            "search": self.spec.search, "metric": self.spec.metric,
            "rule": protocol.RULES[self.spec.search].format(m=self.spec.metric), "lrs": lrs,
            "fine_tunes": len(first) + len(later),
            "per_trial": batch.as_dict(),
            "trials": [{"id": protocol.trial_id(lr, t), "lr": lr, "effective_lr": lr * batch.lr_scale,
                        "trial": t, "seed": protocol.trial_seed(t)} for lr, t in first],
            "then_at_selected_lr": [{"trial": t, "seed": protocol.trial_seed(t)} for _, t in later],
        }

    def _prepare(self):
        """Every check (config, data, weights, metric, memory) and the settings; writes nothing. The
        trials' common detectron2 config is built here, once."""
        visible = torch.cuda.device_count()
        gpus = self.gpus_per_trial(visible)
        if self.spec.executor.kind != "slurm" and gpus > visible:
            raise UserError(f"{self.spec.label('SWEEP.GPUS_PER_TRIAL')} {gpus}: this machine shows {visible} GPU(s); "
                            f"use at most {visible}, or the slurm executor")
        self.job = self.spec.job(gpus)
        remote = self.spec.executor.kind == "slurm" and gpus > 0  # trials run on GPU nodes, not here
        self.cfg, batch = preflight(self.job, cuda=True if remote else None)
        evaluators = self._check_metric(self.cfg)
        lrs = list(self.spec.lrs or [float(self.cfg.SOLVER.BASE_LR)])
        if self.spec.lrs:
            batch = self._plan(lrs[0])
        weights = self.spec.finetune.weights
        setup = batch.as_dict()
        return {
            "name": self.spec.name, "benchmark": self.label, "config": self.config, "weights": weights,
            "weights_sha256": "none" if weights == "none" else file_sha256(weights),
            "lrs": lrs, "trials": self.spec.trials, "search": self.spec.search, "metric": self.spec.metric,
            "overrides": flatten(self.spec.finetune.cfg) + list(self.spec.finetune.overrides),
            "datasets": self.spec.finetune.datasets, "data_root": self.spec.finetune.data_root,
            "executor": self.spec.executor.kind, "gpus_per_trial": gpus,
            "column": column_label(self.cfg, batch, evaluators) + (f", {protocol.SMOKE_LABEL}" if self.spec.smoke else ""),
            "smoke": self.spec.smoke,
            **batch.setup(), "steps": setup["steps"], "warmup_iters": setup["warmup_iters"],
        }

    def _trial_cfg(self, trial):
        return with_values(self.cfg, {"SOLVER.BASE_LR": trial.lr, "SEED": trial.seed, "OUTPUT_DIR": trial.output_dir})

    def _plan(self, lr):
        return plan_batch(with_values(self.cfg, {"SOLVER.BASE_LR": lr}), self.job.world_size, self.job.scaling)

    def _check_settings(self, settings):
        path = self.out / SETTINGS
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: unreadable ({exc}); not a bench folder, use a new --output-dir") from None
        changed = [f"{k} {saved.get(k)!r} (now {settings.get(k)!r})" for k in FIXED_SETTINGS
                   if saved.get(k) != settings.get(k)]
        if changed:
            raise UserError(f"{self.out} holds a sweep with {'; '.join(changed)}; use a new --output-dir "
                            "(or the original settings to resume it)")

    # -- trials -----------------------------------------------------------------------------------
    def _trial(self, lr, trial):
        return Trial(lr=lr, trial=trial, seed=protocol.trial_seed(trial),
                     output_dir=str(self.out / "trials" / protocol.trial_id(lr, trial)))

    def _write_job(self, trial):
        """The trial's ``job.yaml``: its detectron2 config, built once, with its LR, seed and folder."""
        cfg = self._trial_cfg(trial)
        return write_job(trial.output_dir, self.job, cfg, plan_batch(cfg, self.job.world_size, self.job.scaling))

    def _base_record(self, trial, **fields):
        previous = self.store.records().get(trial.id, {})
        return {"id": trial.id, "lr": trial.lr, "trial": trial.trial, "seed": trial.seed,
                "output_dir": trial.output_dir, "weights": self.settings["weights"],
                "weights_sha256": self.settings["weights_sha256"], "attempt": previous.get("attempt", 0),
                "job": str(Path(trial.output_dir) / JOB_NAME), "metrics": {}, "error": None, "job_id": None,
                **{k: self.settings[k] for k in SETUP_FIELDS}, **fields}

    def _on_start(self, trial, job_id, reattached=False):
        with self._lock:
            record = self._base_record(trial, status="running", job_id=job_id)
            if reattached:
                self.store.put(record)
                self._say(f"[bench] {trial.id}: reattached to its running job {job_id} (not submitted again)")
                return
            record["attempt"] += 1
            self.store.put(record)
            self._say(f"[bench] {trial.id}: running (attempt {record['attempt']}, seed {trial.seed})")

    def _on_finish(self, trial, result):
        with self._lock:
            record = self._base_record(trial, job_id=result.job_id)
            if result.ok:
                m = result.metrics
                record.update(status="done", metrics={k: v for k, v in m.items() if "/" in k},
                              wall_time_s=m.get("wall_time_s"), cpu_threads=m.get("cpu_threads"),
                              config_hash=m.get("config_hash"),
                              norm=m.get("norm"), versions=m.get("versions"),
                              **{k: m[k] for k in SETUP_FIELDS if k in m})
                if not self.spec.keep_checkpoints:
                    _drop_intermediate_checkpoints(trial.output_dir)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items()
                                  if k in protocol.REPORTED_METRICS and protocol.is_finite(v))
                if not protocol.counts_as_done(record, self.spec.metric):
                    shown += f"; {self.spec.metric} is not finite: counted as failed"
                self._say(f"[bench] {trial.id}: done  {shown}")
            elif result.stopped:
                record.update(status="stopped", error=result.error)
                self._say(f"[bench] {trial.id}: stopped; run the same command again to resume it")
            else:
                record.update(status="failed", error=result.error)
                self._say(f"[bench] {trial.id}: FAILED {result.error}")
            self.store.put(record)
            if result.ok:
                self._bar.update(1)

    def _say(self, line):
        self._bar.write(line)

    def _todo(self, plan):
        """Trials of ``plan`` still to run: not done, and failed fewer times than allowed."""
        records = self.store.records()
        todo = []
        for lr, t in plan:
            trial = self._trial(lr, t)
            rec = records.get(trial.id)
            if not needs_run(rec, self.spec.max_retries):
                continue
            if rec is None:
                self.store.put(self._base_record(trial, status="queued"))
            todo.append(trial)
        return todo

    def _execute(self, plan, executor):
        for _ in range(self.spec.max_retries + 1):
            todo = self._todo(plan)
            if not todo:
                return
            records = self.store.records()
            recorded = {t.id: records[t.id]["job_id"] for t in todo
                        if records[t.id]["status"] == "running" and records[t.id].get("job_id")}
            for trial in todo:
                if trial.id not in recorded or not (Path(trial.output_dir) / JOB_NAME).is_file():
                    self._write_job(trial)
            executor.run(todo, self._on_start, self._on_finish, recorded_jobs=recorded)

    def _executor(self):
        ex, gpus = self.spec.executor, self.settings["gpus_per_trial"]
        if ex.kind == "local":
            return LocalExecutor(gpus, cpu_jobs=ex.cpu_jobs)
        return SubmititExecutor(self.out / "submitit", cluster="slurm" if ex.kind == "slurm" else "local",
                                gpus_per_trial=gpus, options=ex)

    # -- run --------------------------------------------------------------------------------------
    def run(self):
        settings = self._prepare()
        if self.spec.executor.kind != "slurm":  # Slurm trials run on the cluster's GPU nodes
            refuse_on_cpu(paper_scale(self.cfg), self.allow_cpu)
        self._check_settings(settings)  # before the folder exists: a refused sweep writes nothing
        self.settings = settings
        with folder_lock(self.out, "bench"):
            return self._run_locked()

    def _run_locked(self):
        self._check_settings(self.settings)  # again under the lock: a concurrent first run may have written
        atomic.remove_stale_tmp(self.out)  # half-written files of a killed sweep's atomic writes
        atomic.write_json(self.out / SETTINGS, self.settings)
        s, lrs = self.settings, self.settings["lrs"]
        print(f"[bench] {s['name']} on {s['benchmark']} ({s['column']}): LRs {lrs}, {self.spec.trials} trial(s), "
              f"search {self.spec.search}, metric {self.spec.metric}; per trial {s['world_size']} process(es) x "
              f"{s['ims_per_gpu']} images = batch {s['effective_batch']}, {s['bn_mode']} over "
              f"{s['bn_group']} images, {s['max_iter']} iterations ({s['scaling']})", flush=True)
        if s["flags"]:
            print(f"[bench] WARNING: not the protocol's setup: {'; '.join(s['flags'])}", flush=True)
        if self.settings["weights"] != "none" and self.echo_conversion_warnings:
            for warning in conversion_warnings(self.settings["weights"]):
                print(f"[bench] WARNING: {warning}", file=sys.stderr, flush=True)
        executor = self._executor()
        planned = len(protocol.search_plan(lrs, self.spec.trials, self.spec.search)) + \
            len(protocol.repeat_plan(lrs[0], self.spec.trials, self.spec.search))
        self._bar = tqdm(total=planned, desc="bench trials", unit="trial", dynamic_ncols=True,
                         initial=sum(r["status"] == "done" for r in self.store.records().values()))
        try:
            self._execute(protocol.search_plan(lrs, self.spec.trials, self.spec.search), executor)
            self._run_selected(lrs, executor)
        except KeyboardInterrupt:  # SIGINT/SIGTERM: the executor has stopped its trials
            self._mark_stopped()
            raise
        finally:
            self._bar.close()
        return write_outputs(self.out)

    def _mark_stopped(self):
        """Trials the stop cut short are recorded as stopped (a rerun resumes them), not failed."""
        with self._lock:
            for record in self.store.records().values():
                if record["status"] == "running" and self.spec.executor.kind != "slurm":
                    self.store.put({**record, "status": "stopped", "error": "stopped with the driver"})

    def _run_selected(self, lrs, executor):
        search, metric = self.spec.search, self.spec.metric
        selected = protocol.select_lr(list(self.store.records().values()), metric, lrs, search)
        if selected is not None:
            self._say(f"[bench] selected LR {selected:g} by {metric} "
                      f"({'mean over trials' if search == 'full' else 'trial 0 of each LR'})")
            self._execute(protocol.repeat_plan(selected, self.spec.trials, search), executor)


def run_bench(spec: SweepSpec, dry_run: bool = False, assume_gpus=None, allow_cpu: bool = False) -> int:
    """``simsiam-transfer bench``: plan (dry run) or run one sweep; exit 1 when every trial failed."""
    bench = Bench(spec, allow_cpu=allow_cpu)
    if dry_run:
        print(json.dumps(bench.plan(assume_gpus), indent=2))
        return 0
    summary = bench.run()
    return 0 if summary["selected_lr"] is not None else 1


def needs_run(record, max_retries) -> bool:
    """A trial runs (again) unless it is done or has failed more often than retries allow."""
    if record is None:
        return True
    return not (record["status"] == "done" or (record["status"] == "failed" and record["attempt"] > max_retries))


def finished_summary(spec: SweepSpec):
    """The sweep's ``summary.json`` when the folder holds this sweep finished (every planned trial done or
    out of retries), else None: what a driver asks before running a sweep again."""
    out = Path(spec.output_dir)
    try:
        settings = json.loads((out / SETTINGS).read_text())
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if (settings.get("trials"), settings.get("search"), settings.get("metric")) != (spec.trials, spec.search,
                                                                                  spec.metric):
        return None
    if spec.lrs is not None and settings.get("lrs") != list(spec.lrs):
        return None
    records = RunStore(out).records()
    lrs = settings["lrs"]
    planned = protocol.search_plan(lrs, spec.trials, spec.search)
    selected = protocol.select_lr(list(records.values()), spec.metric, lrs, spec.search)
    if selected is not None:
        planned += protocol.repeat_plan(selected, spec.trials, spec.search)
    if any(needs_run(records.get(protocol.trial_id(lr, t)), spec.max_retries) for lr, t in planned):
        return None
    return summary


def _drop_intermediate_checkpoints(folder):
    """A finished trial needs only model_final.pth; periodic checkpoints were for resuming it."""
    for path in Path(folder).glob("model_[0-9]*.pth"):
        path.unlink()


def write_outputs(directory):
    """summary.json, table.md and ap_vs_lr.png of one bench folder, from its run store."""
    directory = Path(directory)
    bench = load_bench(directory)
    atomic.write_json(directory / "summary.json", bench["summary"])
    table = render([bench], "md")
    atomic.write_text(directory / "table.md", table)
    plot_ap_vs_lr([bench], directory / "ap_vs_lr.png")
    summary = bench["summary"]
    print(table)
    t = summary["trials"]
    print(f"[bench] trials: {t['done']} done, {t['failed']} failed, {t['unfinished']} unfinished; "
          f"summary in {directory / 'summary.json'}")
    if t["non_finite"]:
        print(f"[bench] {len(t['non_finite'])} trial(s) with a non-finite {summary['selection']['metric']} "
              f"counted as failed: {', '.join(t['non_finite'])}")
    warning = protocol.classifier_warning(summary)
    if warning:
        print(f"[bench] WARNING: {warning}")
    return summary
