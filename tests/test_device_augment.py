"""DATA.AUGMENT_ON device: the loader's crop and draws against the official PIL pipeline, the batched ops
against PIL's, and pretraining with the option (CPU tensors).

Tolerances are in levels of 0-255 and are stated in docs/loader.md; each comes from a bound where there is
one (PIL truncates each blend to uint8: < 1 level; its HSV is 8-bit: hue within 13 levels), else from the
measured worst case with margin.
"""

import importlib.util
import json
import math
import random

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from skimage import data as skdata
from torchvision import transforms

from conftest import REPO, cli_main
from pretrain import device_augment as D
from pretrain.config import load_cfg, resolve_augment_on
from pretrain.data import COLOR_JITTER, crop_and_params, simsiam_augmentation
from simsiam_transfer.errors import UserError
from simsiam_transfer.resnet import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32  # crop size: small, so thousands of official views take about a second
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
AUGMENT = D.DeviceAugmentation(torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD, max_sigma=2.0)


def levels(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised views back to 0-255."""
    return (normalised * STD + MEAN) * 255


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(getattr(skdata, name)()).resize((120, 90)) for name in ("coffee", "astronaut")]


def _seeded(seed):
    torch.manual_seed(seed)
    random.seed(seed)


def _device_views(views):
    return AUGMENT(D.CropView(torch.stack([v.image for v in views]), torch.stack([v.params for v in views])))


class _Recorder:
    """Records what the official pipeline and ours draw: crop boxes, ColorJitter calls, blur radii."""

    def __init__(self, monkeypatch):
        self.boxes, self.jitters, self.radii = [], 0, []
        get_params = transforms.RandomResizedCrop.get_params
        jitter_forward = transforms.ColorJitter.forward
        blur = ImageFilter.GaussianBlur

        def boxes(img, scale, ratio):
            box = get_params(img, scale, ratio)
            self.boxes.append((box, TF.get_image_size(img)))
            return box

        def jitter(module, img):
            self.jitters += 1
            return jitter_forward(module, img)

        recorder = self

        class Blur(blur):
            def __init__(self, radius=2):
                recorder.radii.append(radius)
                super().__init__(radius)

        monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(boxes))
        monkeypatch.setattr(transforms.ColorJitter, "forward", jitter)
        monkeypatch.setattr(ImageFilter, "GaussianBlur", Blur)


N_VIEWS = 3000


@pytest.fixture(scope="module")
def official_run(photos):
    """N_VIEWS views of the official pipeline (seed 1), with what it drew."""
    with pytest.MonkeyPatch.context() as mp:
        rec = _Recorder(mp)
        _seeded(1)
        transform = simsiam_augmentation(SIZE)
        views = torch.stack([transform(photos[i % 2]) for i in range(N_VIEWS)])
    return rec, levels(views)


@pytest.fixture(scope="module")
def device_run(photos):
    """N_VIEWS views of ours (seed 2: independent of the official run), with what the loader drew."""
    with pytest.MonkeyPatch.context() as mp:
        rec = _Recorder(mp)
        _seeded(2)
        transform = crop_and_params(SIZE)
        pixels = [TF.pil_to_tensor(p) for p in photos]
        views = [transform(pixels[i % 2]) for i in range(N_VIEWS)]
    return rec, views, levels(_device_views(views))


# -- the loader's share: the official draws, the official crop ------------------------------------------------
def test_views_draw_the_official_stream_and_crop_the_official_box(photos, monkeypatch):
    rec = _Recorder(monkeypatch)
    official, ours = simsiam_augmentation(SIZE), crop_and_params(SIZE)
    for seed in range(60):
        photo = photos[seed % 2]
        _seeded(seed)
        official(photo)
        after_official = torch.get_rng_state(), random.getstate()
        _seeded(seed)
        view = ours(TF.pil_to_tensor(photo))
        assert torch.equal(torch.get_rng_state(), after_official[0]) and random.getstate() == after_official[1]
        (box_official, _), (box_ours, _) = rec.boxes[-2:]
        assert box_official == box_ours
        pil_crop = TF.pil_to_tensor(TF.resized_crop(photo, *box_official, [SIZE, SIZE])).int()
        assert view.image.dtype == torch.uint8 and (view.image.int() - pil_crop).abs().max() <= 1


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def _scale_and_log_ratio(boxes):
    scale = torch.tensor([h * w / (W * H) for (_, _, h, w), (W, H) in boxes])
    log_ratio = torch.tensor([math.log(w / h) for (_, _, h, w), _ in boxes])
    return scale, log_ratio


def test_crop_scale_and_aspect_ratio_follow_the_official_distribution(official_run, device_run):
    (official, _), (ours, _, _) = official_run, device_run
    s_off, r_off = _scale_and_log_ratio(official.boxes)
    s_ours, r_ours = _scale_and_log_ratio(ours.boxes)
    # 3000 vs 3000 samples: a KS statistic over 0.05 has p < 0.002 under equal distributions.
    assert _ks(s_off, s_ours) < 0.05 and _ks(r_off, r_ours) < 0.05
    assert 0.19 < s_ours.min() and s_ours.max() <= 1.0
    assert abs(r_ours).max() < math.log(4 / 3) + 0.05  # integer box sides round the ratio a little


def test_grayscale_blur_jitter_and_flip_frequencies(official_run, device_run):
    (official, off_views), (ours, views, dev_views) = official_run, device_run
    params = torch.stack([v.params for v in views])

    def grey(x):  # all three channels equal: the grayscale op ran
        return ((x.amax(1) - x.amin(1)).flatten(1).amax(1) < 1e-3).float().mean().item()

    measured = {
        "jitter": (official.jitters / N_VIEWS, (params[:, D.JITTER] > 0).float().mean().item(), 0.8),
        "grayscale": (grey(off_views), grey(dev_views), 0.2),
        "blur": (len(official.radii) / N_VIEWS, (params[:, D.SIGMA] > 0).float().mean().item(), 0.5),
        "flip": (None, params[:, D.FLIP].mean().item(), 0.5),
    }
    for name, (off, dev, p) in measured.items():  # 0.03 is over 3.7 binomial sigmas at n = 3000
        assert abs(dev - p) < 0.03, (name, dev)
        assert off is None or abs(off - p) < 0.03, (name, off)
    sigmas = params[params[:, D.SIGMA] > 0, D.SIGMA]
    assert 0.1 <= sigmas.min() and sigmas.max() <= 2.0
    assert abs(sigmas.mean() - 1.05) < 0.05 and abs(sum(official.radii) / len(official.radii) - 1.05) < 0.05
    orders = params[params[:, D.JITTER] > 0][:, D.ORDER]
    assert (orders.sort(dim=1).values == torch.arange(4.0)).all()  # each jitter order is a permutation


# -- the device ops against PIL's ----------------------------------------------------------------------------
PIL_OPS = {D.BRIGHTNESS: TF.adjust_brightness, D.CONTRAST: TF.adjust_contrast,
           D.SATURATION: TF.adjust_saturation, D.HUE: TF.adjust_hue}
# op: (per-pixel max, per-sample |d mean|, bias of the means, per-sample |d std|, bias of the stds), levels
OP_TOLERANCES = {D.BRIGHTNESS: (1.25, 1.2, 0.6, 0.6, 0.15), D.CONTRAST: (1.25, 1.2, 0.6, 0.6, 0.15),
                 D.SATURATION: (1.25, 1.2, 0.6, 0.6, 0.15), D.HUE: (13.0, 6.0, 1.5, 2.0, 0.5)}


@pytest.mark.parametrize("op", list(PIL_OPS), ids=["brightness", "contrast", "saturation", "hue"])
def test_each_colour_op_matches_pil_in_per_channel_mean_and_std(device_run, op):
    _, views, _ = device_run
    images = torch.stack([v.image for v in views[:2000]])
    jitter = transforms.ColorJitter(*COLOR_JITTER)
    low, high = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)[op]
    factors = torch.empty(len(images)).uniform_(low, high, generator=torch.Generator().manual_seed(op))
    pil = torch.stack([TF.pil_to_tensor(PIL_OPS[op](TF.to_pil_image(img), float(f)))
                       for img, f in zip(images, factors)]).float()
    ours = D.JITTER_OPS[op](images.float() / 255, factors) * 255
    pixel, sample_mean, bias_mean, sample_std, bias_std = OP_TOLERANCES[op]
    d_mean = pil.mean(dim=(2, 3)) - ours.mean(dim=(2, 3))
    d_std = pil.std(dim=(2, 3)) - ours.std(dim=(2, 3))
    assert (pil - ours).abs().max() <= pixel
    assert d_mean.abs().max() <= sample_mean and d_mean.mean(0).abs().max() <= bias_mean
    assert d_std.abs().max() <= sample_std and d_std.mean(0).abs().max() <= bias_std


def test_blur_matches_pils_gaussian_blur_on_a_test_pattern():
    pattern = torch.zeros(3, 40, 40, dtype=torch.uint8)
    pattern[:, :, 20] = 255     # a one-pixel line: its spread is the blur's
    pattern[0, :, :2] = 200     # a red band on the border: PIL clamps at the edge
    pattern[:, 30:, :] //= 2
    pil_image = TF.to_pil_image(pattern)
    for sigma in (0.1, 0.5, 1.0, 1.5, 2.0):
        pil = TF.pil_to_tensor(pil_image.filter(ImageFilter.GaussianBlur(sigma))).float()
        ours = D.gaussian_blur(pattern[None].float() / 255, torch.tensor([sigma]), D.max_reach(2.0))[0] * 255
        assert (pil - ours).abs().max() <= 2.5, sigma  # PIL rounds each of its six box passes
        for blurred in (pil, ours):
            row = blurred[1, 10, 8:33]  # green: only the line
            x = torch.arange(-12.0, 13.0)
            weights = row / row.sum()
            variance = float((weights * x ** 2).sum() - (weights * x).sum() ** 2)
            assert abs(variance - sigma ** 2) < 0.03 + 0.02 * sigma ** 2, (sigma, variance)


def test_fixed_parameters_give_the_official_image_within_tolerance(photos):
    """Same seed: the same draws on both paths, so the images differ only by arithmetic (docs/loader.md)."""
    official, ours = simsiam_augmentation(SIZE), crop_and_params(SIZE)
    ref, views = [], []
    for seed in range(300):
        _seeded(seed)
        ref.append(official(photos[seed % 2]))
        _seeded(seed)
        views.append(ours(TF.pil_to_tensor(photos[seed % 2])))
    signed = levels(torch.stack(ref)) - levels(_device_views(views))
    diff = signed.abs()
    jittered = torch.stack([v.params[D.JITTER] > 0 for v in views])
    assert diff.mean() <= 2.0 and diff.mean(dim=(1, 2, 3)).max() <= 6.0
    assert diff.flatten().kthvalue(int(0.999 * diff.numel())).values <= 12.0 and diff.max() <= 24.0
    assert diff[~jittered].max() <= 5.0
    per_channel = signed.mean(dim=(0, 2, 3))  # PIL truncates: the official images are slightly darker
    assert (per_channel > -2.5).all() and (per_channel < 0.5).all()


def test_device_augmentation_keeps_the_batch_and_leaves_its_input():
    views = D.CropView(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8),
                       torch.zeros(5, D.NUM_PARAMS))
    views.params[:, D.FLIP] = torch.tensor([1.0, 0, 0, 0, 1])
    before = views.image.clone()
    out = AUGMENT(views)
    assert torch.equal(views.image, before) and out.dtype == torch.float32
    expected = (before.float() / 255 - MEAN) / STD
    assert torch.allclose(out[1:4], expected[1:4], atol=1e-6)          # nothing drawn: only normalised
    assert torch.allclose(out[[0, 4]], expected[[0, 4]].flip(-1), atol=1e-6)


# -- the option ---------------------------------------------------------------------------------------------
def test_augment_on_auto_resolves_by_device_and_bad_values_name_the_key():
    cfg = load_cfg(None, [])
    assert cfg.DATA.AUGMENT_ON == "auto"
    assert resolve_augment_on(cfg, "cpu").DATA.AUGMENT_ON == "cpu"
    assert resolve_augment_on(cfg, "cuda").DATA.AUGMENT_ON == "device"
    assert resolve_augment_on(load_cfg(None, ["DATA.AUGMENT_ON", "device"]), "cpu").DATA.AUGMENT_ON == "device"
    with pytest.raises(UserError, match="DATA.AUGMENT_ON"):
        load_cfg(None, ["DATA.AUGMENT_ON", "gpu"])


def _mini(synthetic, out, *extra):
    return ["pretrain", "--config", "pretrain/simsiam_R_18_mini.yaml",
            "DATA.TRAIN_DIR", synthetic / "unlabeled", "DATA.KNN_TRAIN_DIR", synthetic / "labeled/train",
            "DATA.KNN_VAL_DIR", synthetic / "labeled/val", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0,
            "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 2, "SOLVER.MAX_ITERS_PER_EPOCH", 2,
            "MODEL.DIM", 64, "MODEL.PRED_DIM", 16, "SOLVER.AMP", False, "OUTPUT_DIR", out, *extra]


def test_trainer_views_on_the_device_match_the_cpu_pipeline(synthetic, tmp_path):
    from pretrain.engine import Pretrainer

    batches = {}
    for on in ("cpu", "device"):
        args = [str(a) for a in _mini(synthetic, tmp_path / on, "DATA.AUGMENT_ON", on)[3:]]
        trainer = Pretrainer(load_cfg(str(REPO / "configs/pretrain/simsiam_R_18_mini.yaml"), args))
        (x1, x2, index), _ = next(iter(trainer.epoch_batches(0)))
        batches[on] = index, trainer.to_device(x1), trainer.to_device(x2)
        if on == "device":
            assert isinstance(x1, D.CropView) and x1.image.dtype == torch.uint8
            assert torch.equal(trainer.to_device(x1), batches[on][1])  # no draws on the device: replayable
    assert torch.equal(batches["cpu"][0], batches["device"][0])
    for cpu, device in zip(batches["cpu"][1:], batches["device"][1:]):
        diff = (levels(cpu) - levels(device)).abs()
        assert cpu.shape == device.shape and diff.mean() <= 2.0 and diff.max() <= 24.0


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_with_augment_on_device_resumes_exactly(synthetic, tmp_path):
    device = ["DATA.AUGMENT_ON", "device"]
    assert cli_main(*_mini(synthetic, tmp_path / "full", *device)) == 0
    assert cli_main(*_mini(synthetic, tmp_path / "cut", *device, "SOLVER.EPOCHS", 1)) == 0
    assert cli_main(*_mini(synthetic, tmp_path / "cut", *device)) == 0
    assert "AUGMENT_ON: device" in (tmp_path / "full/config.yaml").read_text()
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full] and all("knn_top1" in r for r in full)
    weights = [torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True)["state_dict"] for d in ("full", "cut")]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.mark.parametrize("section_5_2", [["MODEL.ALTERNATION_STEPS", 2],
                                         ["MODEL.PREDICTOR", "none", "MODEL.TARGET", "moving_average"]])
def test_section_5_2_targets_train_with_device_augmentation(synthetic, tmp_path, section_5_2):
    assert cli_main(*_mini(synthetic, tmp_path, "DATA.AUGMENT_ON", "device", "SOLVER.EPOCHS", 1,
                           "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "", *section_5_2)) == 0
    assert math.isfinite(_metrics(tmp_path)[0]["loss"])


@pytest.mark.slow
def test_loader_benchmark_runs_at_toy_size(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as ``python benchmarks/loader.py`` has it
    spec = importlib.util.spec_from_file_location("loader_benchmark", REPO / "benchmarks/loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()

    def run(*args):
        try:
            bench.main(["--smoke", *args, "--workdir", str(tmp_path / str(len(args)))])
        finally:
            torch.set_num_threads(threads)  # the loader mode measures one thread per core
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    loader = run()
    assert set(loader["workers"]) == {"0", "1"}
    assert all(r["ratio_per_core"] > 0 and r["img_per_cpu_s"]["ours"] > 0 for r in loader["workers"].values())
    e2e = run("--e2e")
    assert e2e["benchmark"] == "loader_e2e" and set(e2e["results"]) == {"device", "cpu", "bare"}
    assert all(e2e["results"][k]["img_per_s"] > 0 for k in e2e["results"]) and set(e2e["ratio_vs_bare"]) == {"device", "cpu"}
