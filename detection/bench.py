"""``simsiam-transfer bench``: fine-tuning LR search x trials for one converted checkpoint.

``DIR/bench.json`` holds the sweep's settings, ``DIR/runs.jsonl`` the run store (see
``detection.runstore``), ``DIR/trials/<id>/`` each trial's detectron2 output, and after the
sweep ``DIR/summary.json``, ``DIR/table.md`` and ``DIR/ap_vs_lr.png``. Rerunning the same
command skips finished trials, reruns unfinished ones (they resume from their checkpoints) and
retries failed ones up to ``--max-retries``.
"""

import fcntl
import hashlib
import json
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from detection import protocol
from detection.executors import LocalExecutor, SubmititExecutor, TrialSpec
from detection.runstore import RunStore
from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError

SETTINGS = "bench.json"
# Settings that change what a trial computes: a DIR holds one value of each.
FIXED_SETTINGS = ("benchmark", "config", "weights_sha256", "overrides", "metric", "datasets", "data_root")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_benchmark(name):
    """(benchmark label, config) for a --benchmark name or config file."""
    from simsiam_transfer.config import resolve_config

    if name in protocol.BENCHMARKS:
        return name, protocol.BENCHMARKS[name]
    if name.endswith((".yaml", ".yml")):
        resolve_config(name)
        return Path(name).stem, name
    raise UserError(f"--benchmark {name}: not one of {sorted(protocol.BENCHMARKS)} nor a .yaml config file")


def gpus_per_trial(requested, executor):
    """--num-gpus as given; else one node of 8 GPUs per Slurm job (the protocol's world size),
    and locally 1 GPU per trial when GPUs are visible (several trials then run at once)."""
    if requested is not None:
        return requested
    if executor == "slurm":
        return 8
    import torch

    return 1 if torch.cuda.is_available() else 0


def default_name(weights):
    return "scratch" if weights == "none" else Path(weights).stem


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)
        benchmark, config = resolve_benchmark(args.benchmark)
        weights = args.weights if args.weights == "none" else str(Path(args.weights).resolve())
        if weights != "none" and not Path(weights).is_file():
            raise UserError(f"--weights {args.weights}: file not found (a converted .pkl, or 'none')")
        # Refuse bad arguments before anything is written.
        self.lrs = protocol.parse_lrs(args.lrs) if args.lrs else None
        if args.trials < 1:
            raise UserError(f"--trials must be >= 1, got {args.trials}")
        if args.max_retries < 0:
            raise UserError("--max-retries must be >= 0")
        self.settings = {
            "name": args.name or default_name(args.weights), "benchmark": benchmark, "config": config,
            "weights": weights, "weights_sha256": "none" if weights == "none" else file_sha256(weights),
            "lrs": None, "trials": args.trials, "search": args.search, "metric": args.metric,
            "overrides": list(args.overrides), "datasets": _abs(args.datasets), "data_root": _abs(args.data_root),
            "executor": args.executor, "num_gpus": gpus_per_trial(args.num_gpus, args.executor),
        }
        self.store = RunStore(self.out)
        self._lock = threading.Lock()

    # -- settings & pre-flight ------------------------------------------------------------------
    def _check_settings(self):
        path = self.out / SETTINGS
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        changed = [k for k in FIXED_SETTINGS if saved.get(k) != self.settings.get(k)]
        if changed:
            raise UserError(f"{self.out} holds a sweep with other {', '.join(changed)}; use a new --output-dir "
                            "(or the original settings to resume it)")

    def _preflight(self, first_lr=None):
        """Everything the trials would refuse, refused once before any trial starts."""
        from detection.finetune import FinetuneJob, preflight

        lr_override = ["SOLVER.BASE_LR", repr(first_lr)] if first_lr is not None else []
        job = FinetuneJob(config_file=self.settings["config"], weights=self.settings["weights"],
                          overrides=self.settings["overrides"] + lr_override,
                          datasets=self.settings["datasets"], data_root=self.settings["data_root"],
                          num_gpus=self.settings["num_gpus"])
        _, cfg = preflight(job)
        return cfg

    # -- trials -----------------------------------------------------------------------------------
    def _spec(self, lr, trial):
        tid = protocol.trial_id(lr, trial)
        return TrialSpec(id=tid, lr=lr, trial=trial, seed=protocol.trial_seed(trial), config=self.settings["config"],
                         weights=self.settings["weights"], output_dir=str(self.out / "trials" / tid),
                         overrides=self.settings["overrides"], datasets=self.settings["datasets"],
                         data_root=self.settings["data_root"], num_gpus=self.settings["num_gpus"])

    def _base_record(self, spec, **fields):
        previous = self.store.records().get(spec.id, {})
        return {"id": spec.id, "lr": spec.lr, "trial": spec.trial, "seed": spec.seed, "output_dir": spec.output_dir,
                "weights": self.settings["weights"], "weights_sha256": self.settings["weights_sha256"],
                "attempt": previous.get("attempt", 0), "metrics": {}, "error": None, "job_id": None, **fields}

    def _on_start(self, spec, job_id):
        with self._lock:
            record = self._base_record(spec, status="running", job_id=job_id)
            record["attempt"] += 1
            self.store.put(record)
            self._say(f"[bench] {spec.id}: running (attempt {record['attempt']}, seed {spec.seed})")

    def _on_finish(self, spec, result):
        with self._lock:
            record = self._base_record(spec, job_id=result.job_id)
            if result.ok:
                m = result.metrics
                record.update(status="done", metrics={k: v for k, v in m.items() if "/" in k},
                              wall_time_s=m.get("wall_time_s"), config_hash=m.get("config_hash"),
                              world_size=m.get("world_size"), norm=m.get("norm"), versions=m.get("versions"))
                if not self.args.keep_checkpoints:
                    _drop_intermediate_checkpoints(spec.output_dir)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items()
                                  if k.split("/")[1] in ("AP50", "AP", "AP75") and v is not None)
                self._say(f"[bench] {spec.id}: done  {shown}")
            else:
                record.update(status="failed", error=result.error)
                self._say(f"[bench] {spec.id}: FAILED {result.error}")
            self.store.put(record)
            if result.ok:
                self._bar.update(1)

    def _say(self, line):
        self._bar.write(line)

    def _todo(self, plan):
        """Trials of ``plan`` still to run: not done, and failed fewer times than allowed."""
        records = self.store.records()
        todo = []
        for lr, trial in plan:
            spec = self._spec(lr, trial)
            rec = records.get(spec.id)
            if rec and rec["status"] == "done":
                continue
            if rec and rec["status"] == "failed" and rec["attempt"] > self.args.max_retries:
                continue
            if rec is None:
                self.store.put(self._base_record(spec, status="queued"))
            todo.append(spec)
        return todo

    def _execute(self, plan, executor):
        for _ in range(self.args.max_retries + 1):
            todo = self._todo(plan)
            if not todo:
                return
            executor.run(todo, self._on_start, self._on_finish)

    def _executor(self):
        gpus = self.settings["num_gpus"]
        if self.args.executor == "local":
            return LocalExecutor(gpus)
        cluster = "slurm" if self.args.executor == "slurm" else "local"
        return SubmititExecutor(self.out / "submitit", cluster=cluster, gpus_per_trial=gpus,
                                partition=self.args.slurm_partition, timeout_min=self.args.slurm_time,
                                cpus_per_task=self.args.slurm_cpus_per_task)

    # -- run --------------------------------------------------------------------------------------
    def run(self):
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.out}: another bench is running in this folder") from None
            try:
                return self._run_locked()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _run_locked(self):
        self._check_settings()
        cfg = self._preflight(self.lrs[0] if self.lrs else None)
        lrs = self.lrs or [float(cfg.SOLVER.BASE_LR)]
        self.settings["lrs"] = lrs
        atomic.write_json(self.out / SETTINGS, self.settings)
        print(f"[bench] {self.settings['name']} on {self.settings['benchmark']}: LRs {lrs}, "
              f"{self.args.trials} trial(s), search {self.args.search}, metric {self.args.metric}", flush=True)
        if self.settings["weights"] != "none":
            from convert.command import pretraining_warnings

            for warning in pretraining_warnings(self.settings["weights"]):
                print(f"[bench] WARNING: {warning}", file=sys.stderr, flush=True)
        executor = self._executor()
        planned = len(protocol.search_plan(lrs, self.args.trials, self.args.search)) + \
            len(protocol.repeat_plan(lrs[0], self.args.trials, self.args.search))
        self._bar = tqdm(total=planned, desc="bench trials", unit="trial", dynamic_ncols=True,
                         initial=sum(r["status"] == "done" for r in self.store.records().values()))
        try:
            self._execute(protocol.search_plan(lrs, self.args.trials, self.args.search), executor)
            self._run_selected(lrs, executor)
        finally:
            self._bar.close()
        return write_outputs(self.out)

    def _run_selected(self, lrs, executor):
        selected = protocol.select_lr(list(self.store.records().values()), self.args.metric, lrs,
                                      self.args.search)
        if selected is not None:
            self._say(f"[bench] selected LR {selected:g} by {self.args.metric} "
                      f"({'mean over trials' if self.args.search == 'full' else 'trial 0 of each LR'})")
            self._execute(protocol.repeat_plan(selected, self.args.trials, self.args.search), executor)


def _drop_intermediate_checkpoints(folder):
    """A finished trial needs only model_final.pth; periodic checkpoints were for resuming it."""
    for path in Path(folder).glob("model_[0-9]*.pth"):
        path.unlink()


def _abs(path):
    return str(Path(path).resolve()) if path else None


def write_outputs(directory):
    """summary.json, table.md and ap_vs_lr.png of one bench folder, from its run store."""
    from detection.report import load_bench, render, plot_ap_vs_lr

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
    return summary
