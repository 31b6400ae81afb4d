"""Pretraining methods as a registry: SimSiam equal to the official builder bit for bit, the supervised
positive control through pretrain -> convert, and a method registered from this file run end to end."""

import json
import sys

import pytest
import torch
import torchvision
from torch import nn

from conftest import REPO, cli_main
from pretrain.engine import train_step
from pretrain.methods import METHODS, PretrainMethod, register_method
from pretrain.methods.simsiam import SimSiamMethod


def official_simsiam(dim, pred_dim):
    """The official builder's structure, as ``benchmarks/pretrain_step.py`` writes it from the paper and
    the official code (its reference loop): one home for it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from pretrain_step import OfficialStyleSimSiam
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return OfficialStyleSimSiam("resnet18", dim, pred_dim)


def test_the_simsiam_method_equals_the_official_builder_bit_for_bit():
    torch.manual_seed(0)
    ours = SimSiamMethod("resnet18", dim=64, pred_dim=16)
    official = official_simsiam(64, 16)
    official.load_state_dict(ours.state_dict())
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    opt = torch.optim.SGD(ours.parameters(), lr=0.0)
    loss, _ = train_step(ours, opt, (x1, x2))
    p1, p2, z1, z2 = official(x1, x2)
    criterion = nn.CosineSimilarity(dim=1)
    reference = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
    reference.backward()
    assert torch.equal(loss, reference.detach())  # diff 0.0
    ours_grads, official_grads = dict(ours.named_parameters()), dict(official.named_parameters())
    assert set(ours_grads) == set(official_grads)
    for name, param in official_grads.items():
        if param.grad is None:
            assert ours_grads[name].grad is None, name
        else:
            assert torch.equal(ours_grads[name].grad, param.grad), name  # diff 0.0


def test_the_registry_refuses_an_unknown_method_and_a_second_registration(capsys, tmp_path):
    assert {"simsiam", "supervised"} <= set(METHODS)
    assert cli_main("pretrain", "MODEL.METHOD", "byol", "OUTPUT_DIR", tmp_path / "x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODEL.METHOD 'byol' is not one of ['simsiam', 'supervised'" in err[0]
    with pytest.raises(ValueError, match="registered twice"):
        register_method("simsiam")(type("Other", (PretrainMethod,), {}))


@register_method("toy_mse")
class ToyMSE(PretrainMethod):
    """A method defined in a test file: one module's worth (a ResNet, its data, a loss), nothing else."""

    views = 2

    def __init__(self, backbone):
        super().__init__()
        self.encoder = getattr(torchvision.models, backbone)(num_classes=16)

    @classmethod
    def build(cls, cfg):
        return cls(cfg.MODEL.BACKBONE)

    def train_dataset(self, cfg):
        from pretrain.data import TwoViewDataset, simsiam_augmentation

        return TwoViewDataset(cfg.DATA.TRAIN_DIR, simsiam_augmentation(cfg.DATA.IMAGE_SIZE, cfg.DATA.MIN_SCALE))

    def step_inputs(self, batch):
        x1, x2, index = batch
        return (x1, x2), {"index": index}

    def forward(self, x1, x2):
        return self.encoder(x1), self.encoder(x2)

    def loss(self, outputs, aux, targets=None):
        z1, z2 = (o.float() for o in outputs)
        return (z1 - z2).pow(2).mean(), z1

    def epoch_record(self):
        return {"toy": 1}


def _common(synthetic, out, *extra):
    return ["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0,
            "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 1, "SOLVER.MAX_ITERS_PER_EPOCH", 2, "SOLVER.AMP", False,
            "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train", "DATA.KNN_VAL_DIR", synthetic / "labeled/val",
            "OUTPUT_DIR", out, *extra]


@pytest.mark.slow
def test_a_method_registered_in_a_test_file_runs_pretrain_then_convert(synthetic, tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli_main(*_common(synthetic, out, "DATA.TRAIN_DIR", synthetic / "unlabeled", "MODEL.METHOD",
                             "toy_mse")) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["toy"] == 1 and record["steps"] == 2 and 0 <= record["knn_top1"] <= 100
    assert cli_main("convert", out / "checkpoint_last.pth", tmp_path / "toy.pkl") == 0
    report = json.loads((tmp_path / "toy.pkl.report.json").read_text())
    assert report["source"] == "simsiam-transfer" and report["depth"] == 18 and report["verification"]["res5"]


@pytest.mark.slow
def test_supervised_pretraining_is_a_pretraining_like_any_other(synthetic, tmp_path, capsys):
    """Cross-entropy on the labeled class folders: the same checkpoint format, resume, monitors, converter."""
    out = tmp_path / "sup"
    args = _common(synthetic, out, "DATA.TRAIN_DIR", synthetic / "labeled/train", "MODEL.METHOD", "supervised")
    assert cli_main(*args, "DATA.AUGMENT_ON", "device") == 2  # SimSiam's device-side recipe is not its own
    assert "MODEL.METHOD supervised augments in its loader only" in capsys.readouterr().err
    assert cli_main(*args) == 0
    assert cli_main(*args, "SOLVER.EPOCHS", 2) == 0  # resumes to epoch 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["chance_loss"] == pytest.approx(1.0986, abs=1e-4)  # ln 3 classes
    assert set(records[0]["residual_bn_scale"]) == {"layer1", "layer2", "layer3", "layer4"}
    saved = (out / "config.yaml").read_text()
    assert "METHOD: supervised" in saved and "AUGMENT_ON: cpu" in saved  # auto: its own augmentation, in the loader
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ckpt["state_dict"]["encoder.fc.weight"].shape == (3, 512)  # the classifier over 3 classes
    capsys.readouterr()
    assert cli_main("convert", out / "checkpoint_last.pth", tmp_path / "sup.pkl") == 0
    report = json.loads((tmp_path / "sup.pkl.report.json").read_text())
    assert report["dropped"].get("projector (fc)") == 2  # the classifier is not part of the backbone
    # Four steps learn nothing: the converter says so against the loss of guessing, not SimSiam's scale.
    assert any("supervised loss never went below 0.8 x the loss of guessing" in w for w in report["warnings"])
    assert not any("SimSiam did not learn" in w for w in report["warnings"])


def test_a_checkpoint_from_before_the_registry_resumes_as_simsiam():
    from pretrain.config import get_cfg
    from simsiam_transfer.pretrain_format import model_settings_changed

    cfg = get_cfg()
    old_text = cfg.dump().replace("  METHOD: simsiam\n", "")  # a config written before MODEL.METHOD existed
    assert "METHOD" not in old_text
    assert model_settings_changed(old_text, cfg) == []
    cfg.defrost()
    cfg.MODEL.METHOD = "supervised"
    assert model_settings_changed(old_text, cfg) == ["MODEL.METHOD: 'simsiam' -> 'supervised'"]
