"""SimSiam training loop: one process or torchrun/DDP, AMP on GPU, resume, monitors, checkpoints.

Per epoch it records ``{"epoch", "loss", "z_std", "lr", "steps", "time_s", "knn_top1"?}``
(``epoch`` is 1-based: the number of epochs completed; ``time_s`` the epoch's training time) to ``OUTPUT_DIR/metrics.jsonl`` and TensorBoard, then writes
checkpoints atomically. A killed run started again with the same OUTPUT_DIR resumes from
``checkpoint_last.pth``: at most the epoch in flight is lost.
"""

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pretrain import checkpoint
from pretrain.data import LabeledFolder, TwoViewDataset, check_train_images, eval_transform, simsiam_augmentation
from pretrain.distributed import barrier, cleanup, init_distributed
from pretrain.knn import extract_features, weighted_knn_top1
from pretrain.loss import normalized_std, simsiam_loss
from pretrain.model import build_model
from pretrain.schedule import apply_lr, initial_lr, lr_at_epoch
from pretrain.targets import MovingAverageTargets, cached_targets
from simsiam_transfer import atomic
from simsiam_transfer.errors import TrainingDiverged, UserError
from simsiam_transfer.versions import library_versions


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_metrics_file(out_dir, history):
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)
    atomic.write_text(Path(out_dir) / "metrics.jsonl", text)


class Pretrainer:
    """Holds the run's state; ``run()`` trains from the first unfinished epoch to SOLVER.EPOCHS."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dist = init_distributed()
        self.out = Path(cfg.OUTPUT_DIR)
        self.device = self.dist.device
        self.amp = bool(cfg.SOLVER.AMP) and self.device.type == "cuda"
        self.per_process_batch = cfg.SOLVER.BATCH_SIZE // self.dist.world_size
        if self.per_process_batch < 1 or cfg.SOLVER.BATCH_SIZE % self.dist.world_size:
            raise UserError(f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} must be a positive multiple of the "
                            f"{self.dist.world_size} processes")
        seed_everything(cfg.SEED + self.dist.rank)

        self.dataset = TwoViewDataset(cfg.DATA.TRAIN_DIR,
                                      simsiam_augmentation(cfg.DATA.IMAGE_SIZE, cfg.DATA.MIN_SCALE))
        if len(self.dataset) < cfg.SOLVER.BATCH_SIZE:
            raise UserError(f"DATA.TRAIN_DIR {cfg.DATA.TRAIN_DIR}: {len(self.dataset)} images, fewer than one "
                            f"batch (SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE}); lower the batch size")
        check_train_images(self.dataset.files, cfg, self.dist)
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size,
                                          rank=self.dist.rank, shuffle=True, seed=cfg.SEED, drop_last=True)
        self.loader = DataLoader(self.dataset, batch_size=self.per_process_batch, sampler=self.sampler,
                                 num_workers=cfg.DATA.NUM_WORKERS, pin_memory=self.device.type == "cuda",
                                 drop_last=True, persistent_workers=cfg.DATA.NUM_WORKERS > 0)

        self.model = build_model(cfg).to(self.device)
        if self.dist.distributed and self.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.init_lr = initial_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE)
        self.optimizer = torch.optim.SGD(self.model.parameter_groups(cfg.SOLVER.FIX_PRED_LR), lr=self.init_lr,
                                         momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.targets = None
        if cfg.MODEL.TARGET == "moving_average":
            self.targets = MovingAverageTargets(len(self.dataset), cfg.MODEL.DIM,
                                                cfg.MODEL.TARGET_MOMENTUM, self.device)
        self.start_epoch, self.history = 0, []
        self._resume()
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.dist.distributed else self.model)

    # -- resume -------------------------------------------------------------------------------
    def _resume(self):
        path = self.out / checkpoint.LAST
        if not path.is_file():
            return
        ckpt = checkpoint.load(path)
        changed = checkpoint.model_settings_changed(ckpt["config"], self.cfg)
        if changed:
            raise UserError(f"{path} was trained with other model settings ({'; '.join(changed)}); "
                            "use a new OUTPUT_DIR or the original settings")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.targets is not None and ckpt.get("targets"):
            self.targets.load_state_dict(ckpt["targets"])
        self.start_epoch, self.history = int(ckpt["epoch"]), list(ckpt["history"])
        if self.dist.rank < len(ckpt["rng"]):
            checkpoint.set_rng_state(ckpt["rng"][self.dist.rank])
        if self.dist.is_main:
            write_metrics_file(self.out, self.history)
            print(f"resuming from {path}: {self.start_epoch} epoch(s) done", flush=True)

    # -- one step -----------------------------------------------------------------------------
    def _loss(self, x1, x2, index, cached=None):
        cfg = self.cfg
        with torch.autocast("cuda", enabled=self.amp):
            p1, p2, z1, z2 = self.ddp(x1, x2)
        p1, p2, z1, z2 = p1.float(), p2.float(), z1.float(), z2.float()
        if cached is not None:
            t1, t2 = cached
        elif self.targets is not None:
            t1, t2 = self.targets.targets(index.to(self.device), z1, z2, self.dist)
        else:
            t1, t2 = z1, z2
        loss = simsiam_loss(p1, p2, t1, t2, stop_gradient=cfg.MODEL.STOP_GRADIENT,
                            similarity=cfg.MODEL.SIMILARITY, symmetric=cfg.MODEL.SYMMETRIC)
        return loss, z1

    def _step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _finite_everywhere(self, loss):
        """Every rank must stop together, or the others would wait in the next all-reduce."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.dist.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _to_device(self, x):
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def train_one_epoch(self, epoch):
        cfg = self.cfg
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        steps = len(self.loader)
        if cfg.SOLVER.MAX_ITERS_PER_EPOCH > 0:
            steps = min(steps, cfg.SOLVER.MAX_ITERS_PER_EPOCH)
        k = cfg.MODEL.ALTERNATION_STEPS
        losses, stds, buffer = [], [], []
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.SOLVER.EPOCHS}", disable=not self.dist.is_main,
                   dynamic_ncols=True, leave=False)
        for it, batch in enumerate(self.loader):
            if it >= steps:
                break
            buffer.append(batch)
            if len(buffer) < k and it < steps - 1:
                continue
            cached = cached_targets(self.model.encoder, [(self._to_device(a), self._to_device(b), i)
                                                         for a, b, i in buffer], self.device) if k > 1 else None
            for j, (x1, x2, index) in enumerate(buffer):
                loss, z1 = self._loss(self._to_device(x1), self._to_device(x2), index,
                                      cached[j] if cached else None)
                if not self._finite_everywhere(loss):
                    bar.close()
                    kept = (f"the last good checkpoint ({self.out / checkpoint.LAST}, {epoch} epochs) is kept"
                            if epoch else "no checkpoint had been written yet")
                    raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, iteration {it + 1}; "
                                           f"{kept}. Lower SOLVER.BASE_LR or check the ablation settings")
                self._step(loss)
                losses.append(loss.item())
                stds.append(normalized_std(z1).item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            buffer = []
        bar.close()
        return float(np.mean(losses)), float(np.mean(stds)), len(losses)

    # -- monitors -----------------------------------------------------------------------------
    def knn_top1(self):
        cfg = self.cfg
        if not (cfg.DATA.KNN_TRAIN_DIR and cfg.DATA.KNN_VAL_DIR):
            return None
        transform = eval_transform(cfg.DATA.IMAGE_SIZE)
        train = LabeledFolder(cfg.DATA.KNN_TRAIN_DIR, transform, "DATA.KNN_TRAIN_DIR")
        val = LabeledFolder(cfg.DATA.KNN_VAL_DIR, transform, "DATA.KNN_VAL_DIR", classes=train.classes)
        loader_args = dict(batch_size=256, num_workers=cfg.DATA.NUM_WORKERS)
        self.model.eval()
        feature_fn = self.model.backbone_features
        train_f, train_y = extract_features(feature_fn, DataLoader(train, **loader_args), self.device)
        val_f, val_y = extract_features(feature_fn, DataLoader(val, **loader_args), self.device)
        self.model.train()
        return weighted_knn_top1(train_f, train_y, val_f, val_y, len(train.classes),
                                 cfg.MONITOR.KNN_K, cfg.MONITOR.KNN_T)

    # -- run ------------------------------------------------------------------------------------
    def _gather_rng(self):
        state = checkpoint.rng_state()
        if not self.dist.distributed:
            return [state]
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def run(self):
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_tmp(self.out)
            atomic.write_text(self.out / "config.yaml", cfg.dump())
        writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tb"), purge_step=self.start_epoch + 1)
        try:
            for epoch in range(self.start_epoch, cfg.SOLVER.EPOCHS):
                lr = lr_at_epoch(self.init_lr, epoch, cfg.SOLVER.EPOCHS, cfg.SOLVER.WARMUP_EPOCHS)
                apply_lr(self.optimizer, lr, self.init_lr)
                start = time.perf_counter()
                loss, z_std, steps = self.train_one_epoch(epoch)
                record = {"epoch": epoch + 1, "loss": loss, "z_std": z_std, "lr": lr, "steps": steps,
                          "time_s": round(time.perf_counter() - start, 3)}
                last = epoch + 1 == cfg.SOLVER.EPOCHS
                if (epoch + 1) % cfg.MONITOR.KNN_PERIOD == 0 or last:
                    if self.dist.is_main:
                        knn = self.knn_top1()
                        if knn is not None:
                            record["knn_top1"] = knn
                    barrier(self.dist)
                rng = self._gather_rng()
                if self.dist.is_main:
                    self.history.append(record)
                    payload = {
                        "format": checkpoint.FORMAT, "state_dict": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "epoch": epoch + 1, "config": cfg.dump(),
                        "versions": library_versions(), "history": self.history, "rng": rng,
                        "scaler": self.scaler.state_dict(),
                        "targets": self.targets.state_dict() if self.targets is not None else None,
                    }
                    checkpoint.save(self.out, payload, numbered=(epoch + 1) % cfg.SOLVER.CHECKPOINT_PERIOD == 0 or last)
                    write_metrics_file(self.out, self.history)
                    for key, value in record.items():
                        if key != "epoch":
                            writer.add_scalar(f"pretrain/{key}", value, epoch + 1)
                    writer.flush()
                    print(json.dumps(record), flush=True)
                barrier(self.dist)
        finally:
            if writer is not None:
                writer.close()
            cleanup(self.dist)
        return self.history


def run_pretrain(cfg):
    return Pretrainer(cfg).run()
