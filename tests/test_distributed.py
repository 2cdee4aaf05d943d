"""Data-parallel training (torchrun, gloo on CPU), synchronized batch norm, parallel sweeps
and the throughput flags.

Multi-process tests use 2 processes with one thread each, process groups on 127.0.0.1 only,
and the bundled digits data with Lenet-300-100 (quaternion) for a few steps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from quatnn import cli, train
from quatnn.nn import NonFiniteStatistics, QBatchNorm1d, QBatchNorm2d, QConv2d, QLinear, sync_norm
from quatnn.nn.norm import triton_norms
from quatnn.nn.sync_norm import QSyncBatchNorm, convert_sync_batchnorm
from quatnn.train import distributed, runner
from quatnn.train.seeding import EpochSampler

# A tenth of the 1438 training images is held out for validation (143). Epoch 1 is 22
# steps of 60 on the other 1295 (the last has 35 samples: 17 and 18 per process), then 8
# steps of epoch 2 (a new shuffle): the sampler, the epoch boundary and sharded
# evaluation (143 validation images: 71 + 72; 359 test images: 179 + 180) all take part,
# and the first 11 steps warm the learning rate up; the loss is label-smoothed and the
# gradients clipped (to 0.5: every step's norm is above it, about 2).
RUN = ["--epochs", "2", "--max-steps", "30", "--val-split", "0.1", "--warmup", "0.5",
       "--label-smoothing", "0.1", "--clip-grad-norm", "0.5", "--progress", "off"]  # fmt: skip
CFG = train.TrainConfig(epochs=2, max_steps=30, val_split=0.1, warmup=0.5, label_smoothing=0.1,
                        clip_grad_norm=0.5, device="cpu")  # fmt: skip
RUN_FILES = {
    "config.toml",
    "metrics.jsonl",
    "checkpoint.pt",
    "best.pt",
    "train.log",
    "summary.json",
}
TIMEOUT = 300


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in train.TIMING_KEYS} for row in rows]


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _assert_same_run(run: Path, reference: Path, atol: float = 1e-5, rel: float = 1e-5) -> None:
    """Same epochs and steps, metrics (``rel``) and final weights (``atol``) up to float
    rounding."""
    rows, expected = _untimed(_metrics(run)), _untimed(_metrics(reference))
    assert [(r["epoch"], r["step"]) for r in rows] == [(r["epoch"], r["step"]) for r in expected]
    for row, want in zip(rows, expected, strict=True):
        assert row == pytest.approx(want, rel=rel, abs=1e-6)
    got, want = _state(run), _state(reference)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
    assert got["model"].keys() == want["model"].keys()  # no DDP "module." prefix
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, atol=atol, rtol=0, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo connects over loopback only
    return env


def _torchrun(argv: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m quatnn ARGV`` on 127.0.0.1, gloo on CPU."""
    script = Path(sys.executable).with_name("torchrun")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = [
        *launcher,
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "quatnn",
        *argv,
    ]
    return subprocess.run(
        command, cwd=cwd, env=_loopback_env(), capture_output=True, text=True, timeout=TIMEOUT
    )


def _join_world(rank: int, world: int, port: int) -> None:
    """Set the variables torchrun sets (rank ``rank`` of ``world`` on 127.0.0.1)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)


class StopAt(train.Callback):
    """Ctrl-C right after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: train.Trainer) -> None:
        if trainer.step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, 30 steps with global batch 60."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["train", *RUN, "--out", str(out)]) == 0
    return out


def test_backend_choice():
    cpu = torch.device("cpu")
    assert distributed.choose_backend("auto", cpu) == "gloo"
    assert distributed.choose_backend("gloo", cpu) == "gloo"
    with pytest.raises(train.RunError, match="nccl needs CUDA devices.*on cpu use gloo"):
        distributed.choose_backend("nccl", cpu)


# ----------------------------------------------------------------------- data sharding


def test_shards_of_each_global_batch_are_the_single_process_batch():
    sampler = EpochSampler(23, seed=5)
    world = 3
    shards = [distributed.ShardedBatchSampler(sampler, 6, r, world) for r in range(world)]
    for epoch in (1, 2):
        shards[0].set_epoch(epoch)  # passed on to the shared EpochSampler
        single = list(BatchSampler(sampler, 6, drop_last=False))  # what one process does
        parts = [list(shard) for shard in shards]
        assert all(len(p) == len(shard) == 4 for p, shard in zip(parts, shards, strict=True))
        joined = [sum((p[b] for p in parts), []) for b in range(4)]
        assert joined == single  # the same batches in the same order
        assert [len(p[3]) for p in parts] == [1, 2, 2]  # last batch of 5, split unevenly
    assert [shards[0].loss_weight(b) for b in range(4)] == [0.5, 0.5, 0.5, 3 / 5]
    # A last batch with fewer samples than processes is dropped by every process.
    tiny = [list(distributed.ShardedBatchSampler(range(13), 6, r, 3)) for r in range(3)]
    assert [len(t) for t in tiny] == [2, 2, 2]
    with pytest.raises(ValueError, match="not divisible by the 4 processes"):
        distributed.ShardedBatchSampler(range(10), 6, 0, 4)
    evals = [list(distributed.ShardSampler(359, r, 2)) for r in range(2)]
    assert evals[0] + evals[1] == list(range(359))


def test_each_process_loads_its_share_of_the_run():
    cfg = runner.resolve(CFG)
    sets = runner._datasets(cfg, download=False)
    cpu = torch.device("cpu")
    whole = runner._loaders(cfg, *sets, cpu, distributed.Context())
    share = runner._loaders(cfg, *sets, cpu, distributed.Context(1, 2))
    for loader in (*whole, *share):
        for sampler in (loader.sampler, loader.batch_sampler):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(1)
    (x, y), (xr, yr) = next(iter(whole[0])), next(iter(share[0]))
    assert len(share[0]) == len(whole[0]) == 22 and len(yr) == 30
    assert torch.equal(xr, x[30:]) and torch.equal(yr, y[30:])  # augmentation included
    for evaluation, first in ((1, 179), (2, 71)):  # the test and validation sets
        labels = torch.cat([y for _, y in whole[evaluation]])
        assert torch.equal(torch.cat([y for _, y in share[evaluation]]), labels[first:])


def test_loss_weights_make_the_mean_of_process_gradients_the_global_gradient():
    """Three simulated processes with an uneven last batch (1, 1, 2 samples): the mean of
    their gradients (what DDP computes) is the single-process gradient of the batch."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))

    def step(loader: DataLoader) -> torch.Tensor:
        torch.manual_seed(1)
        model = nn.Linear(5, 3).double()
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        trainer = train.Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0))
        trainer.train_epoch(loader)
        return start - torch.cat([p.detach().flatten() for p in model.parameters()])

    whole = step(DataLoader(data, batch_size=6))
    shares = [
        step(DataLoader(data, batch_sampler=distributed.ShardedBatchSampler(range(4), 6, r, 3)))
        for r in range(3)
    ]
    torch.testing.assert_close(sum(shares) / 3, whole, atol=1e-6, rtol=0)
    assert not torch.allclose(shares[0], whole)  # each share alone is not the gradient


# ------------------------------------------------------------------ DDP under torchrun


def test_torchrun_two_processes_match_one_process_and_only_rank_0_writes(tmp_path, single):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "run"
    done = _torchrun(["train", *RUN, "--out", str(out)], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes (gloo)" in done.stdout
    for line in ("epoch 1/2", "epoch 2/2", "finished"):  # printed by rank 0 alone
        assert done.stdout.count(line) == 1, done.stdout
    assert {p.name for p in out.iterdir()} == RUN_FILES  # no temp or stray files
    assert not any(cwd.iterdir()) and {p.name for p in tmp_path.iterdir()} == {"cwd", "run"}
    assert len(_metrics(out)) == 2  # one row per epoch, written once
    assert (out / "train.log").read_text().count("epoch 2/2") == 1
    _assert_same_run(out, single)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 30


def _interrupted_worker(rank: int, world: int, port: int, out: str) -> None:
    _join_world(rank, world, port)
    with distributed.session("auto", "cpu") as ctx:
        assert (ctx.world_size, ctx.rank, ctx.backend) == (world, rank, "gloo")
        with pytest.raises(train.Interrupted):  # every process stops at the same step
            train.train(CFG, out, progress="off", callbacks=[StopAt(25)])
    assert not dist.is_initialized()  # the session destroyed the group


def test_resume_with_another_number_of_processes(tmp_path, single):
    # 2 processes (interrupted in epoch 2), then 1 process resumes.
    two_one = tmp_path / "two-then-one"
    mp.spawn(_interrupted_worker, args=(2, _free_port(), str(two_one)), nprocs=2)
    assert _state(two_one)["epoch"] == 1 and len(_metrics(two_one)) == 1
    train.train(CFG, two_one, if_exists="resume", progress="off")
    _assert_same_run(two_one, single)

    # 1 process (interrupted in epoch 2), then 2 processes resume.
    one_two = tmp_path / "one-then-two"
    with pytest.raises(train.Interrupted):
        train.train(CFG, one_two, progress="off", callbacks=[StopAt(25)])
    assert _state(one_two)["epoch"] == 1
    done = _torchrun(["train", "--resume", str(one_two), "--progress", "off"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resuming after epoch 1") == 1
    _assert_same_run(one_two, single)


def test_sync_bn_run_under_torchrun_matches_one_process(tmp_path):
    """A batch-norm model with --sync-bn on 2 processes normalizes with the statistics of
    the global batch: weights, running statistics and metrics as in one process."""
    argv = ["train", "--model", "resnet20", "--option", "norm=variance", "--epochs", "1"]
    argv += ["--max-steps", "2", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.01"]
    argv += ["--eval-batch-size", "200", "--progress", "off"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun([*argv, "--sync-bn", "--out", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # (Without --sync-bn the running variances differ by about 0.1, the weights by 1e-3.)
    # After 2 steps the running statistics are still mostly their init, so evaluation
    # through the norms gives chance-level logits of a large loss (4.2) that amplify the
    # rounding of the summation order: its metrics match to 1e-4 (the weights to 1e-5).
    _assert_same_run(tmp_path / "two", tmp_path / "one", atol=1e-5, rel=1e-4)
    assert any("running_var" in name for name in _state(tmp_path / "one")["model"])


def test_batch_size_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(0, 7))
    with pytest.raises(train.RunError, match="batch_size 60 is not divisible by the 7"):
        train.train(CFG, tmp_path / "run", progress="off")
    assert not (tmp_path / "run").exists()


def test_session_needs_the_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in distributed.ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    session = distributed.session()
    with pytest.raises(train.RunError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        session.__enter__()


# ----------------------------------------------------------------- synchronized norms


def _tiny(mode: str, image: bool) -> nn.Module:
    torch.manual_seed(3)
    if image:
        layers = [QConv2d(4, 8, 3, padding=1), QBatchNorm2d(8, mode=mode), nn.ReLU()]
        layers += [QConv2d(8, 8, 1), QBatchNorm2d(8, mode=mode, momentum=None)]
    else:
        layers = [QLinear(8, 12), QBatchNorm1d(12, mode=mode), nn.Tanh(), QLinear(12, 8)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # affine parameters away from their initial values
        for module in model.modules():
            if isinstance(module, QBatchNorm1d | QBatchNorm2d):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.normal_()
    return model


SYNC_CASES = [(mode, image) for mode in ("whiten", "variance", "split") for image in (True, False)]
SHARDS = ((0, 5), (5, 12))  # uneven: 5 and 7 samples


def _batch(image: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (12, 4, 5, 5) if image else (12, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    x[..., 0] += x[..., 1]  # correlated components: a non-diagonal covariance
    out_shape = (12, 8, 5, 5) if image else (12, 8)
    return x, torch.randn(out_shape, generator=g, dtype=torch.float64)


# The synchronized norms' backends: PyTorch ops (autograd through the collectives), and
# the Triton kernels (whiten and variance modes) on CPU tensors where Triton's interpreter
# runs them (the root conftest.py turns it on without a GPU; benchmarks/cuda_check.py
# checks them on CUDA).
_INTERPRETED = importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1"
SYNC_BACKENDS = ("ops", "kernels") if _INTERPRETED else ("ops",)


@contextlib.contextmanager
def _sync_backend(backend: str) -> Iterator[None]:
    """Run the synchronized whiten and variance norms on ``backend`` only: with
    ``"kernels"`` the PyTorch-ops path's collective fails if it is reached."""
    if backend == "ops":
        yield
        return
    ops = mock.patch.object(sync_norm, "_all_reduce_sum", side_effect=AssertionError("ops ran"))
    with triton_norms("cpu"), ops:
        yield


def _sync_bn_worker(rank: int, init_file: str, results: str) -> None:
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = {}
        for backend in SYNC_BACKENDS:
            with _sync_backend(backend):
                out[backend] = _sync_bn_cases(rank, backend)
        torch.save(out, Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sync_bn_cases(rank: int, backend: str) -> dict:
    """What :func:`_sync_bn_worker` records of one backend."""
    out = {}
    for mode, image in SYNC_CASES:
        if mode == "split" and backend == "kernels":  # no kernels: per real channel
            continue
        model = convert_sync_batchnorm(_tiny(mode, image))
        assert sum(isinstance(m, QSyncBatchNorm) for m in model.modules()) == 1 + image
        steps = []
        for seed in (0, 1):  # two training steps: running statistics accumulate
            x, g = _batch(image, seed)
            lo, hi = SHARDS[rank]
            xr = x[lo:hi].clone().requires_grad_()
            model.zero_grad()
            y = model(xr)
            (y * g[lo:hi]).sum().backward()  # the loss of the whole batch, split
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            for grad in grads.values():
                dist.all_reduce(grad)
            steps.append({"y": y.detach(), "dx": xr.grad, "grads": grads})
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        out[f"{mode}-{image}"] = {"steps": steps, "buffers": buffers}
    # A NaN in one process's shard: both see non-finite statistics and raise alike.
    x, _ = _batch(True, 0)
    x[-1, 0, 0, 0] = math.nan
    try:
        convert_sync_batchnorm(_tiny("whiten", True))(x[slice(*SHARDS[rank])])
        out["nan"] = "no error"
    except NonFiniteStatistics as err:
        out["nan"] = str(err)
    # One sample here and six there: a global batch of 7 (only this process reads the
    # count back), trained through. One sample and none: a global count of 1; both raise.
    x = _batch(False, 2)[0][:7]
    norm = QSyncBatchNorm(8).double()
    share = (x[:1] if rank == 0 else x[1:]).clone().requires_grad_()
    y = norm(share)
    y.sum().backward()
    out["one-sample"] = y.detach()
    out["one-sample-dx"] = share.grad
    out["one-sample-buffers"] = {n: b.clone() for n, b in norm.named_buffers()}
    try:
        QSyncBatchNorm(8).double()(x[:1] if rank == 0 else x[:0])
        out["count-1"] = "no error"
    except ValueError as err:
        out["count-1"] = str(err)
    return out


@pytest.fixture(scope="module")
def sync_bn_runs(tmp_path_factory) -> list[dict]:
    """What each of 2 processes recorded in :func:`_sync_bn_worker`, per backend."""
    path = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_sync_bn_worker, args=(str(path / "init"), str(path)), nprocs=2)
    return [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_sync_batch_norm_in_two_processes_equals_one_batch_norm_on_the_whole_batch(
    sync_bn_runs, backend
):
    ranks = [run[backend] for run in sync_bn_runs]
    assert all("non-finite batch statistics" in ranks[r]["nan"] for r in range(2))
    assert all("in the global batch when using batch statistics, got 1" in ranks[r]["count-1"]
               for r in range(2))  # fmt: skip
    x, norm = _batch(False, 2)[0][:7].requires_grad_(), QBatchNorm1d(8).double()
    y = norm(x)
    y.sum().backward()
    torch.testing.assert_close(torch.cat([ranks[r]["one-sample"] for r in range(2)]), y.detach(),
                               atol=1e-10, rtol=1e-8)  # fmt: skip
    dx = torch.cat([ranks[r]["one-sample-dx"] for r in range(2)])
    torch.testing.assert_close(dx, x.grad, atol=1e-10, rtol=1e-8)
    for r in range(2):
        for name, buf in norm.named_buffers():
            torch.testing.assert_close(ranks[r]["one-sample-buffers"][name], buf, msg=name)
    close = {"atol": 1e-10, "rtol": 1e-8}
    for mode, image in SYNC_CASES:
        if mode == "split" and backend == "kernels":
            continue
        model = _tiny(mode, image)
        for step, seed in enumerate((0, 1)):
            x, g = _batch(image, seed)
            x.requires_grad_()
            model.zero_grad()
            y = model(x)
            (y * g).sum().backward()
            for rank, (lo, hi) in enumerate(SHARDS):
                got = ranks[rank][f"{mode}-{image}"]["steps"][step]
                torch.testing.assert_close(got["y"], y.detach()[lo:hi], **close)
                torch.testing.assert_close(got["dx"], x.grad[lo:hi], **close)
                for name, param in model.named_parameters():
                    torch.testing.assert_close(got["grads"][name], param.grad, **close)
        for rank in range(2):
            buffers = ranks[rank][f"{mode}-{image}"]["buffers"]
            assert buffers.keys() == dict(model.named_buffers()).keys()
            for name, buf in model.named_buffers():
                torch.testing.assert_close(buffers[name], buf, **close, msg=name)


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_sync_batch_norm_syncs_once_and_compiles_to_one_graph(monkeypatch, mode, backend):
    """The synchronized path, run in one process over a stand-in group whose all-reduce is
    the identity: it equals the ordinary layer, reads nothing back to the host but its one
    finiteness check (no call of .item() while every process has 2+ values per channel),
    and torch.compile traces it whole (the PyTorch ops: compiled, the kernels' path is not
    taken): a non-finite batch then gives non-finite outputs and leaves the running
    statistics as they were (eager mode raises)."""
    monkeypatch.setattr(sync_norm, "_all_reduce_sum", lambda tensor, group: tensor)
    monkeypatch.setattr(sync_norm, "_all_reduce_", lambda tensor, group: tensor)
    monkeypatch.setattr(QSyncBatchNorm, "_group", lambda self: "stand-in group")
    torch.manual_seed(0)
    plain = QBatchNorm2d(8, mode=mode)
    synced = convert_sync_batchnorm(QBatchNorm2d(8, mode=mode))
    x = torch.randn(4, 8, 6, 6) * 2 + 1
    bad = x.clone()
    bad[1, 2, 3, 3] = float("nan")  # component 1 of quaternion channel 0
    item = torch.Tensor.item
    with _sync_backend(backend):
        monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("read back the count"))
        torch.testing.assert_close(synced(x), plain(x), rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(torch.Tensor, "item", item)
        for name, buf in plain.named_buffers():
            torch.testing.assert_close(synced.get_buffer(name), buf, msg=name)
        with pytest.raises(NonFiniteStatistics, match="non-finite"):
            synced(bad)
    if backend != "ops":
        return
    explained = torch._dynamo.explain(synced)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(synced, backend="aot_eager")
    compiled(x)
    before = {k: v.clone() for k, v in synced.state_dict().items()}
    y = compiled(bad).unflatten(1, (4, 2))
    assert torch.isnan(y[:, :, 0]).all()
    for name in ("running_mean", "running_cov" if mode == "whiten" else "running_var"):
        assert torch.equal(synced.get_buffer(name), before[name]), name


@pytest.mark.parametrize("mode", ["whiten", "variance", "split"])
def test_sync_batch_norm_float32_on_offset_data(monkeypatch, mode):
    """Means of 2,000 standard deviations: the synchronized PyTorch-ops path (over a
    stand-in group) stays within the single-process norms' float32 error (up to 2.4e-4
    here; unshifted sums gave up to 4.7e-4)."""
    monkeypatch.setattr(sync_norm, "_all_reduce_sum", lambda tensor, group: tensor)
    monkeypatch.setattr(QSyncBatchNorm, "_group", lambda self: "stand-in group")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, 6, 6, generator=g, dtype=torch.float64) + 2000.0
    want = QBatchNorm2d(16, mode=mode).double()(x)
    synced = convert_sync_batchnorm(QBatchNorm2d(16, mode=mode))
    with _sync_backend("ops"):
        got = synced(x.float())
    torch.testing.assert_close(got.double(), want.detach(), atol=3e-4, rtol=0)


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_results():
    model = _tiny("whiten", True)
    model.append(nn.BatchNorm2d(8))
    bn, weight = model[1], model[1].weight
    model[1].running_cov.mul_(2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    synced = convert_sync_batchnorm(_tiny("whiten", True))
    synced.load_state_dict({k: v for k, v in state.items() if not k.startswith("5.")})
    converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is QSyncBatchNorm and type(converted[5]) is nn.SyncBatchNorm
    assert converted[1].weight is weight  # the same tensors: an optimizer keeps working
    assert converted[1].running_cov is bn.running_cov and converted[1].mode == "whiten"
    assert converted.state_dict().keys() == state.keys()
    # Without a process group the synchronized layer is the ordinary one, bit for bit.
    x = _batch(True, 0)[0]
    plain = _tiny("whiten", True)
    plain[1].running_cov.mul_(2.0)
    for train_mode in (True, False):
        plain.train(train_mode)
        synced.train(train_mode)
        assert torch.equal(plain(x), synced(x))
    for a, b in zip(plain.buffers(), synced.buffers(), strict=True):
        assert torch.equal(a, b)
    bare = convert_sync_batchnorm(QBatchNorm2d(8, bias=False))
    assert type(bare) is QSyncBatchNorm and bare.bias is None and bare.weight is not None


# ------------------------------------------------------------------------------ sweeps


def test_compare_with_two_jobs_matches_one_job(tmp_path, capsys):
    argv = ["compare", "--epochs", "1", "--max-steps", "4", "--seeds", "0", "--progress", "off"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    out = capsys.readouterr().out
    assert "quaternion seed 0 finished: test acc" in out and "| variant |" in out
    for run in ("real-s0", "quaternion-s0"):
        a, b = _metrics(tmp_path / "one" / run), _metrics(tmp_path / "two" / run)
        assert len(a) == len(b) == 1
        assert _untimed(b)[0] == pytest.approx(_untimed(a)[0], rel=1e-6)
        assert {p.name for p in (tmp_path / "two" / run).iterdir()} == RUN_FILES
    assert (tmp_path / "two" / "report.md").is_file()
    # Run again: every run is finished, nothing is started.
    assert cli.main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    assert capsys.readouterr().out.count("already holds this run, finished") == 2


def test_a_failing_job_stops_the_sweep_with_its_error(tmp_path):
    bad = train.merge(CFG, {"model": "nope"})
    jobs = [distributed.Job("bad", train.train, (bad, tmp_path / "a"), {"progress": "off"})]
    jobs.append(distributed.Job("never", train.train, (CFG, tmp_path / "b")))
    started = []
    with pytest.raises(train.RunError, match="unknown model 'nope'"):
        distributed.run_jobs(jobs, 1, on_start=lambda i, job: started.append(job.name))
    assert started == ["bad"] and not (tmp_path / "b").exists()


# -------------------------------------------------------------------- throughput flags


class Inspect(train.Callback):
    """Records whether the forward is compiled and the memory format of the inputs."""

    def __init__(self) -> None:
        self.compiled, self.channels_last = None, []

    def on_train_start(self, trainer: train.Trainer) -> None:
        self.compiled = hasattr(trainer.forward, "_orig_mod")  # a torch.compile wrapper
        trainer.model.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))


def test_amp_and_compile_train_on_cpu(tmp_path):
    cfg = train.merge(CFG, {"amp": True, "max_steps": 3})
    amp = train.train(cfg, tmp_path / "amp", progress="off")
    assert amp["amp"] == "bfloat16"
    cfg, seen = train.merge(CFG, {"variant": "real", "compile": True, "max_steps": 3}), Inspect()
    compiled = train.train(cfg, tmp_path / "compiled", progress="off", callbacks=[seen])
    assert seen.compiled and compiled["steps"] == 3
    for run in ("amp", "compiled"):
        row = _metrics(tmp_path / run)[0]
        assert row["step"] == 3 and 0 < row["train_loss"] < 10 and row["test_acc"] > 0.1


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    cfg = train.merge(CFG, {"compile": True, "compile_mode": "reduce-overhead", "max_steps": 1})
    assert train.train(cfg, tmp_path / "run", progress="off")["steps"] == 1
    assert modes == ["reduce-overhead"]
    with pytest.raises(train.RunError, match="compile_mode must be one of default, reduce-"):
        train.train(train.merge(cfg, {"compile_mode": "fast"}), tmp_path / "bad", progress="off")
    assert not (tmp_path / "bad").exists()


def test_channels_last_does_not_change_results(tmp_path):
    cfg = train.merge(CFG, {"model": "conv2", "batch_size": 8, "max_steps": 2, "epochs": 1})
    train.train(cfg, tmp_path / "plain", progress="off")
    seen = Inspect()
    cfg = train.merge(cfg, {"channels_last": True})
    train.train(cfg, tmp_path / "nhwc", progress="off", callbacks=[seen])
    assert seen.channels_last and all(seen.channels_last)  # training and evaluation batches
    _assert_same_run(tmp_path / "nhwc", tmp_path / "plain", atol=1e-4)


# ---------------------------------------------------------------- distributed


@pytest.mark.parametrize("length", range(1, 30))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_batch_sampler_len_is_the_number_of_batches_it_yields(length, world):
    for rank in range(world):
        sampler = distributed.ShardedBatchSampler(range(length), 6, rank, world)
        assert len(sampler) == len(list(sampler))


def test_in_turn_runs_rank_0_then_node_leaders_then_the_rest(monkeypatch):
    """Rank 0 first, then the first process of every other node, then the rest: here rank
    2, the first process of node 1 (2 processes a node), runs in the second turn."""
    gathers = []
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, obj: gathers.append(obj))
    when = []
    for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1)):
        ctx = distributed.Context(rank=rank, world_size=4, local_rank=local, local_world_size=2)
        gathers.clear()
        distributed.in_turn(ctx, lambda: when.append(len(gathers)))
    assert when == [0, 2, 1, 2]  # turn = number of collective rounds before the call


# ---------------------------------------------------------------- nn/sync_norm


@pytest.mark.parametrize("mode", ["whiten", "variance", "split"])
@pytest.mark.parametrize("training", [True, False])
def test_convert_sync_batchnorm_keeps_eps_and_the_training_mode(mode, training):
    from quatnn.nn import QBatchNorm2d
    from quatnn.nn.sync_norm import convert_sync_batchnorm

    torch.manual_seed(0)
    x = torch.randn(6, 8, 3, 3, dtype=torch.float64) * 0.3
    plain = QBatchNorm2d(8, mode=mode, eps=0.5).double()
    plain(x)  # running statistics away from their initial values
    plain.train(training)
    want = plain(x)
    converted = convert_sync_batchnorm(plain)
    assert converted.eps == 0.5 and converted.training == training
    torch.testing.assert_close(converted(x), want)


def test_a_job_whose_parent_has_gone_ends_quietly(monkeypatch, capsys):
    """After a second Ctrl-C the parent no longer listens: the job's result goes nowhere,
    without a traceback of the broken pipe."""
    ours, theirs = mp.Pipe()
    ours.close()
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # the job silences its stdout
    job = distributed.Job("real seed 0", math.sqrt, (4.0,))
    distributed._job_main(job, {}, torch.get_num_threads(), theirs)
    assert capsys.readouterr().err == ""
