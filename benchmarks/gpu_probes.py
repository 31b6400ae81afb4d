"""In-process measurements for the GPU check, one per process (a fresh CUDA context: clean peak memory).

    python benchmarks/gpu_probes.py detector-memory --images 2,4,8 [--config C] [--size S]
    python benchmarks/gpu_probes.py activation-count [--config C]     (CPU: bytes autograd keeps, 1 image)
    python benchmarks/gpu_probes.py simsiam-step --backbone resnet50 --size 224 --batches 64,128
    python benchmarks/gpu_probes.py ddp-world1                        (under torchrun --nproc_per_node 1)
    python benchmarks/gpu_probes.py random-knn KEY VALUE ...          (kNN of an untrained backbone)

Each prints one JSON line (its last line of stdout). Inputs are generated: detector batches alternate
VOC's two image shapes (500x375 and 375x500) resized as the protocol resizes them (detectron2's
``ResizeShortestEdge`` to the config's largest training short side, long side capped), with three
boxes per image; the SimSiam step reads random tensors (the step alone, no loader).
"""

import argparse
import json
import sys
import time

import torch

import _common  # noqa: F401  (puts the repository on sys.path)

VOC_SHAPES = {"landscape": (375, 500), "portrait": (500, 375)}  # (height, width) of VOC's two image shapes
PROTOCOL_DETECTOR = "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc07.yaml"
GIB = 2**30


def _device():
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event_storage():
    from detectron2.utils.events import EventStorage

    return EventStorage()


def build_detector(config, overrides=()):
    """detectron2's model for ``config`` as ``finetune`` builds it (ExtraNorm head, norm rules), random init."""
    from detectron2.modeling import build_model

    from detection.finetune import FinetuneJob, build_cfg

    cfg = build_cfg(FinetuneJob(config_file=config, weights="none", overrides=list(overrides)))
    return cfg, build_model(cfg)


def detector_batch(cfg, images, device, shape="landscape", seed=0):
    """``images`` generated inputs in detectron2's format of one VOC shape (detectron2's loader groups
    images by aspect ratio, so a batch never mixes them), resized as in training."""
    from detectron2.data import transforms as T
    from detectron2.structures import Boxes, Instances

    gen = torch.Generator().manual_seed(seed)
    resize = T.ResizeShortestEdge(max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, "choice")
    batch = []
    for i in range(images):
        h, w = VOC_SHAPES[shape]
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).numpy()
        transform = resize.get_transform(pixels)
        image = transform.apply_image(pixels)
        boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0.2, 0.5, 0.6, 0.95]])
        boxes = boxes * torch.tensor([image.shape[1], image.shape[0]] * 2)
        instances = Instances(image.shape[:2])
        instances.gt_boxes = Boxes(boxes.to(device))
        instances.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (3,), generator=gen).to(device)
        batch.append({"image": torch.as_tensor(image.transpose(2, 0, 1).copy()).to(device), "instances": instances})
    return batch


def detector_memory(config, counts, iters=2, overrides=()):
    """Peak GPU memory and s/iteration of training steps (forward, backward, SGD) per images-per-GPU count."""
    from simsiam_transfer.tf32 import set_tf32

    device = _device()
    set_tf32(False)
    cfg, model = build_detector(config, overrides)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    rows = []
    for count, shape in ((c, s) for c in counts for s in VOC_SHAPES):
        batch = detector_batch(cfg, count, device, shape)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row = {"images": count, "shape": shape, "input_hw": list(batch[0]["image"].shape[1:])}
        try:
            for i in range(iters):
                _sync(device)
                start = time.perf_counter()
                with _event_storage():  # detectron2's heads log to it during training
                    loss = sum(model(batch).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _sync(device)
                row["s_per_iter"] = round(time.perf_counter() - start, 3)
        except torch.OutOfMemoryError:
            row["oom"] = True
        if device.type == "cuda":
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 2)
        rows.append(row)
        optimizer.zero_grad(set_to_none=True)
    from detection.batch_policy import estimate_gib_per_gpu

    for row in rows:  # the pre-flight's estimate for the same inputs, to compare with the measured peak
        row["preflight_gib"] = estimate_gib_per_gpu(row["images"], *row["input_hw"])
    return {"config": config, "norm": cfg.MODEL.RESNETS.NORM, "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "device": str(device), "tf32": False, "rows": rows}


class SavedTensors:
    """Bytes of the distinct storages autograd keeps for backward while the context is open."""

    def __init__(self):
        self.storages = {}

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def _pack(self, t):
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def gib(self):
        return sum(self.storages.values()) / GIB


def simsiam_activation_count(backbones, size=224, images=4):
    """GiB per image (both views) that the SimSiam training forward keeps for backward, fp32 and CPU bf16
    autocast: the basis of ``pretrain/memory.py``'s pre-flight."""
    from pretrain.config import get_cfg
    from pretrain.methods import build_method

    rows = {}
    for backbone in backbones:
        cfg = get_cfg()
        cfg.MODEL.BACKBONE = backbone
        model = build_method(cfg).train()
        x1, x2 = torch.randn(images, 3, size, size), torch.randn(images, 3, size, size)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with SavedTensors() as saved, torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(x1, x2)
            del out
            rows[f"{backbone}/{name}"] = round(saved.gib / images, 4)
        rows[f"{backbone}/params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return {"size": size, "images": images, "gib_per_image": rows}


def activation_count(config, images=1, overrides=()):
    """Bytes autograd keeps for backward in one training forward (distinct storages), plus parameters,
    gradients and SGD momentum: the CPU accounting behind the batch policy's memory pre-flight."""
    cfg, model = build_detector(config, overrides)
    model.train()
    batch = detector_batch(cfg, images, torch.device("cpu"))
    with SavedTensors() as saved, _event_storage():
        loss = sum(model(batch).values())
    del loss
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / GIB
    return {"config": config, "images": images, "input_hw": list(batch[0]["image"].shape[1:]),
            "saved_activation_gib": round(saved.gib, 3), "params_grads_momentum_gib": round(3 * params, 3),
            "total_gib": round(saved.gib + 3 * params, 3)}


def simsiam_step(backbone, size, batches, steps=10, warmup=3):
    """img/s and peak memory of the engine's SimSiam step (``train_step``), fp32 and bf16, channels_last."""
    from pretrain.config import get_cfg
    from pretrain.engine import Precision, configure_backends, prepare_model, to_device, train_step
    from pretrain.methods import build_method

    device = _device()
    configure_backends(device, tf32=False)
    cfg = get_cfg()
    cfg.MODEL.BACKBONE = backbone
    rows = []
    dtypes = (None, torch.bfloat16) if device.type == "cuda" else (None,)
    for batch in batches:
        for dtype in dtypes:
            torch.manual_seed(0)
            model = prepare_model(build_method(cfg), device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            x1, x2 = (to_device(torch.randn(batch, 3, size, size), device) for _ in range(2))
            precision = Precision(device.type, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            row = {"batch": batch, "precision": precision.name}
            try:
                for _ in range(warmup):
                    train_step(model, optimizer, (x1, x2), precision=precision)
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    train_step(model, optimizer, (x1, x2), precision=precision)
                _sync(device)
                row["img_per_s"] = round(batch * steps / (time.perf_counter() - start), 1)
            except torch.OutOfMemoryError:
                row["oom"] = True
            if device.type == "cuda":
                row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
            rows.append(row)
            del model, optimizer, x1, x2
    return {"backbone": backbone, "size": size, "tf32": False, "device": str(device), "rows": rows}


def ddp_world1(steps=3):
    """NCCL (gloo on CPU) at world size 1: DDP with SyncBN over the SimSiam model, a few steps, collectives."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.config import get_cfg
    from pretrain.engine import prepare_model, to_device, train_step
    from pretrain.methods import build_method

    device = _device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        cfg = get_cfg()
        cfg.MODEL.BACKBONE, cfg.MODEL.DIM, cfg.MODEL.PRED_DIM = "resnet18", 512, 128
        model = build_method(cfg)
        if device.type == "cuda":  # SyncBatchNorm runs on CUDA only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = prepare_model(model, device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(steps):
            x1, x2 = (to_device(torch.randn(8, 3, 64, 64), device) for _ in range(2))
            losses.append(float(train_step(ddp, optimizer, (x1, x2))[0]))
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        parts = [torch.zeros(1, device=device)]
        dist.all_gather(parts, total)
        ok = all(map(lambda v: v == v and abs(v) < 10, losses)) and float(parts[0]) == dist.get_world_size()
        return {"backend": backend, "world_size": dist.get_world_size(), "sync_bn": device.type == "cuda",
                "losses": [round(v, 4) for v in losses], "ok": ok}
    finally:
        dist.destroy_process_group()


def random_knn(overrides):
    """kNN top-1 of the pretraining model as built before its first step (same seed, same monitor code)."""
    from pretrain.config import load_cfg
    from pretrain.engine import Precision, knn_folders, memory_format, prepare_model, seed_everything
    from pretrain.knn import extract_features, weighted_knn_top1
    from pretrain.methods import build_method

    cfg = load_cfg(None, overrides)
    device = _device()
    seed_everything(cfg.SEED)
    model = prepare_model(build_method(cfg), device, memory_format(device, Precision(device.type))).eval()
    train, val = knn_folders(cfg)
    train_f, train_y = extract_features(model.backbone_features, train, device)
    val_f, val_y = extract_features(model.backbone_features, val, device)
    top1 = weighted_knn_top1(train_f, train_y, val_f, val_y, len(train.classes), cfg.MONITOR.KNN_K, cfg.MONITOR.KNN_T)
    return {"knn_top1": round(top1, 2), "chance": round(100.0 / len(train.classes), 2)}


def _ints(text):
    return [int(v) for v in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    for name in ("detector-memory", "activation-count"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=PROTOCOL_DETECTOR)
        p.add_argument("--images", type=_ints, default=[2, 4, 8] if name == "detector-memory" else [1])
        p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p = sub.add_parser("simsiam-step")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=_ints, default=[64, 128])
    p.add_argument("--steps", type=int, default=10)
    p = sub.add_parser("simsiam-activation-count")
    p.add_argument("--backbones", default="resnet18,resnet34,resnet50,resnet101")
    p.add_argument("--size", type=int, default=224)
    sub.add_parser("ddp-world1")
    p = sub.add_parser("random-knn")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.probe == "detector-memory":
        record = detector_memory(args.config, args.images, overrides=args.overrides)
    elif args.probe == "activation-count":
        record = activation_count(args.config, args.images[0], overrides=args.overrides)
    elif args.probe == "simsiam-step":
        record = simsiam_step(args.backbone, args.size, args.batches, steps=args.steps)
    elif args.probe == "simsiam-activation-count":
        record = simsiam_activation_count(args.backbones.split(","), args.size)
    elif args.probe == "ddp-world1":
        record = ddp_world1()
    else:
        record = random_knn(args.overrides)
    record["probe_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(record), flush=True)
    return 0 if record.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
