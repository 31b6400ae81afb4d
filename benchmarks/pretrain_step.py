"""Pretraining step: our SimSiam step against an official-style loop, img/s and ratio (one JSON line).

    python benchmarks/pretrain_step.py                      # R18 @ 64 px (batch 64) and R50 @ 128 px (batch 16)
    python benchmarks/pretrain_step.py --cases r18_64 --rounds 6
    python benchmarks/pretrain_step.py --cases r18_64 --profile 3   # + where each step's CPU time goes

The reference is written from the paper (Algorithm 1, Sec. 4) in the structure of the official
builder: a torchvision ResNet built with ``num_classes=dim, zero_init_residual=True`` whose fc becomes
the projector, a predictor MLP, two encoder passes, ``nn.CosineSimilarity`` loss
``-(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5``, SGD, and the official loop's
``loss.item()``; fp32, NCHW. Every variant gets the same model size, batch, random input tensors and
threads; rounds interleave the variants and warm-up steps are excluded.

Variants (``ratio`` = median over rounds of reference time / variant time, from wall time;
``ratio_cpu_time`` the same from process CPU time, which other jobs on a shared machine inflate less):
  ours         the engine's own step (``train_step``) with its CPU policy, SOLVER.AMP False: fp32, NCHW
  ours_amp     the same with SOLVER.AMP True: bf16 autocast and channels_last
  lever_*      our model with a lever set by hand: nchw_fp32 (neither lever), bf16 (NCHW); the lever
               table reads both levers from ``ours_amp`` against nchw_fp32
  compiled_*   (``--compile``) our model under ``torch.compile``, fp32 NCHW and bf16 channels_last
"""

import argparse
import copy
import sys

import torch
from torch import nn

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import emit, interleaved, machine, median, paired_ratio

from pretrain.config import load_cfg
from pretrain.loss import normalized_std, simsiam_loss
from pretrain.engine import choose_precision, memory_format, prepare_model, to_device, train_step
from pretrain.methods import build_method

CASES = {  # name: (backbone, crop px, batch, DIM, PRED_DIM) -- R18 as the mini recipe, R50 as the paper
    "r18_64": ("resnet18", 64, 64, 512, 128),
    "r50_128": ("resnet50", 128, 16, 2048, 512),
}


# -- reference: the official builder's structure, written from the paper -------------------
class OfficialStyleSimSiam(nn.Module):
    def __init__(self, arch: str, dim: int, pred_dim: int):
        super().__init__()
        import torchvision

        self.encoder = getattr(torchvision.models, arch)(num_classes=dim, zero_init_residual=True)
        prev_dim = self.encoder.fc.weight.shape[1]
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
            self.encoder.fc, nn.BatchNorm1d(dim, affine=False))
        self.encoder.fc[6].bias.requires_grad = False
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    def forward(self, x1, x2):
        z1, z2 = self.encoder(x1), self.encoder(x2)
        return self.predictor(z1), self.predictor(z2), z1.detach(), z2.detach()


def reference_step(backbone: str, dim: int, pred_dim: int, lr: float):
    model = OfficialStyleSimSiam(backbone, dim, pred_dim)
    criterion = nn.CosineSimilarity(dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step(x1, x2):
        p1, p2, z1, z2 = model(x1, x2)
        loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
        loss.item()  # the official loop's AverageMeter update
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


# -- ours -------------------------------------------------------------------------------------------
def our_step(cfg, channels_last: bool, bf16: bool, compiled: bool = False):
    """Our model, loss and optimizer with the CPU levers set by hand (for the lever table);
    ``compiled``: the model under ``torch.compile`` (inductor, default mode; compiled in warm-up)."""
    model = build_method(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameter_groups(cfg.SOLVER.FIX_PRED_LR), lr=cfg.SOLVER.BASE_LR,
                                momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    forward = torch.compile(model) if compiled else model

    def step(x1, x2):
        x1, x2 = x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            p1, p2, z1, z2 = forward(x1, x2)
        p1, p2, z1, z2 = p1.float(), p2.float(), z1.float(), z2.float()
        loss = simsiam_loss(p1, p2, z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), normalized_std(z1.detach())  # kept on the device, as the engine does
    return step


def engine_step(cfg):
    """The engine's own step (``pretrain.engine.train_step``) with its CPU policy: ``choose_precision``
    (bf16 autocast behind SOLVER.AMP), ``memory_format`` (channels_last with bf16 only), and
    the per-step metrics work of its ``TrainMetrics`` hook (device-side sums, no host read)."""
    device = torch.device("cpu")
    precision = choose_precision(bool(cfg.SOLVER.AMP), device)
    fmt = memory_format(device, precision)
    model = prepare_model(build_method(cfg), device, fmt)
    model.train()
    optimizer = torch.optim.SGD(model.parameter_groups(cfg.SOLVER.FIX_PRED_LR), lr=cfg.SOLVER.BASE_LR,
                                momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    sums = torch.zeros(3)

    def step(x1, x2):
        nonlocal sums
        loss, z1 = train_step(model, optimizer, (to_device(x1, device, fmt), to_device(x2, device, fmt)),
                              precision=precision)
        sums = sums + torch.stack([loss.float(), normalized_std(z1), (~torch.isfinite(loss)).float()])
    return step


OURS = engine_step

# torch.profiler op name -> category (first match wins); self CPU time is summed per category.
PROFILE_CATEGORIES = (
    ("convolution backward", ("convolution_backward", "mkldnn_convolution_backward")),
    ("convolution forward", ("convolution", "conv2d")),
    ("batch norm", ("batch_norm",)),
    ("relu / pooling", ("relu", "threshold_backward", "pool")),
    ("linear (MLP heads)", ("addmm", "aten::mm", "linear", "aten::matmul")),
    ("optimizer (SGD)", ("sgd", "_foreach", "optimizer")),
    ("layout / dtype copies", ("copy_", "aten::to", "_to_copy", "contiguous", "clone")),
)


def profile_step(step, steps):
    """Share of the step's self CPU time by category (``PROFILE_CATEGORIES``), over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict = {}
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep") or event.key.startswith("## "):
            continue
        name = event.key.lower()
        category = next((cat for cat, keys in PROFILE_CATEGORIES if any(k in name for k in keys)), "other")
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {"self_cpu_ms_per_step": round(whole / 1000.0 / steps, 1),
            "share": {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}}


def case_cfg(backbone, size, batch, dim, pred_dim, amp):
    return load_cfg(None, ["MODEL.BACKBONE", backbone, "MODEL.DIM", dim, "MODEL.PRED_DIM", pred_dim,
                           "DATA.IMAGE_SIZE", size, "SOLVER.BATCH_SIZE", batch, "SOLVER.AMP", amp])


def run_case(name, rounds, steps, levers, profile_steps=0, compiled=False):
    backbone, size, batch, dim, pred_dim = CASES[name]
    torch.manual_seed(0)
    x1, x2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    fp32_cfg = case_cfg(backbone, size, batch, dim, pred_dim, False)
    amp_cfg = case_cfg(backbone, size, batch, dim, pred_dim, True)
    makers = {
        "reference": lambda: reference_step(backbone, dim, pred_dim, fp32_cfg.SOLVER.BASE_LR),
        "ours": lambda: OURS(fp32_cfg),
        "ours_amp": lambda: OURS(amp_cfg),
    }
    if levers:
        # With ``ours_amp`` (both levers) these complete the lever table.
        makers.update({
            "lever_nchw_fp32": lambda: our_step(fp32_cfg, channels_last=False, bf16=False),
            "lever_bf16": lambda: our_step(fp32_cfg, channels_last=False, bf16=True),
        })
    if compiled:  # compile time (tens of seconds on CPU) is spent in the warm-up step, not timed
        makers.update({
            "compiled_fp32": lambda: our_step(fp32_cfg, channels_last=False, bf16=False, compiled=True),
            "compiled_bf16": lambda: our_step(amp_cfg, channels_last=True, bf16=True, compiled=True),
        })
    variants = {}
    for key, make in makers.items():
        step = make()
        # Each variant gets its own copy of the inputs; none may modify them in place.
        a, b = copy.deepcopy(x1), copy.deepcopy(x2)
        variants[key] = lambda step=step, a=a, b=b: step(a, b)
    wall, cpu = interleaved(variants, rounds, steps, warmup=1)
    result = {"backbone": backbone, "crop_px": size, "batch": batch, "rounds": rounds, "steps_per_round": steps,
              "img_per_s": {k: round(batch / median(t), 2) for k, t in wall.items()},
              "ratio": {k: paired_ratio(wall["reference"], t) for k, t in wall.items() if k != "reference"},
              "ratio_cpu_time": {k: paired_ratio(cpu["reference"], t) for k, t in cpu.items() if k != "reference"}}
    if levers:
        base = wall["lever_nchw_fp32"]
        result["lever_speedup_vs_nchw_fp32"] = {
            "ours fp32 (engine policy: NCHW on CPU)": paired_ratio(base, wall["ours"]),
            "bf16": paired_ratio(base, wall["lever_bf16"]),
            "both (ours_amp)": paired_ratio(base, wall["ours_amp"]),
        }
    if profile_steps:
        result["profile"] = {k: profile_step(variants[k], profile_steps) for k in ("reference", "ours", "ours_amp")}
    print(f"pretrain_step {name}: {result}", file=sys.stderr, flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="r18_64,r50_128", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--levers", default="r18_64", help="cases that also time the lever_* variants ('' for none)")
    parser.add_argument("--compile", action="store_true",
                        help="also time our model under torch.compile, fp32 NCHW and bf16 channels_last")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of reference, ours and ours_amp (torch.profiler): "
                             "share of self CPU time by op category")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {"benchmark": "pretrain_step", "machine": machine(),
              "targets": {"ratio.ours": 1.3, "ratio.ours_amp": 1.7}, "cases": {}}
    for name in args.cases.split(","):
        record["cases"][name] = run_case(name, args.rounds, args.steps, name in args.levers.split(","), args.profile,
                                         args.compile)
    emit(record)


if __name__ == "__main__":
    main()
