"""Converter: time and peak memory of a ResNet-50 SimSiam checkpoint -> detectron2 conversion (one JSON line).

    python benchmarks/convert.py            # 3 interleaved rounds of each variant
    python benchmarks/convert.py --rounds 5

Input: an official-layout SimSiam ResNet-50 checkpoint (``{"epoch", "arch", "state_dict":
{"module.encoder.*", "module.predictor.*"}}``, random weights, built from our model). Variants, each
in its own child process (peak RSS is per process), alternating:
  ours            ``convert_checkpoint`` with verification (detectron2 R50-C4 built, features compared)
  ours_no_verify  the same with ``verify=False``
  reference       the official converter's steps, written from MoCo's convert-pretrain-to-detectron2 recipe: keep the backbone
                  prefix, rename (stem / resN / convK.norm / shortcut), numpy, pickle; no checks
``s`` is the conversion itself inside the child (imports excluded); ``peak_rss_mib`` the child's
``ru_maxrss`` (interpreter and imports included); ``python_peak_mib`` tracemalloc's peak during the
conversion (Python-level allocations only: tensors are not traced). Ratios are ours / reference.
"""

import argparse
import json
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import REPO, emit, machine

VARIANTS = ("ours", "ours_no_verify", "reference")
PREFIX = "module.encoder."


def reference_convert(src: str, dst: str) -> None:
    """The official converter's renaming rules (MoCo's convert-pretrain-to-detectron2 recipe), for the simsiam prefix."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    model = {}
    for key, value in state.items():
        if not key.startswith(PREFIX) or key.startswith(PREFIX + "fc"):
            continue
        key = key[len(PREFIX):]
        if "layer" not in key:
            key = "stem." + key
        for i in range(1, 5):
            key = key.replace(f"layer{i}", f"res{i + 1}")
        key = re.sub(r"bn(\d)", r"conv\1.norm", key)
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[key] = value.numpy()
    with open(dst, "wb") as f:
        pickle.dump({"model": model, "__author__": "MOCO", "matching_heuristics": True}, f)


def child(variant: str, src: str, dst: str) -> dict:
    import torch  # noqa: F401  (imports are not part of the conversion's time)
    import torchvision  # noqa: F401  (the converter imports it lazily)

    from convert.command import convert_checkpoint

    tracemalloc.start()
    start = time.perf_counter()
    if variant == "reference":
        reference_convert(src, dst)
    else:
        convert_checkpoint(src, dst, verify=variant == "ours")
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    return {"s": seconds, "python_peak_mib": peak / 2**20}


def run_child(variant, src, dst):
    proc = subprocess.Popen([sys.executable, __file__, "--child", variant, "--src", src, "--dst", dst],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"convert benchmark: {variant} failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def make_input(path: Path) -> None:
    import torch

    from pretrain.config import load_cfg
    from pretrain.methods import build_method

    model = build_method(load_cfg(None, ["MODEL.BACKBONE", "resnet50"]))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state}, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import resource

        result = child(args.child, args.src, args.dst)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    record = {"benchmark": "convert", "machine": machine(), "backbone": "resnet50", "rounds": args.rounds}
    runs = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "checkpoint_0100.pth.tar"
        make_input(src)
        record["input_mib"] = round(src.stat().st_size / 2**20, 1)
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for variant in order:
                runs[variant].append(run_child(variant, str(src), str(Path(tmp) / f"{variant}.pkl")))
    summary = {v: {key: round(statistics.median(x[key] for x in runs[v]), 2)
                   for key in ("s", "peak_rss_mib", "python_peak_mib")} for v in VARIANTS}
    record["variants"] = summary
    record["ratio_vs_reference"] = {
        v: {"s": round(summary[v]["s"] / summary["reference"]["s"], 2),
            "peak_rss": round(summary[v]["peak_rss_mib"] / summary["reference"]["peak_rss_mib"], 2)}
        for v in ("ours", "ours_no_verify")}
    emit(record)


if __name__ == "__main__":
    main()
