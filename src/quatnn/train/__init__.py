"""Training: configs, the loop, checkpoints and run folders.

Example:
    >>> from quatnn import train
    >>> cfg = train.TrainConfig(model="conv2", dataset="digits-color", variant="real4")
    >>> train.resolve(cfg).encoding
    'rgb_gray'

``train.train(cfg, "runs/NAME")`` trains one run into a folder; ``train.compare(cfg,
"runs/NAME", variants=..., seeds=...)`` trains every variant and seed
(see :mod:`quatnn.train.runner`).
"""

from quatnn.train.config import TrainConfig, load_config, load_toml, merge
from quatnn.train.errors import Interrupted, NonFiniteLoss, RunError
from quatnn.train.loop import TIMING_KEYS, Callback, Trainer, lr_schedule
from quatnn.train.runner import (
    DEFAULT_SEEDS,
    compare,
    default_run_dir,
    default_variants,
    resolve,
    resume_config,
    train,
)

__all__ = [
    "DEFAULT_SEEDS",
    "TIMING_KEYS",
    "Callback",
    "Interrupted",
    "NonFiniteLoss",
    "RunError",
    "TrainConfig",
    "Trainer",
    "compare",
    "default_run_dir",
    "default_variants",
    "load_config",
    "load_toml",
    "lr_schedule",
    "merge",
    "resolve",
    "resume_config",
    "train",
]
