"""The bad-input corpus, continued: values that look right by their keys and are not.

Configs (duplicate keys, ``_BASE_`` cycles, deep nesting, alias bombs, non-mapping documents, list
elements of the wrong type), echoed values that would forge a second line, argparse errors, corrupt
annotation values (NaN boxes, undecodable RLE, ids that are lists, deeply nested json), a full disk,
broken launcher variables, and the mode of written files. Refusals follow ``test_bad_inputs``: exit
status 2, exactly one ``error:`` line on stderr naming the file, key or record, no traceback, nothing
created or changed.
"""

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from conftest import cli_main
from test_bad_inputs import Ctx, _tree

from simsiam_transfer import atomic
from simsiam_transfer.errors import UserError, error_line, escape_controls

D2_VOC = "detection/PascalVOC-Detection/faster_rcnn_R_18_C4_voc07_mini.yaml"
D2_COCO = "detection/COCO-InstanceSegmentation/mask_rcnn_R_18_C4_1x_mini.yaml"


def _registry(table):
    def register(name):
        def add(fn):
            table[name] = fn
            return fn
        return add
    return register


def _assert_one_line_refusal(status, captured, expected):
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, (status, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), captured.err
    for text in expected:
        assert text in err_lines[0], (text, err_lines[0])
    return err_lines[0]


# Each case: ctx -> (argv, [substrings the one stderr line must hold]).
CASES: dict = {}
case = _registry(CASES)


# -- configs: duplicate keys at any depth, in every kind of YAML the tool reads --------------------
@case("config/duplicate top-level key")
def _(c):
    cfg = c.file("dup.yaml", "SOLVER:\n  EPOCHS: 1\nMODEL:\n  DIM: 64\nSOLVER:\n  BATCH_SIZE: 16\n")
    return c.pretrain(config=cfg), [str(cfg), "line 5", "duplicate key SOLVER", "line 1"]


@case("config/duplicate nested key")
def _(c):
    cfg = c.file("dup.yaml", "SOLVER:\n  EPOCHS: 1\n  BATCH_SIZE: 16\n  EPOCHS: 3\n")
    return c.pretrain(config=cfg), [str(cfg), "duplicate key SOLVER.EPOCHS", "line 2"]


@case("config/duplicate key in a flow mapping")
def _(c):
    cfg = c.file("dup.yaml", "MODEL: {DIM: 64, PRED_DIM: 16, DIM: 128}\n")
    return c.pretrain(config=cfg), [str(cfg), "duplicate key MODEL.DIM"]


@case("config/duplicate key in a _BASE_ file")
def _(c):
    base = c.file("base.yaml", "SEED: 1\nSEED: 2\n")
    child = c.file("child.yaml", "_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 1\n")
    return c.pretrain(config=child), [str(base), "duplicate key SEED"]


@case("config/duplicate key in a detectron2 config")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nSOLVER:\n  BASE_LR: 0.1\n  BASE_LR: 0.2\n")
    return c.finetune(config=cfg), [str(cfg), "duplicate key SOLVER.BASE_LR"]


@case("config/duplicate dataset in a catalog")
def _(c):
    catalog = c.catalog(extra="synthetic_voc_test:\n  format: voc\n  root: /elsewhere\n  split: test\n"
                              "  classes: [a]\n")
    return c.finetune(datasets=catalog), [str(catalog), "duplicate key synthetic_voc_test"]


@case("config/duplicate key in a pipeline config")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nBENCH:\n  TRIALS: 1\n  TRIALS: 2\n")
    return ["pipeline", "--config", cfg], [str(cfg), "duplicate key BENCH.TRIALS"]


@case("config/duplicate key differing only in quoting")
def _(c):
    cfg = c.file("dup.yaml", "SEED: 1\n'SEED': 2\n")
    return c.pretrain(config=cfg), [str(cfg), "duplicate key SEED"]


# -- configs: _BASE_ cycles and broken bases -------------------------------------------------------
@case("config/_BASE_ pointing to itself")
def _(c):
    cfg = c.file("self.yaml", "_BASE_: self.yaml\nSEED: 1\n")
    return c.pretrain(config=cfg), ["_BASE_ cycle", f"{cfg} -> {cfg}"]


@case("config/_BASE_ cycle of two files")
def _(c):
    a = c.file("a.yaml", "_BASE_: b.yaml\n")
    c.file("b.yaml", "_BASE_: a.yaml\n")
    return c.pretrain(config=a), ["_BASE_ cycle", f"{a} -> {c.tmp / 'b.yaml'} -> {a}"]


@case("config/_BASE_ cycle of three files through a list and a subfolder")
def _(c):
    a = c.file("a.yaml", "_BASE_: [ok.yaml, sub/b.yaml]\n")
    c.file("ok.yaml", "SEED: 1\n")
    c.file("sub/b.yaml", "_BASE_: ../c.yaml\n")
    c.file("c.yaml", "_BASE_: a.yaml\n")
    return c.pretrain(config=a), ["_BASE_ cycle", "b.yaml -> ", "c.yaml -> ", "a.yaml"]


@case("config/_BASE_ cycle in a detectron2 config")
def _(c):
    cfg = c.file("d2.yaml", "_BASE_: d2.yaml\n")
    return c.finetune(config=cfg), ["_BASE_ cycle", str(cfg)]


@case("config/_BASE_ missing")
def _(c):
    cfg = c.file("child.yaml", "_BASE_: nowhere.yaml\n")
    return c.pretrain(config=cfg), [str(cfg), "_BASE_ nowhere.yaml", "file not found"]


@case("config/_BASE_ is a folder")
def _(c):
    (c.tmp / "folder").mkdir()
    cfg = c.file("child.yaml", "_BASE_: folder\n")
    return c.pretrain(config=cfg), [str(cfg), "_BASE_ folder", "not a file"]


@case("config/_BASE_ is a URL")
def _(c):
    cfg = c.file("child.yaml", "_BASE_: https://example.com/evil.yaml\n")
    return c.pretrain(config=cfg), [str(cfg), "files only"]


@case("config/_BASE_ is a mapping")
def _(c):
    cfg = c.file("child.yaml", "_BASE_: {a: 1}\n")
    return c.pretrain(config=cfg), [str(cfg), "_BASE_ must be a file name"]


@case("config/_BASE_ fan-out that would read files exponentially")
def _(c):
    for level in range(12):
        c.file(f"l{level}.yaml", f"_BASE_: [l{level + 1}.yaml, l{level + 1}.yaml]\n" if level < 11 else "SEED: 1\n")
    return c.pretrain(config=c.tmp / "l0.yaml"), [str(c.tmp / "l0.yaml"), "more than 64 files"]


# -- configs: shape (depth, aliases, size, documents) ----------------------------------------------
@case("config/nesting 40 levels deep")
def _(c):
    cfg = c.file("deep.yaml", "SOLVER:" + " {A:" * 40 + " 1" + "}" * 40 + "\n")
    return c.pretrain(config=cfg), [str(cfg), "nested deeper than 32 levels"]


@case("config/nesting 100000 levels deep (RecursionError in yaml)")
def _(c):
    cfg = c.file("deep.yaml", "SOLVER: " + "[" * 100_000 + "]" * 100_000 + "\n")
    return c.pretrain(config=cfg), [str(cfg), "nested deeper than 32 levels"]


@case("config/block nesting 50 levels deep")
def _(c):
    cfg = c.file("deep.yaml", "".join(f"{'  ' * i}K{i}:\n" for i in range(50)) + "  " * 50 + "x: 1\n")
    return c.pretrain(config=cfg), [str(cfg), "nested deeper than 32 levels"]


_LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * 9)}]\n" for i in range(9))


@case("config/billion laughs alias bomb")
def _(c):
    cfg = c.file("bomb.yaml", _LAUGHS + "SEED: 1\n")
    return c.pretrain(config=cfg), [str(cfg), "aliases are expanded"]


@case("config/billion laughs in a dataset catalog")
def _(c):
    catalog = c.catalog(extra=_LAUGHS.replace("l", "zz_l"))
    return c.finetune(datasets=catalog), [str(catalog), "aliases are expanded"]


@case("config/alias that contains itself")
def _(c):
    cfg = c.file("rec.yaml", "SOLVER: &s\n  EPOCHS: *s\n")
    return c.pretrain(config=cfg), [str(cfg), "SOLVER.EPOCHS", "nested deeper"]


@case("config/top level is a list")
def _(c):
    cfg = c.file("list.yaml", "- SOLVER.EPOCHS\n- 3\n")
    return c.pretrain(config=cfg), [str(cfg), "top level is a list", "mapping of KEY: value"]


@case("config/top level is a string")
def _(c):
    cfg = c.file("text.yaml", "just some words\n")
    return c.finetune(config=cfg), [str(cfg), "top level is str"]


@case("config/top level of a pipeline config is a number")
def _(c):
    cfg = c.file("pipe.yaml", "42\n")
    return ["pipeline", "--config", cfg], [str(cfg), "top level is int 42"]


@case("config/empty file")
def _(c):
    cfg = c.file("empty.yaml", "")
    return c.pretrain(config=cfg), [str(cfg), "empty config"]


@case("config/comments only")
def _(c):
    cfg = c.file("empty.yaml", "# SOLVER:\n#   EPOCHS: 3\n\n")
    return c.finetune(config=cfg), [str(cfg), "empty config"]


@case("config/empty _BASE_ file")
def _(c):
    base = c.file("base.yaml", "")
    child = c.file("child.yaml", "_BASE_: base.yaml\nSEED: 1\n")
    return c.pretrain(config=child), [str(base), "empty config"]


@case("config/two documents")
def _(c):
    cfg = c.file("two.yaml", "SEED: 1\n---\nSEED: 2\n")
    return c.pretrain(config=cfg), [str(cfg), "single document"]


@case("config/binary garbage for detectron2")
def _(c):
    cfg = c.file("garbage.yaml", bytes(range(255, -1, -1)) * 16)
    return c.finetune(config=cfg), [str(cfg), "not valid YAML"]


@case("config/NUL bytes in a pipeline config")
def _(c):
    cfg = c.file("nul.yaml", b"OUTPUT_DIR: x\x00y\n")
    return ["pipeline", "--config", cfg], [str(cfg), "not valid YAML"]


@case("config/a file over 16 MiB")
def _(c):
    cfg = c.file("huge.yaml", "# " + "x" * (17 * 2**20) + "\nSEED: 1\n")
    return c.pretrain(config=cfg), [str(cfg), "over 16 MiB"]


@case("config/a mapping key that is a list")
def _(c):
    cfg = c.file("key.yaml", "? [a, b]\n: 1\n")
    return c.pretrain(config=cfg), [str(cfg)]


@case("config/an integer of 5000 digits")
def _(c):
    cfg = c.file("big.yaml", "SEED: " + "9" * 5000 + "\n")
    return c.pretrain(config=cfg), [str(cfg), "a value YAML cannot build", "4300 digits"]


@case("config/a tagged value that does not convert")
def _(c):
    cfg = c.file("tag.yaml", 'SOLVER:\n  EPOCHS: !!int "many"\n')
    return c.finetune(config=cfg), [str(cfg), "a value YAML cannot build", "'many'"]


@case("config/a date and a set where numbers belong")
def _(c):
    cfg = c.file("types.yaml", "SEED: 2001-12-14\nSOLVER:\n  EPOCHS: !!set {a, b}\n")
    return c.pretrain(config=cfg), [str(cfg), "SEED", "not a valid type"]


# -- configs: sections, scalars and list elements of the wrong type --------------------------------
@case("config/a section where a value belongs")
def _(c):
    cfg = c.file("types.yaml", "SOLVER:\n  EPOCHS:\n    VALUE: 3\n")
    return c.pretrain(config=cfg), [str(cfg), "SOLVER.EPOCHS", "a single value belongs here"]


@case("config/a value where a section belongs")
def _(c):
    cfg = c.file("types.yaml", "SOLVER: 3\n")
    return c.pretrain(config=cfg), [str(cfg), "SOLVER", "a section (KEY: value lines) belongs here"]


@case("config/a section over a base file's value")
def _(c):
    base = c.file("base.yaml", "SOLVER:\n  EPOCHS: 3\n")
    child = c.file("child.yaml", "_BASE_: base.yaml\nSOLVER:\n  EPOCHS: {N: 4}\n")
    return c.pretrain(config=child), [str(child), "SOLVER.EPOCHS is a section", str(base)]


@case("config/wrong type reported in the _BASE_ file that holds it")
def _(c):
    base = c.file("base.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nSOLVER:\n  STEPS: [later]\n")
    child = c.file("child.yaml", "_BASE_: base.yaml\nSEED: 1\n")
    return c.finetune(config=child), [str(base), "SOLVER.STEPS", "element 0 is str 'later'", "integers"]


@case("config/DATASETS.TRAIN of numbers")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nDATASETS:\n  TRAIN: [1, 2]\n")
    return c.finetune(config=cfg), [str(cfg), "DATASETS.TRAIN", "element 0 is int 1", "strings"]


@case("config/DATASETS.TEST through an alias to a mapping")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nx: &m {{a: 1}}\nDATASETS:\n  TEST: [*m]\n")
    return c.finetune(config=cfg), [str(cfg), "DATASETS.TEST", "element 0 is a section"]


@case("config/DATASETS.TRAIN through an alias to numbers")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nnums: &n [7, 8]\nDATASETS:\n  TRAIN: *n\n")
    return c.finetune(config=cfg), [str(cfg), "DATASETS.TRAIN", "element 0 is int 7"]


@case("config/SOLVER.STEPS of strings")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nSOLVER:\n  STEPS: [a]\n")
    return c.finetune(config=cfg), [str(cfg), "SOLVER.STEPS", "element 0 is str 'a'"]


@case("config/SOLVER.STEPS of floats")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nSOLVER:\n  STEPS: [100.5]\n")
    return c.finetune(config=cfg), [str(cfg), "SOLVER.STEPS", "integers"]


@case("config/MODEL.PIXEL_MEAN with a null")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nMODEL:\n  PIXEL_MEAN: [1.0, null, 3.0]\n")
    return c.finetune(config=cfg), [str(cfg), "MODEL.PIXEL_MEAN", "element 1 is NoneType None"]


@case("config/anchor SIZES with a string inside the inner list")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nMODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [[32, big]]\n")
    return c.finetune(config=cfg), [str(cfg), "MODEL.ANCHOR_GENERATOR.SIZES", "element 1 is str 'big'"]


@case("config/booleans where integers belong")
def _(c):
    cfg = c.file("d2.yaml", f"_BASE_: {c.shipped(D2_VOC)}\nINPUT:\n  MIN_SIZE_TRAIN: [true]\n")
    return c.finetune(config=cfg), [str(cfg), "INPUT.MIN_SIZE_TRAIN", "bool True"]


@case("config/override DATASETS.TRAIN of numbers")
def _(c):
    return c.finetune("DATASETS.TRAIN", "(1, 2)"), ["override DATASETS.TRAIN", "element 0 is int 1"]


@case("config/override SOLVER.STEPS of strings")
def _(c):
    return c.finetune("SOLVER.STEPS", "('a',)"), ["override SOLVER.STEPS", "element 0 is str 'a'"]


@case("config/override with a section where a value belongs")
def _(c):
    return c.pretrain("SOLVER.BASE_LR", "{'a': 1}"), ["override SOLVER.BASE_LR", "a single value belongs here"]


@case("config/override nested 100 levels deep")
def _(c):
    return c.pretrain("SOLVER.EPOCHS", "[" * 100 + "]" * 100), ["override SOLVER.EPOCHS", "nested deeper"]


@case("config/pipeline SWEEP.LRS of strings")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nSWEEP:\n  LRS: [0.02, fast]\n")
    return ["pipeline", "--config", cfg], [str(cfg), "SWEEP.LRS", "element 1 is str 'fast'"]


@case("config/pipeline BENCH.BENCHMARKS of numbers")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nBENCH:\n  BENCHMARKS: [7]\n")
    return ["pipeline", "--config", cfg], [str(cfg), "BENCH.BENCHMARKS", "element 0 is int 7"]


@case("config/pipeline smoke benchmark not benchmarked")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nROWS:\n  s:\n    WEIGHTS: none\nBENCH:\n  BENCHMARKS: [voc07_mini]\n"
                              "  SMOKE: [coco_1x_mini]\n")
    return ["pipeline", "--config", cfg], [str(cfg), "BENCH.SMOKE coco_1x_mini: not in BENCH.BENCHMARKS"]


@case("config/pipeline SWEEP.SMOKE set for every benchmark")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nROWS:\n  s:\n    WEIGHTS: none\nSWEEP:\n  SMOKE: True\n")
    return ["pipeline", "--config", cfg], ["SWEEP.SMOKE", "the pipeline sets it for each row and benchmark"]


@case("config/pipeline row pretraining keys of the wrong type")
def _(c):
    cfg = c.file("pipe.yaml", "OUTPUT_DIR: x\nROWS:\n  r:\n    PRETRAIN:\n      CONFIG: pretrain/simsiam_R_18_mini.yaml\n"
                              "      CFG:\n        SOLVER:\n          EPOCHS: {a: 1}\n")
    return ["pipeline", "--config", cfg], ["ROWS.r", "SOLVER.EPOCHS", "a single value belongs here"]


# -- values echoed in a message stay on one line (log injection) -----------------------------------
_FORGED = "\nerror: all good, nothing to see"


@case("log/newline in a checkpoint name")
def _(c):
    return c.convert(c.tmp / f"ckpt{_FORGED}.pth"), ["ckpt\\nerror: all good", "not found"]


@pytest.mark.parametrize("char", ["\r", "\x1b[2K", "\u2028", "\x85", "\x0b", "\u202e"])
def test_control_characters_are_escaped(char):
    line = error_line(f"name{char}tail")
    assert len(line.splitlines()) == 1 and line.isprintable() and line.startswith("error: name\\")


for _name, _char in {"carriage return": "\r", "terminal escape": "\x1b[1A\x1b[2K",
                     "unicode line separator": "\u2028", "C1 next line": "\x85"}.items():
    @case(f"log/{_name} in a config name")
    def _(c, char=_char):
        return c.pretrain(config=f"missing{char}error: forged.yaml"), ["missing\\", "config file not found"]


@case("log/newline in an override key")
def _(c):
    return c.pretrain(f"MODEL.NOPE{_FORGED}", "1"), ["MODEL.NOPE\\nerror: all good"]


@case("log/newline in a YAML key")
def _(c):
    cfg = c.file("k.yaml", 'SOLVER:\n  "EPOCHS\\nerror: forged": 1\n')
    return c.pretrain(config=cfg), [str(cfg), "EPOCHS\\nerror: forged"]


@case("log/newline in a dataset name")
def _(c):
    return c.finetune("DATASETS.TEST", "('voc\\nerror: all good',)"), ["unknown dataset", "voc\\nerror: all good"]


# -- argparse: one line, exit 2 -------------------------------------------------------------------
@case("argparse/unknown command")
def _(c):
    return ["frobnicate"], ["simsiam-transfer", "invalid choice: 'frobnicate'", "--help"]


@case("argparse/missing required arguments")
def _(c):
    return ["convert"], ["simsiam-transfer convert", "required", "input"]


@case("argparse/unknown option")
def _(c):
    return ["report", c.tmp, "--colour", "red"], ["unrecognized arguments: --colour red"]


@case("argparse/bad choice")
def _(c):
    return ["convert", "a.pth", "b.pkl", "--format", "onnx"], ["--format", "invalid choice: 'onnx'"]


@case("argparse/not an integer")
def _(c):
    return ["data", "check", "--images", c.tmp, "--workers", "many"], ["--workers", "invalid int value: 'many'"]


@case("argparse/newline in a bad choice")
def _(c):
    return ["convert", "a.pth", "b.pkl", "--format", f"onnx{_FORGED}"], ["onnx\\nerror: all good"]


@case("argparse/no command at all")
def _(c):
    return [], ["simsiam-transfer", "required"]


def _shipped(name):
    from simsiam_transfer.config import resolve_config

    return resolve_config(name).resolve()


class ValueCtx(Ctx):
    shipped = staticmethod(_shipped)

    def catalog(self, extra=""):
        text = (self.synthetic / "datasets.yaml").read_text()
        text = text.replace("root: ", f"root: {self.synthetic}/").replace("json: ", f"json: {self.synthetic}/")
        text = text.replace("image_root: ", f"image_root: {self.synthetic}/")
        return self.file("catalog.yaml", text + extra)

    def finetune(self, *extra, config=D2_VOC, weights=None, datasets=None):
        args = super().finetune(*extra, config=config, weights=weights)
        if datasets:
            args[args.index("--datasets") + 1] = datasets
        return args


@pytest.mark.parametrize("name", list(CASES))
def test_bad_value_is_refused_with_one_line(name, tmp_path, synthetic, r18_pkl, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = ValueCtx(tmp_path, synthetic, r18_pkl)
    argv, expected = CASES[name](ctx)
    before = _tree(tmp_path)
    capsys.readouterr()
    status = cli_main(*argv)
    _assert_one_line_refusal(status, capsys.readouterr(), expected)
    assert _tree(tmp_path) == before, "the refused command created or changed files"


def test_corpus_of_values_covers_every_class():
    groups = {name.split("/")[0] for name in CASES} | {name.split("/")[0] for name in DATA_CASES}
    assert {"config", "log", "argparse", "coco", "voc"} <= groups
    assert len(CASES) + len(DATA_CASES) + len(PREFLIGHT_CASES) >= 100


def test_help_still_exits_0(capsys):
    assert cli_main("convert", "--help") == 0
    assert "usage: simsiam-transfer convert" in capsys.readouterr().out


# -- annotation values: data check reports each record, fine-tuning refuses before training -------
def _coco_doc(c):
    return json.loads((c.synthetic / "coco/annotations/instances_val.json").read_text())


def _coco_text(c, edit):
    doc = _coco_doc(c)
    edit(doc)
    return json.dumps(doc)


# A valid compressed RLE of a 200x200 mask: given as a 96x96 one, it runs past the mask.
_RLE_200x200 = mask_util.encode(np.asfortranarray(np.ones((200, 200), np.uint8)))["counts"].decode()

# name -> (edit(doc) or raw json text(doc), finding, [texts naming the record])
_COCO = {
    "bbox NaN": (lambda d: d["annotations"][3]["bbox"].__setitem__(0, float("nan")), "non-finite number",
                 ["annotation id {a3}", "bbox[0] is nan"]),
    "bbox Infinity": (lambda d: d["annotations"][0]["bbox"].__setitem__(2, float("inf")), "non-finite number",
                      ["annotation id {a0}", "bbox[2] is inf"]),
    "bbox -Infinity": (lambda d: d["annotations"][1]["bbox"].__setitem__(1, float("-inf")), "non-finite number",
                       ["annotation id {a1}", "bbox[1] is -inf"]),
    "bbox of 1e400 (parsed as Infinity)": ('"bbox": [1e400, 1, 2, 3]', "non-finite number", ["bbox[0] is inf"]),
    "bbox value a string": (lambda d: d["annotations"][2]["bbox"].__setitem__(3, "12"), "not a number",
                            ["annotation id {a2}", "bbox[3] is '12'"]),
    "bbox value a boolean": (lambda d: d["annotations"][2]["bbox"].__setitem__(3, True), "not a number",
                             ["annotation id {a2}", "bbox[3] is True"]),
    "bbox of three values": (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), "malformed bbox",
                             ["annotation id {a0}", "a list of 3 value(s)"]),
    "bbox null": (lambda d: d["annotations"][0].__setitem__("bbox", None), "malformed bbox", ["annotation id {a0}"]),
    "bbox nested lists": (lambda d: d["annotations"][0].__setitem__("bbox", [[1], [2], [3], [4]]), "not a number",
                          ["annotation id {a0}", "bbox[0] is a list"]),
    "bbox of negative width": (lambda d: d["annotations"][0].__setitem__("bbox", [10, 10, -5, 5]), "inverted box",
                               ["annotation id {a0}"]),
    "bbox beyond the image width": (lambda d: d["annotations"][0].__setitem__("bbox", [90, 10, 20, 5]),
                                    "box outside the image", ["annotation id {a0}"]),
    "area NaN": (lambda d: d["annotations"][0].__setitem__("area", float("nan")), "non-finite number",
                 ["annotation id {a0}", "area is nan"]),
    "iscrowd 2": (lambda d: d["annotations"][0].__setitem__("iscrowd", 2), "malformed annotation",
                  ["annotation id {a0}", "iscrowd is 2"]),
    "category_id not in categories": (lambda d: d["annotations"][0].__setitem__("category_id", 77), "unknown class",
                                      ["annotation id {a0}", "category 77"]),
    "image width NaN": (lambda d: d["images"][0].__setitem__("width", float("nan")), "non-finite number",
                        ["image id {i0}", "width is nan"]),
    "image height Infinity": (lambda d: d["images"][1].__setitem__("height", float("inf")), "non-finite number",
                              ["image id {i1}", "height is inf"]),
    "image width 0": (lambda d: d["images"][0].__setitem__("width", 0), "bad image size",
                      ["image id {i0}", "width is 0"]),
    "image height negative": (lambda d: d["images"][0].__setitem__("height", -96), "bad image size",
                              ["image id {i0}", "height is -96"]),
    "image width fractional": (lambda d: d["images"][0].__setitem__("width", 95.5), "bad image size",
                               ["image id {i0}", "width is 95.5"]),
    "image width a string": (lambda d: d["images"][0].__setitem__("width", "96"), "not a number",
                             ["image id {i0}", "width is '96'"]),
    "image width of 5000 digits": ('"width": 1' + "0" * 5000, "malformed JSON", ["4300 digits"]),
    "image id a list": (lambda d: d["images"][2].__setitem__("id", [1, 2]), "malformed id",
                        ["images[2]", "id is a list of 2 value(s)"]),
    "image id an object": (lambda d: d["images"][2].__setitem__("id", {"id": 1}), "malformed id",
                           ["images[2]", "id is an object"]),
    "image id a string": (lambda d: d["images"][2].__setitem__("id", "3"), "malformed id", ["images[2]", "'3'"]),
    "image id a float": (lambda d: d["images"][2].__setitem__("id", 1.5), "malformed id", ["images[2]", "1.5"]),
    "image id NaN": (lambda d: d["images"][2].__setitem__("id", float("nan")), "malformed id", ["images[2]", "nan"]),
    "image id null": (lambda d: d["images"][2].__setitem__("id", None), "malformed id", ["images[2]", "None"]),
    "image file_name a list": (lambda d: d["images"][0].__setitem__("file_name", ["a.jpg"]), "malformed image entry",
                               ["image id {i0}", "file_name is a list"]),
    "image entry a number": (lambda d: d["images"].__setitem__(0, 5), "malformed image entry", ["images[0]"]),
    "annotation id a list": (lambda d: d["annotations"][4].__setitem__("id", [9]), "malformed id",
                             ["annotations[4]", "id is a list"]),
    "annotation image_id a list": (lambda d: d["annotations"][4].__setitem__("image_id", [1]), "malformed id",
                                   ["annotations[4]", "image_id is a list"]),
    "annotation category_id an object": (lambda d: d["annotations"][4].__setitem__("category_id", {"id": 1}),
                                         "malformed id", ["annotations[4]", "category_id is an object"]),
    "annotation a string": (lambda d: d["annotations"].__setitem__(4, "box"), "malformed annotation",
                            ["annotations[4]", "'box'"]),
    "category id a list": (lambda d: d["categories"][0].__setitem__("id", [1]), "malformed id",
                           ["categories[0]", "id is a list"]),
    "duplicate category id": (lambda d: d["categories"].append({"id": 1, "name": "again"}), "duplicate category id",
                              ["category id 1"]),
    "RLE counts that do not decode": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [96, 96], "counts": "\u00ff\u00fe garbage ~~~~"}), "undecodable RLE segmentation",
        ["annotation id {a0}"]),
    "RLE counts that run past the mask": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [96, 96], "counts": _RLE_200x200}), "undecodable RLE segmentation", ["annotation id {a0}"]),
    "RLE counts that stop short": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [96, 96], "counts": "03"}), "undecodable RLE segmentation",
        ["annotation id {a0}", "do not describe exactly a 96x96 mask"]),
    "RLE count list that does not add up": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [96, 96], "counts": [10, 20]}), "undecodable RLE segmentation",
        ["annotation id {a0}", "cover 30 pixels", "9216"]),
    "RLE count list with a negative count": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [96, 96], "counts": [9226, -10]}), "undecodable RLE segmentation",
        ["annotation id {a0}"]),
    "RLE of another size than its image": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [100000, 100000], "counts": "PPYo1"}), "undecodable RLE segmentation",
        ["annotation id {a0}", "[100000, 100000]"]),
    "RLE size that is a string": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": "96x96", "counts": "PPYo1"}), "malformed segmentation", ["annotation id {a0}"]),
    "RLE counts null": (lambda d: d["annotations"][0].__setitem__(
        "segmentation", {"size": [96, 96], "counts": None}), "malformed segmentation", ["annotation id {a0}"]),
    "polygon of two points": (lambda d: d["annotations"][1].__setitem__("segmentation", [[1, 1, 5, 5]]),
                              "polygon with fewer than 3 points", ["annotation id {a1}", "4 values"]),
    "polygon with NaN": (lambda d: d["annotations"][1].__setitem__("segmentation", [[1, 1, 5, float("nan"), 9, 1]]),
                         "non-finite number", ["annotation id {a1}", "polygon 0 value 3 is nan"]),
    "polygon with a string": (lambda d: d["annotations"][1].__setitem__("segmentation", [[1, 1, 5, "5", 9, 1]]),
                              "malformed segmentation", ["annotation id {a1}", "polygon 0"]),
    "polygon nested a level too deep": (lambda d: d["annotations"][1].__setitem__("segmentation", [[[1, 1, 5, 5, 9, 1]]]),
                                        "malformed segmentation", ["annotation id {a1}"]),
    "segmentation a number": (lambda d: d["annotations"][1].__setitem__("segmentation", 5), "malformed segmentation",
                              ["annotation id {a1}"]),
    "deeply nested JSON": (lambda d: "[" * 100_000 + "]" * 100_000, "malformed JSON", ["nested too deeply"]),
    "deeply nested JSON inside an image entry": (
        lambda d: json.dumps(d).replace('"images": [', '"images": [' + "[" * 50_000 + "]" * 50_000 + ", ", 1),
        "malformed JSON", ["nested too deeply"]),
    "images not a list": (lambda d: d.__setitem__("images", {"1": {}}), "malformed JSON", ["needs lists"]),
}


def _coco_case(c, edit):
    doc = _coco_doc(c)
    if isinstance(edit, str):  # a raw fragment spliced into the text: values json.dumps would not write
        key = edit.split(":")[0]
        text = json.dumps(doc)
        start = text.index(key + ":")
        end = text.index("]" if edit.split(":")[1].strip().startswith("[") else ",", start)
        text = text[:start] + edit + text[end + (1 if text[end] == "]" else 0):]
    else:
        result = edit(doc)
        text = result if isinstance(result, str) else json.dumps(doc)
    path = c.file("bad.json", text)
    names = {f"{prefix}{i}": record.get("id") if isinstance(record, dict) else None
             for prefix, section in (("a", "annotations"), ("i", "images")) if isinstance(doc[section], list)
             for i, record in enumerate(doc[section][:5])}
    return path, names


DATA_CASES: dict = {}
data_case = _registry(DATA_CASES)
for _name, (_edit, _kind, _texts) in _COCO.items():
    @data_case(f"coco/{_name}")
    def _(c, edit=_edit, kind=_kind, texts=_texts):
        path, names = _coco_case(c, edit)
        argv = ["data", "check", "--coco", path, "--image-root", c.synthetic / "coco/val", "--workers", "0"]
        return argv, kind, [str(path)] + [t.format(**names) for t in texts]


@data_case("coco/file_name that forges a report line")
def _(c):
    path, _ = _coco_case(c, lambda d: d["images"][0].__setitem__("file_name", "x.jpg\nOK: no problems found\x1b[2J"))
    argv = ["data", "check", "--coco", path, "--image-root", c.synthetic / "coco/val", "--workers", "0"]
    return argv, "missing image", ["x.jpg\\nOK: no problems found\\x1b[2J"]


def _voc_case(c, edit):
    root = c.tmp / "VOC2007"
    shutil.copytree(c.synthetic / "VOCdevkit/VOC2007", root)
    first = (root / "ImageSets/Main/test.txt").read_text().split()[0]
    xml = root / "Annotations" / f"{first}.xml"
    xml.write_text(edit(xml.read_text()))
    return root, xml


def _set_tag(tag, value):
    def edit(xml):
        start = xml.index(f"<{tag}>") + len(tag) + 2
        return xml[:start] + str(value) + xml[xml.index(f"</{tag}>", start):]
    return edit


_VOC = {
    "xmin nan": (_set_tag("xmin", "nan"), "non-finite number", ["line ", "<xmin> is 'nan'"]),
    "xmax inf": (_set_tag("xmax", "inf"), "non-finite number", ["<xmax> is 'inf'"]),
    "ymin -Infinity": (_set_tag("ymin", "-Infinity"), "non-finite number", ["<ymin> is '-Infinity'"]),
    "ymax 1e999": (_set_tag("ymax", "1e999"), "non-finite number", ["<ymax> is '1e999'"]),
    "xmin not a number": (_set_tag("xmin", "left"), "malformed XML", ["<xmin> is 'left'"]),
    "width 0": (_set_tag("width", "0"), "bad image size", ["<size> is 0x"]),
    "height negative": (_set_tag("height", "-96"), "bad image size", ["x-96"]),
    "xmax beyond the image": (_set_tag("xmax", "500"), "box outside the image", ["500"]),
}
for _name, (_edit, _kind, _texts) in _VOC.items():
    @data_case(f"voc/{_name}")
    def _(c, edit=_edit, kind=_kind, texts=_texts):
        root, xml = _voc_case(c, edit)
        argv = ["data", "check", "--voc", root, "--split", "test", "--classes", "disk,square,triangle", "--workers", "0"]
        return argv, kind, [str(xml)] + texts


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_data_check_reports_each_corrupt_value_with_its_record(name, tmp_path, synthetic, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, kind, records = DATA_CASES[name](ValueCtx(tmp_path, synthetic, None))
    before = _tree(tmp_path)
    capsys.readouterr()
    status = cli_main(*argv)
    captured = capsys.readouterr()
    assert status == 2 and "Traceback" not in captured.out + captured.err, captured.out + captured.err
    assert f"ERROR {kind}: " in captured.out, captured.out
    section = captured.out.split(f"ERROR {kind}: ", 1)[1]
    for text in records:
        assert text in section, (text, captured.out)
    assert not any(line.startswith(("OK", "ERROR forged")) for line in captured.out.splitlines())
    assert _tree(tmp_path) == before


# The same corruption given to finetune: refused by the pre-flight, before OUTPUT_DIR exists.
PREFLIGHT_CASES = ["coco/bbox NaN", "coco/image width NaN", "coco/image id a list", "coco/annotation image_id a list",
                   "coco/RLE counts that do not decode", "coco/RLE counts that stop short",
                   "coco/polygon of two points", "coco/deeply nested JSON", "coco/category_id not in categories",
                   "voc/xmin nan", "voc/width 0"]


@pytest.mark.parametrize("name", PREFLIGHT_CASES)
def test_finetune_refuses_corrupt_annotations_before_training(name, tmp_path, synthetic, r18_pkl, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = ValueCtx(tmp_path, synthetic, r18_pkl)
    argv, kind, records = DATA_CASES[name](ctx)
    if name.startswith("coco/"):
        bad = argv[argv.index("--coco") + 1]
        catalog = ctx.file("cat.yaml", "".join(
            f"synthetic_coco_{split}:\n  format: coco\n  json: {bad}\n  image_root: {synthetic / 'coco/val'}\n"
            for split in ("train", "val")))
        args = ctx.finetune(config=D2_COCO, datasets=catalog)
    else:
        root = argv[argv.index("--voc") + 1]
        catalog = ctx.file("cat.yaml", "".join(
            f"synthetic_voc_{split}:\n  format: voc\n  root: {root}\n  split: {split}\n  classes: [disk, square, triangle]\n"
            for split in ("trainval", "test")))
        args = ctx.finetune(datasets=catalog)
    before = _tree(tmp_path)
    capsys.readouterr()
    status = cli_main(*args)
    line = _assert_one_line_refusal(status, capsys.readouterr(), records)
    assert kind.replace("JSON", "COCO json") in line and "data check" in line
    assert _tree(tmp_path) == before and not (tmp_path / "ft").exists()


# -- a full disk: one line, the previous file kept, no partial file --------------------------------
def _no_space(code=errno.ENOSPC):
    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, os.PathLike)) or hasattr(a, "write"))
        if hasattr(target, "write"):
            target.write(b"\0" * 4096)
        else:
            with open(target, "wb") as f:
                f.write(b"\0" * 4096)
        raise OSError(code, os.strerror(code))
    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("fmt", ["detectron2", "torchvision"])
def test_disk_full_during_convert_is_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch, code, fmt):
    ctx = Ctx(tmp_path, None, None)
    src = ctx.r18_checkpoint()
    out = tmp_path / "out.pkl"
    out.write_bytes(b"the previous good weights")
    monkeypatch.setattr(pickle if fmt == "detectron2" else torch, "dump" if fmt == "detectron2" else "save",
                        _no_space(code))
    status = cli_main("convert", src, out, "--no-verify", "--format", fmt)
    line = _assert_one_line_refusal(status, capsys.readouterr(), [str(out), os.strerror(code), "needs about",
                                                                   " MB", "free in", "unchanged"])
    assert "44." in line or "46." in line  # a ResNet-18 backbone: about 45 MB of float32
    assert out.read_bytes() == b"the previous good weights"
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "out.pkl.report.json").exists()


def test_disk_full_during_a_pretraining_checkpoint_keeps_the_last_one(synthetic, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, synthetic, None)
    assert cli_main(*ctx.pretrain()) == 0
    last = tmp_path / "run" / "checkpoint_last.pth"
    saved = last.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(torch, "save", _no_space())
    status = cli_main(*ctx.pretrain("SOLVER.EPOCHS", "2"))
    err = capsys.readouterr().err
    # The epoch's progress bar shares stderr (it ends in "\r"); the error is the one line after it.
    errors = [part for part in err.replace("\r", "\n").splitlines() if part.strip().startswith("error:")]
    assert status == 2 and "Traceback" not in err and len(errors) == 1, err
    for text in (str(last), "No space left on device", "needs about", "free in", "unchanged"):
        assert text in errors[0], (text, errors[0])
    assert last.read_bytes() == saved
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_write_error_other_than_space_is_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _no_space(errno.EIO))
    with pytest.raises(OSError) as err:
        atomic.torch_save({"w": torch.zeros(3)}, tmp_path / "x.pth")
    assert err.value.errno == errno.EIO and not list(tmp_path.iterdir())


def test_payload_bytes_counts_shared_storage_once():
    weight = torch.zeros(1000)
    assert atomic.payload_bytes({"a": weight, "b": weight[:10], "c": [weight]}) == 4000


# -- launcher variables: one line before anything is written ---------------------------------------
LAUNCH_ENVS = {
    "RANK not a number": ({"RANK": "zero", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["RANK='zero'"]),
    "WORLD_SIZE not a number": ({"RANK": "0", "WORLD_SIZE": "2x"}, ["WORLD_SIZE='2x'"]),
    "LOCAL_RANK negative": ({"LOCAL_RANK": "-1"}, ["LOCAL_RANK='-1'"]),
    "WORLD_SIZE 0": ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE='0'", ">= 1"]),
    "RANK beyond WORLD_SIZE": ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
                               ["rank 2 does not exist", "world of 2"]),
    "WORLD_SIZE without MASTER_ADDR": ({"RANK": "0", "WORLD_SIZE": "2"}, ["MASTER_ADDR and MASTER_PORT not set"]),
    "WORLD_SIZE without MASTER_PORT": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, ["MASTER_PORT not set"]),
    "MASTER_PORT not a number": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
                                 ["MASTER_PORT='http'"]),
    "WORLD_SIZE alone": ({"WORLD_SIZE": "4"}, ["WORLD_SIZE is set but RANK is not"]),
    "RANK alone": ({"RANK": "3"}, ["RANK is set but WORLD_SIZE is not"]),
    "SLURM_NTASKS not a number": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "eight"}, ["SLURM_NTASKS='eight'"]),
    "SLURM_STEP_NUM_TASKS not a number": ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "two"},
                                          ["SLURM_STEP_NUM_TASKS='two'"]),
    "SLURM_PROCID beyond the step": ({"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "h"},
                                     ["SLURM_PROCID=9 SLURM_STEP_NUM_TASKS=2"]),
    "SLURM_NTASKS outside an srun step": ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"},
                                          ["SLURM_NTASKS=4 but this process is not a task of an srun step"]),
    "newline in RANK": ({"RANK": "0\nerror: forged", "WORLD_SIZE": "1"}, ["RANK='0\\nerror: forged'"]),
}


@pytest.mark.parametrize("name", list(LAUNCH_ENVS))
def test_broken_launcher_variables_are_one_line(name, synthetic, tmp_path, capsys, monkeypatch):
    env, expected = LAUNCH_ENVS[name]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    status = cli_main(*Ctx(tmp_path, synthetic, None).pretrain())
    _assert_one_line_refusal(status, capsys.readouterr(), expected)
    assert not (tmp_path / "run").exists()


def test_launch_env_accepts_what_torchrun_and_srun_set():
    from pretrain.distributed import LaunchEnv, launch_env

    assert launch_env({}) == LaunchEnv()
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) == LaunchEnv()  # single-process torchrun
    assert launch_env({"WORLD_SIZE": "1"}) == LaunchEnv()
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch_env(torchrun) == LaunchEnv(3, 4, 3)
    with pytest.raises(UserError):
        launch_env({**torchrun, "LOCAL_RANK": "x"})


# -- files honour the umask (shared labs) ----------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700)])
def test_written_files_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "report.json", {"a": 1})
        atomic.torch_save({"w": torch.zeros(2)}, tmp_path / "ckpt.pth")
        with atomic.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(old)
    for name in ("report.json", "ckpt.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == file_mode, name
    assert (tmp_path / "folder").stat().st_mode & 0o777 == dir_mode


def test_converted_weights_are_readable_by_the_group_under_umask_022(tmp_path):
    src = Ctx(tmp_path, None, None).r18_checkpoint()
    old = os.umask(0o022)
    try:
        assert cli_main("convert", src, tmp_path / "w.pkl", "--no-verify") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "w.pkl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "w.pkl.report.json").stat().st_mode & 0o777 == 0o644


def test_escape_controls_leaves_ordinary_text_alone():
    text = "/data/Ünïcode path/ツ.jpg: bbox [1, 2] — fine"
    assert escape_controls(text) == text


def test_a_checkpoint_whose_config_text_is_hostile_still_converts(tmp_path, capsys):
    """The config text inside a pretraining checkpoint is only informative: a YAML bomb or 100,000
    nested brackets there are ignored, not a RecursionError."""
    src = Ctx(tmp_path, None, None).r18_checkpoint()
    for index, text in enumerate(["[" * 100_000, _LAUGHS]):
        payload = torch.load(src, weights_only=True)
        payload.update(history=[{"epoch": 1, "loss": -0.5, "z_std": 0.02, "lr": 0.05}], config=text)
        torch.save(payload, src)
        assert cli_main("convert", src, tmp_path / f"out{index}.pkl", "--no-verify") == 0, capsys.readouterr().err


def test_a_disk_too_full_for_the_temporary_file_is_one_line(tmp_path, monkeypatch):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "open", no_inode)
    with pytest.raises(UserError, match=r"weights\.pkl: could not be written: No space left on device \(needs "
                                        r"about 40 bytes, .* free in .*\); nothing was written"):
        atomic.write_text(tmp_path / "weights.pkl", "x" * 40)
