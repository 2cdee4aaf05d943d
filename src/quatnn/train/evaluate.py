"""Evaluate the saved model of a run folder on a split of its dataset: loss, accuracy,
top-5 accuracy (datasets of more than 10 classes), each class's accuracy and the
confusion matrix (what ``quatnn evaluate RUN_DIR`` prints).

The model and the data are rebuilt from the run's ``config.toml`` as training built them:
the same encoding, the same held-out validation images, no augmentation (``train``: the
images the run trained on, unaugmented); a run trained with ``--amp`` is evaluated under
the same autocast, as its training evaluated it.

Example:
    >>> import tempfile
    >>> from quatnn import train
    >>> run = tempfile.mkdtemp()
    >>> cfg = train.TrainConfig(variant="real", epochs=1, max_steps=5)
    >>> summary = train.train(cfg, run, progress="off")  # doctest: +ELLIPSIS
    lenet_300_100 real on digits ...
    >>> result = evaluate_run(run)
    >>> result["images"], result["acc"] == summary["final_test_acc"]
    (359, True)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from quatnn import data
from quatnn.train import checkpoint as checkpoints
from quatnn.train import device as devices
from quatnn.train.config import EVAL_SPLITS, TrainConfig, merge
from quatnn.train.errors import RunError
from quatnn.train.loop import top5_hits
from quatnn.train.runner import TOP5_ABOVE, _datasets, _model, _saved_config, resolve

__all__ = ["evaluate_run"]


def evaluate_run(
    run_dir: str | os.PathLike,
    checkpoint: str = "checkpoint.pt",
    split: str = "test",
    *,
    data_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    download: bool = False,
) -> dict:
    """Evaluate the model in ``checkpoint`` (a file name in ``run_dir``: ``checkpoint.pt``,
    the last completed epoch, or ``best.pt``) on ``split`` (one of
    :data:`~quatnn.train.config.EVAL_SPLITS`).

    Returns ``run``, ``checkpoint``, ``epoch``, ``split``, ``images``, ``loss`` (mean
    cross-entropy), ``acc``, ``top5`` (None for 10 classes or fewer), ``classes``,
    ``per_class`` (per class: ``class``, ``images``, ``acc`` (None without images) and
    ``taken_for``, the class it is most often mistaken for, None if never) and
    ``confusion`` (``confusion[t][p]`` counts images of class t predicted as p). Raises
    RunError with one line for a missing run, checkpoint or dataset, or a split the run
    does not have.
    """
    if split not in EVAL_SPLITS:
        raise RunError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise RunError(f"batch_size must be at least 1, got {batch_size}")
    run = Path(run_dir)
    saved = _saved_config(run, remedy="evaluate takes the folder of one run")
    if saved is None:
        raise RunError(f"{run} holds no run")
    overrides = {} if data_dir is None else {"data_dir": str(data_dir)}
    cfg = resolve(merge(saved, overrides, "command line"))
    if split == "val" and not cfg.val_split:
        raise RunError(f"{run} held out no validation set (it trained without --val-split)")
    path = run / checkpoint
    state = checkpoints.load(path, cfg.to_dict())
    info, dataset = _split(dataclasses.replace(cfg, augment=False), split, download)
    model = _model(cfg, info, dataset[0][0])
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise RunError(f"{path} does not fit {cfg.model}/{cfg.variant} ({reason})") from None
    target = devices.resolve(device)
    model = model.to(target).eval()
    k = info.num_classes
    confusion = torch.zeros(k * k, dtype=torch.long)
    loss_sum, top5 = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size or cfg.eval_batch_size)
    amp = devices.amp_dtype(target) if cfg.amp else None
    with torch.no_grad(), torch.autocast(target.type, dtype=amp, enabled=amp is not None):
        for x, y in loader:
            logits = model(x.to(target)).float().cpu()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
            if k > TOP5_ABOVE:
                top5 += int(top5_hits(logits, y))
    confusion = confusion.view(k, k)
    images = int(confusion.sum())
    classes = [str(c) for c in state.get("classes") or dataset.classes]
    return {
        "run": str(run),
        "checkpoint": checkpoint,
        "epoch": state.get("epoch"),
        "split": split,
        "images": images,
        "loss": loss_sum / images,
        "acc": int(confusion.trace()) / images,
        "top5": top5 / images if k > TOP5_ABOVE else None,
        "classes": classes,
        "per_class": [_per_class(confusion, t, classes) for t in range(k)],
        "confusion": confusion.tolist(),
    }


def _split(cfg: TrainConfig, split: str, download: bool) -> tuple[data.DatasetInfo, Dataset]:
    """The dataset's info and the images of ``split`` as ``cfg`` trains on them (the test
    split alone reads no training files)."""
    info, train_set, test_set, val_set = _datasets(cfg, download, training=split != "test")
    return info, {"train": train_set, "test": test_set, "val": val_set}[split]


def _per_class(confusion: torch.Tensor, t: int, classes: list[str]) -> dict:
    row = confusion[t]
    images = int(row.sum())
    wrong = row.clone()
    wrong[t] = 0
    return {
        "class": classes[t],
        "images": images,
        "acc": int(row[t]) / images if images else None,
        "taken_for": classes[int(wrong.argmax())] if int(wrong.max()) else None,
    }
