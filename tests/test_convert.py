"""Converter: every source layout, both block types, verification, diagnostics, refusals."""

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision

from conftest import cli_main, run_cli, torchvision_state
from convert.command import convert_checkpoint
from simsiam_transfer.d2_weights import read_detectron2_pkl
from convert.rename import rename_torchvision_to_detectron2
from simsiam_transfer.checkpoints import SOURCES
from convert.verify import VerificationError, verify_detectron2_payload
from simsiam_transfer.errors import UserError


@pytest.mark.parametrize("tv, d2", [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.running_var", "stem.conv1.norm.running_var"),
    ("layer1.0.conv2.weight", "res2.0.conv2.weight"),
    ("layer2.1.bn3.bias", "res3.1.conv3.norm.bias"),
    ("layer3.0.downsample.0.weight", "res4.0.shortcut.weight"),
    ("layer4.0.downsample.1.running_mean", "res5.0.shortcut.norm.running_mean"),
])
def test_rename_torchvision_to_detectron2(tv, d2):
    assert rename_torchvision_to_detectron2(tv) == d2


def _checkpoint(source, depth):
    """A checkpoint of ``source``'s layout around a torchvision ResNet-<depth>, with its extra heads."""
    backbone = torchvision_state(depth)
    fc = {k: v for k, v in backbone.items() if k.startswith("fc.")}
    body = {k: v for k, v in backbone.items() if not k.startswith("fc.")}
    head = {"0.weight": torch.randn(8, 4), "1.weight": torch.ones(8), "1.running_mean": torch.zeros(8)}
    if source == "torchvision":
        return backbone
    if source == "simsiam":
        sd = {f"module.encoder.{k}": v for k, v in body.items()}
        sd.update({f"module.encoder.fc.{k}": v for k, v in head.items()})
        sd.update({f"module.predictor.{k}": v for k, v in head.items()})
        return {"state_dict": sd, "epoch": 100, "arch": f"resnet{depth}"}
    if source == "simsiam-transfer":
        sd = {f"encoder.{k}": v for k, v in body.items()}
        sd.update({f"predictor.{k}": v for k, v in head.items()})
        return {"format": "simsiam-transfer/pretrain-v1", "state_dict": sd, "versions": {"torch": "x"}, "epoch": 1}
    if source == "moco":
        sd = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
        sd.update({f"module.encoder_k.{k}": v for k, v in body.items()})
        sd["module.queue"] = torch.randn(128, 16)
        return {"state_dict": sd}
    if source == "byol":
        sd = {f"backbone.{k}": v for k, v in body.items()}
        sd.update({f"momentum_backbone.{k}": v for k, v in body.items()})
        sd.update({f"projector.{k}": v for k, v in head.items()})
        sd.update({f"classifier.{k}": v for k, v in fc.items()})
        return {"state_dict": sd}
    raise AssertionError(source)


# Every layout at ResNet-18 (basic blocks); the renaming does not depend on the block type, so one
# layout checks the bottleneck blocks of ResNet-50 (each R50 verification builds an R50-C4 model).
@pytest.mark.parametrize("source, depth", [(source, 18) for source in SOURCES] + [("simsiam", 50)])
def test_every_source_and_block_type_converts_and_verifies(tmp_path, source, depth):
    src = tmp_path / "in.pth"
    torch.save(_checkpoint(source, depth), src)
    report = convert_checkpoint(src, tmp_path / "out.pkl")
    assert report["source"] == source and report["depth"] == depth
    assert report["block"] == ("basic" if depth < 50 else "bottleneck")
    assert report["verification"]["res5"]["relative_diff"] < 1e-4
    payload = read_detectron2_pkl(tmp_path / "out.pkl")
    assert payload["__author__"] == "simsiam-transfer" and payload["matching_heuristics"] is True
    model = payload["model"]
    assert "stem.conv1.weight" in model and "res5.1.conv2.norm.running_var" in model
    assert not any("fc" in k or "num_batches_tracked" in k for k in model)
    n_bn = sum(1 for k in torchvision_state(depth) if k.endswith("num_batches_tracked"))
    assert len(model) == len(torchvision_state(depth)) - 2 - n_bn
    expected_dropped = {"torchvision": "classifier (fc)", "simsiam": "predictor", "simsiam-transfer": "predictor",
                        "moco": "momentum encoder", "byol": "projector"}[source]
    assert expected_dropped in report["dropped"]
    assert json.loads((tmp_path / "out.pkl.report.json").read_text())["tensors"] == len(model)


def test_values_survive_the_renaming(tmp_path):
    state = torchvision_state(18)
    torch.save(state, tmp_path / "tv.pth")
    convert_checkpoint(tmp_path / "tv.pth", tmp_path / "o.pkl")
    model = read_detectron2_pkl(tmp_path / "o.pkl")["model"]
    np.testing.assert_array_equal(model["res3.0.shortcut.norm.running_mean"],
                                  state["layer2.0.downsample.1.running_mean"].numpy())


def test_torchvision_output_loads_into_torchvision(tmp_path):
    torch.save(_checkpoint("simsiam", 18), tmp_path / "in.pth")
    convert_checkpoint(tmp_path / "in.pth", tmp_path / "out.pth", fmt="torchvision")
    state = torch.load(tmp_path / "out.pth", weights_only=True)
    result = torchvision.models.resnet18(weights=None).load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys


def _payload_and_backbone(tmp_path, depth=18):
    from simsiam_transfer.d2_weights import detectron2_payload
    from convert.rename import rename_state_dict

    backbone = {k: v for k, v in torchvision_state(depth).items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return detectron2_payload(rename_state_dict(backbone)), backbone


def test_verification_fails_for_a_swapped_stride_convention(tmp_path):
    payload, backbone = _payload_and_backbone(tmp_path, 50)
    verify_detectron2_payload(payload, backbone, 50)
    with pytest.raises(VerificationError, match="features differ"):
        verify_detectron2_payload(payload, backbone, 50, stride_in_1x1=True)


def test_verification_fails_for_wrong_weights_and_for_missing_ones(tmp_path):
    payload, backbone = _payload_and_backbone(tmp_path)
    m = payload["model"]
    m["res4.0.conv1.weight"], m["res4.1.conv1.weight"] = m["res4.1.conv1.weight"], m["res4.0.conv1.weight"].copy()
    # detectron2's matching skips a tensor of the wrong shape: it shows as missing and unused.
    with pytest.raises(VerificationError, match=r"not in the file.*left unused"):
        verify_detectron2_payload(payload, backbone, 18)
    payload, backbone = _payload_and_backbone(tmp_path)
    m = payload["model"]
    m["res3.1.conv1.weight"], m["res3.1.conv2.weight"] = m["res3.1.conv2.weight"], m["res3.1.conv1.weight"]
    with pytest.raises(VerificationError, match="features differ"):
        verify_detectron2_payload(payload, backbone, 18)
    payload, backbone = _payload_and_backbone(tmp_path)
    del payload["model"]["res5.1.conv2.norm.weight"]
    with pytest.raises(VerificationError, match="not in the file"):
        verify_detectron2_payload(payload, backbone, 18)


def test_near_identity_blocks_are_reported_with_numbers(tmp_path, capsys):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    torch.save(model.state_dict(), tmp_path / "zero.pth")
    # The warnings are a property of the weights: verification (tested above) is not needed here.
    assert cli_main("convert", "--no-verify", tmp_path / "zero.pth", tmp_path / "zero.pkl") == 0
    err = capsys.readouterr().err
    assert "WARNING: res2: residual-branch BN scale mean 0.0000" in err and "near-identity" in err
    report = json.loads((tmp_path / "zero.pkl.report.json").read_text())
    assert len(report["warnings"]) == 4 and report["residual_bn_scale"]["res5"]["max"] == 0.0
    torch.save(torchvision_state(18), tmp_path / "ok.pth")
    assert cli_main("convert", "--no-verify", tmp_path / "ok.pth", tmp_path / "ok.pkl") == 0
    assert "WARNING" not in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def _bad_inputs(tmp_path):
    good = torchvision_state(18)
    (tmp_path / "truncated.pth").write_bytes(b"")
    torch.save(good, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign.pth").write_bytes(b"this is not a checkpoint at all" * 10)
    with open(tmp_path / "unsafe.pth", "wb") as f:
        torch.save({"state_dict": good, "hook": _Evil()}, f)
    vit = {"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    torch.save(vit, tmp_path / "vit.pth")
    cifar = dict(good)
    cifar["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(cifar, tmp_path / "cifar.pth")
    r50 = torchvision_state(50)
    torch.save({k: v for k, v in r50.items() if not k.startswith("layer3.5.")}, tmp_path / "missing_block.pth")
    torch.save({k: v for k, v in good.items() if k != "layer2.0.bn1.weight"}, tmp_path / "missing_tensor.pth")
    both = {**{f"backbone.{k}": v for k, v in good.items()}, **{f"module.encoder.{k}": v for k, v in good.items()}}
    torch.save(both, tmp_path / "ambiguous.pth")
    return {
        "truncated.pth": "truncated or foreign", "foreign.pth": "truncated or foreign",
        "unsafe.pth": "unsafe pickle", "vit.pth": "no ResNet backbone found",
        "cifar.pth": "not the ImageNet stem", "missing_block.pth": "missing blocks for ResNet-50: layer3 has 5 of 6",
        "missing_tensor.pth": "lacks 1 tensor", "ambiguous.pth": "ambiguous layout",
        "nonexistent.pth": "file not found",
    }


def test_bad_inputs_are_refused_with_one_line_exit_2_and_no_output(tmp_path, capsys):
    from app.cli import main

    for name, message in _bad_inputs(tmp_path).items():
        out = tmp_path / f"{name}.pkl"
        assert main(["convert", str(tmp_path / name), str(out)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and str(tmp_path / name) in err, (name, err)
        assert not out.exists() and not (tmp_path / f"{name}.pkl.report.json").exists()
        assert not list(tmp_path.glob(f".{name}.pkl.*"))
    assert "executed" not in capsys.readouterr().out


def test_unsafe_pickle_refused_through_the_console_command(tmp_path):
    _bad_inputs(tmp_path)
    proc = run_cli("convert", tmp_path / "unsafe.pth", tmp_path / "o.pkl")
    assert proc.returncode == 2 and "executed" not in proc.stdout and "Traceback" not in proc.stderr


def test_forced_source_that_does_not_match_lists_candidates(tmp_path):
    torch.save(_checkpoint("moco", 18), tmp_path / "moco.pth")
    with pytest.raises(UserError, match=r"--source simsiam expects keys under 'module.encoder.'.*\['moco'\]"):
        convert_checkpoint(tmp_path / "moco.pth", tmp_path / "o.pkl", source="simsiam")


def test_detectron2_reader_refuses_foreign_pickles(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "x": _Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        read_detectron2_pkl(tmp_path / "evil.pkl")
    (tmp_path / "cut.pkl").write_bytes(b"\x80\x04\x95")
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_detectron2_pkl(tmp_path / "cut.pkl")


def test_our_pretraining_checkpoint_converts(synthetic, tmp_path):
    from app.cli import main

    args = ["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.TRAIN_DIR", synthetic / "unlabeled",
            "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0,
            "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 1, "SOLVER.MAX_ITERS_PER_EPOCH", 1, "SOLVER.AMP", False, "OUTPUT_DIR", tmp_path]
    assert main([str(a) for a in args]) == 0
    report = convert_checkpoint(tmp_path / "checkpoint_last.pth", tmp_path / "out.pkl")
    assert report["source"] == "simsiam-transfer" and report["dropped"]["predictor"] > 0
    assert report["dropped"]["projector (fc)"] > 0
