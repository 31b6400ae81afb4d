"""Pretraining config (fvcore ``CfgNode``, as detectron2; ``_BASE_`` works): defaults are the paper's baseline recipe.

Every ablation of the paper is a key here (docs/protocol.md).
"""

import math

from simsiam_transfer.atomic import check_output_dir
from simsiam_transfer.config import CfgNode as CN
from simsiam_transfer.config import load
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import PRETRAIN_BACKBONES

_C = CN()
_C.SEED = 0
_C.OUTPUT_DIR = "runs/pretrain"

_C.DATA = CN()
_C.DATA.TRAIN_DIR = ""        # image folder (recursive; class sub-folders allowed, labels ignored)
_C.DATA.KNN_TRAIN_DIR = ""    # optional labeled ImageFolder for the kNN monitor / linear probe
_C.DATA.KNN_VAL_DIR = ""
_C.DATA.IMAGE_SIZE = 224      # crop size of both views
_C.DATA.NUM_WORKERS = 8       # per process
_C.DATA.CHECK_IMAGES = "auto" # decode TRAIN_DIR before OUTPUT_DIR is written: auto (<= 50k images) / always / never
_C.DATA.MIN_SCALE = 0.2       # RandomResizedCrop scale lower bound (official: 0.2)
_C.DATA.AUGMENT_ON = "auto"   # cpu: the official PIL pipeline in the loader; device: loader crops, the rest
                              # runs batched on the training device; auto: device on CUDA, else cpu

_C.MODEL = CN()
_C.MODEL.METHOD = "simsiam"           # the pretraining method (pretrain/methods): simsiam / supervised / ...
_C.MODEL.BACKBONE = "resnet50"        # resnet18 / resnet34 / resnet50 / resnet101
_C.MODEL.ZERO_INIT_RESIDUAL = True    # official; short CPU runs need False (docs/mini-benchmark.md)
_C.MODEL.DIM = 2048                   # projector hidden/output dim d
_C.MODEL.PRED_DIM = 512               # predictor bottleneck
_C.MODEL.PROJ_HIDDEN_DIM = 0          # 0 = the backbone's width (official: 2048 for ResNet-50)
_C.MODEL.PROJ_LAYERS = 3
_C.MODEL.STOP_GRADIENT = True         # Fig. 2
_C.MODEL.PREDICTOR = "mlp"            # mlp / none / fixed_random (Table 1a, 1b)
_C.MODEL.HEAD_BN = "default"          # none / hidden / default / all (Table 3)
_C.MODEL.SIMILARITY = "cosine"        # cosine / cross_entropy (Sec. 4.5)
_C.MODEL.SYMMETRIC = True             # Sec. 4.6
_C.MODEL.TARGET = "siamese"           # siamese / moving_average (Sec. 5.2, used with PREDICTOR none)
_C.MODEL.TARGET_MOMENTUM = 0.8        # m of the moving-average target
_C.MODEL.ALTERNATION_STEPS = 1        # k-step alternation with cached targets (Sec. 5.2); 1 = SimSiam

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 100
_C.SOLVER.BATCH_SIZE = 512            # total over all processes
_C.SOLVER.BASE_LR = 0.05              # lr = BASE_LR * BATCH_SIZE / 256
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.FIX_PRED_LR = False         # predictor lr constant (Table 1c)
_C.SOLVER.WARMUP_EPOCHS = 0           # linear warmup (paper: 10 for batch >= 1024)
_C.SOLVER.CHECKPOINT_PERIOD = 10      # numbered checkpoints; checkpoint_last.pth every epoch
_C.SOLVER.AMP = False                 # mixed precision: bf16 on GPUs with bf16 (compute capability >= 8.0),
                                      # fp16 + GradScaler on older GPUs, bf16 on CPUs with native bf16;
                                      # off = fp32 as the official code and the paper
_C.SOLVER.TF32 = False                # TF32 convolutions and matmuls on CUDA; off = IEEE fp32 (the paper's V100s)
_C.SOLVER.LOG_PERIOD = 20             # steps between host reads of loss/z_std (and the finite check)
_C.SOLVER.MAX_ITERS_PER_EPOCH = 0     # 0 = full epoch; >0 caps iterations (smoke runs)

_C.MONITOR = CN()
_C.MONITOR.KNN_PERIOD = 1             # epochs between kNN evaluations (needs DATA.KNN_* dirs)
_C.MONITOR.KNN_K = 200
_C.MONITOR.KNN_T = 0.07

_C.LINEAR = CN()
_C.LINEAR.PRETRAINED = ""             # a pretraining checkpoint (default: OUTPUT_DIR/checkpoint_last.pth)
_C.LINEAR.EPOCHS = 90
_C.LINEAR.BATCH_SIZE = 4096
_C.LINEAR.BASE_LR = 0.1               # lr = BASE_LR * BATCH_SIZE / 256
_C.LINEAR.WEIGHT_DECAY = 0.0
_C.LINEAR.OPTIMIZER = "lars"          # lars (official, LARC trust 0.001) / sgd


def get_cfg():
    return _C.clone()


CHOICES = {
    "MODEL.BACKBONE": PRETRAIN_BACKBONES,
    "MODEL.PREDICTOR": ("mlp", "none", "fixed_random"),
    "MODEL.HEAD_BN": ("none", "hidden", "default", "all"),
    "MODEL.SIMILARITY": ("cosine", "cross_entropy"),
    "MODEL.TARGET": ("siamese", "moving_average"),
    "LINEAR.OPTIMIZER": ("lars", "sgd"),
    "DATA.CHECK_IMAGES": ("auto", "always", "never"),
    "DATA.AUGMENT_ON": ("auto", "cpu", "device"),
}


def validate(cfg, source="config"):
    """Values yacs cannot check by type; returns nothing, raises UserError naming the key."""
    from pretrain.methods import METHODS  # the registry holds the shipped methods and any registered since

    if cfg.MODEL.METHOD not in METHODS:
        raise UserError(f"{source}: MODEL.METHOD {cfg.MODEL.METHOD!r} is not one of {sorted(METHODS)}")
    if cfg.MODEL.METHOD != "simsiam" and (cfg.MODEL.TARGET != "siamese" or cfg.MODEL.ALTERNATION_STEPS != 1):
        raise UserError(f"{source}: MODEL.TARGET and MODEL.ALTERNATION_STEPS are SimSiam's Sec. 5.2 ablations; "
                        f"leave them at siamese / 1 with MODEL.METHOD {cfg.MODEL.METHOD}")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if value not in allowed:
            raise UserError(f"{source}: {key} {value!r} is not one of {list(allowed)}")
    positive = ("SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "SOLVER.BASE_LR", "DATA.IMAGE_SIZE",
                "MODEL.DIM", "MODEL.PRED_DIM", "MODEL.ALTERNATION_STEPS", "SOLVER.CHECKPOINT_PERIOD",
                "SOLVER.LOG_PERIOD", "MONITOR.KNN_PERIOD")
    for key in positive:
        section, name = key.split(".")
        if not cfg[section][name] > 0:
            raise UserError(f"{source}: {key} must be > 0, got {cfg[section][name]}")
    for key in ("SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "LINEAR.BASE_LR"):
        section, name = key.split(".")
        if not math.isfinite(cfg[section][name]):
            raise UserError(f"{source}: {key} must be finite, got {cfg[section][name]}")
    if cfg.DATA.NUM_WORKERS < 0:
        raise UserError(f"{source}: DATA.NUM_WORKERS must be >= 0 (0 loads in the main process), "
                        f"got {cfg.DATA.NUM_WORKERS}")
    check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    if cfg.MODEL.PROJ_LAYERS not in (2, 3):
        raise UserError(f"{source}: MODEL.PROJ_LAYERS must be 2 or 3, got {cfg.MODEL.PROJ_LAYERS}")
    if not 0.0 <= cfg.MODEL.TARGET_MOMENTUM < 1.0:
        raise UserError(f"{source}: MODEL.TARGET_MOMENTUM must be in [0, 1)")
    if cfg.MODEL.TARGET == "moving_average" and cfg.MODEL.ALTERNATION_STEPS > 1:
        raise UserError(f"{source}: MODEL.TARGET moving_average and MODEL.ALTERNATION_STEPS > 1 are "
                        "separate experiments; set one of them")
    if cfg.SOLVER.WARMUP_EPOCHS >= cfg.SOLVER.EPOCHS and cfg.SOLVER.WARMUP_EPOCHS > 0:
        raise UserError(f"{source}: SOLVER.WARMUP_EPOCHS must be < SOLVER.EPOCHS")


def resolve_augment_on(cfg, device_type: str):
    """``cfg`` with DATA.AUGMENT_ON ``auto`` replaced by what this run uses, so config.yaml and the
    checkpoint record it: ``device`` where training runs on CUDA, ``cpu`` otherwise."""
    if cfg.DATA.AUGMENT_ON != "auto":
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATA.AUGMENT_ON = "device" if device_type == "cuda" else "cpu"
    cfg.freeze()
    return cfg


# A pretraining at the paper's scale: a ResNet-50/101 on crops of ImageNet size. On a CPU it runs for weeks.
PAPER_BACKBONES = ("resnet50", "resnet101")
PAPER_MIN_IMAGE_SIZE = 160


def paper_scale(cfg):
    """Why ``cfg`` is a paper-scale pretraining (one phrase), or None for a mini one."""
    if cfg.MODEL.BACKBONE in PAPER_BACKBONES and cfg.DATA.IMAGE_SIZE >= PAPER_MIN_IMAGE_SIZE:
        return f"MODEL.BACKBONE {cfg.MODEL.BACKBONE} on {cfg.DATA.IMAGE_SIZE}-px crops is a paper-scale pretraining"
    return None


def load_cfg(config_file=None, overrides=(), nodes=()):
    """The frozen pretraining config: defaults <- file <- nested ``(node, where)`` pairs <- overrides."""
    return load(_C, config_file, overrides, validate, nodes=nodes)
