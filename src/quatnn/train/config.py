"""Training configuration: one dataclass with defaults, TOML files and overrides.

A config file is flat TOML whose keys are the fields of :class:`TrainConfig` (model
options in an ``[options]`` table). A compare recipe adds ``variants`` and ``seeds``.
Later sources win: defaults, then the file, then command-line flags.

Example:
    >>> cfg = merge(TrainConfig(), {"model": "conv2", "dataset": "cifar10", "lr": 2e-4})
    >>> cfg.model, cfg.lr, cfg.batch_size
    ('conv2', 0.0002, 60)
    >>> TrainConfig.from_dict(tomllib.loads(dumps_toml(cfg.to_dict()))) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quatnn.metrics import BEST_BY
from quatnn.train.errors import RunError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step")
EVAL_SPLITS = ("test", "val", "train")
"""The splits a run can be evaluated on (``val``: runs trained with ``val_split``)."""
COMPARE_KEYS = ("variants", "seeds")
"""Keys of a compare recipe beyond those of :class:`TrainConfig`."""
DEFAULT_SEEDS = (0, 1, 2)
"""The seeds a comparison trains unless told otherwise."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes. ``reduce-overhead`` replays CUDA graphs, which removes the
per-kernel launch cost that bounds small models on a GPU (quaternion layers launch more
kernels than real ones)."""


def _field(default: object, help: str, runtime: bool = False) -> object:
    kw = {"default_factory": dict} if isinstance(default, dict) else {"default": default}
    return field(**kw, metadata={"help": help, "runtime": runtime})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. The defaults train Lenet-300-100 on the
    bundled ``digits`` data with the lottery-ticket recipe (Adam 1.2e-3, batch 60).

    Fields marked runtime (where the data is, which device, how many loader workers,
    compiling, memory format, distributed settings) may change when a run is resumed; the
    others define the run.
    """

    model: str = _field("lenet_300_100", "model name (see `quatnn models`)")
    variant: str = _field(
        "quaternion", "real3 or real4 (colour data), real (grayscale) or quaternion"
    )
    dataset: str = _field("digits", "dataset name; digits and digits-color are bundled")
    data_dir: str = _field("data", "folder holding (or receiving) downloaded datasets", True)
    encoding: str = _field("auto", "input encoding; auto: the variant's default")
    augment: bool = _field(True, "the dataset's standard train augmentation (crop, flip)")
    val_split: float = _field(
        0.0,
        "fraction of the training set held out (per class, the same images for every seed) "
        "to validate on: the best epoch and best.pt are then chosen on it, not on the test "
        "set; 0: none",
    )
    best_by: str = _field(
        "acc",
        "what makes an epoch the best (best.pt, the best_* figures, a lottery level's "
        "early-stopping epoch): acc, the highest accuracy, or loss, the lowest loss "
        "(Frankle & Carbin's early stopping); on the validation set with val_split, else "
        "on the test set",
    )
    options: dict = _field({}, "model options, e.g. norm=whiten for ResNets")
    epochs: int = _field(15, "number of epochs")
    batch_size: int = _field(60, "training batch size")
    eval_batch_size: int = _field(500, "test batch size")
    optimizer: str = _field("adam", f"one of {', '.join(OPTIMIZERS)}")
    lr: float = _field(1.2e-3, "learning rate")
    weight_decay: float = _field(0.0, "L2 weight decay (decoupled for adamw)")
    label_smoothing: float = _field(
        0.0, "label smoothing of the training loss (test and validation losses: none)"
    )
    clip_grad_norm: float = _field(
        0.0, "clip the gradients' total 2-norm to this before each step; 0: no clipping"
    )
    momentum: float = _field(0.9, "SGD momentum")
    schedule: str = _field(
        "none", "learning rate per epoch: none, cosine (to 0), step (x0.1 at 50% and 75%)"
    )
    warmup: float = _field(
        0.0,
        "epochs (fractions too) of linear learning-rate warmup: step k of the first n "
        "steps uses k/n of the schedule's rate (Goyal et al. 2017); 0: none",
    )
    seed: int = _field(0, "seed of initialization, shuffling and augmentation")
    max_steps: int = _field(0, "stop after this many optimizer steps in all (0: no limit)")
    amp: bool = _field(
        False,
        "mixed precision: bfloat16 where supported (CPU, most GPUs), else float16 with "
        "loss scaling",
    )
    device: str = _field("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps", True)
    workers: int = _field(
        -1,
        "DataLoader worker processes (per process under torchrun); -1: 0 on CPU or bundled "
        "data, else up to 8, sharing the cores among a node's processes",
        True,
    )
    compile: bool = _field(False, "torch.compile the model", True)
    compile_mode: str = _field(
        "default",
        f"torch.compile mode when compiling: {', '.join(COMPILE_MODES)} (reduce-overhead "
        "replays CUDA graphs)",
        True,
    )
    channels_last: bool = _field(
        False, "channels-last (NHWC) memory format for image models and batches", True
    )
    sync_bn: bool = _field(
        False,
        "under torchrun: batch norm statistics over the global batch (quaternion and real "
        "batch norms; real ones need CUDA)",
        True,
    )
    backend: str = _field(
        "auto", "torch.distributed backend under torchrun; auto: nccl on CUDA, else gloo", True
    )

    @classmethod
    def from_dict(cls, values: Mapping[str, object], source: str = "config") -> TrainConfig:
        """A config from a mapping; unknown keys and wrong types raise :class:`RunError`."""
        return merge(cls(), values, source)

    def to_dict(self) -> dict:
        """The fields as a plain dict (TOML-ready)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> TrainConfig:
        """Check value ranges and choices; return ``self``."""
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.val_split < 1, "val_split must be in [0, 1)"),
            (0 <= self.warmup <= self.epochs, "warmup must be in [0, epochs]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.clip_grad_norm >= 0, "clip_grad_norm must be >= 0 (0: no clipping)"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.max_steps >= 0, "max_steps must be >= 0 (0: no limit)"),
            (self.workers >= -1, "workers must be >= 0, or -1 for automatic"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.best_by in BEST_BY, f"best_by must be one of {', '.join(BEST_BY)}"),
            (
                self.compile_mode in COMPILE_MODES,
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}",
            ),
            (
                _known_backend(self.backend),
                "backend must be auto or a torch.distributed backend (gloo, nccl, ..., or "
                "per device: cpu:gloo,cuda:nccl)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RunError(f"{message}; got {self._shown(message.split()[0])}")
        return self

    def _shown(self, name: str) -> str:
        return f"{name} = {getattr(self, name)!r}"

    def identity(self) -> dict:
        """The fields that define the run (all but the runtime ones)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
RUNTIME_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["runtime"])


def _typed(name: str, value: object, source: str) -> object:
    kind = FIELDS[name].type
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "dict": isinstance(value, Mapping),
    }[kind]
    if not ok:
        raise RunError(f"{source}: {name} must be of type {kind}, got {value!r}")
    if kind == "float":
        return float(value)
    return dict(value) if kind == "dict" else value


def continued_runs(
    had: Mapping[str, object], variants: Sequence[str], seeds: Sequence[int]
) -> dict:
    """The ``variants`` and ``seeds`` of a recipe (compare, lottery) continued with these:
    those it ``had`` (its saved recipe's), then the new ones.

    >>> continued_runs({"seeds": [0, 1]}, ["real"], [1, 2])
    {'variants': ['real'], 'seeds': [0, 1, 2]}
    """
    given = {"variants": variants, "seeds": seeds}
    return {k: list(dict.fromkeys([*had.get(k, []), *v])) for k, v in given.items()}


def merge(base: TrainConfig, values: Mapping[str, object], source: str = "config") -> TrainConfig:
    """``base`` with ``values`` applied (model ``options`` are merged key by key).

    >>> merge(TrainConfig(), {"options": {"norm": "whiten"}}).options
    {'norm': 'whiten'}
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise RunError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELDS)}"
        )
    changes = {name: _typed(name, value, source) for name, value in values.items()}
    if "options" in changes:
        changes["options"] = {**base.options, **changes["options"]}
    return dataclasses.replace(base, **changes)


def _known_backend(name: str) -> bool:
    """``auto``, or backends torch.distributed knows (``gloo``; ``cpu:gloo,cuda:nccl``)."""
    import torch.distributed as dist

    known = set(getattr(getattr(dist, "Backend", None), "backend_list", ())) - {"undefined"}
    return name == "auto" or all(p.split(":")[-1] in known for p in name.split(","))


def load_toml(path: str | Path) -> dict:
    """The contents of TOML file ``path`` (RunError if missing or invalid)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise RunError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"cannot read config file {path}: {err}") from None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def dumps_toml(values: Mapping[str, object]) -> str:
    """TOML text of a flat mapping of scalars and lists, plus tables of them.

    >>> print(dumps_toml({"lr": 0.0003, "seeds": [0, 1], "options": {"norm": "whiten"}}))
    lr = 0.0003
    seeds = [0, 1]
    <BLANKLINE>
    [options]
    norm = "whiten"
    <BLANKLINE>
    """
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in values.items()
        if not isinstance(v, Mapping)
    ]
    for key, table in values.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); the value is read as TOML if it can be, else kept as
    a string.

    >>> parse_option("norm=whiten"), parse_option("width=0.5"), parse_option("small_input=false")
    (('norm', 'whiten'), ('width', 0.5), ('small_input', False))
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RunError(f"model option {text!r} must look like KEY=VALUE, e.g. norm=whiten")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None,
    overrides: Mapping[str, object],
    *,
    compare: bool = False,
    keep: Sequence[str] = (),
) -> tuple[TrainConfig, dict]:
    """The config from the defaults, then TOML file ``path`` (if given), then
    ``overrides``; and, in a dict, the compare keys (``variants``, ``seeds``) and the
    ``keep`` keys (those a caller reads itself, e.g. a ``[lottery]`` table) from either.

    A file with compare keys is a compare recipe: RunError unless ``compare``. With
    ``compare``, a single run's ``variant`` and ``seed`` in the file are ignored.

    >>> cfg, extra = load_config(None, {"lr": 1e-3, "seeds": [0, 1]}, compare=True)
    >>> cfg.lr, extra
    (0.001, {'seeds': [0, 1]})
    """
    values = load_toml(path) if path is not None else {}
    if "lottery" in values and "lottery" not in keep:  # (a lottery recipe has compare keys)
        raise RunError(
            f"{path} is a lottery recipe (it has a [lottery] table); run it with "
            f"quatnn lottery --config {path}"
        )
    extra = {k: values.pop(k) for k in COMPARE_KEYS if k in values}
    if extra and not compare:
        raise RunError(
            f"{path} is a compare recipe (it sets {', '.join(extra)}); run it with "
            f"quatnn compare --config {path}"
        )
    if compare:
        values.pop("variant", None)
        values.pop("seed", None)
    extra |= {k: values.pop(k) for k in keep if k in values}
    extra |= {k: overrides[k] for k in (*COMPARE_KEYS, *keep) if k in overrides}
    for key, kind in (("variants", str), ("seeds", int)):
        items = extra.get(key, [])
        if not isinstance(items, list | tuple) or not all(type(i) is kind for i in items):
            raise RunError(f"{key} must be a list of {kind.__name__}s, got {items!r}")
    cfg = TrainConfig.from_dict(values, str(path))
    rest = {k: v for k, v in overrides.items() if k not in (*COMPARE_KEYS, *keep)}
    return merge(cfg, rest, "command line"), extra
