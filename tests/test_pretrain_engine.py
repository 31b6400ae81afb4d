"""Pretraining engine: hooks, precision and memory format, Sec. 5.2 targets, exact resume with
workers, checkpoint portability, Slurm/torchrun launch, kNN split over ranks."""

import copy
import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from conftest import REPO, cli_main
from pretrain import checkpoint
from pretrain.distributed import DistInfo, LaunchEnv, all_gather_varlen, device_for, launch_env
from simsiam_transfer.slurm import expand_nodelist
from pretrain.engine import (Pretrainer, Precision, cpu_supports_bf16, memory_format, prepare_model, seed_worker,
                             to_device, train_step)
from pretrain.hooks import AmpSkipMonitor, HookBase
from pretrain.knn import extract_features
from pretrain.methods.simsiam import SimSiamMethod
from pretrain.targets import alternation
from simsiam_transfer.errors import UserError
from test_pretrain import _metrics, _mini_args


# -- Slurm / torchrun environment (pure functions) ---------------------------------------------------
def test_nodelist_expansion():
    assert expand_nodelist("node[01-04],gpu7") == ["node01", "node02", "node03", "node04", "gpu7"]
    assert expand_nodelist("a[8-10,3]") == ["a8", "a9", "a10", "a3"]
    assert expand_nodelist("solo") == ["solo"]
    with pytest.raises(UserError, match="SLURM_NODELIST"):
        expand_nodelist("n[a-b]")


SLURM = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242",
         "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
         "SLURM_NODEID": "0"}


def test_srun_without_master_addr_derives_the_rendezvous():
    launch = launch_env({**SLURM, "SLURM_NODELIST": "node[01-04],gpu7"}, first_host=lambda nl: expand_nodelist(nl)[0])
    assert launch == LaunchEnv(3, 8, 1, {"MASTER_ADDR": "node01", "MASTER_PORT": str(15000 + 4242)}, 4)


def test_srun_with_master_addr_keeps_it():
    launch = launch_env({**SLURM, "SLURM_NODELIST": "x[1-2]", "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert launch == LaunchEnv(3, 8, 1, {}, 4)


def test_the_step_s_task_count_wins_and_a_batch_script_without_srun_is_refused():
    """sbatch --ntasks 8 running the command without srun is one process: refused, not left waiting for
    7 ranks; a step of 2 tasks inside a job of 8 is a world of 2."""
    batch_script = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_NODELIST": "n1"}
    with pytest.raises(UserError, match=r"SLURM_NTASKS=8 but this process is not a task of an srun step") as err:
        launch_env(batch_script)
    assert "\n" not in str(err.value)
    step = {**batch_script, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    assert launch_env(step, first_host=lambda nl: nl).world_size == 2
    assert launch_env({**batch_script, "SLURM_STEP_NUM_TASKS": "1"}) == LaunchEnv()


def test_a_node_whose_gpus_are_not_all_used_gets_a_warning():
    from pretrain.distributed import idle_gpu_warning

    warning = idle_gpu_warning(1, 8)  # srun --ntasks-per-node 1 on an 8-GPU node
    assert "shows 8 GPUs" in warning and "7 stay idle" in warning and "--ntasks-per-node 8" in warning
    assert idle_gpu_warning(8, 8) is None and idle_gpu_warning(1, 1) is None  # all used; --gpus-per-task 1
    assert idle_gpu_warning(2, 0) is None  # CPU


def test_srun_without_any_rendezvous_is_one_clear_error():
    with pytest.raises(UserError, match="MASTER_ADDR") as err:
        launch_env(SLURM)
    assert "\n" not in str(err.value)


def test_torchrun_wins_and_single_task_srun_is_one_process():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert launch_env({**SLURM, **torchrun}) == LaunchEnv(1, 2, 1, {})
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}) == LaunchEnv()


def test_device_index_wraps_over_visible_gpus():
    assert device_for(3, 1) == torch.device("cuda", 0)  # --gpus-per-task 1: each task sees one GPU
    assert device_for(5, 4) == torch.device("cuda", 1)
    assert device_for(2, 0) == torch.device("cpu")


# -- checkpoint portability ------------------------------------------------------------------------
def test_rng_state_for_fewer_visible_gpus():
    saved = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]  # an old 8-GPU checkpoint
    assert checkpoint.cuda_state_for_device(saved, 0) is saved[0]
    assert checkpoint.cuda_state_for_device(saved[:2], 5) is None  # no IndexError
    assert checkpoint.cuda_state_for_device(saved[:1], 3) is saved[0]  # this format: the rank's own device
    assert checkpoint.cuda_state_for_device(saved, None) is None  # resumed on CPU
    state = checkpoint.rng_state()
    state["cuda"] = saved
    checkpoint.set_rng_state(state)  # a GPU-written state restores on a CPU host
    assert torch.equal(torch.get_rng_state(), state["torch"])


def _tiny_training_state():
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_empty_scaler_state_is_skipped_and_a_present_one_loaded():
    model, opt = _tiny_training_state()
    base = {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "targets": None,
            "rng": [checkpoint.rng_state()]}
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    checkpoint.restore({**base, "scaler": {}}, model, opt, scaler, None, rank=0)  # written with AMP off
    assert scaler.get_scale() == 8.0
    written = torch.amp.GradScaler("cpu", init_scale=1024.0)
    checkpoint.restore({**base, "scaler": written.state_dict()}, model, opt, scaler, None, rank=0)
    assert scaler.get_scale() == 1024.0
    with pytest.raises(RuntimeError, match="empty"):  # what the skip avoids
        torch.amp.GradScaler("cpu").load_state_dict({})


# -- the step: memory format, precision, skipped steps -----------------------------------------------
def _tiny(**kw):
    torch.manual_seed(0)
    return SimSiamMethod("resnet18", dim=32, pred_dim=8, **kw)


def test_channels_last_step_matches_nchw_gradients():
    plain, fast = _tiny(), prepare_model(_tiny(), torch.device("cpu"))
    assert fast.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    grads = []
    for model, prep in ((plain, lambda x: x), (fast, lambda x: to_device(x, torch.device("cpu")))):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0 keeps the gradients to compare
        loss, _ = train_step(model, opt, (prep(x1), prep(x2)))
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, ga), (loss_b, gb) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item() + 1e-8)


def test_channels_last_only_where_it_measured_faster():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format(cpu, Precision("cpu")) == torch.contiguous_format  # fp32 on CPU: 0.88x measured
    assert memory_format(cpu, Precision("cpu", torch.bfloat16)) == torch.channels_last
    assert memory_format(cuda, Precision("cuda")) == torch.channels_last
    assert memory_format(cuda, Precision("cuda", torch.float16)) == torch.channels_last


def test_gradscaler_skipped_steps_are_counted_and_warned(capsys):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(optimizer=opt, record={}, epoch=0, dist=DistInfo())
    monitor = AmpSkipMonitor()
    monitor.trainer = trainer
    monitor.before_train()
    x = torch.randn(4, 3, 32, 32)
    for scale_input, expected in ((1e38, 2), (1.0, 0)):  # 1e38 inputs overflow: non-finite gradients
        scaler = torch.amp.GradScaler("cpu")
        monitor.before_epoch()
        for _ in range(2):
            train_step(model, opt, (x * scale_input, x.flip(3) * scale_input), scaler=scaler)
        trainer.record = {"steps": 2}
        monitor.after_epoch()
        assert trainer.record["amp_skipped_steps"] == expected
    monitor.after_train()
    assert "skipped 2 of 2 steps" in capsys.readouterr().err


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_step_runs_on_cpu_without_a_scaler():
    model = prepare_model(_tiny(), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = to_device(torch.randn(4, 3, 32, 32), torch.device("cpu"))
    loss, z1 = train_step(model, opt, (x, x.flip(3)), precision=Precision("cpu", torch.bfloat16))
    assert loss.dtype == torch.float32 and z1.dtype == torch.float32 and torch.isfinite(loss)


# -- Sec. 5.2 ---------------------------------------------------------------------------------------
class _Noise(Dataset):
    """Each item draws from the RNG, as the augmentations do."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.rand(3), torch.rand(3), i


@pytest.mark.parametrize("workers", [0, 2])
def test_alternation_rereads_the_same_views_and_keeps_only_targets(workers):
    sampler = DistributedSampler(_Noise(), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(3)

    def loader():
        return DataLoader(_Noise(), batch_size=2, sampler=sampler, num_workers=workers,
                          worker_init_fn=functools.partial(seed_worker, base=(0, 1, 0)) if workers else None,
                          generator=torch.Generator().manual_seed(7))

    computed = []

    def target(batch):
        computed.append(batch[2].tolist())
        return batch[0].sum(1)  # a "d-dim target" per sample; the images are dropped

    pairs = list(alternation(iter(loader()), iter(loader()), 4, 5, target,
                             (checkpoint.rng_state, checkpoint.set_rng_state)))
    assert len(pairs) == 5 and computed == [b[2].tolist() for b, _ in pairs]
    for batch, cached in pairs:
        assert torch.equal(batch[0].sum(1), cached)
    assert len({i for b, _ in pairs for i in b[2].tolist()}) == 10
    if workers == 0:  # without replaying the RNG, in-process augmentations would differ
        drift = list(alternation(iter(loader()), iter(loader()), 4, 5, lambda b: b[0].sum(1)))
        assert any(not torch.equal(b[0].sum(1), t) for b, t in drift)


class _Probe(HookBase):
    """Registered first: sees the state before the fill pass (before_train) and before step 1 (before_epoch)."""

    def before_train(self):
        self.weights = copy.deepcopy(self.trainer.model.state_dict())
        self.empty = self.trainer.targets.memory.abs().sum().item() == 0

    def before_epoch(self):
        if self.trainer.epoch == 0:
            self.memory = self.trainer.targets.memory.clone()
            self.weights_after = copy.deepcopy(self.trainer.model.state_dict())


def _cfg(synthetic, out, *extra):
    from pretrain.config import load_cfg

    args = [str(a) for a in _mini_args(synthetic, out, "SOLVER.EPOCHS", 1, *extra)[3:]]
    return load_cfg(str(REPO / "configs/pretrain/simsiam_R_18_mini.yaml"), args)


def test_moving_average_memory_is_filled_before_step_one(synthetic, tmp_path):
    cfg = _cfg(synthetic, tmp_path, "MODEL.PREDICTOR", "none", "MODEL.TARGET", "moving_average",
               "SOLVER.MAX_ITERS_PER_EPOCH", 1, "DATA.KNN_TRAIN_DIR", "", "DATA.KNN_VAL_DIR", "")
    trainer, probe = Pretrainer(cfg), _Probe()
    probe.trainer = trainer
    trainer.hooks.insert(0, probe)
    trainer.run()
    assert probe.empty
    norms = probe.memory.norm(dim=1)
    assert probe.memory.shape[0] == 96 and torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert probe.memory.std(dim=0).mean() > 1e-3  # per-image values, not one constant
    for key, value in probe.weights.items():  # the fill pass moved no weight and no BN statistic
        assert torch.equal(value, probe.weights_after[key]), key


# -- exact resume with loader workers -----------------------------------------------------------------
def test_resume_with_two_workers_gives_identical_weights(synthetic, tmp_path):
    extra = ["DATA.NUM_WORKERS", 2, "MONITOR.KNN_PERIOD", 10, "SOLVER.EPOCHS"]
    assert cli_main(*_mini_args(synthetic, tmp_path / "full", *extra, 2)) == 0
    assert cli_main(*_mini_args(synthetic, tmp_path / "cut", *extra, 1)) == 0
    assert cli_main(*_mini_args(synthetic, tmp_path / "cut", *extra, 2)) == 0
    full, cut = (torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True) for d in ("full", "cut"))
    assert [r["loss"] for r in _metrics(tmp_path / "cut")] == [r["loss"] for r in _metrics(tmp_path / "full")]
    for key, value in full["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][key]), key


def test_knn_folder_typo_fails_before_anything_is_written(synthetic, tmp_path):
    assert cli_main(*_mini_args(synthetic, tmp_path / "out", "DATA.KNN_VAL_DIR", tmp_path / "nope")) == 2
    assert not (tmp_path / "out").exists()


# -- several processes (gloo on CPU) ------------------------------------------------------------------
class _Labeled(Dataset):
    def __len__(self):
        return 7  # uneven shards over 2 ranks

    def __getitem__(self, i):
        return torch.full((4,), float(i)) + torch.arange(4.0), i % 3


def _knn_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    info = DistInfo(rank, 2, rank, torch.device("cpu"))
    seen = []

    def features(x):
        seen.extend(x[:, 0].tolist())
        return x

    feats, labels = extract_features(features, _Labeled(), torch.device("cpu"), info, batch_size=2)
    torch.save({"feats": feats, "labels": labels, "seen": seen,
                "varlen": all_gather_varlen(torch.arange(rank + 1), info)}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_knn_features_are_split_over_ranks_and_gathered(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_knn_worker, args=(29547, str(tmp_path)), nprocs=2)
    single = extract_features(lambda x: x, _Labeled(), torch.device("cpu"))
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert sorted(results[0]["seen"] + results[1]["seen"]) == list(range(7))  # each image on one rank
    for res in results:
        order = res["labels"].new_tensor(sorted(range(7), key=lambda i: (i % 2, i)))  # rank 0: 0,2,4,6
        assert torch.equal(res["feats"], single[0][order]) and torch.equal(res["labels"], single[1][order])
        assert res["varlen"].tolist() == [0, 0, 1]


def _torchrun(synthetic, out, *extra):
    # --standalone: a free port on this host (a fixed one collides with the suite's other workers)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "app.cli"] + [str(a) for a in _mini_args(synthetic, out, "SOLVER.EPOCHS", 1, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize("ablation", [[], ["MODEL.PREDICTOR", "none", "MODEL.TARGET", "moving_average"]],
                         ids=["default", "moving_average"])
def test_two_process_gloo_run_with_knn(synthetic, tmp_path, ablation):
    proc = _torchrun(synthetic, tmp_path, *ablation)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = _metrics(tmp_path)
    assert 0 <= record["knn_top1"] <= 100 and record["steps"] == 2
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2 and all(len(r["cuda"]) <= 1 for r in ckpt["rng"])
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # DDP's wrapper is not saved
    if ablation:
        norms = ckpt["targets"]["memory"].norm(dim=1)  # every image filled, by both ranks together
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_two_process_divergence_is_the_one_line_message(synthetic, tmp_path):
    proc = _torchrun(synthetic, tmp_path, "SOLVER.BASE_LR", "1e30", "SOLVER.LOG_PERIOD", 1)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: training diverged: ")]
    # Both ranks stop at the same step; torchrun then ends whichever rank has not printed yet.
    assert 1 <= len(lines) <= 2 and all("loss became non-finite" in line for line in lines), proc.stderr[-3000:]
    assert "FloatingPointError" not in proc.stderr and not (tmp_path / "checkpoint_last.pth").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
