"""Training: configs, the loop, checkpoints and run folders.

Example:
    >>> from quatnn import train
    >>> cfg = train.TrainConfig(model="conv2", dataset="digits-color", variant="real4")
    >>> train.resolve(cfg).encoding
    'rgb_gray'

``train.train(cfg, "runs/NAME")`` trains one run into a folder; ``train.compare(cfg,
"runs/NAME", variants=..., seeds=...)`` trains every variant and seed
(see :mod:`quatnn.train.runner`). Each name is imported from its module on first use.
"""

from quatnn._lazy import lazy_names

_ORIGINS = {
    **dict.fromkeys(
        ("DEFAULT_SEEDS", "TrainConfig", "load_config", "load_toml", "merge"), "config"
    ),
    **dict.fromkeys(("Interrupted", "NonFiniteLoss", "RunError"), "errors"),
    "evaluate_run": "evaluate",
    **dict.fromkeys(("TIMING_KEYS", "Callback", "Trainer", "lr_schedule"), "loop"),
    **dict.fromkeys(
        ("compare", "default_run_dir", "default_variants", "resolve", "resume_config", "train"),
        "runner",
    ),
}
__all__ = sorted(_ORIGINS)
__getattr__, __dir__ = lazy_names(__name__, _ORIGINS)
