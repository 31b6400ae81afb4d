"""One detectron2 fine-tune + evaluation, with pre-flight checks.

Everything that can be wrong with the inputs is checked before any worker starts: config keys,
dataset names and files, the weights file (it must cover the whole backbone and res5), norm and
world-size settings. The resolved config is written once as ``OUTPUT_DIR/job.yaml``
(``detection.job``); ``run_job`` then takes the folder's lock, launches detectron2's own trainer
(resuming from a checkpoint in ``OUTPUT_DIR`` when there is one), trains, evaluates, and writes
``OUTPUT_DIR/metrics.json``. ``bench`` writes one job per trial and runs it through
``detection.worker``.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from pathlib import Path

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import default_setup, launch
from detectron2.utils import comm

from detection import batch_policy, protocol
from detection.cpu_amp import training_precision
from detection.datasets import check_dataset_contents, check_dataset_names, register_datasets
from detection.job import Job, new_cfg, write_job
from detection.spec import FinetuneJob
from detection.trainer import Trainer
from simsiam_transfer import atomic
from simsiam_transfer.c4 import check_weights_cover_model, single_process_norm
from simsiam_transfer.config import merge_file, merge_node, merge_overrides, resolve_config
from simsiam_transfer.cpu_guard import refuse_on_cpu
from simsiam_transfer.errors import TrainingDiverged, UserError
from simsiam_transfer.locks import folder_lock
from simsiam_transfer.slurm import first_slurm_host, slurm_step
from simsiam_transfer.stopping import GRACE_S
from simsiam_transfer.tf32 import set_tf32
from simsiam_transfer.versions import library_versions

logger = logging.getLogger("simsiam_transfer.finetune")
# OUTPUT_DIR/schedule.json: the effective setup a fine-tune folder was started with; a resume
# under another one is refused (it would evaluate a model trained to another schedule).
SCHEDULE = "schedule.json"
__all__ = ["FinetuneJob", "build_cfg", "preflight", "run_finetune", "run_job", "finetune"]


def config_hash(cfg):
    """Hash of the protocol settings: OUTPUT_DIR, SEED and MODEL.WEIGHTS are left out."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR, c.SEED, c.MODEL.WEIGHTS = "", 0, ""
    return hashlib.sha256(c.dump().encode()).hexdigest()[:16]


def build_cfg(job, cuda=None):
    """The resolved, frozen detectron2 config for ``job`` (no side effects besides logging).

    ``cuda``: plan as if GPUs are (True) or are not (False) there; default: whether they are.
    """
    cfg = new_cfg()
    merge_file(cfg, job.config_path)
    if job.cfg:
        merge_node(cfg, job.cfg, "FINETUNE.CFG")
    merge_overrides(cfg, job.overrides)
    cfg.MODEL.WEIGHTS = "" if job.weights == "none" else str(job.weights)
    if job.scaling == "faithful":
        cfg.SOLVER.REFERENCE_WORLD_SIZE = 0  # keep the config's batch, LR and schedule (batch_policy)
    if not (torch.cuda.is_available() if cuda is None else cuda):
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.RESNETS.NORM == "SyncBN" and (job.world_size == 1 or cfg.MODEL.DEVICE == "cpu"):
        # nn.SyncBatchNorm needs CUDA and a process group; naiveSyncBN is plain BN at world size 1
        # (the same BN group), and syncs over gloo processes on CPU.
        log = logger.info if job.world_size == 1 else logger.warning
        log("MODEL.RESNETS.NORM SyncBN cannot run with %d process(es) on %s; using naiveSyncBN",
            job.world_size, cfg.MODEL.DEVICE)
        cfg.MODEL.RESNETS.NORM = single_process_norm(cfg.MODEL.RESNETS.NORM)
    if cfg.MODEL.RESNETS.NORM == "FrozenBN" and not cfg.MODEL.WEIGHTS:
        raise UserError("MODEL.RESNETS.NORM FrozenBN with --weights none diverges (frozen random "
                        "statistics); use BN, naiveSyncBN or SyncBN for the scratch baseline")
    cfg.freeze()
    return cfg


def check_weights_file(weights):
    if weights != "none" and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: file not found (use a converted .pkl, or 'none')")


def plan(job, cuda=None):
    """(cfg, batch plan) for ``job`` without touching dataset files or weights (``--dry-run``)."""
    register_datasets(job.data_root, job.datasets)
    cfg = build_cfg(job, cuda)
    return cfg, batch_policy.plan_batch(cfg, job.world_size, job.scaling)


def evaluator_types(cfg):
    return [MetadataCatalog.get(name).get("evaluator_type") for name in cfg.DATASETS.TEST]


def preflight(job, cuda=None):
    """Validate inputs, fix the seed, and return (its cfg with an explicit SEED, its batch plan).

    ``cuda=True`` plans for GPU machines elsewhere (a Slurm submit host): the memory check is then
    left to the machine that runs the trial."""
    check_weights_file(job.weights)
    specs = register_datasets(job.data_root, job.datasets)
    cfg = build_cfg(job, cuda)
    check_dataset_names(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), specs, job.datasets)
    for name in cfg.DATASETS.TRAIN:
        classes = specs[name].get("classes")
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise UserError(f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES "
                            f"is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}; override it to match")
    if job.weights != "none":
        check_weights_cover_model(job.weights, cfg)
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):  # last: it reads every annotation
        check_dataset_contents(specs[name])
    if cfg.SEED < 0:
        cfg = with_values(cfg, {"SEED": random.SystemRandom().randrange(2**31)})
    batch = batch_policy.plan_batch(cfg, job.world_size, job.scaling)
    if cuda is None:
        batch_policy.check_gpu_count(job.num_gpus, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        batch_policy.check_fits(batch, batch_policy.visible_gpu_gib())
    return cfg, batch


# A fine-tune at the protocol's scale: R50-C4 (or deeper) at VOC/COCO input sizes. On a CPU: days per trial.
PAPER_MIN_DEPTH, PAPER_MIN_INPUT = 50, 480


def paper_scale(cfg):
    """Why ``cfg`` is a protocol-scale fine-tune (one phrase), or None for a mini one."""
    if cfg.MODEL.RESNETS.DEPTH >= PAPER_MIN_DEPTH and max(cfg.INPUT.MIN_SIZE_TRAIN) >= PAPER_MIN_INPUT:
        return (f"R{cfg.MODEL.RESNETS.DEPTH}-C4 at {max(cfg.INPUT.MIN_SIZE_TRAIN)}-px inputs is a "
                "protocol-scale fine-tune")
    return None


def with_values(cfg, values):
    """A frozen copy of ``cfg`` with ``{"SOLVER.BASE_LR": 0.02, ...}`` set as they are (typed, no strings)."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in values.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    cfg.freeze()
    return cfg


def check_resume(output_dir, batch):
    """Refuse to resume (or re-evaluate) a folder whose checkpoints were made under another setup."""
    folder = Path(output_dir)
    saved_path = folder / SCHEDULE
    now = batch.resume_record()
    if saved_path.is_file():
        changes = batch_policy.resume_changes(json.loads(saved_path.read_text()), now)
        if changes:
            raise UserError(f"{folder} was trained with {'; '.join(changes)}; it will not be resumed or "
                            "evaluated under another setup: use a new OUTPUT_DIR")
        return
    last = folder / "last_checkpoint"
    if last.is_file():
        name = last.read_text().strip()
        match = re.fullmatch(r"model_(\d+)\.pth", name)
        if match is None or int(match.group(1)) + 1 >= batch.max_iter:
            raise UserError(f"{folder}: checkpoint {name} has no {SCHEDULE} and may come from another "
                            f"schedule (now {batch.max_iter} iterations); use a new OUTPUT_DIR")


def diverged_reason(exc):
    """The FloatingPointError line of a diverged run, also when ``launch`` wraps it (multi-GPU spawn)."""
    if isinstance(exc, FloatingPointError):
        return str(exc)
    lines = [line for line in str(exc).splitlines() if line.startswith("FloatingPointError")]
    return lines[-1].split(":", 1)[-1].strip() if lines else None


def flatten_results(results):
    """``{"bbox": {"AP": ..}, "segm": {..}}`` -> ``{"bbox/AP": .., "segm/AP": ..}`` (floats or None)."""
    flat = {}
    for task, metrics in (results or {}).items():
        for key, value in metrics.items():
            value = float(value)
            # COCO reports NaN for empty size ranges; JSON has no NaN.
            flat[f"{task}/{key}"] = None if math.isnan(value) else value
    return flat


def _worker(job, cfg, batch):
    register_datasets(job.data_root, job.datasets)
    if cfg.MODEL.DEVICE == "cuda":
        set_tf32(cfg.SOLVER.TF32)
    default_setup(cfg, argparse_namespace(job))
    start = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    if comm.is_main_process():
        write_metrics(cfg, job, batch, trainer.eval_results, time.time() - start, trainer.storage)
    return trainer.eval_results


def argparse_namespace(job):
    """What detectron2's ``default_setup`` reads from its command line (it logs it and the config file)."""
    return argparse.Namespace(config_file=str(resolve_config(job.config_path)), eval_only=False,
                              num_gpus=job.num_gpus, num_machines=job.num_machines,
                              machine_rank=job.machine_rank, dist_url=job.dist_url, opts=[])


def late_mean(storage, name, share=0.2):
    """Mean of a logged training scalar over the last ``share`` of its values (None if never logged)."""
    try:
        history = storage.history(name)  # fvcore's HistoryBuffer; it exists once a value was logged
    except (KeyError, AttributeError):
        return None
    return round(history.avg(max(1, int(len(history.values()) * share))), 4)


def write_metrics(cfg, job, batch, results, wall_time_s, storage=None):
    flat = flatten_results(results)
    if not flat:
        raise RuntimeError("evaluation produced no metrics; is DATASETS.TEST set?")
    record = {
        **flat,
        protocol.CLASSIFIER_METRIC: late_mean(storage, "fast_rcnn/fg_cls_accuracy"),
        "config_hash": config_hash(cfg),
        "seed": int(cfg.SEED),
        "weights": job.weights,
        "norm": cfg.MODEL.RESNETS.NORM,
        "tf32": bool(cfg.SOLVER.TF32) and cfg.MODEL.DEVICE == "cuda",
        "amp": bool(cfg.SOLVER.AMP.ENABLED),
        "precision": training_precision(cfg),  # what the forward ran in: AMP is bf16 or fp32 on a CPU
        **batch.setup(),
        "ims_per_batch": batch.effective_batch,
        "base_lr": batch.base_lr,
        "wall_time_s": round(wall_time_s, 1),
        "cpu_threads": torch.get_num_threads(),  # a wall time means little without it
        "versions": library_versions(),
    }
    atomic.write_json(Path(cfg.OUTPUT_DIR) / "metrics.json", record)
    return record


def run_finetune(job, allow_cpu=True):
    """Pre-flight, ``job.yaml`` into OUTPUT_DIR, then ``run_job``; returns the metrics record (None on
    machine rank > 0, whose processes train but leave evaluation to machine rank 0)."""
    cfg, batch = preflight(job)
    refuse_on_cpu(paper_scale(cfg), allow_cpu)
    atomic.check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    return run_job(Job(job=job, cfg=cfg, plan=batch.as_dict(), path=write_job(cfg.OUTPUT_DIR, job, cfg, batch)))


def run_job(job: Job):
    """Run one written job in its folder: the folder's lock, the resume guard, detectron2's ``launch``."""
    cfg = job.cfg
    batch = batch_policy.plan_batch(cfg, job.job.world_size, job.job.scaling)
    if torch.cuda.is_available():  # the machine that runs it: a Slurm node the submit host planned for
        batch_policy.check_gpu_count(job.job.num_gpus, torch.cuda.device_count())
        batch_policy.check_fits(batch, batch_policy.visible_gpu_gib())
    check_resume(cfg.OUTPUT_DIR, batch)
    # One writer per folder; a trial orphaned by a killed driver is stopping itself: wait for it.
    # Machine rank 0 holds it for the job (the other machines share the folder on a cluster file system).
    lock = (folder_lock(cfg.OUTPUT_DIR, "fine-tune", wait_s=GRACE_S + 15) if job.job.machine_rank == 0
            else contextlib.nullcontext())
    with lock:
        return _run_locked(job.job, cfg, batch)


def _run_locked(job, cfg, batch):
    if job.machine_rank == 0 and not (Path(cfg.OUTPUT_DIR) / SCHEDULE).is_file():
        atomic.write_json(Path(cfg.OUTPUT_DIR) / SCHEDULE, batch.resume_record())
    try:
        launch(_worker, job.num_gpus, num_machines=job.num_machines, machine_rank=job.machine_rank,
               dist_url=job.dist_url, args=(job, cfg, batch))
    except Exception as exc:
        reason = diverged_reason(exc)
        if reason is None:
            raise
        raise TrainingDiverged(f"{reason}; lower SOLVER.BASE_LR or check the weights") from None
    if job.machine_rank > 0:
        return None
    metrics_path = Path(cfg.OUTPUT_DIR) / "metrics.json"
    return json.loads(metrics_path.read_text()) if metrics_path.is_file() else None


def dry_run_plan(job, cuda):
    """What ``finetune --dry-run`` prints: the effective setup, nothing run."""
    cfg, batch = plan(job, cuda)
    return {"config": job.config_path, "weights": job.weights, "world_size": job.world_size,
            "num_machines": job.num_machines, **batch.as_dict(), "device": cfg.MODEL.DEVICE}


def under_srun(job, env, first_host=first_slurm_host):
    """The job as one distributed run across an srun step's nodes (one task per node, each launching its
    GPUs' processes, the rendezvous from Slurm's environment), or one line refusing a step of another shape."""
    step = slurm_step(env, first_host)
    if step is None:
        return job
    if step.tasks_per_node > 1:
        raise UserError(f"finetune runs as {step.world_size} srun tasks, {step.tasks_per_node} per node: detectron2 "
                        "starts one process per GPU itself, so these would be independent trainings into one "
                        "folder; run one task per node (srun --ntasks-per-node 1 ... finetune --num-gpus N)")
    if job.num_machines not in (1, step.nodes):
        raise UserError(f"--num-machines {job.num_machines} but the srun step has {step.nodes} node(s); leave it "
                        "out under srun (the step sets it)")
    addr = env.get("MASTER_ADDR") or step.rendezvous["MASTER_ADDR"]
    port = env.get("MASTER_PORT") or step.rendezvous["MASTER_PORT"]
    return dataclasses.replace(job, num_machines=step.nodes, machine_rank=step.node_rank,
                               dist_url=f"tcp://{addr}:{port}")


def finetune(job, dry_run=False, assume_gpus=None, allow_cpu=False):
    """``simsiam-transfer finetune``: a ``FinetuneJob`` (num_gpus -1: every visible GPU) -> plan or run."""
    job = under_srun(job, os.environ)
    if job.num_gpus < 0:
        visible = torch.cuda.device_count() if assume_gpus is None else assume_gpus
        job = dataclasses.replace(job, num_gpus=visible)
    if dry_run:
        cuda = torch.cuda.is_available() if assume_gpus is None else assume_gpus > 0
        print(json.dumps(dry_run_plan(job, cuda), indent=2))
        return 0
    record = run_finetune(job, allow_cpu)
    if record is None:
        print(f"machine rank {job.machine_rank}: training finished; machine rank 0 evaluates and writes "
              "metrics.json, this machine writes none")
        return 0
    keys = [k for k in protocol.REPORTED_METRICS if record.get(k) is not None]
    print(" ".join(f"{k}={record[k]:.2f}" for k in keys))
    return 0
