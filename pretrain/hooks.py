"""The pretraining loop's concerns, one hook each (as detectron2's ``HookBase``).

``Pretrainer.run()`` calls, in list order, ``before_train``, then per epoch ``before_epoch``,
``after_step`` after every SGD step, ``after_epoch``, and finally ``after_train`` (also after an
error). Hooks fill ``trainer.record`` (this epoch's metrics record); the checkpointer appends it
to ``trainer.history`` and the writers publish it.
"""

import json
import sys
from pathlib import Path
from typing import Any, List

import torch
from torch.utils.data import DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretrain import checkpoint
from pretrain.distributed import all_reduce_sum
from pretrain.knn import extract_features, weighted_knn_top1
from pretrain.loss import normalized_std
from pretrain.outputs import METRICS
from pretrain.schedule import apply_lr, lr_at_epoch
from simsiam_transfer import atomic
from simsiam_transfer.errors import TrainingDiverged
from simsiam_transfer.resnet import residual_branch_gammas


class HookBase:
    """Override the events a concern needs; ``self.trainer`` is set when the hook is registered."""

    trainer: Any = None

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


def write_metrics_file(out_dir, history) -> None:
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)
    atomic.write_text(Path(out_dir) / METRICS, text)


def init_batches(num_images: int, batch: int, dist_info) -> List[List[int]]:
    """This rank's batches covering every image: the same count on every rank (SyncBN forwards must
    match; DistributedSampler pads) and none of size 1 (train-mode BN needs two samples)."""
    images: Any = range(num_images)  # the sampler only needs len()
    indices: List[int] = list(DistributedSampler(images, num_replicas=dist_info.world_size,
                                                 rank=dist_info.rank, shuffle=False))
    batches = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-1] = batches[-2][-1:] + batches[-1]
    return batches


class TargetMemoryInit(HookBase):
    """Sec. 5.2: fill the moving-average memory from the initial network before step 1."""

    def before_train(self):
        t = self.trainer
        if t.targets is None or t.targets.initialized:
            return
        loader = t.make_loader(t.dataset, epoch=-1, batch_sampler=init_batches(len(t.dataset), t.per_process_batch,
                                                                               t.dist))
        # Train-mode BN (as the steps see it) without moving the running statistics.
        buffers = {k: v.clone() for k, v in t.model.named_buffers()}
        with torch.no_grad():
            t.targets.initialize(((t.to_device(a), t.to_device(b), i) for a, b, i in loader),
                                 t.forward_encoder, t.dist)
        for name, value in t.model.named_buffers():
            value.copy_(buffers[name])


class LRSchedule(HookBase):
    """Cosine (with optional warmup) set once at each epoch's start, as the official code."""

    def before_epoch(self):
        t, solver = self.trainer, self.trainer.cfg.SOLVER
        lr = lr_at_epoch(t.init_lr, t.epoch, solver.EPOCHS, solver.WARMUP_EPOCHS)
        apply_lr(t.optimizer, lr, t.init_lr)
        t.record["lr"] = lr


class TrainMetrics(HookBase):
    """Loss and z_std kept on the device; one all-reduce and one host read per ``SOLVER.LOG_PERIOD``
    steps. The same reduction carries a non-finite count, so every rank stops at the same step."""

    def before_epoch(self):
        self.sums = torch.zeros(3, device=self.trainer.device)  # loss, z_std, non-finite steps
        self.totals, self.count = [0.0, 0.0, 0.0], 0

    def after_step(self):
        t = self.trainer
        loss, z1 = t.step_outputs
        self.sums += torch.stack([loss.float(), normalized_std(z1), (~torch.isfinite(loss)).float()])
        self.count += 1
        if self.count % t.cfg.SOLVER.LOG_PERIOD == 0 or self.count == t.steps_per_epoch:
            self._flush()

    def _flush(self):
        t = self.trainer
        reduced = all_reduce_sum(self.sums, t.dist).tolist()
        self.sums = torch.zeros_like(self.sums)
        self.totals = [a + b for a, b in zip(self.totals, reduced)]
        done = self.count * t.dist.world_size
        t.running_loss = self.totals[0] / done
        if self.totals[2] > 0:
            kept = (f"the last good checkpoint ({t.out / checkpoint.LAST}, {t.epoch} epochs) is kept"
                    if t.epoch else "no checkpoint had been written yet")
            raise TrainingDiverged(f"loss became non-finite ({t.running_loss}) at epoch {t.epoch + 1} by "
                                   f"iteration {self.count}; {kept}. Lower SOLVER.BASE_LR or check the "
                                   "ablation settings")

    def after_epoch(self):
        done = self.count * self.trainer.dist.world_size
        self.trainer.record.update(loss=self.totals[0] / done, z_std=self.totals[1] / done, steps=self.count,
                                   **self.trainer.model.epoch_record())


class AmpSkipMonitor(HookBase):
    """fp16 GradScaler skips the optimizer step after an overflow; count the skips per epoch."""

    def before_train(self):
        self.stepped = 0
        self.handle = self.trainer.optimizer.register_step_post_hook(self._count)

    def _count(self, *_):
        self.stepped += 1

    def before_epoch(self):
        self.stepped = 0

    def after_epoch(self):
        t = self.trainer
        skipped = t.record["steps"] - self.stepped
        t.record["amp_skipped_steps"] = skipped
        if skipped and t.dist.is_main:
            print(f"warning: epoch {t.epoch + 1}: mixed precision skipped {skipped} of {t.record['steps']} "
                  "steps after gradient overflow; set SOLVER.AMP False for fp32", file=sys.stderr, flush=True)

    def after_train(self):
        self.handle.remove()


class ProgressBar(HookBase):
    def before_epoch(self):
        t = self.trainer
        self.bar = tqdm(total=t.steps_per_epoch, desc=f"epoch {t.epoch + 1}/{t.cfg.SOLVER.EPOCHS}",
                        dynamic_ncols=True, leave=False)
        self.shown = None

    def after_step(self):
        self.bar.update(1)
        if self.trainer.running_loss is not None and self.trainer.running_loss != self.shown:
            self.shown = self.trainer.running_loss
            self.bar.set_postfix(loss=f"{self.shown:.4f}")

    def after_epoch(self):
        self.bar.close()

    def after_train(self):
        if getattr(self, "bar", None) is not None:
            self.bar.close()


class KnnMonitor(HookBase):
    """Weighted kNN top-1 every ``MONITOR.KNN_PERIOD`` epochs and at the last; every rank extracts its share."""

    def after_epoch(self):
        t, cfg = self.trainer, self.trainer.cfg
        if t.knn_sets is None or not ((t.epoch + 1) % cfg.MONITOR.KNN_PERIOD == 0 or t.epoch + 1 == cfg.SOLVER.EPOCHS):
            return
        train, val = t.knn_sets
        t.model.eval()
        args = dict(dist_info=t.dist, num_workers=cfg.DATA.NUM_WORKERS)
        with torch.autocast(t.precision.device_type, dtype=t.precision.dtype, enabled=t.precision.dtype is not None):
            train_f, train_y = extract_features(t.model.backbone_features, train, t.device, **args)
            val_f, val_y = extract_features(t.model.backbone_features, val, t.device, **args)
        t.model.train()
        t.record["knn_top1"] = weighted_knn_top1(train_f, train_y, val_f, val_y, len(train.classes),
                                                 cfg.MONITOR.KNN_K, cfg.MONITOR.KNN_T)


def residual_bn_scale(encoder) -> dict:
    """Per ResNet stage, mean |gamma| of each residual branch's last BN (zero-init starts at 0)."""
    stages = residual_branch_gammas(encoder.state_dict())
    return {f"layer{i + 1}": round(float(torch.cat([g.detach().abs().flatten() for g in gammas]).mean()), 6)
            for i, gammas in enumerate(stages)}


class ResidualBNMonitor(HookBase):
    def after_epoch(self):
        self.trainer.record["residual_bn_scale"] = residual_bn_scale(self.trainer.model.encoder)


class Checkpointer(HookBase):
    """Appends the epoch's record to the history and writes the checkpoint (``checkpoint.py`` owns its format)."""

    def after_epoch(self):
        t = self.trainer
        t.history.append(t.record)
        rng = t.gather_rng()
        if not t.dist.is_main:
            return
        epochs_done, last = t.epoch + 1, t.epoch + 1 == t.cfg.SOLVER.EPOCHS
        payload = checkpoint.build_payload(t.model, t.optimizer, t.scaler, t.targets, epochs_done, t.cfg.dump(),
                                           t.history, rng)
        checkpoint.save(t.out, payload, numbered=epochs_done % t.cfg.SOLVER.CHECKPOINT_PERIOD == 0 or last)


class JsonWriter(HookBase):
    """``config.yaml`` at start; ``metrics.jsonl`` rewritten from the history (also right after a resume)."""

    def before_train(self):
        t = self.trainer
        t.out.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_tmp(t.out)  # half-written files of a killed run's atomic writes
        atomic.write_text(t.out / "config.yaml", t.cfg.dump())
        if t.history:
            write_metrics_file(t.out, t.history)

    def after_epoch(self):
        write_metrics_file(self.trainer.out, self.trainer.history)


def flat_scalars(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}/"))
        elif key != "epoch" and not isinstance(value, str):  # strings (the precision) are provenance, not curves
            out[prefix + key] = value
    return out


class TensorboardWriter(HookBase):
    def before_train(self):
        self.writer = SummaryWriter(str(self.trainer.out / "tb"), purge_step=self.trainer.start_epoch + 1)

    def after_epoch(self):
        for key, value in flat_scalars(self.trainer.record).items():
            self.writer.add_scalar(f"pretrain/{key}", value, self.trainer.epoch + 1)
        self.writer.flush()

    def after_train(self):
        if getattr(self, "writer", None) is not None:
            self.writer.close()


class StdoutWriter(HookBase):
    def after_epoch(self):
        print(json.dumps(self.trainer.record), flush=True)


def default_hooks(trainer) -> List[HookBase]:
    """Order matters: monitors fill the record before the checkpointer and the writers read it."""
    hooks = [TargetMemoryInit(), LRSchedule(), TrainMetrics()]
    if trainer.scaler.is_enabled():
        hooks.append(AmpSkipMonitor())
    if trainer.dist.is_main:
        hooks.append(ProgressBar())
    hooks += [KnnMonitor(), ResidualBNMonitor(), Checkpointer()]
    if trainer.dist.is_main:
        hooks += [JsonWriter(), TensorboardWriter(), StdoutWriter()]
    return hooks
