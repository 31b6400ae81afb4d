"""CPU_JOBS / ``bench --cpu-jobs``: two CPU jobs side by side (cores/2 threads each) against the same two
jobs one after another (all cores each), for a mini pretraining and a mini fine-tune.

    python benchmarks/cpu_jobs.py                   # both stages, 1 round (~2 min on 2 cores)
    python benchmarks/cpu_jobs.py --stages finetune --rounds 2

Each job is the real CLI in its own process (``pretrain`` with the mini recipe, bf16 where the CPU has
it; ``finetune`` of ``voc07_mini`` from random init), on small generated data, with the thread count
set as the executors set it (``OMP_NUM_THREADS``). Rounds alternate the order of the two modes.
``speedup`` = sequential wall / side-by-side wall (>1: side by side finishes the pair sooner).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import REPO, emit, machine

from detection.executors import cpu_thread_env


UNLABELED = 512
STEPS_PER_EPOCH = UNLABELED // 32  # the mini recipe's batch


def pretrain_argv(data: Path, out: Path, steps: int):
    return ["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.TRAIN_DIR", str(data / "unlabeled"),
            "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", "DATA.CHECK_IMAGES", "never",
            "SOLVER.EPOCHS", str(max(1, steps // STEPS_PER_EPOCH)), "SOLVER.CHECKPOINT_PERIOD", "1000",
            "OUTPUT_DIR", str(out)]


def finetune_argv(data: Path, out: Path, iters: int):
    return ["finetune", "--config", "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml",
            "--weights", "none", "--datasets", str(data / "datasets.yaml"), "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({iters - 2},)", "SOLVER.WARMUP_ITERS", "2", "TEST.PRECISE_BN.NUM_ITER", "2",
            "SOLVER.CHECKPOINT_PERIOD", "100000", "OUTPUT_DIR", str(out)]


def run_pair(argvs, side_by_side: bool) -> float:
    """Wall seconds for both jobs: started together, each with its share of the cores as the local
    executor gives it (``cpu_thread_env``), or each after the other with all of them."""
    env = {**os.environ, **cpu_thread_env(len(argvs) if side_by_side else 1)}
    cmd = [sys.executable, "-m", "app.cli"]
    start = time.perf_counter()
    if side_by_side:
        procs = [subprocess.Popen(cmd + a, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for a in argvs]
        errors = [p.communicate()[1] for p in procs]
        codes = [p.returncode for p in procs]
    else:
        done = [subprocess.run(cmd + a, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for a in argvs]
        errors, codes = [d.stderr for d in done], [d.returncode for d in done]
    wall = time.perf_counter() - start
    for code, err in zip(codes, errors):
        if code:
            sys.exit(f"a job failed (exit {code}): {err.decode(errors='replace')[-800:]}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="pretrain,finetune")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=64, help="rounded down to whole epochs of 16")
    parser.add_argument("--finetune-iters", type=int, default=40)
    args = parser.parse_args()
    from simsiam_transfer.synthetic import make_synthetic

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_synthetic(work / "data", num_train=48, num_test=24, num_unlabeled=UNLABELED,
                              labeled_per_class=(4, 2), workers=1)
        for stage in args.stages.split(","):
            build = {"pretrain": lambda o: pretrain_argv(data, o, args.pretrain_steps),
                     "finetune": lambda o: finetune_argv(data, o, args.finetune_iters)}[stage]
            walls = {"sequential": [], "side_by_side": []}
            for r in range(args.rounds):
                modes = [("sequential", False), ("side_by_side", True)]
                for name, together in (modes if r % 2 == 0 else modes[::-1]):
                    argvs = [build(work / f"{stage}_{name}_{r}_{j}") for j in range(2)]
                    walls[name].append(round(run_pair(argvs, together), 2))
            seq, par = sum(walls["sequential"]), sum(walls["side_by_side"])
            results[stage] = {"sequential_s": walls["sequential"], "side_by_side_s": walls["side_by_side"],
                              "threads_each": {"sequential": int(cpu_thread_env(1)["OMP_NUM_THREADS"]),
                                               "side_by_side": int(cpu_thread_env(2)["OMP_NUM_THREADS"])},
                              "speedup": round(seq / par, 3)}
    emit({"benchmark": "cpu_jobs", "jobs": 2, "stages": results,
          "settings": {"pretrain_steps": args.pretrain_steps, "finetune_iters": args.finetune_iters,
                       "rounds": args.rounds}, "machine": machine()})


if __name__ == "__main__":
    main()
