"""``simsiam-transfer finetune``: one detectron2 fine-tune + evaluation, with pre-flight checks.

Everything that can be wrong with the inputs is checked in the launching process, before
any worker starts: config keys, dataset names and files, the weights file (it must cover
the whole backbone and res5), norm and world-size settings. Workers then build detectron2's
own trainer, resume from ``OUTPUT_DIR`` when a checkpoint is there (an interrupted run
continues), train, evaluate, and the main process writes ``OUTPUT_DIR/metrics.json``.
"""

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from simsiam_transfer import atomic
from simsiam_transfer.config import merge_file, merge_overrides, resolve_config
from simsiam_transfer.errors import TrainingDiverged, UserError
from simsiam_transfer.versions import library_versions

logger = logging.getLogger("simsiam_transfer.finetune")


@dataclasses.dataclass
class FinetuneJob:
    """Everything a worker needs; plain data so it pickles into spawned processes."""

    config_file: str
    weights: str  # a converted .pkl, or "none" for random init
    overrides: list = dataclasses.field(default_factory=list)
    data_root: str = None
    datasets: str = None
    num_gpus: int = 0
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"

    @property
    def world_size(self):
        return max(self.num_gpus, 1) * self.num_machines


def config_hash(cfg):
    """Hash of the protocol settings: OUTPUT_DIR, SEED and MODEL.WEIGHTS are left out."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR, c.SEED, c.MODEL.WEIGHTS = "", 0, ""
    return hashlib.sha256(c.dump().encode()).hexdigest()[:16]


def build_cfg(job):
    """The resolved, frozen detectron2 config for ``job`` (no side effects besides logging)."""
    import detection  # noqa: F401  (registers the ExtraNorm head)
    from detectron2.config import get_cfg

    cfg = get_cfg()
    merge_file(cfg, job.config_file)
    merge_overrides(cfg, job.overrides)
    cfg.MODEL.WEIGHTS = "" if job.weights == "none" else str(job.weights)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.RESNETS.NORM == "SyncBN" and (job.world_size == 1 or cfg.MODEL.DEVICE == "cpu"):
        # nn.SyncBatchNorm needs CUDA and a process group; naiveSyncBN is plain BN at world size 1.
        logger.warning("MODEL.RESNETS.NORM SyncBN cannot run with %d process(es) on %s; using naiveSyncBN",
                       job.world_size, cfg.MODEL.DEVICE)
        cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
    if cfg.MODEL.RESNETS.NORM == "FrozenBN" and not cfg.MODEL.WEIGHTS:
        raise UserError("MODEL.RESNETS.NORM FrozenBN with --weights none diverges (frozen random "
                        "statistics); use BN, naiveSyncBN or SyncBN for the scratch baseline")
    cfg.freeze()
    return cfg


def preflight(job):
    """Validate inputs, fix the seed, and return (job with an explicit SEED, its cfg)."""
    from detection.datasets import check_dataset_names, register_datasets

    if job.weights != "none":
        path = Path(job.weights)
        if not path.is_file():
            raise UserError(f"--weights {path}: file not found (use a converted .pkl, or 'none')")
    specs = register_datasets(job.data_root, job.datasets)
    cfg = build_cfg(job)
    check_dataset_names(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), specs, job.datasets)
    for name in cfg.DATASETS.TRAIN:
        classes = specs[name].get("classes")
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise UserError(f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES "
                            f"is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}; override it to match")
    if job.weights != "none":
        from convert.verify import check_weights_cover_model

        check_weights_cover_model(job.weights, cfg)
    if cfg.SEED < 0:
        seed = random.SystemRandom().randrange(2**31)
        job = dataclasses.replace(job, overrides=list(job.overrides) + ["SEED", str(seed)])
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SEED = seed
        cfg.freeze()
    return job, cfg


def flatten_results(results):
    """``{"bbox": {"AP": ..}, "segm": {..}}`` -> ``{"bbox/AP": .., "segm/AP": ..}`` (floats or None)."""
    flat = {}
    for task, metrics in (results or {}).items():
        for key, value in metrics.items():
            value = float(value)
            # COCO reports NaN for empty size ranges; JSON has no NaN.
            flat[f"{task}/{key}"] = None if math.isnan(value) else value
    return flat


def _worker(job):
    from detectron2.engine import default_setup
    from detectron2.utils import comm

    from detection.datasets import register_datasets
    from detection.trainer import Trainer

    register_datasets(job.data_root, job.datasets)
    cfg = build_cfg(job)
    default_setup(cfg, argparse_namespace(job))
    start = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process():
        write_metrics(cfg, job, trainer.cfg, results, time.time() - start)
    return results


def argparse_namespace(job):
    import argparse

    return argparse.Namespace(config_file=str(resolve_config(job.config_file)), eval_only=False,
                              num_gpus=job.num_gpus, num_machines=job.num_machines,
                              machine_rank=job.machine_rank, dist_url=job.dist_url, opts=job.overrides)


def write_metrics(cfg, job, effective_cfg, results, wall_time_s):
    flat = flatten_results(results)
    if not flat:
        raise RuntimeError("evaluation produced no metrics; is DATASETS.TEST set?")
    record = {
        **flat,
        "config_hash": config_hash(cfg),
        "seed": int(cfg.SEED),
        "weights": job.weights,
        "world_size": job.world_size,
        "norm": cfg.MODEL.RESNETS.NORM,
        "ims_per_batch": int(effective_cfg.SOLVER.IMS_PER_BATCH),
        "base_lr": float(effective_cfg.SOLVER.BASE_LR),
        "max_iter": int(effective_cfg.SOLVER.MAX_ITER),
        "wall_time_s": round(wall_time_s, 1),
        "versions": library_versions(),
    }
    atomic.write_json(Path(cfg.OUTPUT_DIR) / "metrics.json", record)
    return record


def run_finetune(job):
    """Pre-flight, then detectron2's ``launch``; returns the metrics record."""
    from detectron2.engine import launch

    job, cfg = preflight(job)
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    try:
        launch(_worker, job.num_gpus, num_machines=job.num_machines, machine_rank=job.machine_rank,
               dist_url=job.dist_url, args=(job,))
    except FloatingPointError as exc:
        raise TrainingDiverged(f"{exc}; lower SOLVER.BASE_LR or check the weights") from None
    metrics_path = Path(cfg.OUTPUT_DIR) / "metrics.json"
    return json.loads(metrics_path.read_text()) if metrics_path.is_file() else None


def finetune_command(args):
    job = FinetuneJob(config_file=args.config, weights=args.weights, overrides=args.overrides,
                      data_root=args.data_root, datasets=args.datasets, num_gpus=torch.cuda.device_count() if args.num_gpus is None else args.num_gpus,
                      num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url)
    record = run_finetune(job)
    keys = [k for k in record if k.split("/")[-1] in ("AP", "AP50", "AP75")]
    print(" ".join(f"{k}={record[k]:.2f}" for k in keys if record[k] is not None))
    return 0
