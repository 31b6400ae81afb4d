"""The ``simsiam-transfer`` command: a thin dispatcher over the stages and the pipeline.

``finetune`` and ``bench`` build their specs from the detection stage's schema (``FINETUNE`` /
``SWEEP``, ``detection.schema``); their flags are conveniences mapped to schema keys by one table
there, so this parser states no default of its own. Exit status: ``simsiam_transfer.entry``.
"""

import argparse
import sys

from simsiam_transfer.checkpoints import SOURCES
from simsiam_transfer.entry import run_entry
from simsiam_transfer.errors import OneLineArgumentParser


def _doctor(args):
    from simsiam_transfer.doctor import run_doctor

    return run_doctor(args)


def _make_synthetic(args):
    from simsiam_transfer.synthetic import make_synthetic

    out = make_synthetic(args.out, seed=args.seed, num_train=args.num_train, num_test=args.num_test,
                         num_unlabeled=args.num_unlabeled, image_size=args.image_size, num_labeled=args.num_labeled)
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


def _pretrain(args):
    from pretrain.config import load_cfg
    from pretrain.engine import run_pretrain

    cfg = load_cfg(args.config, args.overrides)
    history = run_pretrain(cfg, allow_cpu=args.allow_cpu)
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


def _schema_node(defaults, flags, args, config_file=None, prefix=""):
    """``defaults`` <- ``config_file`` <- the flags given, validated by the caller; returns (node, namer)."""
    from detection import schema
    from simsiam_transfer.config import load

    values, origins = schema.flag_values(flags, args)
    by_key = {flag.key: flag.names[0] for flag in flags}
    node = load(defaults, config_file, nodes=[(schema.nest(values), "command-line flags")] if values else ())
    source = str(config_file) if config_file else ""

    def name(key):
        if key in origins or not source:
            return origins.get(key) or by_key.get(key) or key
        return f"{source}: {key}"
    return node, name


def finetune_job_from_args(args):
    from detection import schema
    from detection.spec import FinetuneJob

    node, name = _schema_node(schema.BENCH, schema.FINETUNE_FLAGS, args)
    schema.validate_finetune(node.FINETUNE, name)
    return FinetuneJob.from_config(node.FINETUNE, tuple(args.overrides))


def sweep_spec_from_args(args):
    from detection import schema
    from detection.spec import SweepSpec

    node, name = _schema_node(schema.BENCH, schema.BENCH_FLAGS, args, args.sweep_config)
    schema.validate_bench(node, name)
    return SweepSpec.from_config(node, tuple(args.overrides), label=name)


def _finetune(args):
    from detection.finetune import finetune

    return finetune(finetune_job_from_args(args), args.dry_run, args.assume_gpus, args.allow_cpu)


def _bench(args):
    from detection.bench import run_bench

    return run_bench(sweep_spec_from_args(args), args.dry_run, args.assume_gpus, args.allow_cpu)


def _report(args):
    from detection.report import report_command

    return report_command(args)


def _pipeline(args):
    from app.pipeline import Pipeline, load_pipeline_cfg

    Pipeline(load_pipeline_cfg(args.config, args.overrides), allow_cpu=args.allow_cpu).run()
    return 0


def add_schema_flags(parser, flags):
    """One argument per schema flag; absent flags leave their key at the schema's (or file's) value."""
    from detection import schema

    for flag in flags:
        dest = flag.names[0].lstrip("-").replace("-", "_")
        shown = schema.flag_default(schema.BENCH, flag)
        text = f"{flag.help} [{flag.key}; default: {shown!s}]" if shown not in ("", None) else \
            f"{flag.help} [{flag.key}]"
        if flag.kind == "switch":
            parser.add_argument(*flag.names, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        default = schema.get(schema.BENCH, flag.key)
        kind = str if flag.kind == "lrs" else type(default)
        parser.add_argument(*flag.names, dest=dest, type=kind, choices=flag.choices, metavar=flag.metavar,
                            default=argparse.SUPPRESS, help=text)


def add_allow_cpu(p):
    p.add_argument("--allow-cpu", action="store_true",
                   help="run a paper-scale configuration (ResNet-50, protocol sizes) even without a CUDA GPU")


def add_plan_arguments(p):
    add_allow_cpu(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and run nothing")
    p.add_argument("--assume-gpus", type=int, default=None, metavar="N",
                   help="plan for N visible GPUs (with --dry-run, on a machine without them)")


def _sub(sub, name, help_text, examples):
    """A subcommand whose help ends with example invocations."""
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser():
    from detection import schema

    parser = OneLineArgumentParser(
        prog="simsiam-transfer",
        description="SimSiam pretraining -> detectron2 conversion -> C4 detection-transfer benchmark.",
        epilog="examples:\n  simsiam-transfer pipeline --config pipeline/mini.yaml\n"
               "  simsiam-transfer COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "doctor", "report torch/CUDA/detectron2; non-zero exit without detectron2",
             ["simsiam-transfer doctor"])
    p.set_defaults(func=_doctor)

    data = _sub(sub, "data", "generated datasets and dataset validation",
                ["simsiam-transfer data make-synthetic --out data/synthetic",
                 "simsiam-transfer data check --voc datasets/VOC2007"])
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _sub(data_sub, "make-synthetic", "write deterministic VOC/COCO/unlabeled/labeled datasets (skimage "
             "textures)", ["simsiam-transfer data make-synthetic --out data/synthetic",
                           "simsiam-transfer data make-synthetic --out data/small --num-unlabeled 500 --seed 1"])
    p.add_argument("--out", required=True, help="output folder: new, empty, or generated earlier (then replaced "
                   "as a whole); any other folder is refused and left untouched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=300, help="VOC trainval / COCO train images")
    p.add_argument("--num-test", type=int, default=200, help="VOC test / COCO val images")
    p.add_argument("--num-unlabeled", type=int, default=4000, help="unlabeled pretraining images")
    p.add_argument("--num-labeled", type=int, default=100,
                   help="labeled training images per class (kNN monitor, supervised pretraining)")
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=_make_synthetic)
    p = _sub(data_sub, "check", "validate a VOC root, a COCO json + image folder, or an image folder",
             ["simsiam-transfer data check --voc datasets/VOC2007 --split trainval,test",
              "simsiam-transfer data check --coco datasets/coco/annotations/instances_val2017.json "
              "--image-root datasets/coco/val2017"])
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

    p = _sub(sub, "pretrain", "SimSiam pretraining (defaults: the paper's recipe); resumes",
             ["simsiam-transfer pretrain --config pretrain/simsiam_R_50_100ep_b512.yaml DATA.TRAIN_DIR "
              "/data/imagenet/train",
              "torchrun --nproc_per_node 8 -m app.cli pretrain --config pretrain/simsiam_R_50_200ep_b256_base.yaml"])
    p.add_argument("--config", help="pretraining YAML (a path, or relative to configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. SOLVER.EPOCHS 200")
    add_allow_cpu(p)
    p.set_defaults(func=_pretrain)

    p = _sub(sub, "linear", "linear probe on the frozen pretrained backbone",
             ["simsiam-transfer linear --config pretrain/simsiam_R_18_mini.yaml OUTPUT_DIR runs/pretrain"])
    p.add_argument("--config", help="pretraining YAML (reads DATA.KNN_*_DIR and LINEAR.*)")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p.set_defaults(func=_linear)

    p = _sub(sub, "fig2", "the paper's Fig. 2: the same pretraining with and without stop-gradient",
             ["simsiam-transfer fig2 --config pretrain/simsiam_R_18_repro.yaml --output-dir runs/fig2 "
              "DATA.TRAIN_DIR data/synthetic/unlabeled"])
    p.add_argument("--config", help="pretraining YAML")
    p.add_argument("--output-dir", required=True, help="holds both runs, fig2.json and fig2.png")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p.set_defaults(func=_fig2)

    p = _sub(sub, "repro", "the paper's Fig. 2, Table 1 and Table 3 as pretraining runs + JSON/PNG/table",
             ["simsiam-transfer repro --output-dir runs/repro DATA.TRAIN_DIR data/synthetic/unlabeled",
              "simsiam-transfer repro --output-dir runs/repro --experiments fig2"])
    p.add_argument("--config", default="pretrain/simsiam_R_18_repro.yaml", help="pretraining YAML")
    p.add_argument("--output-dir", required=True, help="holds every run, <experiment>.json/.png and repro.md")
    p.add_argument("--experiments", default="fig2,table1,table3", help="comma-separated subset")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    p.set_defaults(func=_repro)

    p = _sub(sub, "convert", "pretraining checkpoint -> detectron2 / torchvision weights, verified",
             ["simsiam-transfer convert runs/pretrain/checkpoint_last.pth weights.pkl",
              "simsiam-transfer convert moco_v2_800ep.pth.tar moco.pkl --source moco"])
    p.add_argument("input", help="pretraining checkpoint (.pth / .pth.tar)")
    p.add_argument("output", help="output file (.pkl for detectron2, .pth for torchvision)")
    p.add_argument("--format", choices=("detectron2", "torchvision"), default="detectron2")
    p.add_argument("--source", choices=("auto", *SOURCES), default="auto",
                   help="input layout; auto-detected from key names by default")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the detectron2 load and feature-equivalence check")
    p.set_defaults(func=_convert)

    p = _sub(sub, "finetune", "one detectron2 C4 fine-tune + evaluation",
             ["simsiam-transfer finetune --config voc07 --weights weights.pkl OUTPUT_DIR runs/ft",
              "simsiam-transfer finetune --config voc07_mini --weights none --datasets data/synthetic/datasets.yaml "
              "OUTPUT_DIR runs/ft_mini"])
    add_schema_flags(p, schema.FINETUNE_FLAGS)
    add_plan_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="detectron2 config overrides")
    p.set_defaults(func=_finetune)

    p = _sub(sub, "bench", "fine-tuning LR search x trials -> run store, summary.json, table",
             ["simsiam-transfer bench --benchmark voc07 --weights weights.pkl --output-dir runs/bench/voc07 "
              "--lrs 0.02,0.03,0.05",
              "simsiam-transfer bench --config my_sweep.yaml --weights weights.pkl --executor slurm"])
    p.add_argument("--config", dest="sweep_config", metavar="FILE",
                   help="bench YAML with FINETUNE and SWEEP nodes (detection/schema.py); flags override it")
    add_schema_flags(p, schema.BENCH_FLAGS)
    add_plan_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="detectron2 config overrides for every trial")
    p.set_defaults(func=_bench)

    p = _sub(sub, "report", "Table-5 style report of bench folders",
             ["simsiam-transfer report runs/demo/bench/*/* --out table.md",
              "simsiam-transfer report runs/bench/voc07 --format latex --reference paper"])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="bench --output-dir folders")
    p.add_argument("--format", default="md", choices=("md", "csv", "latex"))
    p.add_argument("--out", help="write here (plus <stem>_ap_vs_lr.png) instead of stdout")
    p.add_argument("--per-trial", action="store_true", help="also list every trial's metrics and seed")
    p.add_argument("--reference", choices=("paper",),
                   help="paper: add the SimSiam paper's Table 5 rows and each row's difference to "
                        "'SimSiam, base' and 'SimSiam, optimal'")
    p.set_defaults(func=_report)

    p = _sub(sub, "pipeline", "pretrain -> convert -> bench -> report, resumable",
             ["simsiam-transfer pipeline --config pipeline/mini.yaml OUTPUT_DIR runs/demo",
              "simsiam-transfer pipeline --config pipeline/table5.yaml SWEEP.EXECUTOR slurm"])
    p.add_argument("--config", required=True, help="pipeline YAML (e.g. pipeline/mini.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="e.g. OUTPUT_DIR runs/demo")
    add_allow_cpu(p)
    p.set_defaults(func=_pipeline)
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    return run_entry(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
