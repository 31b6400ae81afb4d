"""``job.yaml``: one fine-tune as a file, written by ``bench`` (each trial) and ``finetune``, read by the
worker (``python -m detection.worker JOB``). Its writer and reader are both here.

    format      simsiam-transfer/finetune-job-v1
    config      the detectron2 YAML the config was built from (a benchmark's file, or the user's)
    detectron2  the full resolved detectron2 config (LR, seed and OUTPUT_DIR included), values typed
    plan        the batch plan (``detection.batch_policy.BatchPlan``: world size, images per GPU, BN, ...)
    launch      num_gpus, num_machines, machine_rank, dist_url
    weights     the converted .pkl, or none
    datasets    the dataset catalog (or null), data_root the standard folders' root (or null)
    scaling     faithful / linear

The detectron2 config is built once (by the writer); the worker loads it as it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from detectron2.config import CfgNode, get_cfg

from detection.batch_policy import BatchPlan
from detection.spec import FinetuneJob
from simsiam_transfer import atomic
from simsiam_transfer.config import merge_node, safe_yaml
from simsiam_transfer.errors import UserError

FORMAT = "simsiam-transfer/finetune-job-v1"
NAME = "job.yaml"


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker runs: the job's launch data and its resolved detectron2 config."""

    job: FinetuneJob
    cfg: Any  # detectron2 CfgNode, frozen
    plan: dict
    path: Path


def new_cfg() -> CfgNode:
    """detectron2's default config plus this project's own keys, which every job file holds."""
    cfg = get_cfg()
    cfg.SOLVER.TF32 = False  # TF32 convolutions and matmuls on CUDA; off = IEEE fp32, as the paper
    return cfg


def _as_dict(cfg: CfgNode) -> dict:
    return yaml.safe_load(cfg.dump())


def write_job(folder, job: FinetuneJob, cfg: CfgNode, plan: BatchPlan) -> Path:
    """Write ``folder/job.yaml`` atomically; returns its path."""
    doc = {
        "format": FORMAT, "config": job.config_path, "weights": job.weights, "datasets": job.datasets, "data_root": job.data_root,
        "scaling": job.scaling,
        "launch": {"num_gpus": job.num_gpus, "num_machines": job.num_machines, "machine_rank": job.machine_rank,
                   "dist_url": job.dist_url},
        "plan": plan.as_dict(), "detectron2": _as_dict(cfg),
    }
    path = Path(folder) / NAME
    atomic.write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def read_job(path) -> Job:
    """The job of a ``job.yaml``: its detectron2 config rebuilt from detectron2's defaults and the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: job file not found (bench and finetune write one into each trial folder)")
    doc = safe_yaml(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: not a simsiam-transfer fine-tune job (format {FORMAT}); rerun bench or "
                        "finetune to write it")
    try:
        launch = doc["launch"]
        job = FinetuneJob(config_file=doc["config"], weights=doc["weights"],
                          datasets=doc.get("datasets"), data_root=doc.get("data_root"), scaling=doc["scaling"],
                          num_gpus=int(launch["num_gpus"]), num_machines=int(launch["num_machines"]),
                          machine_rank=int(launch["machine_rank"]), dist_url=str(launch["dist_url"]))
        detectron2 = doc["detectron2"]
        plan = dict(doc["plan"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: damaged job file ({type(exc).__name__}: {exc}); rerun bench or finetune "
                        "to write it again") from None
    cfg = merge_node(new_cfg(), detectron2, str(path))
    cfg.freeze()
    return Job(job=job, cfg=cfg, plan=plan, path=path)
