"""Tests for pruning masks, strategies, lottery tickets (quatnn.prune) and their report."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quatnn import cli, models
from quatnn.nn import QLinear
from quatnn.prune import (
    LotteryConfig,
    MaskCallback,
    PruneSpec,
    attach,
    dense_masks,
    detach,
    layer_types,
    level_dir,
    load_masks,
    load_recipe,
    masks_of,
    prunable_layers,
    prune,
    random_like,
    run_lottery,
    save_masks,
)
from quatnn.report.lottery import is_lottery, write_lottery_report
from quatnn.train import (
    Callback,
    Interrupted,
    RunError,
    TrainConfig,
    Trainer,
)
from quatnn.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _randomize(model: nn.Module, seed: int) -> None:
    """New random weights, as training would leave them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in prunable_layers(model).values():
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


def _kept(masks: dict) -> dict:
    return {name: int(mask.sum()) for name, mask in masks.items()}


# ------------------------------------------------------------------ strategies


@pytest.mark.parametrize("variant", ["real", "quaternion"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_sparsity_after_each_level_is_one_minus_keep_rate_to_the_level(variant, scope):
    model = models.create("lenet_300_100", variant)
    spec, masks = PruneSpec(scope=scope, rate=0.2), dense_masks(model)
    sizes = {name: mask.numel() for name, mask in masks.items()}
    for level in range(1, 5):
        _randomize(model, level)
        new = prune(model, masks, spec)
        assert all((new[n] <= masks[n]).all() for n in masks), "pruned weights stay pruned"
        masks, keep = new, 0.8**level
        if scope == "layerwise":
            for name, kept in _kept(masks).items():
                assert abs(kept - sizes[name] * keep) <= 1, (name, level)
        else:
            assert abs(sum(_kept(masks).values()) - sum(sizes.values()) * keep) <= len(sizes)


def _two_layers(small_scale: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU())
    with torch.no_grad():
        model[0].weight.mul_(small_scale)
    return model


def test_global_prunes_more_from_the_layer_with_smaller_weights_layerwise_does_not():
    model = _two_layers(0.1)
    pruned = {
        scope: {
            n: 1 - m.float().mean().item()
            for n, m in prune(model, dense_masks(model), PruneSpec(scope=scope, rate=0.5)).items()
        }
        for scope in ("global", "layerwise")
    }
    assert pruned["global"]["0"] > 0.5 > pruned["global"]["2"]
    assert pruned["global"]["0"] + pruned["global"]["2"] == pytest.approx(1.0)
    assert pruned["layerwise"] == {"0": 0.5, "2": 0.5}


def test_layerwise_rates_per_layer_type_and_skips():
    model = models.create("lenet_300_100", "real")
    assert layer_types(model) == {"fc1": "fc", "fc2": "fc", "head": "output"}
    rates = {"fc": 0.2, "output": 0.1}  # Frankle & Carbin 2019 for Lenet
    masks = prune(model, dense_masks(model), PruneSpec(scope="layerwise", rates=rates))
    assert _kept(masks) == {"fc1": 188160, "fc2": 24000, "head": 900}
    skipping = PruneSpec(scope="layerwise", rate=0.5, skip=("output", "fc1"))
    assert _kept(prune(model, dense_masks(model), skipping)) == {
        "fc1": 235200,
        "fc2": 15000,
        "head": 1000,
    }
    with pytest.raises(ValueError, match="skip names no layer"):
        prune(model, dense_masks(model), PruneSpec(skip=("conv9",)))
    with pytest.raises(ValueError, match="layerwise"):
        PruneSpec(rates=rates)
    with pytest.raises(ValueError, match="to values in \\[0, 1\\), got conv='abc'"):
        PruneSpec(scope="layerwise", rates={"conv": "abc"})


def test_quaternion_granularity_prunes_whole_quaternions_by_norm():
    layer = QLinear(4, 8, bias=False)  # weight (4, 2, 1): quaternions A and B
    with torch.no_grad():
        layer.weight.copy_(
            torch.tensor([[0.9, 0.5], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])[..., None]
        )
    model = nn.Sequential(layer)
    element = prune(model, dense_masks(model), PruneSpec(rate=0.5))["0"]
    quaternion = prune(model, dense_masks(model), PruneSpec(rate=0.5, granularity="quaternion"))
    assert element[:, 0, 0].tolist() == [True, False, False, False]  # A's zeros go first
    assert quaternion["0"][:, :, 0].tolist() == [[False, True]] * 4  # |A| = 0.9 < |B| = 1


def test_quaternion_granularity_on_a_mixed_model():
    model = nn.Sequential(QLinear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    _randomize(model, 0)
    spec = PruneSpec(rate=0.3, granularity="quaternion")
    masks = prune(model, dense_masks(model), spec)
    mask, norms = masks["0"], model[0].weight.detach().norm(dim=0)
    assert (mask == mask[0]).all(), "all four components pruned together"
    assert norms[~mask[0]].max() <= norms[mask[0]].min()
    head = masks["2"]
    assert not head.all(1).all() and head.any(1).all(), "the real head is pruned by element"
    pruned = sum(m.numel() - int(m.sum()) for m in masks.values())
    assert abs(pruned - 0.3 * sum(m.numel() for m in masks.values())) < 4


def test_quaternion_pruning_ranks_by_the_euclidean_norm():
    layer = QLinear(4, 8, bias=False)  # two quaternions, rows of weight (4, 2, 1)
    with torch.no_grad():  # |a| = 1.5 > |b| = 1.4, though b's components are larger in sum
        w = torch.tensor([[1.5, 0.7], [0.0, 0.7], [0.0, 0.7], [0.0, 0.7]])
        layer.weight.copy_(w[..., None])
    model = nn.Sequential(layer)
    mask = prune(model, dense_masks(model), PruneSpec(rate=0.5, granularity="quaternion"))["0"]
    norms = layer.weight.detach().double().norm(dim=0)
    assert norms[~mask[0]].max() <= norms[mask[0]].min()


def test_layerwise_quaternion_granularity_removes_the_rate_of_each_layers_quaternions():
    model = models.create("lenet_300_100", "quaternion")
    spec = PruneSpec(scope="layerwise", rate=0.2, granularity="quaternion")
    masks = prune(model, dense_masks(model), spec)
    for name, layer in prunable_layers(model).items():
        quaternion = isinstance(layer, QLinear)
        units = layer.weight[0].numel() if quaternion else layer.weight.numel()
        size = 4 if quaternion else 1
        assert int(masks[name].sum()) == size * (units - round(0.2 * units)), name


def test_random_control_keeps_each_layers_counts_with_another_mask():
    model = models.create("lenet_300_100", "quaternion")
    masks = prune(model, dense_masks(model), PruneSpec(rate=0.6, granularity="quaternion"))
    generator = torch.Generator().manual_seed(0)
    control = random_like(model, masks, "quaternion", generator)
    assert _kept(control) == _kept(masks)
    assert all(not torch.equal(control[n], masks[n]) for n in ("fc1", "fc2", "head"))
    assert (control["fc1"] == control["fc1"][0]).all()
    spec = PruneSpec(method="random", scope="layerwise", rate=0.5)
    assert _kept(prune(model, dense_masks(model), spec, generator)) == {
        "fc1": 29400,
        "fc2": 3750,
        "head": 500,
    }


# ------------------------------------------------------------------ masks in training


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=generator), torch.randint(0, 4, (96,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_pruned_weights_stay_exactly_zero_through_training(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(QLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    trainer = Trainer(model, OPTIMIZERS[optimizer](model.parameters()))
    trainer.fit(_loader(), _loader(), epochs=1)  # dense: the optimizer state is non-zero
    masks = prune(model, dense_masks(model), PruneSpec(rate=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.callbacks.append(MaskCallback(masks))
    trainer.fit(_loader(), _loader(), epochs=3)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert (weight[~mask] == 0).all(), "pruned weights are exactly zero"
        assert (weight.grad[~mask] == 0).all(), "and get no gradient"
        assert not torch.equal(weight[mask], before[f"{name}.weight"][mask]), "others train"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradient_hook_alone_keeps_a_fresh_optimizer_from_reviving_weights(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(QLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = prune(model, dense_masks(model), PruneSpec(rate=0.5))
    attach(model, masks)
    opt = OPTIMIZERS[optimizer](model.parameters())
    for x, y in _loader():  # no enforce() after the steps
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()


def test_masks_attach_detach_save_and_load(tmp_path):
    model = models.create("lenet_300_100", "quaternion")
    masks = prune(model, dense_masks(model), PruneSpec(rate=0.5))
    attach(model, masks)
    assert "fc1.weight_mask" not in model.state_dict(), "checkpoints load into plain models"
    save_masks(tmp_path / "masks.pt", masks_of(model))
    loaded = load_masks(tmp_path / "masks.pt")
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    detach(model)
    assert masks_of(model) == {}
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    model(torch.randn(2, 784)).sum().backward()
    assert (model.fc1.weight.grad != 0).any(), "no hook left after detach"
    with pytest.raises(ValueError, match="shape"):
        attach(model, {"fc1": torch.ones(3, dtype=torch.bool)})


def _masked_model() -> tuple[nn.Sequential, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(QLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = prune(model, dense_masks(model), PruneSpec(rate=0.5))
    attach(model, masks)
    return model, masks


def _grad_hooks(module: nn.Module) -> int:
    return len(module.weight._backward_hooks or {})


def _pruned_grads_are_zero(model: nn.Module, masks: dict) -> bool:
    model.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    return all((model.get_submodule(n).weight.grad[~m] == 0).all() for n, m in masks.items())


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_masked_model_saved_whole_stays_masked_when_loaded(how):
    model, masks = _masked_model()
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    else:
        loaded = pickle.loads(pickle.dumps(model))
    assert masks_of(loaded).keys() == masks.keys()
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    opt = OPTIMIZERS["adam-wd"](loaded.parameters())
    for x, y in _loader():  # no enforce() after the steps: the gradient hook alone
        opt.zero_grad()
        nn.functional.cross_entropy(loaded(x), y).backward()
        opt.step()
    for name, mask in masks.items():
        weight = loaded.get_submodule(name).weight
        assert (weight[~mask] == 0).all(), "pruned weights stay exactly zero"
        assert (weight.grad[~mask] == 0).all(), "and get no gradient"
        assert not torch.equal(weight[mask], before[f"{name}.weight"][mask]), "others train"
    assert _pruned_grads_are_zero(model, masks), "the original is still masked"


def test_a_copied_masked_model_masks_its_gradients_and_detaches_on_its_own():
    model, masks = _masked_model()
    copied = copy.deepcopy(model)
    assert _pruned_grads_are_zero(copied, masks), "masked without attaching again"
    attach(copied, masks)
    attach(copied, masks)
    assert _grad_hooks(copied[0]) == _grad_hooks(model[0]) == 1, "attach adds no second hook"
    assert _pruned_grads_are_zero(copied, masks)
    detach(copied)
    assert masks_of(copied) == {} and _grad_hooks(copied[0]) == 0
    assert not _pruned_grads_are_zero(copied, masks), "the copy is detached"
    assert _pruned_grads_are_zero(model, masks), "the original is not"
    other = copy.deepcopy(model)
    detach(model)
    assert not _pruned_grads_are_zero(model, masks)
    assert _pruned_grads_are_zero(other, masks), "detaching the original leaves the copy"


# ------------------------------------------------------------------ lottery runs

CFG = TrainConfig(model="lenet_300_100", dataset="digits", epochs=2, device="cpu")
LOTTERY = LotteryConfig(
    levels=2, prune=PruneSpec(rate=0.5), controls=("reinit", "random"), control_levels=(1,)
)


class StartRecorder(Callback):
    """Records each level's weights and masks once its training starts."""

    def __init__(self) -> None:
        self.starts: list[tuple[dict, dict]] = []

    def on_train_start(self, trainer: Trainer) -> None:
        state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        self.starts.append((state, masks_of(trainer.model)))


@pytest.fixture(scope="module")
def lottery(tmp_path_factory):
    """Lenet real and quaternion on digits: levels at 100%, 50% (with controls), 25%."""
    out = tmp_path_factory.mktemp("lottery")
    recorder = StartRecorder()
    rows = run_lottery(CFG, out, LOTTERY, seeds=(0,), progress="off", callbacks=[recorder])
    starts = {
        (r["variant"], r["level"], r["control"]): s
        for r, s in zip(rows, recorder.starts, strict=True)
    }
    return out, rows, starts


def _model_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_lottery_writes_a_run_folder_masks_and_sparsity_per_level(lottery):
    out, rows, _ = lottery
    assert is_lottery(out)
    assert [(r["variant"], r["level"], r["control"]) for r in rows[:5]] == [
        ("real", 0, None),
        ("real", 1, None),
        ("real", 1, "reinit"),
        ("real", 1, "random"),
        ("real", 2, None),
    ]
    for row in rows:
        names = {p.name for p in row["path"].iterdir()}
        assert {
            "config.toml",
            "metrics.jsonl",
            "summary.json",
            "masks.pt",
            "sparsity.json",
        } <= names
    for variant, start in (("real", 100.0), ("quaternion", 67710 / 266610 * 100)):
        for level in range(3):
            counts = json.loads((level_dir(out, variant, 0, level) / "sparsity.json").read_text())
            assert counts["prunable"]["percent_remaining"] == pytest.approx(100 * 0.5**level)
            assert counts["reference"] == "real" and counts["real_params"]["total"] == 266610
            if level == 0:
                assert counts["real_params"]["percent_remaining"] == pytest.approx(start)


def test_lottery_keeps_accuracy_at_half_the_weights(lottery):
    _, rows, _ = lottery
    for row in rows:
        if row["level"] == 1 and row["control"] is None:
            assert row["final_test_acc"] > 0.8, row


def test_rewinding_restores_the_saved_values_of_the_survivors(lottery):
    out, _, starts = lottery
    for variant in ("real", "quaternion"):
        rewind = _model_state(level_dir(out, variant, 0, 0) / "rewind.pt")
        init, _ = starts[(variant, 0, None)]
        assert all(torch.equal(rewind[k], init[k]) for k in init), "rewind 0 = initialization"
        for level in (1, 2):
            state, masks = starts[(variant, level, None)]
            saved = load_masks(level_dir(out, variant, 0, level) / "masks.pt")
            assert all(torch.equal(masks[n], saved[n]) for n in saved)
            for key, value in state.items():
                name = key.rsplit(".", 1)[0]
                expected = rewind[key] * saved[name] if key.endswith("weight") else rewind[key]
                assert torch.equal(value, expected), (variant, level, key)


def test_controls_branch_off_the_ticket(lottery):
    out, _, starts = lottery
    for variant in ("real", "quaternion"):
        ticket = load_masks(level_dir(out, variant, 0, 1) / "masks.pt")
        reinit = load_masks(level_dir(out, variant, 0, 1, "reinit") / "masks.pt")
        random = load_masks(level_dir(out, variant, 0, 1, "random") / "masks.pt")
        assert all(torch.equal(reinit[n], ticket[n]) for n in ticket)
        assert _kept(random) == _kept(ticket)
        assert all(not torch.equal(random[n], ticket[n]) for n in ticket)
        ticket_start, _ = starts[(variant, 1, None)]
        reinit_start, _ = starts[(variant, 1, "reinit")]
        weight = reinit_start["fc1.weight"][ticket["fc1"]]
        assert (weight != ticket_start["fc1.weight"][ticket["fc1"]]).all()
    assert not (level_dir(out, "real", 0, 2, "reinit")).exists(), "controls at level 1 only"


def test_pruned_weights_are_zero_in_the_trained_checkpoints(lottery):
    out, rows, _ = lottery
    for row in rows:
        state = _model_state(row["path"] / "checkpoint.pt")
        for name, mask in load_masks(row["path"] / "masks.pt").items():
            assert (state[f"{name}.weight"][~mask] == 0).all(), row["path"]


def test_running_a_lottery_again_trains_nothing(lottery):
    out, rows, _ = lottery
    mtimes = {r["path"]: (r["path"] / "summary.json").stat().st_mtime_ns for r in rows}
    again = run_lottery(CFG, out, LOTTERY, seeds=(0,), progress="off")
    assert not any(r["trained"] for r in again)
    assert [r["final_test_acc"] for r in again] == [r["final_test_acc"] for r in rows]
    assert mtimes == {r["path"]: (r["path"] / "summary.json").stat().st_mtime_ns for r in again}
    other = LotteryConfig(levels=2, prune=PruneSpec(rate=0.3))
    with pytest.raises(RunError, match="different lottery") as refused:
        run_lottery(CFG, out, other, seeds=(0,), progress="off")
    # the command it suggests continues the lottery there: nothing left to train
    command = str(refused.value).split("continue that one with: ")[1]
    assert command == f"quatnn lottery --config {out / 'lottery.toml'} --out {out}"
    assert cli.main([*command.split()[1:], "--progress", "off"]) == 0
    assert mtimes == {r["path"]: (r["path"] / "summary.json").stat().st_mtime_ns for r in again}


def test_a_lottery_continued_with_another_seed_keeps_every_seed_in_its_recipe(tmp_path):
    cfg = dataclasses.replace(CFG, epochs=1, max_steps=2)
    lottery = LotteryConfig(levels=1, prune=PruneSpec(rate=0.5))
    for seed in (0, 1):
        run_lottery(cfg, tmp_path, lottery, variants=("real",), seeds=(seed,), progress="off")
    _, extra, _ = load_recipe(tmp_path / "lottery.toml")
    assert extra == {"variants": ["real"], "seeds": [0, 1]}


def test_min_acc_stops_each_chain_and_says_so(lottery, capsys):
    out, _, _ = lottery
    strict = dataclasses.replace(LOTTERY, min_acc=1.0)
    again = run_lottery(CFG, out, strict, seeds=(0,), progress="off")
    assert [(r["level"], r["trained"]) for r in again] == [(0, False), (0, False)]
    said = capsys.readouterr().out
    assert said.count("below min_acc 100.00%; levels 1-2 skipped") == 2


@pytest.fixture(scope="module")
def quaternion_lottery(tmp_path_factory):
    """Lenet quaternion on digits pruned by whole quaternions, rewound to epoch 1."""
    out = tmp_path_factory.mktemp("quaternion_lottery")
    lottery = LotteryConfig(
        levels=1,
        prune=PruneSpec(rate=0.5, granularity="quaternion"),
        rewind="1ep",
        controls=("random",),
    )
    run_lottery(CFG, out, lottery, variants=("quaternion",), seeds=(0,), progress="off")
    return out


def test_epoch_rewind_point_is_saved_after_that_epoch(quaternion_lottery):
    level0 = level_dir(quaternion_lottery, "quaternion", 0, 0)
    rewind = torch.load(level0 / "rewind.pt", weights_only=True)
    rows = [json.loads(line) for line in (level0 / "metrics.jsonl").read_text().splitlines()]
    assert (rewind["epoch"], rewind["step"]) == (1, rows[0]["step"])


def test_level_masks_come_from_the_previous_levels_trained_weights(quaternion_lottery):
    """Magnitude pruning judges the trained weights: within each quaternion layer every
    pruned quaternion is no larger (in the trained level-0 checkpoint) than every kept one."""
    trained = _model_state(level_dir(quaternion_lottery, "quaternion", 0, 0) / "checkpoint.pt")
    masks = load_masks(level_dir(quaternion_lottery, "quaternion", 0, 1) / "masks.pt")
    quaternion_layers = [n for n, m in masks.items() if trained[f"{n}.weight"].shape[0] == 4]
    assert quaternion_layers
    for name in quaternion_layers:
        mask, norms = masks[name], trained[f"{name}.weight"].double().norm(dim=0)
        assert (mask == mask[0]).all() and not mask.all(), name
        assert norms[~mask[0]].max() <= norms[mask[0]].min(), name


def test_random_control_keeps_whole_quaternions_at_quaternion_granularity(quaternion_lottery):
    ticket = load_masks(level_dir(quaternion_lottery, "quaternion", 0, 1) / "masks.pt")
    random = load_masks(level_dir(quaternion_lottery, "quaternion", 0, 1, "random") / "masks.pt")
    model = models.create("lenet_300_100", "quaternion")
    for name, layer in prunable_layers(model).items():
        assert int(random[name].sum()) == int(ticket[name].sum())
        if isinstance(layer, QLinear):
            assert (random[name] == random[name][0]).all(), name
            assert not torch.equal(random[name], ticket[name]), name


def test_min_acc_judges_the_ticket_not_its_controls(monkeypatch, tmp_path):
    from quatnn.prune import lottery as L

    def fake_train(cfg, step, callbacks, options):
        step.folder.mkdir(parents=True, exist_ok=True)
        (step.folder / "rewind.pt").touch()
        acc = 0.9 if step.control is None else 0.1
        return {"level": step.level, "control": step.control, "final_test_acc": acc}

    monkeypatch.setattr(L, "_train_level", fake_train)  # the ticket passes, the controls not
    lottery = LotteryConfig(
        levels=3, prune=PruneSpec(rate=0.5), controls=("reinit", "random"), min_acc=0.5
    )
    rows = run_lottery(CFG, tmp_path, lottery, variants=("real",), seeds=(0,), progress="off")
    assert [r["level"] for r in rows if r["control"] is None] == [0, 1, 2, 3]


class InterruptOnce(Callback):
    """Ctrl-C at the first step of epoch 2 of the second training (level 1), once epoch 1
    is checkpointed."""

    def __init__(self) -> None:
        self.trainings = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainings += 1

    def on_step_end(self, trainer: Trainer) -> None:
        if self.trainings == 2 and trainer.epoch == 2:
            raise KeyboardInterrupt


def test_an_interrupted_level_resumes_and_late_rewinding(tmp_path, capsys):
    lottery = LotteryConfig(levels=1, prune=PruneSpec(rate=0.5), rewind="5it")
    kw = {"variants": ("real",), "seeds": (1,), "progress": "off"}
    with pytest.raises(Interrupted, match="run the same quatnn lottery command again"):
        run_lottery(CFG, tmp_path, lottery, callbacks=[InterruptOnce()], **kw)
    level1 = level_dir(tmp_path, "real", 1, 1)
    masks = load_masks(level1 / "masks.pt")
    # the level's log names the lottery's command, and quatnn train refuses the level, whose
    # masks it would drop
    command = f"quatnn lottery --config {tmp_path / 'lottery.toml'} --out {tmp_path}"
    assert f"resume with: {command}" in (level1 / "train.log").read_text()
    assert cli.main(["train", "--resume", str(level1)]) == 2
    assert "is a lottery level" in capsys.readouterr().err
    recorder = StartRecorder()
    rows = run_lottery(CFG, tmp_path, lottery, callbacks=[recorder], **kw)
    assert [r["trained"] for r in rows] == [False, True]
    assert len(recorder.starts) == 1, "only the interrupted level trains"
    assert all(torch.equal(masks[n], load_masks(level1 / "masks.pt")[n]) for n in masks)
    metrics = [json.loads(line) for line in (level1 / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    rewind = torch.load(level_dir(tmp_path, "real", 1, 0) / "rewind.pt", weights_only=True)
    assert rewind["step"] == 5
    state, _ = recorder.starts[0]  # resumed: the checkpoint of epoch 1, masked
    assert all((state[f"{n}.weight"][~m] == 0).all() for n, m in masks.items())


# ------------------------------------------------------------------ recipes and reports


def test_the_conv4_recipe_follows_the_paper():
    cfg, extra, lottery = load_recipe(ROOT / "experiments" / "lottery_conv4_cifar10.toml")
    assert (cfg.model, cfg.dataset, cfg.optimizer, cfg.lr, cfg.batch_size) == (
        "conv4",
        "cifar10",
        "adam",
        3e-4,
        60,
    )
    assert extra == {"variants": ["real4", "quaternion"], "seeds": [0, 1, 2, 3, 4]}
    assert (lottery.levels, lottery.prune.rate, lottery.prune.scope, lottery.rewind) == (
        20,
        0.2,
        "global",
        "0",
    )
    assert math.isclose(0.8**lottery.levels * 100, 1.15, abs_tol=0.01)


COMPARE_RECIPES = sorted(
    p for p in (ROOT / "experiments").glob("*.toml") if not p.stem.startswith("lottery")
)


@pytest.mark.parametrize("path", COMPARE_RECIPES, ids=lambda p: p.stem)
def test_every_compare_recipe_runs_as_a_lottery_study_with_the_papers_pruning(path):
    """The README: ``quatnn lottery --config`` any recipe runs its lottery study, with the
    pruning of Iqbal & Mishra (global L1, 20% per level, 20 levels, rewind to init)."""
    compare_cfg, compare_extra = load_config(path, {}, compare=True)
    cfg, extra, lottery = load_recipe(path)
    assert (cfg, extra) == (compare_cfg, compare_extra)
    assert (lottery.levels, lottery.prune.rate, lottery.prune.scope, lottery.rewind) == (
        20,
        0.2,
        "global",
        "0",
    )
    assert (lottery.prune.method, lottery.prune.granularity) == ("magnitude", "element")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rewind": "two epochs"}, "rewind"),
        ({"controls": ["shuffle"]}, "unknown control"),
        ({"rate": 1.5}, "rate"),
        ({"levles": 3}, "unknown key"),
        ({"levels": 1, "control_levels": [7]}, "control level.s. 7 beyond the last level 1"),
    ],
)
def test_bad_lottery_settings_are_refused(values, message):
    with pytest.raises(RunError, match=message):
        LotteryConfig.from_dict(values)


def test_a_skip_that_names_no_layer_is_refused_before_training(tmp_path):
    lottery = LotteryConfig(levels=1, prune=PruneSpec(skip=("conv9",)))
    with pytest.raises(RunError, match="conv9"):
        run_lottery(CFG, tmp_path / "lottery", lottery, seeds=(0,), progress="off")
    assert not (tmp_path / "lottery").exists()


def test_a_rewind_after_the_last_epoch_or_step_is_refused_before_training(tmp_path):
    lottery = LotteryConfig(levels=1, rewind=f"{CFG.epochs + 1}ep")
    with pytest.raises(RunError, match="after the last epoch"):
        run_lottery(CFG, tmp_path / "lottery", lottery, seeds=(0,), progress="off")
    short = dataclasses.replace(CFG, max_steps=3)
    with pytest.raises(RunError, match=r"rewind 4it is after the last step \(max_steps 3\)"):
        run_lottery(short, tmp_path / "lottery", LotteryConfig(levels=1, rewind="4it"), seeds=(0,))
    assert not (tmp_path / "lottery").exists()


class Unpicklable(Callback):
    def __init__(self) -> None:
        self.hook = lambda: None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"progress": "none"}, "progress must be one of"),
        ({"seeds": ("0",)}, "seeds must be"),
        ({"variants": "real"}, "variants must be"),
        ({"callbacks": [object()]}, "Callback objects"),
        ({"jobs": 2, "callbacks": [Unpicklable()]}, "callbacks that pickle"),
        ({"tensorboard": True}, "tensorboard package"),
    ],
    ids=["progress", "seeds", "variants", "callbacks", "unpicklable", "tensorboard"],
)
def test_bad_run_lottery_arguments_are_refused_before_anything_is_written(
    tmp_path, kwargs, message
):
    if "tensorboard" in kwargs and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    kwargs = {"seeds": (0,), "progress": "off", **kwargs}
    with pytest.raises(RunError, match=message):
        run_lottery(CFG, tmp_path / "lottery", LotteryConfig(levels=1), **kwargs)
    assert not (tmp_path / "lottery").exists()


def test_a_file_is_refused_as_lottery_folder(tmp_path):
    (tmp_path / "lottery").write_text("notes")
    with pytest.raises(RunError, match="is a file"):
        run_lottery(CFG, tmp_path / "lottery", LotteryConfig(levels=1), seeds=(0,))
    assert (tmp_path / "lottery").read_text() == "notes"


def test_lottery_report(lottery, tmp_path):
    out, _, _ = lottery
    result = write_lottery_report(out, tmp_path)
    assert all(path.is_file() for path in result.files)
    lines = result.table.splitlines()
    assert len(lines) == 2 + 6  # header, rule, 2 variants x 3 levels
    assert "reinit acc (%)" in lines[0] and "random acc (%)" in lines[0]
    assert lines[2].startswith("| real | 0 | 100.00 | 100.00 |")
    assert lines[5].startswith("| quaternion | 0 | 25.40 | 100.00 |")
    assert not is_lottery(tmp_path)
    # the weights left per layer at the deepest level, counted here from the masks
    markdown = (tmp_path / "lottery.md").read_text()
    layers = markdown.split("## Weights left per layer at level 2")[1].split("\n\n")[1]
    assert layers.splitlines()[0] == "| layer | real (%) | quaternion (%) |"
    real = load_masks(level_dir(out, "real", 0, 2) / "masks.pt")
    quaternion = load_masks(level_dir(out, "quaternion", 0, 2) / "masks.pt")
    assert list(real) == list(quaternion) == ["fc1", "fc2", "head"]
    for name, line in zip(real, layers.splitlines()[2:], strict=True):
        left = [100 * m[name].float().mean().item() for m in (real, quaternion)]
        assert line == f"| {name} | {left[0]:.2f} | {left[1]:.2f} |"


def test_lottery_titles_name_every_pruning_setting():
    from quatnn.report.lottery import _title

    recipe = {"model": "conv4", "dataset": "cifar10", "lottery": LotteryConfig().to_dict()}
    plain = "conv4 on cifar10: global magnitude pruning, 0.2 per level, element, rewind 0"
    assert _title(recipe) == plain
    rates = {"conv": 0.1, "fc": 0.2}
    table = LotteryConfig(prune=PruneSpec(scope="layerwise", rates=rates, skip=("output",)))
    recipe["lottery"] = table.to_dict()
    assert _title(recipe).endswith("conv 0.1, fc 0.2 per level, element, rewind 0, output kept")


# ---------------------------------------------------------------- prune


def test_a_replaced_weight_gets_the_gradient_mask_too():
    """load_state_dict(assign=True) puts new weight tensors in place: their pruned
    gradients are zero as well (the hook follows the layer's current weight)."""
    from quatnn.nn import QLinear
    from quatnn.prune import PruneSpec, attach, dense_masks, prune

    torch.manual_seed(0)
    model = nn.Sequential(QLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = prune(model, dense_masks(model), PruneSpec(rate=0.5))
    attach(model, masks)
    model(torch.randn(2, 8)).sum().backward()  # the first weights hooked and used
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    for name, mask in masks.items():
        grad = model.get_submodule(name).weight.grad
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).any(), name


def test_layer_types_of_quaternion_models():
    from quatnn import models
    from quatnn.prune import layer_types

    assert layer_types(models.create("lenet_300_100", "quaternion")) == {
        "fc1": "fc", "fc2": "fc", "head": "output"}  # fmt: skip
    types_ = layer_types(models.create("conv2", "quaternion"))
    assert types_ == {"features.0": "conv", "features.2": "conv", "classifier.0": "fc",
                      "classifier.2": "fc", "head": "output"}  # fmt: skip


def test_sparsity_counts_layers_without_a_mask_as_dense():
    from quatnn.prune import sparsity

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0": torch.ones(4, 4, dtype=torch.bool)}
    masks["0"][:2] = False  # 8 of the 16 weights of layer 0 pruned; layer 2 not named
    report = sparsity(model, masks, reference_params=60)
    assert [layer["remaining"] for layer in report["layers"]] == [8, 8]
    assert report["prunable"] == {"weights": 24, "remaining": 16,
                                  "percent_remaining": pytest.approx(100 * 16 / 24)}  # fmt: skip
    assert report["params"]["remaining"] == 30 - 8
    assert report["real_params"]["percent_remaining"] == pytest.approx(100 * 22 / 60)
