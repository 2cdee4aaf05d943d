"""Iterative magnitude pruning with rewinding: lottery tickets (Frankle & Carbin 2019).

For each variant and seed: train the dense model (level 0), prune a fraction of the
remaining weights, rewind the survivors to their values at the rewind point, retrain;
repeat up to ``levels`` times, or until a level's final test accuracy falls below
``min_acc``. Controls branch off any pruned level: ``reinit`` trains the level's mask
from a fresh random initialization, ``random`` a random mask with the same per-layer
counts from the rewound weights.

The rewind point is ``"0"`` (the initialization), ``"<k>it"`` (after optimizer step k of
level 0) or ``"<k>ep"`` (after epoch k). Every level retrains from the rewound weights
for the full config (all epochs, a fresh optimizer).

A lottery folder holds ``lottery.toml`` (the recipe: the training config, ``variants``,
``seeds`` and a ``[lottery]`` table) and per variant and seed
``<variant>-s<seed>/level-<LL>[-<control>]/``: a normal run folder of
:func:`quatnn.train.train` plus ``masks.pt`` (:func:`quatnn.prune.masks.save_masks`) and
``sparsity.json`` (:func:`quatnn.prune.sparsity.sparsity`, with ``level``, ``control``
and the ``reference`` variant); level 0 also keeps ``rewind.pt``. Finished levels are
skipped and an interrupted one resumes from its checkpoint, so running the same lottery
again continues it; ``levels``, ``min_acc``, controls, variants and seeds may change
between runs, the training config, pruning and rewinding may not.

Example:
    >>> from quatnn.train import TrainConfig
    >>> cfg = TrainConfig(model="lenet_300_100", dataset="digits", epochs=2)
    >>> lottery = LotteryConfig(levels=3, prune=PruneSpec(rate=0.5), controls=("reinit",))
    >>> rows = run_lottery(cfg, "runs/lottery", lottery, seeds=(0,))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quatnn import data, models
from quatnn.data.registry import is_color
from quatnn.prune.masks import attach, dense_masks, enforce, load_masks, save_masks
from quatnn.prune.sparsity import sparsity
from quatnn.prune.strategies import PruneSpec, prune, random_like
from quatnn.train import checkpoint, distributed
from quatnn.train.config import (
    COMPARE_KEYS,
    DEFAULT_SEEDS,
    TrainConfig,
    continued_runs,
    dumps_toml,
    load_toml,
    merge,
)
from quatnn.train.errors import Interrupted, RunError
from quatnn.train.loop import Callback, Trainer
from quatnn.train.progress import PROGRESS_MODES
from quatnn.train.runner import (
    _check_jobs,
    _datasets,
    _tensorboard_writer_class,
    resolve,
    train,
    uses_gpu,
)
from quatnn.train.seeding import mix

__all__ = [
    "CONTROLS",
    "LotteryConfig",
    "continue_command",
    "level_dir",
    "load_recipe",
    "lottery_of_level",
    "parse_rewind",
    "reference_variant",
    "run_lottery",
]

CONTROLS = ("reinit", "random")
RECIPE = "lottery.toml"
_PRUNE_KEYS = tuple(f.name for f in dataclasses.fields(PruneSpec))
_REWIND = re.compile(r"(\d+)(it|ep)?")


def parse_rewind(text: str) -> tuple[int, str]:
    """``(count, unit)`` of a rewind point, unit ``it`` (steps) or ``ep`` (epochs).

    >>> parse_rewind("0"), parse_rewind("500it"), parse_rewind("2ep")
    ((0, 'it'), (500, 'it'), (2, 'ep'))
    """
    match = _REWIND.fullmatch(str(text).strip())
    if match is None:
        raise RunError(f"rewind must look like 0, 500it or 2ep, got {text!r}")
    return int(match[1]), match[2] or "it"


@dataclass(frozen=True)
class LotteryConfig:
    """The pruning schedule of a lottery (see the module docstring).

    Args:
        levels: pruned levels after the dense level 0.
        prune: how each level prunes (:class:`~quatnn.prune.strategies.PruneSpec`).
        rewind: ``"0"``, ``"<k>it"`` or ``"<k>ep"``.
        controls: any of :data:`CONTROLS`, trained beside the ticket.
        control_levels: the levels that get controls (empty: every pruned level).
        min_acc: stop after a level whose final test accuracy is below this.
    """

    levels: int = 20
    prune: PruneSpec = field(default_factory=PruneSpec)
    rewind: str = "0"
    controls: tuple[str, ...] = ()
    control_levels: tuple[int, ...] = ()
    min_acc: float = 0.0

    def __post_init__(self) -> None:
        parse_rewind(self.rewind)
        object.__setattr__(self, "controls", tuple(self.controls))
        object.__setattr__(self, "control_levels", tuple(self.control_levels))
        if self.levels < 0:
            raise RunError(f"levels must be >= 0, got {self.levels}")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise RunError(
                f"unknown control(s) {', '.join(unknown)}; controls: {', '.join(CONTROLS)}"
            )
        if any(level < 1 for level in self.control_levels):
            raise RunError("control levels start at 1 (level 0 is the dense model)")
        beyond = [level for level in self.control_levels if level > self.levels]
        if beyond:
            raise RunError(
                f"control level(s) {', '.join(map(str, beyond))} beyond the last level "
                f"{self.levels}; raise levels or drop them"
            )
        if not 0 <= self.min_acc <= 1:
            raise RunError(f"min_acc is a fraction in [0, 1], got {self.min_acc}")

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> LotteryConfig:
        """A config from the flat keys of a ``[lottery]`` table: this class's fields and
        those of :class:`PruneSpec` (RunError for unknown keys or bad values)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"prune"}
        unknown = sorted(set(values) - own - set(_PRUNE_KEYS))
        if unknown:
            valid = ", ".join([*sorted(own), *_PRUNE_KEYS])
            raise RunError(f"[lottery]: unknown key(s) {', '.join(unknown)}; valid keys: {valid}")
        try:
            spec = PruneSpec(**{k: v for k, v in values.items() if k in _PRUNE_KEYS})
        except (TypeError, ValueError) as err:
            raise RunError(f"[lottery]: {err}") from None
        return cls(prune=spec, **{k: v for k, v in values.items() if k in own})

    def to_dict(self) -> dict:
        """The flat ``[lottery]`` table of this config."""
        spec = {k: getattr(self.prune, k) for k in _PRUNE_KEYS}
        spec |= {"rates": dict(self.prune.rates), "skip": list(self.prune.skip)}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        own |= {"controls": list(self.controls), "control_levels": list(self.control_levels)}
        del own["prune"]
        return {**spec, **own}

    def identity(self) -> dict:
        """What makes two lotteries the same (those may share a folder)."""
        return {k: v for k, v in self.to_dict().items() if k in (*_PRUNE_KEYS, "rewind")}

    def has_control(self, level: int) -> bool:
        """Whether ``level`` gets the controls."""
        return level > 0 and (not self.control_levels or level in self.control_levels)


def reference_variant(dataset: str) -> str:
    """The real model that sparsity is measured against: ``real4`` for colour data,
    ``real`` for grayscale.

    >>> reference_variant("cifar10"), reference_variant("digits")
    ('real4', 'real')
    """
    try:
        color = is_color(dataset)
    except ValueError as err:
        raise RunError(str(err)) from None
    return "real4" if color else "real"


def _reference(cfg: TrainConfig, spec: PruneSpec) -> tuple[str, int]:
    """The reference variant and its parameter count for ``cfg``'s model and data; checks
    that ``spec`` fits the model."""
    info, variant = data.info(cfg.dataset, cfg.data_dir), reference_variant(cfg.dataset)
    model = models.create(
        cfg.model, variant, info.num_classes, input_size=info.image_size, **cfg.options
    )
    try:
        spec.check(model)
    except ValueError as err:
        raise RunError(f"[lottery]: {err}") from None
    return variant, models.count_parameters(model)


def level_dir(
    out: str | Path, variant: str, seed: int, level: int, control: str | None = None
) -> Path:
    """The folder of one level: ``out/<variant>-s<seed>/level-<LL>[-<control>]``.

    >>> level_dir("runs/x", "quaternion", 0, 3, "reinit").as_posix()
    'runs/x/quaternion-s0/level-03-reinit'
    """
    suffix = f"-{control}" if control else ""
    return Path(out) / f"{variant}-s{seed}" / f"level-{level:02d}{suffix}"


def lottery_of_level(folder: str | Path) -> Path | None:
    """The lottery folder whose level ``folder`` is (it holds pruning masks), or None.

    >>> lottery_of_level("runs/x/real-s0") is None  # no masks.pt there
    True
    """
    folder = Path(folder)
    return folder.parent.parent if (folder / "masks.pt").is_file() else None


def continue_command(out: str | Path) -> str:
    """The command that continues the lottery in ``out`` (from its recipe).

    >>> continue_command("runs/x")
    'quatnn lottery --config runs/x/lottery.toml --out runs/x'
    """
    return f"quatnn lottery --config {Path(out) / RECIPE} --out {out}"


def _toml_table(name: str, values: Mapping[str, object]) -> str:
    """A ``[name]`` table with inline tables for mapping values."""
    lines = [f"[{name}]"]
    for key, value in values.items():
        if isinstance(value, Mapping):
            inline = ", ".join(f"{k} = {float(v)!r}" for k, v in value.items())
            lines.append(f"{key} = {{{inline}}}")
        else:
            lines.append(dumps_toml({key: value}).strip())
    return "\n".join(lines) + "\n"


def load_recipe(
    path: str | Path | None,
    overrides: Mapping[str, object] = {},
    lottery_overrides: Mapping[str, object] = {},
) -> tuple[TrainConfig, dict, LotteryConfig]:
    """The training config, the ``variants``/``seeds`` and the lottery config of TOML
    recipe ``path`` (or of the defaults), each with its overrides applied.

    >>> cfg, extra, lottery = load_recipe(None, {"seeds": [0, 1]}, {"levels": 2})
    >>> cfg.model, extra, lottery.levels, lottery.prune.rate
    ('lenet_300_100', {'seeds': [0, 1]}, 2, 0.2)
    """
    values = load_toml(path) if path is not None else {}
    table = values.pop("lottery", {})
    for key in ("variant", "seed"):
        values.pop(key, None)
    extra = {k: v for k, v in {**values, **overrides}.items() if k in COMPARE_KEYS}
    for key, kind in (("variants", str), ("seeds", int)):
        items = extra.get(key, [])
        if not isinstance(items, list | tuple) or not all(type(i) is kind for i in items):
            raise RunError(f"{key} must be a list of {kind.__name__}s, got {items!r}")
    cfg = TrainConfig.from_dict(
        {k: v for k, v in values.items() if k not in COMPARE_KEYS}, str(path)
    )
    cfg = merge(cfg, {k: v for k, v in overrides.items() if k not in COMPARE_KEYS}, "command line")
    return cfg, extra, LotteryConfig.from_dict({**table, **lottery_overrides})


def _write_recipe(
    out: Path, base: TrainConfig, lottery: LotteryConfig, variants, seeds, write: bool = True
) -> None:
    """Write ``out/lottery.toml`` (or, with ``write=False``, only check that it could be),
    refusing a folder that holds another lottery. A continued lottery's recipe keeps the
    variants and seeds it had and adds the new ones."""
    recipe = {k: v for k, v in base.to_dict().items() if k not in ("variant", "seed")}
    path = out / RECIPE
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file, not a lottery folder; use another --out")
    had: dict = {}
    if path.is_file():
        saved_cfg, had, saved_lottery = load_recipe(path)
        saved = {**saved_cfg.identity(), **saved_lottery.identity()}
        wanted = {**base.identity(), **lottery.identity()}
        changed = [k for k in saved if k not in ("variant", "seed") and saved[k] != wanted[k]]
        if changed:
            shown = ", ".join(f"{k} = {saved[k]!r} there, {wanted[k]!r} here" for k in changed[:3])
            raise RunError(
                f"{out} holds a different lottery ({shown}); use another --out or "
                f"--overwrite, or continue that one with: {continue_command(out)}"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise RunError(f"{out} is not empty and holds no lottery (no {RECIPE}); use another --out")
    if not write:
        return
    text = dumps_toml({**recipe, **continued_runs(had, variants, seeds)})
    text += "\n" + _toml_table("lottery", lottery.to_dict())
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(path, lambda f: f.write(text), mode="w")


def _reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh random values for every module with ``reset_parameters``, drawn under
    ``seed`` without disturbing the global generators."""
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


class _Level(Callback):
    """Sets up one level's masks and starting weights when its training starts fresh,
    keeps its masks through training and, in level 0, saves the rewind point."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        level: int,
        control: str | None,
        lottery: LotteryConfig,
        reference: tuple[str, int],
    ) -> None:
        self.cfg, self.out, self.level, self.control = cfg, out, level, control
        self.lottery, self.reference = lottery, reference
        self.folder = self._sibling(level, control)
        self.run = {"model": cfg.model, "variant": cfg.variant, "dataset": cfg.dataset}
        self.is_main = distributed.current().is_main  # only rank 0 writes files
        self.rewind = parse_rewind(lottery.rewind) if level == 0 and control is None else None

    def _sibling(self, level: int, control: str | None = None) -> Path:
        return level_dir(self.out, self.cfg.variant, self.cfg.seed, level, control)

    def _load(self, model: nn.Module, path: Path) -> None:
        model.load_state_dict(checkpoint.load(path, self.run)["model"])

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix(self.cfg.seed, self.level, salt))

    def _start(self, model: nn.Module) -> dict:
        """The level's masks; leaves ``model`` holding its starting weights."""
        if self.level == 0:
            return dense_masks(model)
        if self.control is None:
            previous = self._sibling(self.level - 1)
            self._load(model, previous / "checkpoint.pt")
            masks = prune(
                model, load_masks(previous / "masks.pt"), self.lottery.prune, self._generator(0)
            )
        else:
            masks = load_masks(self._sibling(self.level) / "masks.pt")
        if self.control == "reinit":
            _reinitialize(model, mix(self.cfg.seed, self.level, 1))
        else:
            self._load(model, self._sibling(0) / "rewind.pt")
        if self.control == "random":
            masks = random_like(model, masks, self.lottery.prune.granularity, self._generator(2))
        return masks

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.step == 0:
            masks = self._start(trainer.model)
            if self.is_main:
                save_masks(self.folder / "masks.pt", masks)
                self._write_sparsity(trainer.model, masks)
            if self.rewind is not None and self.rewind[0] == 0:
                self._save_rewind(trainer)
        else:
            masks = load_masks(self.folder / "masks.pt")
        attach(trainer.model, masks)

    def _write_sparsity(self, model: nn.Module, masks: dict) -> None:
        variant, params = self.reference
        report = sparsity(model, masks, params)
        report = {"level": self.level, "control": self.control, "reference": variant, **report}
        text = json.dumps(report, indent=2)
        checkpoint.write_atomic(self.folder / "sparsity.json", lambda f: f.write(text), "w")

    def on_step_end(self, trainer: Trainer) -> None:
        enforce(trainer.model)
        if self.rewind == (trainer.step, "it"):
            self._save_rewind(trainer)

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.rewind == (trainer.epoch, "ep"):
            self._save_rewind(trainer)

    def _save_rewind(self, trainer: Trainer) -> None:
        if self.is_main:
            model = trainer.model.state_dict()
            state = {"step": trainer.step, "epoch": trainer.epoch, "model": model}
            checkpoint.save(self.folder / "rewind.pt", self.run, state)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("summary.json", "masks.pt", "sparsity.json"))


def run_lottery(
    base: TrainConfig,
    out: str | Path,
    lottery: LotteryConfig,
    *,
    variants: Sequence[str] = (),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    overwrite: bool = False,
    progress: str = "auto",
    tensorboard: bool = False,
    download: bool = True,
    callbacks: Sequence[Callback] = (),
    jobs: int = 1,
) -> list[dict]:
    """Run (or continue) the lottery of ``base`` into ``out`` for every variant and seed
    (``variants`` default: the real reference and ``quaternion``) and return one row
    per level folder: ``variant``, ``seed``, ``level``, ``control``, ``path``,
    ``trained`` (False when it was already complete) and ``final_test_acc``.
    ``overwrite`` deletes a lottery already in ``out`` first; ``progress``,
    ``tensorboard`` and ``download`` are passed to :func:`quatnn.train.train`, and
    ``callbacks`` join every level's training, after the one that sets up its masks and
    weights. Raises RunError for bad input and Interrupted on Ctrl-C or SIGTERM.

    ``jobs`` > 1 runs that many variant-and-seed chains of levels at a time, each in a
    process of its own (:func:`quatnn.train.distributed.run_jobs`; ``callbacks`` must then
    pickle). Under torchrun every level trains on all processes and only rank 0 writes.

    Bad input is refused before anything is downloaded or written."""
    out = Path(out)
    ctx = distributed.current()
    _check_arguments(variants, seeds, progress, tensorboard and ctx.is_main, callbacks, jobs)
    variants = tuple(variants) or (reference_variant(base.dataset), "quaternion")
    if not seeds or len(set(seeds)) != len(seeds) or len(set(variants)) != len(variants):
        raise RunError("a lottery needs at least one seed, and no variant or seed twice")
    _check_jobs(jobs, ctx)
    count, unit = parse_rewind(lottery.rewind)
    if unit == "ep" and count > base.epochs:
        raise RunError(f"rewind {lottery.rewind} is after the last epoch ({base.epochs})")
    if unit == "it" and base.max_steps and count > base.max_steps:
        raise RunError(
            f"rewind {lottery.rewind} is after the last step (max_steps {base.max_steps})"
        )
    runs = [resolve(dataclasses.replace(base, variant=v, seed=s)) for v in variants for s in seeds]
    reference = _reference(runs[0], lottery.prune)
    replace = overwrite and (out / RECIPE).is_file()
    if not replace:
        _write_recipe(out, base, lottery, variants, seeds, write=False)  # check it everywhere
    if replace or jobs > 1 or not (out / RECIPE).is_file():  # the data, before the folder
        distributed.in_turn(ctx, lambda: _datasets(runs[0], download))  # (jobs: downloaded once)
    ctx.barrier()  # every process has checked the folder before rank 0 changes it
    if ctx.is_main:
        if replace:
            shutil.rmtree(out)
        _write_recipe(out, base, lottery, variants, seeds)
    ctx.barrier()
    options = {"progress": progress, "tensorboard": tensorboard, "download": download}
    if jobs == 1:
        return [
            row
            for cfg in runs
            for row in _run_chain(cfg, out, lottery, reference, callbacks, options)
        ]
    tasks = [
        distributed.Job(
            f"{cfg.variant} seed {cfg.seed}",
            _run_chain,
            (cfg, out, lottery, reference, list(callbacks), {**options, "progress": "off"}),
            gpu=uses_gpu(cfg),
        )
        for cfg in runs
    ]

    def started(i: int, job: distributed.Job) -> None:
        print(f"[lottery] {job.name}: levels 0-{lottery.levels} (started)", flush=True)

    def ended(i: int, job: distributed.Job, rows: list[dict]) -> None:
        accs = ", ".join(f"{row['final_test_acc']:.2%}" for row in rows if not row["control"])
        print(f"[lottery] {job.name} finished: test acc by level {accs}", flush=True)

    try:
        chains = distributed.run_jobs(tasks, jobs, on_start=started, on_end=ended)
    except Interrupted:
        raise Interrupted(
            "interrupted; finished levels and the last epoch of the others are kept: run the "
            "same quatnn lottery command again to continue"
        ) from None
    return [row for rows in chains for row in rows]


def _sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _check_arguments(
    variants: Sequence[str],
    seeds: Sequence[int],
    progress: str,
    tensorboard: bool,
    callbacks: Sequence[Callback],
    jobs: int,
) -> None:
    """Refuse (RunError) the bad arguments of :func:`run_lottery` that its training would
    refuse only after ``lottery.toml`` is written, or not at all."""
    if not _sequence(variants) or not all(isinstance(v, str) for v in variants):
        raise RunError(f"variants must be a sequence of variant names, got {variants!r}")
    if not _sequence(seeds) or not all(type(s) is int for s in seeds):
        raise RunError(f"seeds must be a sequence of ints, got {seeds!r}")
    if progress not in PROGRESS_MODES:
        raise RunError(f"progress must be one of {', '.join(PROGRESS_MODES)}; got {progress!r}")
    if tensorboard:
        _tensorboard_writer_class()  # RunError without the tensorboard package
    strangers = [c for c in callbacks if not isinstance(c, Callback)]
    if strangers:
        raise RunError(f"callbacks must be quatnn.train.Callback objects, got {strangers[0]!r}")
    if jobs > 1:
        try:
            pickle.dumps(list(callbacks))
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise RunError(f"jobs > 1 needs callbacks that pickle: {err}") from None


def _run_chain(
    cfg: TrainConfig,
    out: Path,
    lottery: LotteryConfig,
    reference: tuple[str, int],
    callbacks: Sequence[Callback],
    options: dict,
) -> list[dict]:
    """The levels (and controls) of one variant and seed; their rows of
    :func:`run_lottery`."""
    rows: list[dict] = []
    for level in range(lottery.levels + 1):
        controls = lottery.controls if lottery.has_control(level) else ()
        for control in (None, *controls):
            step = _Level(cfg, out, level, control, lottery, reference)
            rows.append(_train_level(cfg, step, callbacks, options))
        if level == 0 and not (step.folder / "rewind.pt").is_file():
            raise RunError(
                f"{step.folder}: training ended before the rewind point "
                f"{lottery.rewind}; rewind earlier"
            )
        accuracy = rows[-1 - len(controls)]["final_test_acc"]
        if accuracy < lottery.min_acc:
            if step.is_main and level < lottery.levels:
                print(
                    f"[lottery] {cfg.variant} seed {cfg.seed}: level {level} ends at "
                    f"{accuracy:.2%} test accuracy, below min_acc {lottery.min_acc:.2%}; "
                    f"levels {level + 1}-{lottery.levels} skipped",
                    flush=True,
                )
            break
    return rows


def _train_level(
    cfg: TrainConfig, step: _Level, callbacks: Sequence[Callback], options: dict
) -> dict:
    """Train one level unless it is complete; its row of :func:`run_lottery`."""
    folder = step.folder
    row = {
        "variant": cfg.variant,
        "seed": cfg.seed,
        "level": step.level,
        "control": step.control,
        "path": folder,
        "trained": not _complete(folder),
    }
    if row["trained"]:
        name = f"level {step.level}" + (f" {step.control}" if step.control else "")
        if step.is_main:
            print(f"[lottery] {cfg.variant} seed {cfg.seed} {name} -> {folder}", flush=True)
        try:
            command = continue_command(folder.parent.parent)
            summary = train(
                cfg,
                folder,
                if_exists="continue",
                callbacks=[step, *callbacks],
                resume_command=command,
                **options,
            )
        except Interrupted:
            raise Interrupted(
                f"interrupted while training {folder}; finished levels and its last epoch "
                f"are kept: run the same quatnn lottery command again to continue ({command})"
            ) from None
    else:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return {**row, "final_test_acc": summary["final_test_acc"]}
