"""``simsiam-transfer convert INPUT OUTPUT``: the conversion pipeline and its printed summary."""

import importlib.util
import sys
from pathlib import Path

from convert.rename import rename_state_dict
from convert.verify import (decay_only_scale, near_identity_warnings, pretraining_check, residual_scale_stats,
                            verify_detectron2_payload)
from simsiam_transfer import atomic
from simsiam_transfer.checkpoints import extract_backbone
from simsiam_transfer.d2_weights import (conversion_report_path, detectron2_payload, write_conversion_report,
                                         write_detectron2_pkl)
from simsiam_transfer.errors import UserError, error_line


def convert_checkpoint(input_path, output_path, fmt="detectron2", source="auto", verify=True):
    """Convert, verify, then write OUTPUT and ``OUTPUT.report.json``; returns the report dict."""
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise UserError(f"{output_path}: output would overwrite the input checkpoint")
    atomic.check_output_file(output_path, "OUTPUT")
    atomic.check_output_file(conversion_report_path(output_path), "OUTPUT's report")
    # Leftovers of a convert killed mid-write to the same OUTPUT (this command owns those names).
    atomic.remove_stale_tmp(Path(output_path).parent, [Path(output_path).name, conversion_report_path(output_path).name])
    backbone, info = extract_backbone(input_path, source)
    stats, check = _diagnose(backbone, info.pop("training"))
    report = {
        "input": str(input_path), "output": str(output_path), "format": fmt, **info,
        "tensors": len(backbone), "residual_bn_scale": stats, "pretraining_check": check,
        "warnings": near_identity_warnings(stats) + check["problems"], "verification": None,
    }
    if fmt == "detectron2":
        payload = detectron2_payload(rename_state_dict(backbone))
        if not verify:
            report["verification"] = "disabled (--no-verify)"
        elif importlib.util.find_spec("detectron2") is None:
            report["verification"] = "skipped: detectron2 is not importable"
        else:
            report["verification"] = verify_detectron2_payload(payload, backbone, info["depth"])
        write_detectron2_pkl(output_path, payload)
    else:
        report["verification"] = "torchvision format: checked against torchvision ResNet shapes"
        atomic.torch_save(backbone, output_path)
    write_conversion_report(output_path, report)
    return report


def print_summary(report, out=None, err=None):
    out, err = out or sys.stdout, err or sys.stderr
    print(f"source:     {report['source']} (ResNet-{report['depth']}, {report['block']} blocks)", file=out)
    print(f"converted:  {report['tensors']} backbone tensors -> {report['format']} names", file=out)
    dropped = ", ".join(f"{g}: {n}" for g, n in sorted(report["dropped"].items())) or "nothing"
    print(f"dropped:    {dropped}", file=out)
    ver = report["verification"]
    if isinstance(ver, dict):
        print("verified:   detectron2 C4 model loaded every backbone+res5 tensor from the file, none unused; "
              f"res4/res5 match torchvision (relative diff {ver['res4']['relative_diff']:.1e} / "
              f"{ver['res5']['relative_diff']:.1e})", file=out)
    else:
        print(f"verified:   {ver}", file=out)
    scales = ", ".join(f"{s} {v['mean']:.3f}" for s, v in report["residual_bn_scale"].items())
    print(f"residual BN scale (mean |gamma| of each branch's last BN): {scales}", file=out)
    for warning in report["warnings"]:
        print(error_line(warning, prefix="WARNING: "), file=err)
    print(f"wrote:      {report['output']} (+ {conversion_report_path(report['output']).name})", file=out)


def is_converted(input_path, output_path) -> bool:
    """Whether ``output_path`` (and its report) were converted from ``input_path`` as it is now: both
    written, and not older than the input (a resumed pretraining rewrites its checkpoint)."""
    output, report = Path(output_path), conversion_report_path(output_path)
    return (output.is_file() and report.is_file()
            and output.stat().st_mtime >= Path(input_path).stat().st_mtime)


def convert_command(args):
    report = convert_checkpoint(args.input, args.output, args.format, args.source, not args.no_verify)
    print_summary(report)
    return 0


def _diagnose(backbone, training):
    """(residual-BN statistics, the no-op/collapse verdict) of an extracted backbone and its
    checkpoint's training record (None for checkpoints of other projects)."""
    training = training or {}
    decay_only = None
    if training.get("zero_init_residual") is False:  # the scales started at 1.0
        decay_only = decay_only_scale(training.get("history"), training.get("weight_decay", 0.0),
                                      training.get("momentum", 0.0))
    stats = residual_scale_stats(backbone, decay_only)
    return stats, pretraining_check(stats, training.get("history"), training.get("dim", 0), decay_only,
                                    training.get("method", "simsiam"))


def check_pretraining_run(checkpoint_path) -> dict:
    """The same verdict straight from a pretraining checkpoint (the pipeline, right after pretraining):
    ``pretraining_check``'s dict plus the residual-BN statistics."""
    backbone, info = extract_backbone(checkpoint_path)
    stats, check = _diagnose(backbone, info["training"])
    check["problems"] += near_identity_warnings(stats)
    check["ok"] = not check["problems"]
    return {**check, "residual_bn_scale": stats}
