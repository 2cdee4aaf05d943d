"""Training library: configs, the loop, checkpoints, resume exactness, NaN handling."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_data import write_cifar10, write_imagenet, write_mnist
from torch import nn

from quatnn import data, models, train
from quatnn.train import checkpoint, runner
from quatnn.train.config import TrainConfig, dumps_toml, load_config, parse_option, tomllib
from quatnn.train.evaluate import evaluate_run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# Lenet-300-100 on the bundled digits: 1438 training images, 24 steps of 60 per epoch.
STEPS_PER_EPOCH = 24


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in train.TIMING_KEYS} for row in rows]


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


class StopAt(train.Callback):
    """Raise ``error`` (a KeyboardInterrupt, say) after optimizer step ``step``."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    def on_step_end(self, trainer: train.Trainer) -> None:
        if trainer.step == self.step:
            raise self.error


class PoisonAt(train.Callback):
    """Set a weight of parameter ``index`` to NaN after optimizer step ``step``, so the
    next loss is NaN."""

    def __init__(self, step: int, index: int = 0) -> None:
        self.step, self.index = step, index

    def on_step_end(self, trainer: train.Trainer) -> None:
        if trainer.step == self.step:
            with torch.no_grad():
                list(trainer.model.parameters())[self.index].view(-1)[0] = math.nan


def test_config_toml_round_trip_and_precedence(tmp_path):
    cfg = train.TrainConfig(model="resnet18", lr=3e-4, options={"norm": "whiten"})
    text = dumps_toml(cfg.to_dict())
    assert train.TrainConfig.from_dict(tomllib.loads(text)) == cfg
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "conv4"\nlr = 0.0003\nseeds = [0, 1]\n[options]\nnorm = "split"\n')
    cfg, extra = load_config(recipe, {"lr": 1e-3, "options": {"width": 2}}, compare=True)
    assert (cfg.model, cfg.lr, cfg.options) == ("conv4", 1e-3, {"norm": "split", "width": 2})
    assert extra == {"seeds": [0, 1]}
    with pytest.raises(train.RunError, match="compare recipe"):
        load_config(recipe, {})
    shipped = Path(__file__).parents[1] / "experiments" / "lottery_conv4_cifar10.toml"
    for compare in (True, False):  # quatnn compare and quatnn train both name lottery
        with pytest.raises(train.RunError, match="lottery recipe.*run it with quatnn lottery"):
            load_config(shipped, {}, compare=compare)
    assert "lottery" in load_config(shipped, {}, compare=True, keep=("lottery",))[1]
    assert parse_option("small_input=false") == ("small_input", False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0.1}, "unknown key"),
        ({"epochs": "ten"}, "epochs must be of type int"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
    ],
)
def test_config_errors(values, message):
    with pytest.raises(train.RunError, match=message):
        train.TrainConfig.from_dict(values).validate()


def test_lr_schedules():
    cosine = train.lr_schedule("cosine", 1.0, 4)
    assert [cosine(e) for e in (1, 3)] == [1.0, pytest.approx(0.5)]
    assert train.lr_schedule("none", 0.1, 4)(4) == 0.1
    for epochs in range(1, 13):  # x0.1 for epochs that start at or after 50% and 75%
        step = train.lr_schedule("step", 1.0, epochs)
        for e in range(1, epochs + 1):
            cuts = sum((e - 1) / epochs >= f for f in (0.5, 0.75))
            assert step(e) == pytest.approx(0.1**cuts), (epochs, e)


def test_top5_accuracy_counts_the_labels_among_the_five_highest_logits():
    torch.manual_seed(0)
    x, y = torch.randn(300, 6), torch.randint(0, 20, (300,))
    model = nn.Linear(6, 20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scores = train.Trainer(model, optimizer, top5=True).evaluate(loader, "val")
    with torch.no_grad():
        logits = model(x)
    beaten_by = (logits > logits.gather(1, y[:, None])).sum(1)  # logits above the label's
    assert scores["val_top5"] == pytest.approx((beaten_by < 5).double().mean().item())
    assert scores["val_acc"] == pytest.approx((beaten_by == 0).double().mean().item())
    assert 0 < scores["val_acc"] < scores["val_top5"] < 1
    assert "val_top5" not in train.Trainer(model, optimizer).evaluate(loader, "val")
    # summed over processes (here: two that saw the same images), the same fractions
    twice = train.Trainer(model, optimizer, top5=True, reduce=lambda totals: 2 * totals)
    doubled = twice.evaluate(loader, "val")
    assert {k: doubled[k] for k in scores if k != "eval_seconds"} == pytest.approx(
        {k: scores[k] for k in scores if k != "eval_seconds"}
    )


def _one_batch(classes: int = 5) -> tuple[torch.utils.data.DataLoader, nn.Linear]:
    torch.manual_seed(0)
    data_set = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, classes, (16,)))
    return torch.utils.data.DataLoader(data_set, 16), nn.Linear(6, classes)


def test_label_smoothing_of_the_training_loss_only():
    loader, model = _one_batch()
    (x, y), eps = next(iter(loader)), 0.2
    with torch.no_grad():
        logp = model(x).log_softmax(1)
    # the target puts 1 - eps on the label and eps spread evenly over all 5 classes
    smoothed = -((1 - eps) * logp.gather(1, y[:, None]).squeeze(1) + eps * logp.mean(1)).mean()
    plain = -logp.gather(1, y[:, None]).mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay
    trainer = train.Trainer(model, optimizer, label_smoothing=eps)
    trainer.fit(loader, loader, 1)
    row = trainer.history[0]
    assert row["train_loss"] == pytest.approx(smoothed.item(), rel=1e-6)
    assert row["test_loss"] == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("amp", [None, torch.float16])  # float16: with a GradScaler
def test_clip_grad_norm_scales_the_step_down_to_the_norm(amp):
    loader, model = _one_batch()
    x, y = next(iter(loader))
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    limit = norm.item() / 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train.Trainer(model, optimizer, amp_dtype=amp, clip_grad_norm=limit).fit(loader, loader, 1)
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        tol = 1e-6 if amp is None else 2e-3  # float16 forward
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g * limit / norm, atol=tol, rtol=0)


def test_the_run_trains_with_the_configs_smoothing_and_clipping(tmp_path):
    cfg = train.TrainConfig(
        variant="real", optimizer="sgd", momentum=0.0, lr=0.1, clip_grad_norm=1e-3,
        label_smoothing=0.1, epochs=1, max_steps=3, device="cpu",
    )  # fmt: skip
    changes = []

    class Watch(train.Callback):
        def on_train_start(self, trainer: train.Trainer) -> None:
            assert trainer.label_smoothing == 0.1
            self.last = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

        def on_step_end(self, trainer: train.Trainer) -> None:
            now = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            changes.append((now - self.last).norm().item())
            self.last = now

    train.train(cfg, tmp_path / "run", progress="off", callbacks=[Watch()])
    assert changes == pytest.approx([0.1 * 1e-3] * 3, rel=1e-4)  # lr x the clipped norm


def test_warmup_scales_each_step_of_the_schedule():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    used = []  # the learning rate each optimizer step ran with
    optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), 2
    )  # 4 steps per epoch
    cosine = train.lr_schedule("cosine", 0.1, 3)
    trainer = train.Trainer(model, optimizer)
    trainer.fit(loader, loader, 3, lr_at=cosine, warmup_steps=6)
    expected = [cosine((k - 1) // 4 + 1) * min(1, k / 6) for k in range(1, 13)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert [row["lr"] for row in trainer.history] == pytest.approx(expected[::4], rel=1e-12)
    with pytest.raises(ValueError, match="warmup_steps needs lr_at"):
        train.Trainer(model, optimizer).fit(loader, loader, 1, warmup_steps=2)


def test_warmup_is_counted_in_epochs_of_the_training_loader(tmp_path):
    cfg = train.TrainConfig(variant="real", epochs=2, warmup=0.5, device="cpu")
    train.train(cfg, tmp_path / "run", progress="off")
    # 24 steps per epoch: 12 warmup steps, the first at 1/12 of the rate
    assert [row["lr"] for row in _metrics(tmp_path / "run")] == [cfg.lr / 12, cfg.lr]
    with pytest.raises(train.RunError, match=r"warmup must be in \[0, epochs\]"):
        train.merge(cfg, {"warmup": 3.0}).validate()


def test_resume_after_interrupt_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # interrupted while warming up (1.5 epochs), under a cosine schedule
    cfg = train.TrainConfig(
        variant="quaternion", epochs=3, schedule="cosine", warmup=1.5, device="cpu"
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train(cfg, whole, progress="off")

    stop = StopAt(STEPS_PER_EPOCH + 6, KeyboardInterrupt())  # inside epoch 2
    with pytest.raises(train.Interrupted, match=f"resume with: quatnn train --resume {parts}"):
        train.train(cfg, parts, progress="off", callbacks=[stop])
    assert torch.load(parts / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(_metrics(parts)) == 1 and not (parts / "summary.json").exists()
    assert (parts / "train.log").read_text().splitlines()[-1].startswith("interrupted in epoch 2")
    # A row whose checkpoint never made it to disk (killed in between) must not survive,
    # nor the temporary file of that write.
    with open(parts / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "test_acc": 0.0}) + "\n")
    leftover = parts / ".checkpoint.pt.4242.0123abcd.tmp"
    leftover.write_bytes(b"half a checkpoint")
    (parts / "notes.tmp").write_text("mine")  # not of that pattern: kept

    with pytest.raises(train.RunError, match="unfinished; continue it with --resume"):
        train.train(cfg, parts, progress="off")
    train.train(cfg, parts, if_exists="resume", progress="off")

    assert _untimed(_metrics(parts)) == _untimed(_metrics(whole))
    a, b = _weights(whole / "checkpoint.pt"), _weights(parts / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resuming after epoch 1" in (parts / "train.log").read_text()
    assert not leftover.exists() and (parts / "notes.tmp").read_text() == "mine"


def test_loader_workers_do_not_change_results(tmp_path):
    cfg = train.TrainConfig(variant="real", epochs=1, max_steps=8, device="cpu")
    train.train(cfg, tmp_path / "w0", progress="off")
    train.train(train.merge(cfg, {"workers": 2}), tmp_path / "w2", progress="off")
    assert _untimed(_metrics(tmp_path / "w0")) == _untimed(_metrics(tmp_path / "w2"))


class Deterministic(train.Callback):
    """Records whether torch runs deterministic kernels at each step."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_step_end(self, trainer: train.Trainer) -> None:
        self.seen.append(torch.are_deterministic_algorithms_enabled())


def test_training_is_deterministic_and_leaves_the_callers_setting(tmp_path):
    cfg = train.TrainConfig(variant="real", epochs=1, max_steps=2, device="cpu")
    seen = Deterministic()
    before = torch.are_deterministic_algorithms_enabled()
    train.train(cfg, tmp_path / "run", progress="off", callbacks=[seen])
    assert seen.seen == [True, True] and torch.are_deterministic_algorithms_enabled() == before


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = train.TrainConfig(variant="real", epochs=3, device="cpu")
    poison = PoisonAt(STEPS_PER_EPOCH + 4)  # the loss of step 29 (epoch 2, batch 5) is NaN
    with pytest.raises(train.NonFiniteLoss, match=r"nan in epoch 2 at step 29 \(batch 5 of 24\)"):
        train.train(cfg, tmp_path, progress="off", callbacks=[poison])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert len(_metrics(tmp_path)) == 1 and not (tmp_path / "summary.json").exists()
    assert "keeps epoch 1" in (tmp_path / "train.log").read_text().splitlines()[-1]
    # NaN weights after an epoch's last step (its loss was finite): epoch 2 is not saved.
    poison = PoisonAt(2 * STEPS_PER_EPOCH)
    with pytest.raises(train.NonFiniteLoss, match=r"weights became non-finite in epoch 2 at"):
        train.train(cfg, tmp_path / "end", progress="off", callbacks=[poison])
    state = torch.load(tmp_path / "end" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nonfinite_activations_at_a_batch_norm_stop_as_a_nan_loss_does(tmp_path):
    """The whitening norm of a quaternion ResNet raises on a NaN input (eager mode) before
    any loss is NaN; training stops with the step named and the last good checkpoint."""
    cfg = train.TrainConfig(
        model="resnet20", variant="quaternion", dataset="digits-color", epochs=3, device="cpu"
    )
    poison = PoisonAt(STEPS_PER_EPOCH + 4)  # the first convolution: step 29 meets NaN at its norm
    match = r"activations became non-finite in epoch 2 at step 29 \(batch 5 of 24\).*batch norm"
    with pytest.raises(train.NonFiniteLoss, match=match):
        train.train(cfg, tmp_path, progress="off", callbacks=[poison])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert "keeps epoch 1" in (tmp_path / "train.log").read_text().splitlines()[-1]
    # A NaN classifier bias: the loss of step 29 is NaN (no norm after the head), its
    # gradients reach every weight, and step 30 meets NaN at a norm; step 29 is named.
    poison = PoisonAt(STEPS_PER_EPOCH + 4, index=-1)
    with pytest.raises(train.NonFiniteLoss, match=r"loss became nan in epoch 2 at step 29 "):
        train.train(cfg, tmp_path / "head", progress="off", callbacks=[poison])


def test_ctrl_c_at_an_epoch_end_lands_after_the_epoch_is_written(tmp_path, monkeypatch):
    """A Ctrl-C while epoch 1's files are written waits for all of them: the message names
    the epoch that checkpoint.pt really holds, and the metrics file agrees with it."""
    save = checkpoint.save

    def interrupted_save(path, run, state):
        if state["epoch"] == 1 and Path(path).name == "checkpoint.pt":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C lands while epoch 1 is saved
        save(path, run, state)

    monkeypatch.setattr(checkpoint, "save", interrupted_save)
    cfg = train.TrainConfig(variant="real", epochs=3, max_steps=3 * STEPS_PER_EPOCH, device="cpu")
    with pytest.raises(train.Interrupted, match="after epoch 1, which .*checkpoint.pt holds;"):
        train.train(cfg, tmp_path, progress="off")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(_metrics(tmp_path)) == 1


def test_checkpoint_validation(tmp_path):
    run = {"model": "conv2", "variant": "real4", "dataset": "cifar10"}
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, run, {"epoch": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    with pytest.raises(train.RunError, match="belongs to another run"):
        checkpoint.load(path, {**run, "variant": "quaternion"})
    torch.save({"epoch": 1}, path)
    with pytest.raises(train.RunError, match="not a quatnn checkpoint"):
        checkpoint.load(path, run)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(train.RunError, match="corrupt or not a checkpoint"):
        checkpoint.load(path, run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_an_atomic_write_lands_after_it(tmp_path, signum):
    """Ctrl-C inside torch.save would break its zip writer: the write finishes first, then
    the signal reaches the handler that was there before (here: one raising
    KeyboardInterrupt), and the handlers are as they were."""
    path = tmp_path / "checkpoint.pt"

    def interrupted_write(f):
        f.write(b"first half, ")
        signal.raise_signal(signum)  # arrives mid-write
        f.write(b"second half")

    def to_interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signum, to_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.write_atomic(path, interrupted_write)
        assert signal.getsignal(signum) is to_interrupt
    finally:
        signal.signal(signum, previous)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert path.read_bytes() == b"first half, second half"


@pytest.mark.parametrize(
    ("dataset", "model", "writer", "shape"),
    [
        ("mnist", "lenet_300_100", write_mnist, [784]),
        ("cifar10", "conv2", write_cifar10, [4, 32, 32]),
        ("imagenet32", "conv2", write_imagenet, [4, 32, 32]),
    ],
)
def test_trains_on_files_in_the_real_formats(tmp_path, dataset, model, writer, shape):
    root = writer(tmp_path / "data")
    cfg = train.TrainConfig(
        model=model,
        dataset=dataset,
        data_dir=str(root),
        epochs=2,
        batch_size=8,
        max_steps=3,
        device="cpu",
    )
    summary = train.train(cfg, tmp_path / "run", progress="off", download=False)
    assert summary["steps"] == 3 and summary["epochs"] == 1  # max_steps ends epoch 1 early
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["step"] == 3
    # more than 10 classes (ImageNet's 1000): the top-5 accuracy too
    top5 = dataset == "imagenet32"
    assert ("test_top5" in rows[0], "best_test_top5" in summary) == (top5, top5)
    if top5:
        assert summary["final_test_top5"] == rows[0]["test_top5"] >= rows[0]["test_acc"]
        assert f"top-5 {rows[0]['test_top5']:.2%}" in (tmp_path / "run" / "train.log").read_text()
    again = evaluate_run(tmp_path / "run")  # the model and data rebuilt from the folder
    assert (again["acc"], again["top5"]) == (rows[0]["test_acc"], rows[0].get("test_top5"))
    if dataset == "cifar10":  # the test split alone reads no training file
        for batch in (root / "cifar-10-batches-py").glob("data_batch_*"):
            batch.unlink()
        assert evaluate_run(tmp_path / "run")["acc"] == rows[0]["test_acc"]
        with pytest.raises(train.RunError, match="cannot be read|not found"):
            evaluate_run(tmp_path / "run", split="train")
    test_set = data.load(dataset, root, train=False, encoding=summary["encoding"], download=False)
    assert list(test_set[0][0].shape) == shape
    # exports name the outputs as the dataset's files do (CIFAR's batches.meta, ImageNet's
    # label numbers)
    from quatnn.export import export_run, read_metadata

    export_run(tmp_path / "run", "safetensors", tmp_path / "m.safetensors")
    assert read_metadata(tmp_path / "m.safetensors")["extra"]["classes"] == test_set.classes


def test_default_variants_need_no_dataset_files():
    """An image folder is RGB whatever it holds: compare without --variants needs no root."""
    from quatnn.prune.lottery import reference_variant
    from quatnn.train.runner import default_variants

    assert default_variants("imagefolder") == default_variants("cifar10")
    assert default_variants("cifar10") == ("real3", "real4", "quaternion")
    assert default_variants("mnist") == ("real", "quaternion")
    assert reference_variant("imagefolder") == "real4"


def test_a_runs_config_serves_other_variants_with_their_own_encoding(tmp_path):
    """config.toml keeps "auto" (summary.json names the encoding used), so a quaternion
    run's config re-run as ``real`` feeds plain gray images, and the run still resumes."""
    cfg = train.TrainConfig(variant="quaternion", epochs=2, max_steps=2, device="cpu")
    run = tmp_path / "run"
    summary = train.train(cfg, run, progress="off")
    assert summary["encoding"] == "group4"
    saved, _ = load_config(run / "config.toml", {})
    assert saved.encoding == "auto"
    assert train.resolve(saved).encoding == "group4"
    other = train.resolve(dataclasses.replace(saved, variant="real"))
    assert other.encoding == "identity"
    again = train.train(saved, run, if_exists="continue", progress="off")  # same run: finished
    assert again == summary
    explicit = dataclasses.replace(saved, encoding="group4", variant="real")
    assert train.resolve(explicit).encoding == "group4"  # asked for: kept


def test_a_new_comparison_without_its_data_writes_nothing(tmp_path):
    cfg = train.TrainConfig(dataset="mnist", data_dir=str(tmp_path / "data"), device="cpu")
    with pytest.raises(train.RunError, match="'mnist' not found"):
        train.compare(cfg, tmp_path / "cmp", seeds=(0,), download=False, progress="off")
    assert not (tmp_path / "cmp").exists()  # fixing the command later needs no --overwrite


RECIPES = ["lenet_mnist", "conv2_cifar10", "conv4_cifar10", "conv6_cifar10", "conv4_cifar100",
           "conv6_cifar100", "resnet18_cifar100"]  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES)
def test_experiment_recipes_load_and_build(recipe):
    cfg, extra = load_config(EXPERIMENTS / f"{recipe}.toml", {}, compare=True)
    assert extra["variants"] and len(extra["seeds"]) >= 3
    info = data.info(cfg.dataset)
    for variant in extra["variants"]:
        train.resolve(train.merge(cfg, {"variant": variant}))
        models.create(cfg.model, variant, num_classes=info.num_classes, **cfg.options)


def _dropout_trainer() -> train.Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 4)
    )
    return train.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_resume_restores_the_global_rng_that_dropout_draws_from():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    whole = _dropout_trainer()
    whole.fit(loader, loader, epochs=2)
    part = _dropout_trainer()
    part.fit(loader, loader, epochs=1)
    state = part.state_dict()
    resumed = _dropout_trainer()  # a fresh process: its generator is elsewhere
    torch.rand(5)
    resumed.load_state_dict(state)
    resumed.fit(loader, loader, epochs=2)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_sampler_shuffles_each_epoch_anew():
    from quatnn.train.seeding import EpochSampler

    sampler = EpochSampler(200, seed=0)
    orders = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert sorted(i for _, i in keys) == list(range(200)) and {e for e, _ in keys} == {epoch}
        orders.append([i for _, i in keys])
    assert orders[0] != orders[1]


class _Draws(torch.utils.data.Dataset):
    """An 'augmentation' that draws from torch's global generator."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(8)


def test_seeded_dataset_augments_each_epoch_anew_and_reproducibly():
    from quatnn.train.seeding import SeededDataset

    ds = SeededDataset(_Draws(), seed=3)
    for i in range(4):
        assert torch.equal(ds[(1, i)], ds[(1, i)])
        assert not torch.equal(ds[(1, i)], ds[(2, i)])


# ---------------------------------------------------------------- train/config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"momentum": 1.0}, "momentum must be in"),  # [0, 1): 1 never decays
        ({"eval_batch_size": 0}, "eval_batch_size must be at least 1"),
        ({"max_steps": -1}, "max_steps must be >= 0"),
        ({"val_split": 1.0}, "val_split must be in"),  # nothing left to train on
        ({"val_split": -0.1}, "val_split must be in"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm must be >= 0"),
        ({"best_by": "val_acc"}, "best_by must be one of acc, loss"),
    ],
)
def test_config_validation_ranges(values, message):
    with pytest.raises(train.RunError, match=message):
        TrainConfig.from_dict(values).validate()
    TrainConfig.from_dict({"momentum": 0.0, "eval_batch_size": 1, "max_steps": 0}).validate()


def test_config_bool_is_not_an_int():
    # TOML `epochs = true` is a boolean, not a count of epochs
    with pytest.raises(train.RunError, match="epochs must be of type int"):
        TrainConfig.from_dict({"epochs": True})
    with pytest.raises(train.RunError, match="seed must be of type int"):
        TrainConfig.from_dict({"seed": False})


def test_command_line_seeds_and_variants_win_over_the_recipe(tmp_path):
    """Later sources win: defaults, then the file, then command-line flags."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('seeds = [0, 1]\nvariants = ["real"]\n')
    _, extra = load_config(recipe, {"seeds": [7], "variants": ["quaternion"]}, compare=True)
    assert extra == {"seeds": [7], "variants": ["quaternion"]}
    _, extra = load_config(recipe, {"seeds": [7]}, compare=True)
    assert extra == {"seeds": [7], "variants": ["real"]}


def test_per_device_backend_is_accepted():
    import torch.distributed as dist

    assert "gloo" in dist.Backend.backend_list
    TrainConfig(backend="cpu:gloo").validate()
    with pytest.raises(train.RunError, match="backend must be"):
        TrainConfig(backend="gloo:cpu").validate()


# ---------------------------------------------------------------- train/checkpoint


def test_a_failing_atomic_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old contents")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_remove_leftovers_removes_only_write_atomic_temporaries(tmp_path):
    # a real leftover: what write_atomic names its temporary file
    ours = tmp_path / f".checkpoint.pt.{os.getpid()}.0123abcd.tmp"
    foreign = [tmp_path / ".notes.tmp", tmp_path / ".cache.tmp", tmp_path / ".a.b.tmp"]
    for p in (ours, *foreign):
        p.write_text("x")
    checkpoint.remove_leftovers(tmp_path)
    assert not ours.exists()
    assert all(p.exists() for p in foreign)


# ---------------------------------------------------------------- train/runner

ROWS = [  # epoch 2 is the best; the first epoch is slow (warm-up)
    {"epoch": 1, "train_acc": 0.50, "test_acc": 0.60, "test_loss": 1.0, "epoch_seconds": 9.0,
     "eval_seconds": 0.5, "samples_per_second": 100.0},
    {"epoch": 2, "train_acc": 0.70, "test_acc": 0.90, "test_loss": 0.5, "epoch_seconds": 2.0,
     "eval_seconds": 0.25, "samples_per_second": 400.0},
    {"epoch": 3, "train_acc": 0.80, "test_acc": 0.85, "test_loss": 0.6, "epoch_seconds": 4.0,
     "eval_seconds": 0.25, "samples_per_second": 200.0},
]  # fmt: skip


def test_summary_fields_follow_the_history():
    trainer = types.SimpleNamespace(history=ROWS, step=30, model=nn.Linear(3, 2), amp_dtype=None)
    s = runner._summary(TrainConfig(), trainer, torch.device("cpu"), 1)
    assert s["final_train_acc"] == 0.80 and s["final_test_acc"] == 0.85
    assert (s["best_test_acc"], s["best_epoch"]) == (0.90, 2)
    assert "best_val_acc" not in s  # no validation set
    assert s["total_seconds"] == pytest.approx(9.5 + 2.25 + 4.25)  # training and evaluation
    assert s["seconds_per_epoch"] == pytest.approx(3.0)  # epochs after the warm-up one
    assert s["samples_per_second"] == pytest.approx(300.0)


def test_with_a_validation_set_the_best_epoch_is_that_of_the_best_validation_accuracy():
    rows = [
        {**row, "val_loss": 1.0, "val_acc": val}
        for row, val in zip(ROWS, (0.5, 0.7, 0.8), strict=True)
    ]
    trainer = types.SimpleNamespace(history=rows, step=30, model=nn.Linear(3, 2), amp_dtype=None)
    s = runner._summary(TrainConfig(), trainer, torch.device("cpu"), 1)
    assert (s["best_epoch"], s["best_val_acc"], s["best_test_acc"]) == (3, 0.8, 0.85)
    assert s["final_test_acc"] == 0.85


class _Quiet:
    def write(self, line: str) -> None:
        pass


@pytest.mark.parametrize(
    ("test_accs", "val_accs", "losses", "best_epoch"),
    [
        ((0.5, 0.7, 0.7), None, None, 2),  # ties: the first
        ((0.5, 0.7, 0.6), (0.5, 0.6, 0.6), None, 2),  # validation ties: the first
        ((0.5, 0.9, 0.6), (0.5, 0.6, 0.7), None, 3),  # the validation accuracy decides
        ((0.5, 0.9, 0.6), None, (0.9, 0.4, 0.3), 3),  # best_by loss: the lowest test loss
        ((0.5, 0.9, 0.6), (0.5, 0.6, 0.7), (0.3, 0.4, 0.3), 1),  # validation loss; ties
    ],
)
def test_best_pt_holds_the_first_epoch_of_the_best_accuracy_or_loss(
    tmp_path, test_accs, val_accs, losses, best_epoch
):
    """best.pt and summary's best_epoch name the same epoch, chosen by validation
    accuracy (or loss, with best_by) where the run has it, the first of equals."""
    cfg = TrainConfig(best_by="loss" if losses else "acc")
    writer = runner.RunWriter(tmp_path, cfg, _Quiet(), None, classes=["a", "b"])
    model = nn.Linear(2, 2)
    trainer = types.SimpleNamespace(history=[], model=model, state_dict=lambda: {"epoch": 0})
    for epoch, acc in enumerate(test_accs, 1):
        row = {"epoch": epoch, "step": epoch, "train_loss": 1.0, "train_acc": 0.5,
               "test_loss": 1.0, "test_acc": acc, "lr": 1e-3, "epoch_seconds": 1.0,
               "eval_seconds": 0.1, "samples_per_second": 1.0}  # fmt: skip
        if val_accs:
            row |= {"val_loss": 1.0, "val_acc": val_accs[epoch - 1]}
        if losses:
            row[f"{'val' if val_accs else 'test'}_loss"] = losses[epoch - 1]
        trainer.history.append(row)
        with torch.no_grad():
            model.weight.fill_(epoch)
        writer.on_epoch_end(trainer, row)
    summary = runner._summary(
        cfg, types.SimpleNamespace(**vars(trainer), step=3, amp_dtype=None), torch.device("cpu"), 1
    )
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] == best_epoch
    assert best["test_acc"] == test_accs[best_epoch - 1]
    assert torch.all(best["model"]["weight"] == best_epoch)
    if val_accs:
        assert best["val_acc"] == summary["best_val_acc"] == val_accs[best_epoch - 1]


def test_a_validation_split_is_held_out_of_training_and_chooses_best_pt(tmp_path):
    """With --val-split, the run trains on the rest of the training set, evaluates on the
    held-out images (recomputed here from best.pt) and keeps the epoch they score best."""
    cfg = TrainConfig(variant="real", epochs=3, val_split=0.2, device="cpu")
    summary = train.train(cfg, tmp_path / "run", progress="off")
    rows = _metrics(tmp_path / "run")
    plain = data.load("digits", train=True, augment=False)
    held = data.validation_split(plain, plain, 0.2)[1].indices
    assert summary["steps"] == 3 * math.ceil((len(plain) - len(held)) / cfg.batch_size)
    best = max(rows, key=lambda row: (row["val_acc"], -row["epoch"]))
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_val_acc"] == best["val_acc"]
    assert summary["best_test_acc"] == best["test_acc"]
    model = models.create(
        "lenet_300_100", "real", num_classes=10, in_channels=1, input_size=(28, 28)
    )
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()

    def accuracy(images: list[int], dataset) -> float:
        x = torch.stack([dataset[i][0] for i in images])
        y = torch.tensor([dataset[i][1] for i in images])
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    test = data.load("digits", train=False)
    assert state["epoch"] == best["epoch"]
    assert accuracy(held, plain) == pytest.approx(best["val_acc"], abs=1e-6)
    assert accuracy(range(len(test)), test) == pytest.approx(best["test_acc"], abs=1e-6)
    assert best["val_acc"] > 0.8  # it learned
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"val acc {best['val_acc']:.2%}" in log
    images = f"{len(plain) - len(held):,} training, {len(held)} validation, {len(test)} test"
    assert images in log


def test_evaluate_run_of_an_amp_run_evaluates_under_its_autocast(tmp_path):
    cfg = TrainConfig(epochs=1, max_steps=6, amp=True, device="cpu")
    summary = train.train(cfg, tmp_path / "run", progress="off")
    result = evaluate_run(tmp_path / "run")
    assert result["acc"] == summary["final_test_acc"]
    assert result["loss"] == pytest.approx(_metrics(tmp_path / "run")[0]["test_loss"], rel=1e-5)


def test_evaluate_run_measures_what_training_measured_and_more(tmp_path):
    cfg = TrainConfig(variant="real", epochs=3, val_split=0.2, device="cpu")
    summary = train.train(cfg, tmp_path / "run", progress="off")
    rows = _metrics(tmp_path / "run")
    best = rows[summary["best_epoch"] - 1]
    test = evaluate_run(tmp_path / "run", "best.pt")
    assert (test["epoch"], test["split"], test["images"]) == (summary["best_epoch"], "test", 359)
    assert test["acc"] == summary["best_test_acc"]
    assert test["loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    val = evaluate_run(tmp_path / "run", "best.pt", "val")
    assert val["acc"] == summary["best_val_acc"]
    last = evaluate_run(tmp_path / "run")  # checkpoint.pt: the last epoch
    assert (last["epoch"], last["acc"]) == (3, summary["final_test_acc"])
    plain = data.load("digits", train=True, augment=False)
    held = data.validation_split(plain, plain, 0.2)[1].indices
    trained = evaluate_run(tmp_path / "run", split="train")
    assert trained["images"] == len(plain) - len(held) and trained["acc"] > 0.9
    # the confusion matrix: rows are the test set's classes, the diagonal its hits
    labels = torch.tensor([y for _, y in data.load("digits", train=False)])
    confusion = torch.tensor(test["confusion"])
    assert torch.equal(confusion.sum(1), torch.bincount(labels, minlength=10))
    assert confusion.trace().item() / len(labels) == test["acc"]
    for t, row in enumerate(test["per_class"]):
        assert row["acc"] == confusion[t, t].item() / confusion[t].sum().item()
        wrong = confusion[t].clone()
        wrong[t] = 0
        taken = None if wrong.max() == 0 else test["classes"][int(wrong.argmax())]
        assert (row["class"], row["taken_for"]) == (test["classes"][t], taken)


def test_evaluate_run_refuses_what_it_cannot_evaluate(tmp_path):
    cfg = TrainConfig(variant="real", epochs=1, max_steps=2, device="cpu")
    train.train(cfg, tmp_path / "run", progress="off")
    with pytest.raises(train.RunError, match="held out no validation set"):
        evaluate_run(tmp_path / "run", split="val")
    with pytest.raises(train.RunError, match="split must be one of test, val, train"):
        evaluate_run(tmp_path / "run", split="dev")
    with pytest.raises(train.RunError, match="batch_size must be at least 1, got 0"):
        evaluate_run(tmp_path / "run", batch_size=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.RunError, match="holds no run"):
        evaluate_run(tmp_path / "empty")
    (tmp_path / "run" / "best.pt").write_bytes(b"half a file")
    with pytest.raises(train.RunError, match="best.pt is corrupt"):
        evaluate_run(tmp_path / "run", "best.pt")


def test_a_run_with_another_validation_split_is_a_different_run(tmp_path):
    cfg = TrainConfig(variant="real", epochs=1, max_steps=1, device="cpu")
    train.train(cfg, tmp_path / "run", progress="off")
    with pytest.raises(train.RunError, match="val_split"):
        train.train(train.merge(cfg, {"val_split": 0.1}), tmp_path / "run", if_exists="resume")


def test_overwrite_replaces_a_different_run(tmp_path):
    cfg = TrainConfig(variant="real", epochs=1, max_steps=1, device="cpu")
    train.train(cfg, tmp_path / "run", progress="off")
    other = train.merge(cfg, {"lr": 5e-4})
    summary = train.train(other, tmp_path / "run", if_exists="overwrite", progress="off")
    assert summary["steps"] == 1
    assert "lr = 0.0005" in (tmp_path / "run" / "config.toml").read_text()


@pytest.mark.skipif(runner.fcntl is None, reason="run folders are locked with fcntl.flock")
@pytest.mark.parametrize("if_exists", ["resume", "overwrite"])
def test_a_run_folder_in_use_is_refused_and_left_alone(tmp_path, if_exists):
    """While a process trains in a folder (its lock held), a second one that would resume or
    overwrite the run there stops with a RunError and changes nothing."""
    import fcntl

    cfg = TrainConfig(variant="real", epochs=1, max_steps=1, device="cpu")
    out = tmp_path / "run"
    train.train(cfg, out, progress="off")
    (out / "summary.json").unlink()  # unfinished, as while it trains
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the training process holds it
        with pytest.raises(train.RunError, match="another process is training in"):
            train.train(cfg, out, if_exists=if_exists, progress="off")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        os.close(fd)
    train.train(cfg, out, if_exists=if_exists, progress="off")  # once free, it goes on
    assert (out / "summary.json").is_file()


def test_a_stale_best_pt_is_removed_when_a_run_restarts_from_epoch_0(tmp_path):
    """A run whose checkpoint holds epoch 0 starts over: no best.pt of a lost epoch stays."""
    cfg = TrainConfig(variant="real", epochs=1, device="cpu")

    class StopAt(train.Callback):
        def on_step_end(self, trainer):
            if trainer.step == 1:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        train.train(cfg, out, progress="off", callbacks=[StopAt()])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    checkpoint.save(out / "best.pt", cfg.to_dict(), {"epoch": 1, "test_acc": 1.0, "model": {}})
    with pytest.raises(train.Interrupted):
        train.train(cfg, out, if_exists="resume", progress="off", callbacks=[StopAt()])
    assert not (out / "best.pt").exists()
