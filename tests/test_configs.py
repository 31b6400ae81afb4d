"""Every shipped YAML loads through the loader that uses it; the paper recipes train at mini size."""

import pytest

from conftest import cli_main
from simsiam_transfer.config import config_root

SHIPPED = sorted(str(p.relative_to(config_root())) for p in config_root().rglob("*.yaml"))


def test_every_stage_ships_configs():
    assert {name.split("/")[0] for name in SHIPPED} == {"pretrain", "detection", "pipeline"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_through_its_stage_loader(name):
    stage = name.split("/")[0]
    if stage == "pretrain":
        from pretrain.config import load_cfg

        cfg = load_cfg(name)
        assert cfg.is_frozen() and cfg.SOLVER.EPOCHS > 0
    elif stage == "detection":
        from detectron2.config import get_cfg
        from detectron2.modeling import ROI_HEADS_REGISTRY

        from simsiam_transfer import c4  # noqa: F401  (registers the C4 ExtraNorm head the configs name)
        from simsiam_transfer.config import merge_file

        cfg = get_cfg()
        merge_file(cfg, name)
        assert ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
        assert cfg.SOLVER.IMS_PER_BATCH > 0
        assert cfg.DATASETS.TRAIN or name.split("/")[-1].startswith("Base-")  # a _BASE_ names no data
    else:
        from app.pipeline import Pipeline, load_pipeline_cfg

        pipeline = Pipeline(load_pipeline_cfg(name))
        if name.endswith("pipeline/mini.yaml"):  # the demo: a positive control, and the COCO column a smoke run
            assert [r.id for r in pipeline.rows] == ["scratch", "supervised", "simsiam", "simsiam_no_sg"]
            voc, coco = (pipeline.sweep_spec(bm, pipeline.rows[0]) for bm in ("voc07_mini", "coco_1x_mini"))
            assert (voc.trials, voc.smoke, coco.trials, coco.smoke) == (3, False, 1, True)
            assert pipeline.pretrain_cfg(pipeline.rows[1]).DATA.TRAIN_DIR.endswith("labeled/train")
        if name.endswith("mini_long.yaml"):  # the LR search and 5 trials on VOC; COCO stays a smoke run
            spec = pipeline.sweep_spec("voc07_mini", pipeline.rows[0])
            assert spec.lrs == (0.02, 0.05, 0.1) and spec.trials == 5 and not spec.smoke
            assert pipeline.sweep_spec("coco_1x_mini", pipeline.rows[0]).smoke
        for row in pipeline.rows:  # each row's pretraining config, nested keys included
            if row.pretrained_here:
                assert pipeline.pretrain_cfg(row).is_frozen()


@pytest.mark.parametrize("name", ["pretrain/simsiam_R_50_200ep_b256_optimal.yaml",
                                  "pretrain/simsiam_R_50_100ep_b512.yaml"])
def test_paper_recipe_trains_at_mini_size(name, synthetic, tmp_path):
    import json

    assert cli_main("pretrain", "--config", name, "OUTPUT_DIR", tmp_path, "DATA.TRAIN_DIR", synthetic / "unlabeled",
                    "MODEL.BACKBONE", "resnet18", "MODEL.DIM", 64, "MODEL.PRED_DIM", 16, "DATA.IMAGE_SIZE", 32,
                    "DATA.NUM_WORKERS", 0, "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 1,
                    "SOLVER.MAX_ITERS_PER_EPOCH", 2) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["steps"] == 2
