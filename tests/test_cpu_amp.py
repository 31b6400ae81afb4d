"""SOLVER.AMP.ENABLED on the CPU: detectron2's trainer with a bf16-autocast step (detectron2's AMPTrainer is CUDA-only)."""

import json
import logging

import pytest
import torch

from conftest import cli_main

VOC_MINI = "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml"
SHORT = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2",
         "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.PRECISE_BN.NUM_ITER", "2"]


class _Probe(torch.nn.Module):
    """A model whose forward records the autocast state and the dtype its linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.seen = []

    def forward(self, batch):
        out = self.linear(batch)
        self.seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return {"loss_a": out.float().pow(2).mean(), "loss_b": out.float().abs().mean()}


def test_step_runs_forward_in_bf16_and_updates_fp32_weights():
    from detectron2.utils.events import EventStorage

    from detection.cpu_amp import CPUAutocastTrainer

    torch.manual_seed(0)
    model = _Probe()
    before = model.linear.weight.detach().clone()
    trainer = CPUAutocastTrainer(model, [torch.randn(8, 4)] * 2, torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(0) as storage:
        trainer.run_step()
    assert model.seen == [(True, torch.bfloat16)]
    assert model.linear.weight.dtype == torch.float32 and model.linear.weight.grad.dtype == torch.float32
    assert not torch.equal(model.linear.weight.detach(), before)
    assert {"loss_a", "loss_b", "total_loss"} <= set(storage.histories())  # detectron2's own metrics writer
    assert not torch.is_autocast_enabled("cpu")  # the autocast region ends with the forward
    model(torch.randn(2, 4))  # a forward outside the step (PreciseBN, evaluation) stays fp32
    assert model.seen[-1] == (False, torch.float32)


def test_a_forward_that_raises_inside_the_step_closes_the_autocast_region():
    from detectron2.utils.events import EventStorage

    from detection.cpu_amp import CPUAutocastTrainer

    model = _Probe()
    trainer = CPUAutocastTrainer(model, [torch.randn(8, 3)], torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(0), pytest.raises(RuntimeError):
        trainer.run_step()  # 3 features into Linear(4, 2)
    assert not torch.is_autocast_enabled("cpu")


def _finetune(synthetic, r18_pkl, out, *extra):
    return cli_main("finetune", "--config", VOC_MINI, "--weights", r18_pkl, "--datasets", synthetic / "datasets.yaml",
                    *SHORT, "OUTPUT_DIR", out, "SOLVER.AMP.ENABLED", "True", *extra)


def test_cpu_finetune_with_amp_trains_in_bf16_with_detectron2s_trainer(synthetic, r18_pkl, tmp_path, monkeypatch):
    from detection import cpu_amp, trainer

    monkeypatch.setattr(cpu_amp, "cpu_supports_bf16", lambda: True)
    built = []
    original = trainer.Trainer.__init__

    def keep(self, cfg):
        original(self, cfg)
        built.append(self)
    monkeypatch.setattr(trainer.Trainer, "__init__", keep)
    assert _finetune(synthetic, r18_pkl, tmp_path) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["amp"] is True and metrics["precision"] == "bf16" and 0.0 <= metrics["bbox/AP50"] <= 100.0
    run = built[0]
    assert type(run._trainer) is cpu_amp.CPUAutocastTrainer and run.cfg.SOLVER.AMP.ENABLED
    weights = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())


def test_amp_on_a_cpu_without_native_bf16_fine_tunes_in_fp32_and_says_so(synthetic, r18_pkl, tmp_path, monkeypatch,
                                                                          caplog):
    from detection import cpu_amp

    monkeypatch.setattr(cpu_amp, "cpu_supports_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="simsiam_transfer.finetune"):
        assert _finetune(synthetic, r18_pkl, tmp_path) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"] == "fp32"
    assert any("no native bf16" in r.getMessage() and "fp32" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("amp, device, expected", [(False, "cpu", "fp32"), (True, "cuda", "fp16")])
def test_training_precision_of_detectron2s_own_paths(amp, device, expected):
    from detection.cpu_amp import training_precision
    from detection.job import new_cfg

    cfg = new_cfg()
    cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE = amp, device
    assert training_precision(cfg) == expected
