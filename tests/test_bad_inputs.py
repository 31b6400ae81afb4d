"""The bad-input corpus (issue 13): hostile or broken files and values, generated here.

Every refusal case asserts what a user relies on: exit status 2, exactly one line on stderr that
names the file or key, no traceback, no file or folder created or changed, and no pickle/YAML
payload executed (each payload would create ``PWNED``). ``data check`` cases assert the report
names each corruption with its record. Cases run in process (``cli_main``) for speed.
"""

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_main, run_cli, torchvision_state
from detection import protocol

# Keeps a bench that is not refused yet (before the h-detect merge) to seconds.
BENCH_SHORT = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.NUM_ITER", "1"]
PRETRAIN_SMALL = ["DATA.IMAGE_SIZE", "32", "DATA.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1",
                  "SOLVER.MAX_ITERS_PER_EPOCH", "1", "MODEL.DIM", "64", "MODEL.PRED_DIM", "16",
                  "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", "SOLVER.AMP", "False"]


class _Payload:
    """Unpickling this runs a shell command that creates ``PWNED``: any trace of it is a failure."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tag_yaml(marker):
    return f"SEED: !!python/object/apply:os.system ['touch {marker}']\n"


def png_bomb(path, side=20000):
    """A valid 1-bit PNG of side x side pixels (400 Mpx) that is a few kB on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


class Ctx:
    """Inputs of one case: a fresh folder, the generated datasets, a converted ResNet-18 .pkl."""

    def __init__(self, tmp, synthetic, r18_pkl):
        self.tmp, self.synthetic, self.r18_pkl = tmp, synthetic, r18_pkl
        self.marker = tmp / "PWNED"

    def file(self, name, content):
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def checkpoint(self, name, obj):
        torch.save(obj, self.tmp / name)
        return self.tmp / name

    def r18_checkpoint(self, name="r18.pth", transform=None):
        state = {f"module.encoder.{k}": v for k, v in torchvision_state(18).items()}
        if transform:
            transform(state)
        return self.checkpoint(name, {"state_dict": state})

    def images(self, bad_name=None, bad_content=None):
        """A copy of the generated unlabeled folder, plus one bad file."""
        folder = self.tmp / "images"
        shutil.copytree(self.synthetic / "unlabeled", folder)
        if bad_name:
            path = folder / bad_name
            if callable(bad_content):
                bad_content(path)
            else:
                path.write_bytes(bad_content)
        return folder

    def a_jpeg(self):
        return next((self.synthetic / "unlabeled").rglob("*.jpg")).read_bytes()

    def pretrain(self, *extra, config="pretrain/simsiam_R_18_mini.yaml", train_dir=None):
        return ["pretrain", "--config", config, "DATA.TRAIN_DIR", train_dir or self.synthetic / "unlabeled",
                *PRETRAIN_SMALL, "OUTPUT_DIR", self.tmp / "run", *extra]

    def finetune(self, *extra, config="detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml", weights=None):
        return ["finetune", "--config", config, "--weights", weights or self.r18_pkl,
                "--datasets", self.synthetic / "datasets.yaml", "OUTPUT_DIR", self.tmp / "ft", *extra]

    def bench(self, *extra, benchmark="voc07_mini", weights=None):
        return ["bench", "--benchmark", benchmark, "--weights", weights or self.r18_pkl, "--output-dir",
                self.tmp / "bench", "--lrs", "0.02", "--trials", "1", "--datasets", self.synthetic / "datasets.yaml",
                *extra, *BENCH_SHORT]

    def convert(self, src, out=None):
        return ["convert", src, out or self.tmp / "out.pkl"]


def _registry(table):
    """A decorator ``@register(name)`` that files the decorated case under ``name`` in ``table``."""
    def register(name):
        def add(fn):
            table[name] = fn
            return fn
        return add
    return register


# Each case: ctx -> (argv, [substrings the one stderr line must hold]).
CASES: dict = {}
case = _registry(CASES)


# -- checkpoints given to convert ----------------------------------------------------------------
@case("convert/truncated")
def _(c):
    src = c.r18_checkpoint()
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return c.convert(src), [str(src), "not a readable PyTorch checkpoint"]


@case("convert/empty")
def _(c):
    src = c.file("empty.pth", b"")
    return c.convert(src), [str(src)]


@case("convert/text-file")
def _(c):
    src = c.file("notes.pth", "these are not weights\n")
    return c.convert(src), [str(src)]


@case("convert/payload-in-torch-zip")
def _(c):
    src = c.checkpoint("evil.pth", {"state_dict": {"x": _Payload(c.marker)}})
    return c.convert(src), [str(src), "unsafe pickle", "system"]


@case("convert/payload-plain-pickle")
def _(c):
    src = c.file("evil.pkl", pickle.dumps({"state_dict": _Payload(c.marker)}, protocol=4))
    return c.convert(src), [str(src), "posix.system", "refused"]


@case("convert/detectron2-pkl")  # issue 13 point 8: names what the file is, no torch warning
def _(c):
    return c.convert(c.r18_pkl), [str(c.r18_pkl), "detectron2 weights file", "finetune --weights"]


@case("convert/foreign-architecture-vit")
def _(c):
    src = c.checkpoint("vit.pth", {"state_dict": {"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                                                  "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}})
    return c.convert(src), [str(src), "no ResNet backbone found"]


@case("convert/foreign-architecture-cifar-stem")
def _(c):
    src = c.r18_checkpoint(transform=lambda s: s.update({"module.encoder.conv1.weight": torch.zeros(64, 3, 3, 3)}))
    return c.convert(src), [str(src), "not the ImageNet stem"]


@case("convert/nan-weights")
def _(c):
    src = c.r18_checkpoint(transform=lambda s: s["module.encoder.layer3.0.conv1.weight"].fill_(float("nan")))
    return c.convert(src), [str(src), "NaN/inf", "layer3.0.conv1.weight"]


@case("convert/input-is-a-folder")
def _(c):
    (c.tmp / "ckpt_dir").mkdir()
    return c.convert(c.tmp / "ckpt_dir"), [str(c.tmp / "ckpt_dir"), "directory"]


@case("convert/output-is-a-folder")
def _(c):
    src = c.r18_checkpoint()
    (c.tmp / "outdir").mkdir()
    return c.convert(src, c.tmp / "outdir"), [str(c.tmp / "outdir"), "is a folder"]


@case("convert/output-under-a-file")
def _(c):
    src = c.r18_checkpoint()
    c.file("afile", "x")
    return c.convert(src, c.tmp / "afile" / "out.pkl"), [str(c.tmp / "afile"), "is a file"]


@case("convert/source-mismatch")
def _(c):
    src = c.r18_checkpoint()
    return c.convert(src) + ["--source", "moco"], [str(src), "--source moco"]


# -- checkpoints and weights read by the other commands ------------------------------------------
@case("pretrain/truncated-resume-checkpoint")
def _(c):
    (c.tmp / "run").mkdir()
    ckpt = c.file("run/checkpoint_last.pth", b"PK\x03\x04 cut short")
    return c.pretrain(), [str(ckpt), "unreadable checkpoint"]


@case("pretrain/payload-resume-checkpoint")
def _(c):
    (c.tmp / "run").mkdir()
    ckpt = c.checkpoint("run/checkpoint_last.pth", {"format": "x", "rng": _Payload(c.marker)})
    return c.pretrain(), [str(ckpt), "unsafe pickle"]


@case("pretrain/foreign-resume-checkpoint")
def _(c):
    (c.tmp / "run").mkdir()
    ckpt = c.checkpoint("run/checkpoint_last.pth", {"state_dict": {"w": torch.zeros(2)}})
    return c.pretrain(), [str(ckpt), "not a simsiam-transfer pretraining checkpoint"]


@case("linear/nan-pretrained-weights")
def _(c):
    src = c.r18_checkpoint(transform=lambda s: s["module.encoder.conv1.weight"].fill_(float("inf")))
    return (["linear", "--config", "pretrain/simsiam_R_18_mini.yaml", "LINEAR.PRETRAINED", src,
             "DATA.KNN_TRAIN_DIR", c.synthetic / "labeled/train", "DATA.KNN_VAL_DIR", c.synthetic / "labeled/val",
             "OUTPUT_DIR", c.tmp / "lin"], [str(src), "NaN/inf"])


@case("finetune/weights-truncated-pkl")
def _(c):
    bad = c.file("cut.pkl", c.r18_pkl.read_bytes()[:1000])
    return c.finetune(weights=bad), [str(bad), "truncated or corrupt"]


@case("finetune/weights-nan-pkl")
def _(c):
    payload = pickle.loads(c.r18_pkl.read_bytes())
    payload["model"]["res4.0.conv1.weight"][:] = np.nan
    bad = c.file("nan.pkl", pickle.dumps(payload))
    return c.finetune(weights=bad), [str(bad), "NaN/inf", "res4.0.conv1.weight"]


# A .pkl whose unpickling would run a command, given as --weights to both commands that take one.
for _command in ("finetune", "bench"):
    @case(f"{_command}/weights-payload-pkl")
    def _(c, command=_command):
        bad = c.file("evil.pkl", pickle.dumps({"model": {"w": np.zeros(2)}, "x": _Payload(c.marker)}))
        return getattr(c, command)(weights=bad), [str(bad), "posix.system"]


# -- images for pretraining (checked before OUTPUT_DIR is written) -------------------------------
@case("pretrain/truncated-jpeg")
def _(c):
    folder = c.images("zz_cut.jpg", c.a_jpeg()[:400])
    return c.pretrain(train_dir=folder), [str(folder / "zz_cut.jpg"), "unreadable image"]


@case("pretrain/zero-byte-jpeg")
def _(c):
    folder = c.images("zz_empty.jpg", b"")
    return c.pretrain(train_dir=folder), [str(folder / "zz_empty.jpg"), "empty file"]


@case("pretrain/text-named-jpg")
def _(c):
    folder = c.images("zz_notes.jpg", b"hello, I am text\n")
    return c.pretrain(train_dir=folder), [str(folder / "zz_notes.jpg"), "not an image"]


@case("pretrain/decompression-bomb")
def _(c):
    folder = c.images("zz_bomb.png", png_bomb)
    return c.pretrain(train_dir=folder), [str(folder / "zz_bomb.png"), "oversize image", "decompression-bomb"]


# -- configs: tags (one per entry point), unknown keys, wrong types ------------------------------
# A tagged config given to every command that reads one: refused naming the file and the tag.
_TAGGED_CONFIG_COMMANDS = {
    "pretrain --config": lambda c, evil: c.pretrain(config=evil),
    "linear --config": lambda c, evil: ["linear", "--config", evil],
    "fig2 --config": lambda c, evil: ["fig2", "--config", evil, "--output-dir", c.tmp / "fig2"],
    "finetune --config": lambda c, evil: c.finetune(config=evil),
    "bench --benchmark FILE": lambda c, evil: c.bench(benchmark=evil),
    "pipeline --config": lambda c, evil: ["pipeline", "--config", evil],
}
for _command, _argv in _TAGGED_CONFIG_COMMANDS.items():
    @case(f"tag/{_command}")
    def _(c, argv=_argv):
        evil = c.file("evil.yaml", _tag_yaml(c.marker))
        return argv(c, evil), [str(evil), "refused the YAML tag !!python/object/apply:os.system"]


@case("tag/pretrain --config with a tagged _BASE_")
def _(c):
    c.file("evil.yaml", _tag_yaml(c.marker))
    child = c.file("child.yaml", "_BASE_: evil.yaml\nSOLVER:\n  EPOCHS: 1\n")
    return c.pretrain(config=child), ["evil.yaml", "refused the YAML tag"]


@case("tag/finetune --datasets catalog")
def _(c):
    evil = c.file("catalog.yaml", f"voc: !!python/object/apply:os.system ['touch {c.marker}']\n")
    args = c.finetune()
    args[args.index("--datasets") + 1] = evil
    return args, [str(evil), "refused the YAML tag"]


@case("config/pretrain unknown key in file")
def _(c):
    cfg = c.file("typo.yaml", "MODEL:\n  BACKBONE: resnet18\n  PREDICTR: mlp\n")
    return c.pretrain(config=cfg), [str(cfg), "PREDICTR"]


@case("config/pretrain wrong type in file")
def _(c):
    cfg = c.file("types.yaml", "SOLVER:\n  EPOCHS: [1, 2]\n")
    return c.pretrain(config=cfg), [str(cfg), "EPOCHS"]


@case("config/pretrain binary file")
def _(c):
    cfg = c.file("binary.yaml", bytes(range(256)) * 4)
    return c.pretrain(config=cfg), [str(cfg)]


@case("config/pretrain override of an unknown key")
def _(c):
    return c.pretrain("MODEL.NOPE", "1"), ["MODEL.NOPE"]


@case("config/pretrain override of the wrong type")
def _(c):
    return c.pretrain("SOLVER.BATCH_SIZE", "'many'"), ["SOLVER.BATCH_SIZE"]


@case("config/pretrain kNN period of 0")
def _(c):
    return c.pretrain("MONITOR.KNN_PERIOD", "0"), ["MONITOR.KNN_PERIOD must be > 0"]


@case("config/pipeline CPU_JOBS of 0")
def _(c):
    return ["pipeline", "--config", "pipeline/mini.yaml", "SWEEP.CPU_JOBS", "0"], ["SWEEP.CPU_JOBS 0: must be an integer >= 1"]


@case("config/finetune override of an unknown key")
def _(c):
    return c.finetune("MODEL.BAD_KEY", "1"), ["MODEL.BAD_KEY"]


@case("config/pipeline unknown key")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nBENCH:\n  LRZ: [0.1]\n")
    return ["pipeline", "--config", cfg], [str(cfg), "LRZ"]


# -- CLI values ----------------------------------------------------------------------------------
@case("cli/pretrain DATA.NUM_WORKERS -1")
def _(c):
    return c.pretrain("DATA.NUM_WORKERS", "-1"), ["DATA.NUM_WORKERS", ">= 0"]


@case("cli/pretrain DATA.CHECK_IMAGES bogus")
def _(c):
    return c.pretrain("DATA.CHECK_IMAGES", "sometimes"), ["DATA.CHECK_IMAGES"]


@case("cli/pretrain OUTPUT_DIR is an existing file")
def _(c):
    c.file("run", "I am a file")
    return c.pretrain(), ["OUTPUT_DIR", str(c.tmp / "run"), "existing file"]


@case("cli/pretrain odd overrides")
def _(c):
    return c.pretrain("SOLVER.EPOCHS"), ["KEY VALUE pairs"]


@case("cli/finetune OUTPUT_DIR is an existing file")
def _(c):
    c.file("ft", "I am a file")
    return c.finetune(), ["OUTPUT_DIR", str(c.tmp / "ft")]


@case("cli/finetune missing weights")
def _(c):
    return c.finetune(weights=c.tmp / "nowhere.pkl"), [str(c.tmp / "nowhere.pkl"), "not found"]


@case("cli/bench --lrs not numbers")
def _(c):
    args = c.bench()
    args[args.index("--lrs") + 1] = "0.02,abc"
    return args, ["--lrs"]


@case("cli/bench unknown override leaves no folder")
def _(c):
    return c.bench("MODEL.BAD_KEY", "1"), ["MODEL.BAD_KEY"]


@case("cli/bench --metric bogus/AP")
def _(c):
    return c.bench("--metric", "bogus/AP"), ["--metric", "bogus/AP"]


@case("cli/report --out is a folder")
def _(c):
    c.file("b/bench.json", "{}")
    (c.tmp / "outdir").mkdir()
    return ["report", c.tmp / "b", "--out", c.tmp / "outdir"], [str(c.tmp / "outdir")]


@case("cli/report of a binary runs.jsonl")
def _(c):
    c.file("b/bench.json", json.dumps({"name": "x", "benchmark": "voc07_mini", "metric": "bbox/AP",
                                       "lrs": [0.02], "search": "full", "trials": 1}))
    runs = c.file("b/runs.jsonl", bytes(range(256)) * 8)
    return ["report", c.tmp / "b"], [str(runs), "line"]


@case("cli/data check --workers -1")
def _(c):
    return ["data", "check", "--images", c.synthetic / "unlabeled", "--workers", "-1"], ["--workers"]


@case("cli/data check --json is a folder")
def _(c):
    (c.tmp / "rep").mkdir()
    return (["data", "check", "--images", c.synthetic / "unlabeled", "--json", c.tmp / "rep"],
            ["--json", str(c.tmp / "rep"), "is a folder"])


def _tree(root):
    """Every path under ``root`` with its size and mtime: a refused command must leave it unchanged."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_line(name, tmp_path, synthetic, r18_pkl, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here and be caught
    ctx = Ctx(tmp_path, synthetic, r18_pkl)
    argv, expected = CASES[name](ctx)
    before = _tree(tmp_path)
    capsys.readouterr()
    status = cli_main(*argv)
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, (status, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), captured.err
    for text in expected:
        assert text in err_lines[0], (text, err_lines[0])
    assert not ctx.marker.exists(), "a payload was executed"
    assert _tree(tmp_path) == before, "the refused command created or changed files"


def test_corpus_covers_every_group():
    groups = {name.split("/")[0] for name in CASES}
    assert {"convert", "pretrain", "linear", "finetune", "bench", "tag", "config", "cli"} <= groups
    assert len(CASES) + len(DATA_CASES) >= 40


# -- data check: each corruption reported with its file and record -------------------------------
DATA_CASES: dict = {}
data_case = _registry(DATA_CASES)


def _coco(c, edit):
    """A copy of the generated COCO val json with ``edit(doc)`` applied; argv of data check on it."""
    doc = json.loads((c.synthetic / "coco/annotations/instances_val.json").read_text())
    edit(doc)
    path = c.file("bad.json", json.dumps(doc))
    return ["data", "check", "--coco", path, "--image-root", c.synthetic / "coco/val", "--workers", "0"], doc


def _voc(c, file_id_edit=None, split_text=None):
    root = c.tmp / "VOC2007"
    shutil.copytree(c.synthetic / "VOCdevkit/VOC2007", root)
    ids = (root / "ImageSets/Main/test.txt").read_text().split()
    if file_id_edit:
        xml = root / "Annotations" / f"{ids[0]}.xml"
        xml.write_text(file_id_edit(xml.read_text()))
    if split_text:
        (root / "ImageSets/Main/test.txt").write_text(split_text(ids))
    return ["data", "check", "--voc", root, "--split", "test", "--classes", "disk,square,triangle",
            "--workers", "0"], root / "Annotations" / f"{ids[0]}.xml", ids


def _replace_first_tag(xml, tag, value):
    start = xml.index(f"<{tag}>") + len(tag) + 2
    return xml[:start] + str(value) + xml[xml.index(f"</{tag}>", start):]


def _image_id(i):
    return lambda doc: f"image id {doc['images'][i]['id']}"


def _annotation_id(i):
    return lambda doc: f"annotation id {doc['annotations'][i]['id']}"


# name -> (section, index, field, value or fn(doc), finding, [fn(doc) or text naming the record])
_COCO_FIELD_EDITS = {
    "duplicate image id": ("images", 1, "id", lambda d: d["images"][0]["id"], "duplicate image id",
                           [_image_id(0), lambda d: d["images"][1]["file_name"]]),
    "duplicate annotation id": ("annotations", 1, "id", lambda d: d["annotations"][0]["id"],
                                "duplicate annotation id", [_annotation_id(0)]),
    "polygon with an odd number of values": ("annotations", 0, "segmentation", [[10, 10, 20, 10, 20, 20, 10]],
                                             "polygon with an odd number of values", [_annotation_id(0), "7 values"]),
    "segmentation that is a string": ("annotations", 2, "segmentation", "10 10 20 20", "segmentation is a string",
                                      [_annotation_id(2)]),
    "absolute file_name outside the image root": ("images", 0, "file_name", "/etc/hostname",
                                                  "file_name outside the image root", [_image_id(0), "/etc/hostname"]),
    "relative file_name escaping the image root": ("images", 0, "file_name", "../../secret.jpg",
                                                   "file_name outside the image root", ["../../secret.jpg"]),
    "header width differs from the image": ("images", 0, "width", 4000, "header size differs from the image",
                                            [_image_id(0), lambda d: f"says 4000x{d['images'][0]['height']}",
                                             "is 96x96"]),
    "zero-area box": ("annotations", 0, "bbox", [10, 10, 0, 5], "zero-area box", [_annotation_id(0)]),
    "annotation of an unknown image": ("annotations", 0, "image_id", 123456, "annotation of unknown image",
                                       ["image id 123456"]),
}
for _name, (_section, _index, _field, _value, _finding, _names) in _COCO_FIELD_EDITS.items():
    @data_case(f"coco/{_name}")
    def _(c, section=_section, index=_index, field=_field, value=_value, finding=_finding, names=_names):
        def edit(doc):
            doc[section][index][field] = value(doc) if callable(value) else value
        argv, doc = _coco(c, edit)
        return argv, finding, [n(doc) if callable(n) else n for n in names]


@data_case("coco/duplicate category name")
def _(c):
    def edit(doc):
        doc["categories"].append({"id": 99, "name": doc["categories"][0]["name"]})
    argv, doc = _coco(c, edit)
    return argv, "duplicate category name", [repr(doc["categories"][0]["name"]), "99"]


@data_case("coco/json that is binary")
def _(c):
    path = c.file("binary.json", bytes(range(256)))
    return (["data", "check", "--coco", path, "--image-root", c.synthetic / "coco/val"], "malformed JSON",
            [str(path)])


@data_case("voc/zero-area box")
def _(c):
    def edit(xml):
        xmin = xml.split("<xmin>")[1].split("<")[0]
        return _replace_first_tag(xml, "xmax", xmin)
    argv, xml, _ = _voc(c, edit)
    return argv, "zero-area box", [str(xml), "line "]


@data_case("voc/inverted box")
def _(c):
    argv, xml, _ = _voc(c, lambda x: _replace_first_tag(_replace_first_tag(x, "ymin", 60), "ymax", 20))
    return argv, "inverted box", [str(xml)]


@data_case("voc/header size differs from the image")
def _(c):
    argv, xml, ids = _voc(c, lambda x: _replace_first_tag(x, "width", 4000))
    return argv, "header size differs from the image", [str(xml), "says 4000x", f"{ids[0]}.jpg is 96x96"]


@data_case("voc/duplicate id in a split")
def _(c):
    argv, _, ids = _voc(c, split_text=lambda ids: "\n".join(ids + [ids[3]]) + "\n")
    return argv, "duplicate image id in split", [f"line {len(ids) + 1}: {ids[3]} (also line 4)"]


@data_case("voc/malformed XML")
def _(c):
    argv, xml, _ = _voc(c, lambda x: x[: len(x) // 2])
    return argv, "malformed XML", [str(xml)]


@data_case("images/truncated, empty, text and bomb files")
def _(c):
    folder = c.images("zz_cut.jpg", c.a_jpeg()[:400])
    (folder / "zz_empty.jpg").write_bytes(b"")
    (folder / "zz_notes.png").write_text("hello")
    png_bomb(folder / "zz_bomb.png")
    return (["data", "check", "--images", folder, "--workers", "2"], "unreadable image",
            ["zz_cut.jpg", "ERROR empty file: 1", "zz_empty.jpg", "ERROR not an image: 1", "zz_notes.png",
             "ERROR oversize image: 1", "zz_bomb.png: 400,000,000 pixels, over the decompression-bomb limit"])


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_data_check_reports_each_corruption_with_its_record(name, tmp_path, synthetic, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, kind, records = DATA_CASES[name](Ctx(tmp_path, synthetic, None))
    before = _tree(tmp_path)
    capsys.readouterr()
    status = cli_main(*argv)
    captured = capsys.readouterr()
    assert status == 2 and "Traceback" not in captured.out + captured.err, captured.out
    assert f"ERROR {kind}: " in captured.out, captured.out
    section = captured.out.split(f"ERROR {kind}: ", 1)[1]
    for text in records:
        assert text in captured.out, (text, captured.out)
    assert str(records[0]) in section or records[0] in captured.out
    assert _tree(tmp_path) == before


def test_clean_datasets_and_image_folders_pass(synthetic, capsys):
    assert cli_main("data", "check", "--images", synthetic / "unlabeled", "--workers", "2") == 0
    assert cli_main("data", "check", "--voc", synthetic / "VOCdevkit/VOC2007", "--classes", "disk,square,triangle") == 0
    assert cli_main("data", "check", "--coco", synthetic / "coco/annotations/instances_train.json",
                    "--image-root", synthetic / "coco/train") == 0
    assert capsys.readouterr().out.count("OK: no problems found") == 3


# -- images during training, leftovers, interruption, aggregation -------------------------------
def test_pretrain_scan_is_reported_with_its_time_and_skipped_above_the_limit(synthetic, tmp_path, capsys,
                                                                            monkeypatch):
    ctx = Ctx(tmp_path, synthetic, None)
    assert cli_main(*ctx.pretrain()) == 0
    out = capsys.readouterr().out
    assert "checked 96 images in DATA.TRAIN_DIR in " in out and "all decode" in out
    monkeypatch.setattr("pretrain.data.AUTO_SCAN_LIMIT", 10)
    folder = ctx.images("zz_cut.jpg", ctx.a_jpeg()[:400])
    # Above the limit the scan is opt-in: skipped (and said so) under auto, run under always.
    assert cli_main(*ctx.pretrain("DATA.CHECK_IMAGES", "always", "OUTPUT_DIR", tmp_path / "b",
                                  train_dir=folder)) == 2
    assert "zz_cut.jpg" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert cli_main(*ctx.pretrain("OUTPUT_DIR", tmp_path / "c", "SOLVER.EPOCHS", "1", train_dir=folder)) in (0, 2)
    assert "image check skipped: 97 images" in capsys.readouterr().out


def test_an_image_that_fails_to_decode_in_training_stops_the_run_naming_it(synthetic, tmp_path, capsys):
    """Policy (docs/reliability.md): with the scan off, a bad file stops training at once, one line, exit 2."""
    folder = tmp_path / "few"
    folder.mkdir()
    for src in sorted((synthetic / "unlabeled").rglob("*.jpg"))[:15]:
        shutil.copy(src, folder / src.name)
    (folder / "zz_cut.jpg").write_bytes(next(folder.glob("*.jpg")).read_bytes()[:400])
    ctx = Ctx(tmp_path, synthetic, None)
    args = ctx.pretrain("DATA.CHECK_IMAGES", "never", "DATA.NUM_WORKERS", "1", "SOLVER.MAX_ITERS_PER_EPOCH", "0",
                        train_dir=folder)
    assert cli_main(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "DataLoader worker" not in err, err
    assert f"{folder / 'zz_cut.jpg'}: unreadable image" in err
    assert not (tmp_path / "run" / "checkpoint_last.pth").exists()


def test_a_decompression_bomb_is_refused_by_name_when_opened(tmp_path):
    from simsiam_transfer.errors import UserError
    from simsiam_transfer.images import open_rgb

    bomb = png_bomb(tmp_path / "bomb.png")
    with pytest.raises(UserError, match=r"bomb\.png: oversize image \(400,000,000 pixels, over the "):
        open_rgb(bomb)


def test_pretrain_removes_its_own_stale_tmp_files(synthetic, tmp_path):
    ctx = Ctx(tmp_path, synthetic, None)
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint_last.pth.k1l2m3n4.tmp", run / ".metrics.jsonl.abcd_123.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    (run / "notes.tmp").write_text("not ours")
    assert cli_main(*ctx.pretrain()) == 0
    assert not any(p.exists() for p in stale) and (run / "notes.tmp").exists()
    assert not list(run.glob(".*.tmp"))


def test_convert_removes_its_own_stale_tmp_files_only(tmp_path):
    ctx = Ctx(tmp_path, None, None)
    src = ctx.r18_checkpoint()
    ours = [tmp_path / ".out.pkl.abcd1234.tmp", tmp_path / ".out.pkl.report.json.zz9_8x7w.tmp"]
    theirs = tmp_path / ".other.pkl.abcd1234.tmp"
    for path in [*ours, theirs]:
        path.write_bytes(b"partial")
    assert cli_main("convert", src, tmp_path / "out.pkl", "--no-verify") == 0
    assert not any(p.exists() for p in ours) and theirs.exists()


def test_killed_convert_leaves_no_tmp_after_the_next_run(tmp_path):
    src = tmp_path / "r50.pth"
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in torchvision_state(50).items()}}, src)
    out = tmp_path / "out.pkl"
    cmd = [sys.executable, "-m", "app.cli", "convert", str(src), str(out), "--no-verify"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".out.pkl.*.tmp")):
        time.sleep(0.002)
    assert proc.poll() is None, "convert finished before its write could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.pkl.*.tmp")) and not out.exists()  # killed mid-write
    rerun = run_cli("convert", src, out, "--no-verify")
    assert rerun.returncode == 0, rerun.stderr
    assert not list(tmp_path.glob(".*.tmp"))
    from simsiam_transfer.d2_weights import read_detectron2_pkl

    assert "res5.2.conv3.weight" in read_detectron2_pkl(out)["model"]


def test_detectron2_pkl_given_to_convert_is_one_complete_line(r18_pkl, tmp_path):
    proc = run_cli("convert", r18_pkl, tmp_path / "again.pkl")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Warning" not in proc.stderr and proc.stderr.rstrip().endswith("the pretraining checkpoint)")


def test_a_nan_metric_never_wins_the_lr_search():
    settings = {"name": "x", "benchmark": "voc07", "config": "c", "weights": "w", "metric": "bbox/AP",
                "lrs": [0.02, 0.05], "search": "full"}
    records = [{"id": "lr0.02_t0", "lr": 0.02, "trial": 0, "status": "done", "metrics": {"bbox/AP": float("nan")}},
               {"id": "lr0.05_t0", "lr": 0.05, "trial": 0, "status": "done", "metrics": {"bbox/AP": 5.4}}]
    summary = protocol.build_summary(settings, records)
    assert summary["selected_lr"] == 0.05
    assert summary["trials"]["failed"] == 1


def test_header_size_check_follows_exif_orientation_as_detectron2_does(tmp_path):
    from PIL import Image

    from detection.data_check import check_coco

    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: detectron2 reads it as 20 x 40
    (tmp_path / "img").mkdir()
    image.save(tmp_path / "img" / "a.jpg", exif=exif)

    def doc(width, height):
        return {"images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": height}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
                "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ok.json").write_text(json.dumps(doc(20, 40)))
    (tmp_path / "raw.json").write_text(json.dumps(doc(40, 20)))
    assert check_coco(tmp_path / "ok.json", tmp_path / "img").ok
    problems = check_coco(tmp_path / "raw.json", tmp_path / "img").problems
    assert list(problems) == ["header size differs from the image"]
    assert "says 40x20" in problems["header size differs from the image"][0]
