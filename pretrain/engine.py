"""SimSiam training loop: one process or torchrun/DDP, optional mixed precision, resume, hooks.

``Pretrainer.run()`` is a short loop over epochs and steps; each concern (LR schedule, metrics,
kNN and BN monitors, checkpoints, writers) is a hook in ``pretrain/hooks.py``.
Per epoch it records ``{"epoch", "loss", "z_std", "lr", "steps", "time_s", "residual_bn_scale",
"knn_top1"?, "amp_skipped_steps"?}`` (``epoch`` is 1-based: the number of epochs completed;
``time_s`` the epoch's training time) to ``OUTPUT_DIR/metrics.jsonl`` and TensorBoard, then
writes checkpoints atomically. A killed run started again with the same OUTPUT_DIR resumes from
``checkpoint_last.pth``: at most the epoch in flight is lost.

``train_step`` is the single SGD step, callable on its own (``benchmarks/pretrain_step.py``).
"""

import contextlib
import dataclasses
import functools
import random
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from pretrain import checkpoint, memory
from pretrain.config import paper_scale, resolve_augment_on
from pretrain.data import BLUR_SIGMA, LabeledFolder, check_train_images, eval_transform
from pretrain.device_augment import CropView, DeviceAugmentation
from pretrain.distributed import all_reduce_sum, cleanup, init_distributed
from pretrain.hooks import HookBase, default_hooks
from pretrain.methods import PretrainMethod, build_method
from pretrain.schedule import initial_lr
from pretrain.targets import MovingAverageTargets, alternation
from simsiam_transfer.bf16 import cpu_supports_bf16
from simsiam_transfer.cpu_guard import refuse_on_cpu
from simsiam_transfer.errors import UserError
from simsiam_transfer.locks import folder_lock
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD
from simsiam_transfer.stopping import deferred_stop
from simsiam_transfer.tf32 import set_tf32, tf32_enabled


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, rank, worker): no two streams share a seed."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_worker(worker_id: int, base: Tuple[int, ...]) -> None:
    """DataLoader ``worker_init_fn``: the worker's augmentation streams depend only on
    (seed, epoch, rank, worker id), so a resumed epoch draws the same crops as the first run."""
    seed_everything(derived_seed(*base, worker_id))


# -- precision and memory format -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Precision:
    device_type: str = "cpu"
    dtype: Optional[torch.dtype] = None   # None = fp32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def grad_scaler(self) -> bool:
        """Only fp16 needs loss scaling; bf16 has fp32's exponent range."""
        return self.dtype == torch.float16


def cuda_supports_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) and later."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_precision(amp: bool, device: torch.device) -> Precision:
    """``SOLVER.AMP``: on CUDA bf16 autocast (no GradScaler) where the GPU has bf16, else fp16 + GradScaler;
    bf16 autocast on CPUs with native bf16; else fp32."""
    if not amp:
        return Precision(device.type)
    if device.type == "cuda":
        return Precision("cuda", torch.bfloat16 if cuda_supports_bf16(device) else torch.float16)
    if device.type == "cpu" and cpu_supports_bf16():
        return Precision("cpu", torch.bfloat16)
    print("warning: SOLVER.AMP is on but this CPU has no native bf16; training in fp32", file=sys.stderr)
    return Precision(device.type)


def configure_backends(device: torch.device, tf32: bool) -> None:
    """On CUDA: cudnn.benchmark on (fixed input shapes; the official code sets it too), TF32 for
    convolutions and matmuls only when ``SOLVER.TF32`` asks (off = the paper's fp32)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    set_tf32(tf32)


def memory_format(device: torch.device, precision: Precision) -> torch.memory_format:
    """channels_last (same math) where it is faster: on GPUs, and on CPUs with bf16 autocast; in fp32
    on CPU it measured 0.88x (R18) and 1.04x (R50) of NCHW here (docs/performance.md)."""
    fast = device.type == "cuda" or precision.dtype == torch.bfloat16
    return torch.channels_last if fast else torch.contiguous_format


def prepare_model(model: torch.nn.Module, device: torch.device,
                  fmt: torch.memory_format = torch.channels_last) -> torch.nn.Module:
    return model.to(device).to(memory_format=fmt)


def to_device(x: torch.Tensor, device: torch.device, fmt: torch.memory_format = torch.channels_last) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=fmt)


Targets = Union[None, Tuple[torch.Tensor, torch.Tensor], Callable]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: Sequence[torch.Tensor],
               aux: Optional[dict] = None, *, method: Optional[PretrainMethod] = None,
               precision: Precision = Precision(), scaler: Optional[torch.amp.GradScaler] = None,
               targets: Targets = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of any method; returns (loss, z), both detached and still on the device (no host sync).

    ``model`` runs the forward (the method itself, or its DDP wrapper); ``method`` (default: the model
    unwrapped) computes the loss from its outputs, ``aux`` (e.g. labels) and ``targets`` (SimSiam's Sec.
    5.2 variants).
    """
    method = method or getattr(model, "module", model)
    with torch.autocast(precision.device_type, dtype=precision.dtype, enabled=precision.dtype is not None):
        outputs = model(*inputs)
    loss, z = method.loss(outputs, aux or {}, targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), z.detach()


# -- the trainer -------------------------------------------------------------------------------------
def knn_folders(cfg) -> Optional[Tuple[LabeledFolder, LabeledFolder]]:
    """Both kNN folders, checked at start-up (a typo must not cost an epoch), or None when unset."""
    train_dir, val_dir = cfg.DATA.KNN_TRAIN_DIR, cfg.DATA.KNN_VAL_DIR
    if not train_dir and not val_dir:
        return None
    if not (train_dir and val_dir):
        missing = "DATA.KNN_VAL_DIR" if train_dir else "DATA.KNN_TRAIN_DIR"
        raise UserError(f"{missing} is empty while the other kNN folder is set; set both or neither")
    transform = eval_transform(cfg.DATA.IMAGE_SIZE)
    train = LabeledFolder(train_dir, transform, "DATA.KNN_TRAIN_DIR")
    return train, LabeledFolder(val_dir, transform, "DATA.KNN_VAL_DIR", classes=train.classes)


class Pretrainer:
    """Holds the run's state; ``run()`` trains from the first unfinished epoch to SOLVER.EPOCHS."""

    def __init__(self, cfg, hooks: Optional[Sequence[HookBase]] = None, allow_cpu: bool = True):
        self.cfg = cfg
        self.dist = init_distributed()
        self.out = Path(cfg.OUTPUT_DIR)
        self.device = self.dist.device
        seed_everything(cfg.SEED + self.dist.rank)  # before the network: its initial weights follow the seed
        self.model: PretrainMethod = build_method(cfg)
        if cfg.DATA.AUGMENT_ON == "device" and not self.model.device_augmentation:
            raise UserError(f"DATA.AUGMENT_ON device: MODEL.METHOD {cfg.MODEL.METHOD} augments in its loader only; "
                            "use cpu or auto")
        self.cfg = cfg = resolve_augment_on(cfg, self.device.type if self.model.device_augmentation else "cpu")
        self.precision = choose_precision(bool(cfg.SOLVER.AMP), self.device)
        configure_backends(self.device, bool(cfg.SOLVER.TF32))
        # What each epoch's record carries: the arithmetic the numbers were made with.
        self.provenance = {"precision": self.precision.name,
                           "tf32": self.device.type == "cuda" and all(tf32_enabled().values())}
        self.per_process_batch = cfg.SOLVER.BATCH_SIZE // self.dist.world_size
        if self.per_process_batch < 1 or cfg.SOLVER.BATCH_SIZE % self.dist.world_size:
            raise UserError(f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} must be a positive multiple of the "
                            f"{self.dist.world_size} processes")

        on_device = cfg.DATA.AUGMENT_ON == "device"  # workers crop and draw; to_device applies the rest
        self.device_augment = (DeviceAugmentation(self.device, IMAGENET_MEAN, IMAGENET_STD, BLUR_SIGMA[1])
                               if on_device else None)
        self.dataset = self.model.train_dataset(cfg)
        if len(self.dataset) < cfg.SOLVER.BATCH_SIZE:
            raise UserError(f"DATA.TRAIN_DIR {cfg.DATA.TRAIN_DIR}: {len(self.dataset)} images, fewer than one "
                            f"batch (SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE}); lower the batch size")
        check_train_images(self.dataset.files, cfg, self.dist)
        self.knn_sets = knn_folders(cfg)
        refuse_on_cpu(paper_scale(cfg), allow_cpu)  # after the input checks: those name what to fix first
        self.sampler: DistributedSampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size,
                                          rank=self.dist.rank, shuffle=True, seed=cfg.SEED, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.per_process_batch
        if cfg.SOLVER.MAX_ITERS_PER_EPOCH > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.SOLVER.MAX_ITERS_PER_EPOCH)

        memory.check_fits(cfg, self.precision.name, self.dist.world_size,
                          sum(p.numel() for p in self.model.parameters()), memory.gpu_gib(self.device),
                          views=self.model.views)
        if self.dist.distributed and self.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.memory_format = memory_format(self.device, self.precision)
        self.model = prepare_model(self.model, self.device, self.memory_format)
        self.init_lr = initial_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE)
        self.optimizer = torch.optim.SGD(self.model.parameter_groups(cfg.SOLVER.FIX_PRED_LR), lr=self.init_lr,
                                         momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.grad_scaler)
        self.targets = None
        if cfg.MODEL.TARGET == "moving_average":
            self.targets = MovingAverageTargets(len(self.dataset), cfg.MODEL.DIM,
                                                cfg.MODEL.TARGET_MOMENTUM, self.device)
        self.start_epoch, self.history = 0, []  # type: int, list
        self._resume()
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.dist.distributed else self.model)
        self.epoch, self.step_outputs, self.running_loss = self.start_epoch, None, None
        self.record: dict = {}
        self.hooks: List[HookBase] = []
        self.register_hooks(default_hooks(self) if hooks is None else hooks)

    def register_hooks(self, hooks: Sequence[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
        self.hooks.extend(hooks)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    def _resume(self) -> None:
        path = self.out / checkpoint.LAST
        if not path.is_file():
            return
        ckpt = checkpoint.load(path)
        changed = checkpoint.model_settings_changed(ckpt["config"], self.cfg)
        if changed:
            raise UserError(f"{path} was trained with other model settings ({'; '.join(changed)}); "
                            "use a new OUTPUT_DIR or the original settings")
        checkpoint.restore(ckpt, self.model, self.optimizer, self.scaler, self.targets, self.dist.rank)
        self.start_epoch, self.history = int(ckpt["epoch"]), list(ckpt["history"])
        if self.dist.is_main:
            print(f"resuming from {path}: {self.start_epoch} epoch(s) done", flush=True)

    # -- data ---------------------------------------------------------------------------------------
    def make_loader(self, dataset, epoch: int, batch_sampler=None) -> DataLoader:
        """A loader whose worker RNG streams depend only on (SEED, epoch, rank): exact resume with workers.

        Without ``batch_sampler`` it is the training loader (the shared DistributedSampler, full batches).
        """
        base = (self.cfg.SEED, epoch + 1, self.dist.rank)  # epoch -1: the moving-average initial pass
        workers = self.cfg.DATA.NUM_WORKERS
        batching = (dict(batch_sampler=batch_sampler) if batch_sampler is not None else
                    dict(batch_size=self.per_process_batch, sampler=self.sampler, drop_last=True))
        return DataLoader(dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=functools.partial(seed_worker, base=base) if workers else None,
                          generator=torch.Generator().manual_seed(derived_seed(*base)), **batching)

    def to_device(self, x: Union[torch.Tensor, CropView]) -> torch.Tensor:
        """A batch of views, ready for the model; ``CropView`` batches (DATA.AUGMENT_ON device) are
        augmented here, so the steps, the alternation's targets and the §5.2 memory fill all see it."""
        if isinstance(x, CropView):
            x = self.device_augment(x)
        return to_device(x, self.device, self.memory_format)

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        p = self.precision
        with torch.autocast(p.device_type, dtype=p.dtype, enabled=p.dtype is not None):
            return self.model.encoder(x).float()

    @torch.no_grad()
    def _alternation_target(self, batch):
        """Eq. (10) for one batch with the chunk's starting weights: only the two d-dim targets are kept."""
        x1, x2, _ = batch
        return self.forward_encoder(self.to_device(x1)), self.forward_encoder(self.to_device(x2))

    def epoch_batches(self, epoch: int):
        """(batch, cached targets or None) for each step of the epoch."""
        self.sampler.set_epoch(epoch)
        steps, k = self.steps_per_epoch, self.cfg.MODEL.ALTERNATION_STEPS
        if k == 1:
            return ((batch, None) for batch in islice(self.make_loader(self.dataset, epoch), steps))
        return alternation(iter(self.make_loader(self.dataset, epoch)), iter(self.make_loader(self.dataset, epoch)),
                           k, steps, self._alternation_target, (checkpoint.rng_state, checkpoint.set_rng_state))

    # -- the loop -------------------------------------------------------------------------------------
    def run_step(self, batch, cached=None):
        """One step of the method on a loader batch; ``cached``: the k-step alternation's targets."""
        inputs, aux = self.model.step_inputs(batch)
        aux = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in aux.items()}
        targets = cached
        if self.targets is not None:
            targets = functools.partial(self.targets.targets, aux["index"], dist_info=self.dist)
        return train_step(self.ddp, self.optimizer, [self.to_device(x) for x in inputs], aux, method=self.model,
                          precision=self.precision, scaler=self.scaler, targets=targets)

    def train_one_epoch(self) -> None:
        self.ddp.train()
        for self.iter, (batch, cached) in enumerate(self.epoch_batches(self.epoch)):
            self.step_outputs = self.run_step(batch, cached)
            self._call("after_step")

    def gather_rng(self) -> list:
        state = checkpoint.rng_state()
        if not self.dist.distributed:
            return [state]
        states: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def hold_output_dir(self) -> contextlib.ExitStack:
        """One run per OUTPUT_DIR: rank 0 takes the folder's lock (or every rank stops with one line naming
        the holder), before anything is written there."""
        held, refusal = contextlib.ExitStack(), None
        if self.dist.is_main:
            try:
                held.enter_context(folder_lock(self.out, "pretraining"))
            except UserError as exc:
                refusal = exc
        refused = all_reduce_sum(torch.tensor([float(refusal is not None)], device=self.device), self.dist)
        if refused.item():
            held.close()
            cleanup(self.dist)
            raise refusal or UserError(f"OUTPUT_DIR {self.out}: another pretraining is writing into it "
                                       "(rank 0 names it)")
        return held

    def run(self) -> list:
        held = self.hold_output_dir()
        try:
            self._call("before_train")
            for self.epoch in range(self.start_epoch, self.cfg.SOLVER.EPOCHS):
                self.record = {"epoch": self.epoch + 1, **self.provenance}
                self._call("before_epoch")
                start = time.perf_counter()
                self.train_one_epoch()
                self.record["time_s"] = round(time.perf_counter() - start, 3)
                with deferred_stop():  # the epoch's monitors, checkpoint and records land together
                    self._call("after_epoch")
        finally:
            self._call("after_train")
            held.close()
            cleanup(self.dist)
        return self.history


def run_pretrain(cfg, allow_cpu: bool = True) -> list:
    """Train ``cfg``; ``allow_cpu`` False refuses a paper-scale run on a machine without CUDA (the CLI's
    default, ``--allow-cpu`` lifts it)."""
    return Pretrainer(cfg, allow_cpu=allow_cpu).run()
