"""The ``simsiam-transfer`` command: a thin dispatcher; each stage owns its arguments and logic.

Exit status (README, "Commands"): 0 success, 2 bad input or usage (one line on stderr, no
traceback, no partial output), 1 anything else.
"""

import logging
import sys
import warnings

from simsiam_transfer.checkpoints import SOURCES
from simsiam_transfer.errors import OneLineArgumentParser, TrainingDiverged, UserError, print_error



def _doctor(args):
    from simsiam_transfer.doctor import run_doctor

    return run_doctor(args)


def _make_synthetic(args):
    from simsiam_transfer.synthetic import make_synthetic

    out = make_synthetic(args.out, seed=args.seed, num_train=args.num_train, num_test=args.num_test,
                         num_unlabeled=args.num_unlabeled, image_size=args.image_size)
    print(f"wrote generated datasets to {out} (catalog: {out / 'datasets.yaml'})")
    return 0


def _data_check(args):
    from detection.data_check import data_check_command
    from simsiam_transfer.images import default_workers

    if args.workers is None:
        args.workers = default_workers()

    return data_check_command(args)


def _convert(args):
    from convert.command import convert_command

    return convert_command(args)


def _finetune(args):
    from detection.finetune import finetune_command

    return finetune_command(args)


def _pretrain(args):
    from pretrain.config import load_cfg
    from pretrain.engine import run_pretrain

    cfg = load_cfg(args.config, args.overrides)
    history = run_pretrain(cfg)
    if history:
        print(f"done: {len(history)} epoch(s), final loss {history[-1]['loss']:.4f}; "
              f"checkpoints in {cfg.OUTPUT_DIR}")
    return 0


def _linear(args):
    from pretrain.config import load_cfg
    from pretrain.linear import run_linear

    result = run_linear(load_cfg(args.config, args.overrides))
    print(f"linear top-1 {result['top1']:.2f} (best {result['best_top1']:.2f}) over {result['epochs']} epochs")
    return 0


def _fig2(args):
    from pretrain.fig2 import run_fig2

    summary = run_fig2(args.config, args.output_dir, args.overrides)
    for name, run in summary["runs"].items():
        print(f"{name:>17}: loss {run['final_loss']:.3f}  z_std*sqrt(d) {run['final_z_std_times_sqrt_d']:.3f}"
              + (f"  kNN {run['final_knn_top1']:.1f}%" if run["final_knn_top1"] is not None else ""))
    print(f"wrote {args.output_dir}/fig2.json and fig2.png")
    return 0


def _repro(args):
    from pretrain.repro import markdown_table, run_experiments

    summaries = run_experiments(args.config, args.output_dir, args.overrides, args.experiments.split(","))
    print(markdown_table(summaries))
    print(f"wrote {args.output_dir}/{{{','.join(summaries)}}}.{{json,png}} and repro.md")
    return 0


def _bench(args):
    from detection.bench import bench_command

    return bench_command(args)


def _report(args):
    from detection.report import report_command

    return report_command(args)


def _pipeline(args):
    from simsiam_transfer.pipeline import Pipeline, load_pipeline_cfg

    Pipeline(load_pipeline_cfg(args.config, args.overrides)).run()
    return 0


def build_parser():
    parser = OneLineArgumentParser(
        prog="simsiam-transfer",
        description="SimSiam pretraining -> detectron2 conversion -> C4 detection-transfer benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="report torch/CUDA/detectron2; non-zero exit without detectron2")
    p.set_defaults(func=_doctor)

    data = sub.add_parser("data", help="generated datasets and dataset validation")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("make-synthetic", help="write deterministic VOC/COCO/unlabeled/labeled datasets (skimage textures)")
    p.add_argument("--out", required=True, help="output folder (replaced as a whole)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=300, help="VOC trainval / COCO train images")
    p.add_argument("--num-test", type=int, default=200, help="VOC test / COCO val images")
    p.add_argument("--num-unlabeled", type=int, default=4000, help="unlabeled pretraining images")
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=_make_synthetic)
    p = data_sub.add_parser("check", help="validate a VOC root, a COCO json + image folder, or an image folder")
    p.add_argument("--voc", metavar="ROOT", help="VOC root holding JPEGImages/, Annotations/, ImageSets/Main/")
    p.add_argument("--split", default=None, help="VOC split(s) to check, comma-separated (default: all found)")
    p.add_argument("--classes", help="comma-separated class names (default: the 20 VOC classes)")
    p.add_argument("--coco", metavar="JSON", help="COCO instances json")
    p.add_argument("--image-root", help="image folder of the COCO json")
    p.add_argument("--images", metavar="DIR", help="pretraining image folder: decode every image, list bad ones")
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading images (default: CPU cores, at most 8; 0 = this process)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_data_check)

    p = sub.add_parser("pretrain", help="SimSiam pretraining (defaults: the paper's recipe); resumes")
    p.add_argument("--config", help="pretraining YAML (a path, or relative to configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. SOLVER.EPOCHS 200")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("linear", help="linear probe on the frozen pretrained backbone")
    p.add_argument("--config", help="pretraining YAML (reads DATA.KNN_*_DIR and LINEAR.*)")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p.set_defaults(func=_linear)

    p = sub.add_parser("fig2", help="the paper's Fig. 2: the same pretraining with and without stop-gradient")
    p.add_argument("--config", help="pretraining YAML")
    p.add_argument("--output-dir", required=True, help="holds both runs, fig2.json and fig2.png")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p.set_defaults(func=_fig2)

    p = sub.add_parser("repro", help="the paper's Fig. 2, Table 1 and Table 3 as pretraining runs + JSON/PNG/table")
    p.add_argument("--config", default="pretrain/simsiam_R_18_repro.yaml", help="pretraining YAML")
    p.add_argument("--output-dir", required=True, help="holds every run, <experiment>.json/.png and repro.md")
    p.add_argument("--experiments", default="fig2,table1,table3", help="comma-separated subset")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p.set_defaults(func=_repro)

    p = sub.add_parser("convert", help="pretraining checkpoint -> detectron2 / torchvision weights, verified")
    p.add_argument("input", help="pretraining checkpoint (.pth / .pth.tar)")
    p.add_argument("output", help="output file (.pkl for detectron2, .pth for torchvision)")
    p.add_argument("--format", choices=("detectron2", "torchvision"), default="detectron2")
    p.add_argument("--source", choices=("auto", *SOURCES), default="auto",
                   help="input layout; auto-detected from key names by default")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the detectron2 load and feature-equivalence check")
    p.set_defaults(func=_convert)

    p = sub.add_parser("finetune", help="one detectron2 C4 fine-tune + evaluation")
    p.add_argument("--config", required=True, help="detectron2 YAML (a path, or relative to configs/)")
    add_job_arguments(p)
    p.add_argument("--num-gpus", type=int, default=None,
                   help="processes per machine, one GPU each (default: all visible GPUs, 0 on CPU)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of rank 0 for multi-machine runs")
    add_plan_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="detectron2 config overrides")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("bench", help="fine-tuning LR search x trials -> run store, summary.json, table")
    p.add_argument("--benchmark", required=True,
                   help="voc07, voc0712, coco_1x, coco_2x (or *_mini for CPU), or a detectron2 config file")
    p.add_argument("--output-dir", required=True, help="sweep folder; rerunning resumes it")
    add_job_arguments(p)
    p.add_argument("--name", help="row label in reports (default: the weights file name, or 'scratch')")
    p.add_argument("--lrs", help="comma-separated SOLVER.BASE_LR values (default: the config's)")
    p.add_argument("--trials", type=int, default=5, help="trials at the selected LR (default 5, as the paper)")
    p.add_argument("--search", default="best-then-repeat",
                   choices=("full", "best-then-repeat", "best-then-repeat-independent"),
                   help="full: every LR x every trial; best-then-repeat: trial 0 per LR, then the rest at the "
                        "best (the mean includes trial 0); best-then-repeat-independent: n more trials at the "
                        "best, trial 0 left out of the mean")
    p.add_argument("--metric", default="bbox/AP",
                   help="LR selection metric (default bbox/AP; segm/* only for Mask R-CNN benchmarks)")
    p.add_argument("--max-retries", type=int, default=1, help="reruns of a failed trial (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished trials' periodic checkpoints (default: only model_final.pth)")
    p.add_argument("--gpus-per-trial", "--num-gpus", dest="gpus_per_trial", type=int, default=None,
                   help="GPUs (processes) per trial (default: all visible GPUs, one trial at a time; 8 with "
                        "--executor slurm; 0 on CPU). Fewer than visible runs trials in parallel")
    p.add_argument("--cpu-jobs", type=int, default=1,
                   help="CPU-only trials to run side by side (default 1), each with cores/N threads: on a "
                        "2-core machine 2 single-thread mini trials finished 1.25x sooner than one after another "
                        "(README, Measured); results match to float rounding")
    p.add_argument("--executor", default="local", choices=("local", "slurm", "submitit-local"))
    p.add_argument("--slurm-partition")
    p.add_argument("--slurm-time", type=int, default=240,
                   help="minutes per trial job (default 240; a timed-out trial is requeued and resumes)")
    p.add_argument("--slurm-cpus-per-gpu", type=int, default=6, help="CPUs per GPU of a trial job (default 6)")
    p.add_argument("--slurm-mem-per-gpu", type=int, default=32, help="GB of memory per GPU of a trial job "
                   "(default 32)")
    add_plan_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="detectron2 config overrides for every trial")
    p.set_defaults(func=_bench)

    p = sub.add_parser("report", help="Table-5 style report of bench folders")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="bench --output-dir folders")
    p.add_argument("--format", default="md", choices=("md", "csv", "latex"))
    p.add_argument("--out", help="write here (plus <stem>_ap_vs_lr.png) instead of stdout")
    p.add_argument("--per-trial", action="store_true", help="also list every trial's metrics and seed")
    p.add_argument("--reference", choices=("paper",),
                   help="paper: add the SimSiam paper's Table 5 rows and each row's difference to "
                        "'SimSiam, base' and 'SimSiam, optimal'")
    p.set_defaults(func=_report)

    p = sub.add_parser("pipeline", help="pretrain -> convert -> bench -> report, resumable")
    p.add_argument("--config", required=True, help="pipeline YAML (e.g. pipeline/mini.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="e.g. OUTPUT_DIR runs/demo")
    p.set_defaults(func=_pipeline)
    return parser


def add_job_arguments(p):
    """Arguments shared by ``finetune`` and ``bench``: weights and datasets."""
    p.add_argument("--weights", required=True,
                   help="converted detectron2 .pkl (simsiam-transfer convert), or 'none' for random init")
    p.add_argument("--datasets", help="dataset catalog YAML (format: README, Fine-tuning)")
    p.add_argument("--data-root", help="root of the standard VOC/COCO folders (default $DETECTRON2_DATASETS)")


def add_plan_arguments(p):
    """The batch policy and planning flags of ``finetune`` and ``bench`` (README: Batch policy)."""
    p.add_argument("--scaling", default="faithful", choices=("faithful", "linear"),
                   help="faithful (default): the config's global batch, LR and schedule on any GPU count, BN "
                        "synced over the trial's GPUs; linear: detectron2's REFERENCE_WORLD_SIZE rescaling "
                        "(changes the batch and BN group)")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and run nothing")
    p.add_argument("--assume-gpus", type=int, default=None, metavar="N",
                   help="plan for N visible GPUs (with --dry-run, on a machine without them)")


def main(argv=None):
    # detectron2 0.6 scripts ops at import; torch now warns about that on every run.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # torch logs "No CUDA runtime is found" whenever detectron2 imports cpp_extension on a CPU machine.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print_error(exc)
        return exc.exit_code
    except TrainingDiverged as exc:
        print_error(f"training diverged: {exc}")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
