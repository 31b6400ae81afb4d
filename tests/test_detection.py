"""Detection stage: ExtraNorm head, configs, datasets, data check, finetune (the engine smoke tests)."""

import json
import math
import re
import shutil

import pytest
import torch

from conftest import cli_main, run_cli
from simsiam_transfer.bf16 import cpu_supports_bf16
from simsiam_transfer.errors import UserError

MINI = {
    "voc07": "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml",
    "voc0712": "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc0712_mini.yaml",
    "coco_1x": "detection/COCO-InstanceSegmentation/mask_rcnn_R_18_C4_1x_mini.yaml",
    "coco_2x": "detection/COCO-InstanceSegmentation/mask_rcnn_R_18_C4_2x_mini.yaml",
}
FULL = {
    "voc07": "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc07.yaml",
    "voc0712": "detection/PascalVOC-Detection/faster_rcnn_R_50_C4_voc0712.yaml",
    "coco_1x": "detection/COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
    "coco_2x": "detection/COCO-InstanceSegmentation/mask_rcnn_R_50_C4_2x.yaml",
}
SHORT = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2",
         "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.PRECISE_BN.NUM_ITER", "2"]


def _cfg(config, *overrides):
    from detection.finetune import FinetuneJob, build_cfg

    return build_cfg(FinetuneJob(config_file=config, weights="none", overrides=list(overrides)))


@pytest.mark.parametrize("name", list(FULL))
def test_full_protocol_configs_build_with_the_extra_norm_head(name):
    from detectron2.modeling import build_model

    cfg = _cfg(FULL[name], "MODEL.RESNETS.NORM", "BN")
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.TEST.PRECISE_BN.ENABLED
    model = build_model(cfg)
    keys = set(model.state_dict())
    assert {"roi_heads.res5.norm.weight", "roi_heads.res5.norm.running_var"} <= keys
    assert ("roi_heads.mask_head.predictor.weight" in keys) == name.startswith("coco")
    assert model.roi_heads.res5[0].conv3.weight.shape[0] == 2048


def test_protocol_schedules():
    voc = _cfg(FULL["voc0712"])
    assert (voc.SOLVER.MAX_ITER, tuple(voc.SOLVER.STEPS), voc.SOLVER.WARMUP_ITERS) == (24000, (18000, 22000), 100)
    assert voc.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval") and voc.INPUT.MIN_SIZE_TRAIN[0] == 480
    coco = _cfg(FULL["coco_1x"])
    assert (coco.SOLVER.MAX_ITER, tuple(coco.SOLVER.STEPS), coco.MODEL.MASK_ON) == (90000, (60000, 80000), True)
    assert _cfg(FULL["coco_2x"]).SOLVER.MAX_ITER == 180000
    base = _cfg(FULL["voc07"])  # the faithful default switches detectron2's rescaling off
    assert (base.SOLVER.IMS_PER_BATCH, base.SOLVER.BASE_LR, base.SOLVER.REFERENCE_WORLD_SIZE) == (16, 0.02, 0)
    from detection.finetune import FinetuneJob, build_cfg

    linear = build_cfg(FinetuneJob(config_file=FULL["voc07"], weights="none", scaling="linear"))
    assert linear.SOLVER.REFERENCE_WORLD_SIZE == 8  # 8 GPUs x 2 images, what batch 16 was written for


def test_resnet18_res5_uses_basic_blocks_so_pretrained_weights_transfer(r18_pkl):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.modeling.backbone.resnet import BasicBlock

    cfg = _cfg(MINI["voc07"])
    model = build_model(cfg)
    assert isinstance(model.roi_heads.res5[0], BasicBlock) and model.roi_heads.res5[0].conv2.weight.shape[0] == 512
    before = model.roi_heads.res5[1].conv2.weight.clone()
    DetectionCheckpointer(model).load(str(r18_pkl))
    assert not torch.equal(before, model.roi_heads.res5[1].conv2.weight)


def test_syncbn_on_one_cpu_process_is_switched_and_logged(caplog):
    caplog.set_level("INFO", logger="simsiam_transfer.finetune")
    cfg = _cfg(MINI["voc07"], "MODEL.RESNETS.NORM", "SyncBN")
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.MODEL.DEVICE == "cpu"
    assert "SyncBN cannot run" in caplog.text


def test_invalid_config_key_names_the_key():
    with pytest.raises(UserError, match="override SOLVER.NOT_A_KEY"):
        _cfg(MINI["voc07"], "SOLVER.NOT_A_KEY", "1")


def test_catalog_validation(tmp_path):
    from detection.datasets import load_catalog

    cases = {
        "bad: [unclosed": "not valid YAML",
        "x:\n  format: lmdb\n": "format must be one of ['coco', 'voc']",
        "x:\n  format: voc\n  root: r\n  split: s\n  classes: [a]\n  year: '07'\n": "'year' must be an integer",
        "x:\n  format: voc\n  root: r\n  split: s\n": "missing key(s) ['classes']",
        "x:\n  format: coco\n  json: a\n  image_root: b\n  extra: 1\n": "unknown key(s) ['extra']",
        "x:\n  format: voc\n  root: r\n  split: s\n  classes: []\n": "non-empty list",
    }
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_catalog(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("x:\n  format: coco\n  json: ann/a.json\n  image_root: img\n")
    assert load_catalog(tmp_path / "c.yaml")["x"]["json"] == (tmp_path / "ann/a.json").resolve()


def test_voc_reader_keeps_difficult_and_uses_zero_based_boxes(synthetic):
    from detection.datasets import load_catalog
    from detection.voc import load_voc_instances

    spec = load_catalog(synthetic / "datasets.yaml")["synthetic_voc_trainval"]
    dicts = load_voc_instances(spec["root"], "trainval", spec["classes"])
    assert len(dicts) == 24
    anns = [a for d in dicts for a in d["annotations"]]
    assert {a["difficult"] for a in anns} == {0, 1}
    xml = (spec["root"] / "Annotations" / f"{dicts[0]['image_id']}.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    assert dicts[0]["annotations"][0]["bbox"][0] == xmin - 1


def _copy_voc(synthetic, tmp_path):
    root = tmp_path / "VOC2007"
    shutil.copytree(synthetic / "VOCdevkit/VOC2007", root)
    return root


def test_data_check_passes_clean_data(synthetic, capsys):
    classes = "disk,square,triangle"
    assert cli_main("data", "check", "--voc", synthetic / "VOCdevkit/VOC2007", "--classes", classes) == 0
    assert "OK: no problems found" in capsys.readouterr().out
    assert cli_main("data", "check", "--coco", synthetic / "coco/annotations/instances_val.json",
                    "--image-root", synthetic / "coco/val") == 0


def test_data_check_catches_each_voc_defect(synthetic, tmp_path, capsys):
    root = _copy_voc(synthetic, tmp_path)
    ids = (root / "ImageSets/Main/test.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    (root / "Annotations" / f"{ids[1]}.xml").write_text("<annotation><size>")
    xml = (root / "Annotations" / f"{ids[2]}.xml").read_text()
    xml = xml.replace("<xmax>", "<xmax>9", 1)  # pushes the box past the image border
    (root / "Annotations" / f"{ids[2]}.xml").write_text(xml)
    xml = (root / "Annotations" / f"{ids[3]}.xml").read_text().replace("<name>", "<name>hexagon_", 1)
    (root / "Annotations" / f"{ids[3]}.xml").write_text(xml)
    (root / "ImageSets/Main/val.txt").write_text("")
    report = tmp_path / "report.json"
    assert cli_main("data", "check", "--voc", root, "--classes", "disk,square,triangle", "--json", report) == 2
    out = capsys.readouterr().out
    problems = json.loads(report.read_text())["problems"]
    assert set(problems) == {"missing image", "malformed XML", "box outside the image", "unknown class", "empty split"}
    assert f"{ids[0]}.jpg" in problems["missing image"]["first"][0]
    assert f"{ids[1]}.xml" in problems["malformed XML"]["first"][0]
    assert "ERROR missing image: 1" in out


def test_data_check_catches_coco_defects(synthetic, tmp_path):
    doc = json.loads((synthetic / "coco/annotations/instances_val.json").read_text())
    doc["annotations"][0]["category_id"] = 99
    doc["annotations"][1]["bbox"] = [90, 90, 50, 50]
    doc["images"][0]["file_name"] = "nowhere.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    (tmp_path / "broken.json").write_text("{\"images\": [")
    from detection.data_check import check_coco

    problems = check_coco(tmp_path / "bad.json", synthetic / "coco/val").as_dict()["problems"]
    assert set(problems) == {"unknown class", "box outside the image", "missing image"}
    assert set(check_coco(tmp_path / "broken.json", synthetic / "coco/val").problems) == {"malformed JSON"}
    proc = run_cli("data", "check", "--coco", tmp_path / "broken.json", "--image-root", synthetic / "coco/val")
    assert proc.returncode == 2 and "malformed JSON" in proc.stdout


def _finetune(config, weights, synthetic, out, *extra, flags=()):
    return cli_main("finetune", "--config", config, "--weights", weights, "--datasets", synthetic / "datasets.yaml",
                    *flags, *SHORT, "OUTPUT_DIR", out, *extra)


def test_voc_faster_rcnn_trains_and_the_voc_evaluator_reports_ap(synthetic, r18_pkl, tmp_path):
    # --scaling linear with REFERENCE_WORLD_SIZE 2 on one process: detectron2 halves the batch and LR
    # and doubles the schedule (the default faithful policy would keep them).
    assert _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, "SOLVER.REFERENCE_WORLD_SIZE", "2", "SEED", "7",
                     flags=("--scaling", "linear")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert 0.0 <= metrics[key] <= 100.0
    assert (metrics["ims_per_batch"], metrics["base_lr"], metrics["max_iter"]) == (2, 0.02 / 2, 8)  # voc07_mini: LR 0.02
    assert metrics["seed"] == 7 and len(metrics["config_hash"]) == 16 and metrics["versions"]["detectron2"]
    assert metrics["norm"] == "BN" and metrics["world_size"] == 1 and metrics["scaling"] == "linear"
    assert metrics["tf32"] is False and metrics["amp"] is True  # precision provenance (SOLVER.TF32 off on CPU;
    assert metrics["precision"] == ("bf16" if cpu_supports_bf16() else "fp32")  # the mini configs' CPU AMP)
    assert metrics["bn_group"] == 2 and "batch 2 != 4" in metrics["flags"]
    assert 0.0 <= metrics["train/fg_cls_accuracy"] <= 1.0  # detectron2's own training statistic, kept
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["total_loss"] for r in log if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["voc0712", "coco_1x", "coco_2x"])
def test_each_mini_protocol_finetunes_from_a_converted_checkpoint(synthetic, r18_pkl, tmp_path, name):
    assert _finetune(MINI[name], r18_pkl, synthetic, tmp_path) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox/AP50"] <= 100.0 and metrics["seed"] >= 0
    if name.startswith("coco"):
        for key in ("segm/AP", "segm/AP50", "segm/AP75"):
            assert 0.0 <= metrics[key] <= 100.0


def test_scratch_row_trains_stably_with_trainable_bn(synthetic, tmp_path):
    assert _finetune(MINI["voc07"], "none", synthetic, tmp_path) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["weights"] == "none"


def test_finetune_resumes_only_under_its_own_schedule(synthetic, r18_pkl, tmp_path, capsys):
    every_2 = ("SEED", "1", "SOLVER.CHECKPOINT_PERIOD", "2")
    assert _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, *every_2) == 0
    assert (tmp_path / "model_0000001.pth").is_file() and (tmp_path / "schedule.json").is_file()
    # As if killed after iteration 2: the last checkpoint is model_0000001.pth.
    for name in ("model_final.pth", "model_0000003.pth", "metrics.json"):
        (tmp_path / name).unlink()
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, *every_2) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "Starting training from iteration 0" in log and "Starting training from iteration 2" in log
    metrics = tmp_path / "metrics.json"
    before = metrics.read_bytes(), metrics.stat().st_mtime_ns
    capsys.readouterr()
    # Another schedule (or batch policy) is refused before anything is trained or evaluated.
    assert _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, *every_2, "SOLVER.MAX_ITER", "6") == 2
    assert "max_iter 4 (now 6)" in capsys.readouterr().err
    assert _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, *every_2, "SOLVER.REFERENCE_WORLD_SIZE", "2",
                     flags=("--scaling", "linear")) == 2
    assert "ims_per_gpu 4 (now 2)" in capsys.readouterr().err
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before


def test_machine_rank_above_zero_returns_without_metrics(synthetic, r18_pkl, tmp_path, monkeypatch, capsys):
    import detection.finetune

    calls = []
    monkeypatch.setattr(detection.finetune, "launch", lambda *a, **k: calls.append(k))  # no second machine here
    code = _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path,
                     flags=("--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://127.0.0.1:9"))
    assert code == 0 and calls[0]["machine_rank"] == 1 and calls[0]["num_machines"] == 2
    assert "machine rank 1: training finished" in capsys.readouterr().out
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "schedule.json").exists()


def test_weights_not_covering_the_backbone_are_refused(synthetic, r18_pkl, tmp_path, capsys):
    code = _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, "MODEL.RESNETS.DEPTH", "34")
    assert code == 2 and "does not cover the model's backbone" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()
    (tmp_path / "w.pth").write_bytes(b"x")
    assert _finetune(MINI["voc07"], tmp_path / "w.pth", synthetic, tmp_path) == 2
    assert "convert the checkpoint first" in capsys.readouterr().err


def test_unknown_dataset_and_missing_root_are_clear_errors(synthetic, r18_pkl, tmp_path, capsys):
    assert _finetune(MINI["voc07"], r18_pkl, synthetic, tmp_path, "DATASETS.TEST", "('nope',)") == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    code = cli_main("finetune", "--config", FULL["voc07"], "--weights", "none", "--data-root", tmp_path / "void",
                    "OUTPUT_DIR", tmp_path)
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_extra_norm_registered_by_the_trainer_that_builds_models():
    import detection.trainer  # noqa: F401
    from detectron2.modeling import ROI_HEADS_REGISTRY

    assert ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm").__module__ == "simsiam_transfer.c4"


def test_finetune_on_broken_data_is_one_clear_error(synthetic, r18_pkl, tmp_path, capsys):
    root = _copy_voc(synthetic, tmp_path)
    first = (root / "ImageSets/Main/trainval.txt").read_text().split()[0]
    (root / "Annotations" / f"{first}.xml").write_text("<annotation><size><width>9</width>")
    catalog = tmp_path / "c.yaml"
    catalog.write_text(f"synthetic_voc_trainval:\n  format: voc\n  root: {root}\n  split: trainval\n"
                       "  classes: [disk, square, triangle]\n"
                       f"synthetic_voc_test:\n  format: voc\n  root: {root}\n  split: test\n"
                       "  classes: [disk, square, triangle]\n")
    args = ["finetune", "--config", MINI["voc07"], "--weights", r18_pkl, "--datasets", catalog, *SHORT,
            "OUTPUT_DIR", tmp_path / "out"]
    assert cli_main(*args) == 2
    err = capsys.readouterr().err
    assert f"{first}.xml: malformed annotation XML" in err and err.count("\n") == 1
    assert not (tmp_path / "out/metrics.json").exists()
    coco = tmp_path / "coco.json"
    coco.write_text("{\"images\": [")
    catalog.write_text(f"synthetic_coco_train:\n  format: coco\n  json: {coco}\n  image_root: {tmp_path}\n"
                       f"synthetic_coco_val:\n  format: coco\n  json: {coco}\n  image_root: {tmp_path}\n")
    args[args.index(MINI["voc07"])] = MINI["coco_1x"]
    assert cli_main(*args) == 2
    assert "malformed COCO json" in capsys.readouterr().err
