"""Export the model of a training run folder (what ``quatnn export RUN_DIR`` calls).

The model is rebuilt from the run's ``config.toml`` exactly as training built it (model,
variant and options from the config; classes, input channels and size from the dataset
and the encoding) and its weights are read from ``checkpoint.pt`` (the last completed
epoch) or ``best.pt`` (the best epoch: by validation accuracy in a run that holds out a
validation set, else by test accuracy; by loss in a run with ``best_by = "loss"``). Every
file says in its metadata how to prepare its input (``input``,
:func:`quatnn.data.preprocessing`) and what its outputs name (``classes``).

Example (a run trained with ``quatnn train``)::

    from quatnn.export import export_run, read_export_metadata
    export_run("runs/conv4-q", "onnx", "conv4.onnx")   # folded, checked with ONNX Runtime
    read_export_metadata("conv4.onnx")["input"]         # image size, mean, std, encoding
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from quatnn.export import ONNX_OPSET, RUN_FORMATS
from quatnn.export.compact import save_compact
from quatnn.export.folding import fold as fold_model
from quatnn.export.formats import export

__all__ = ["SUFFIXES", "load_run", "export_run"]

SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2", "safetensors": ".safetensors"}
"""File name ending of each format (the default output is ``RUN_DIR/model<suffix>``)."""


def _config(run: Path):
    from quatnn.train.config import TrainConfig, load_toml
    from quatnn.train.errors import RunError

    path = run / "config.toml"
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder (expected a run folder with config.toml)")
    if not path.is_file():
        raise ValueError(f"{run} holds no quatnn run (no config.toml)")
    try:
        values = {k: v for k, v in load_toml(path).items() if k not in ("variants", "seeds")}
        return TrainConfig.from_dict(values, source=str(path))
    except RunError as err:
        raise ValueError(str(err)) from None


def load_run(
    run_dir: str | os.PathLike,
    checkpoint: str = "checkpoint.pt",
    data_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, dict, Tensor]:
    """The trained model of run folder ``run_dir`` (eval mode, CPU), the
    :func:`quatnn.models.create` arguments that rebuild it, and an example input batch of
    2 (seeded normal noise of the encoded input's shape).

    ``checkpoint`` is a file name in the run (``checkpoint.pt`` or ``best.pt``);
    ``data_dir`` overrides the config's (only ``imagefolder`` runs read it, for their
    classes and image size). Raises ValueError with one line for a missing or foreign
    run folder or checkpoint.
    """
    return _load_run(run_dir, checkpoint, data_dir)[:3]


def _load_run(
    run_dir: str | os.PathLike, checkpoint: str, data_dir: str | os.PathLike | None
) -> tuple[nn.Module, dict, Tensor, dict]:
    """:func:`load_run`'s values and what an export records of the run: ``input`` (its
    :func:`quatnn.data.preprocessing`) and ``classes`` (the names of the outputs, where
    the checkpoint has them: those written before quatnn recorded them do not)."""
    from quatnn import data, models
    from quatnn.train import checkpoint as checkpoints
    from quatnn.train.errors import RunError

    run = Path(run_dir)
    cfg = _config(run)
    try:
        flat = models.spec(cfg.model).input_kind == "flat"
        info = data.info(cfg.dataset, cfg.data_dir if data_dir is None else data_dir)
        encoding = cfg.encoding
        if encoding == "auto":
            encoding = data.default_encoding(info, cfg.variant, flat=flat)
        encode = data.encodings.get_encoding(encoding, channels=info.channels)
    except (ValueError, data.DatasetMissingError) as err:
        raise ValueError(f"cannot rebuild the model of {run}: {err}") from None
    sample = encode(torch.zeros(info.channels, *info.image_size))
    if flat:
        size = tuple(info.image_size)
        in_channels = sample.numel() // (size[0] * size[1])
    else:
        in_channels, size = sample.shape[0], tuple(sample.shape[1:])
    spec = {"name": cfg.model, "variant": cfg.variant, "num_classes": info.num_classes,
            "in_channels": in_channels, "input_size": list(size), **cfg.options}  # fmt: skip
    try:
        model = models.create(**{**spec, "input_size": size})
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot rebuild the model of {run}: {err}") from None
    path = run / checkpoint
    try:
        state = checkpoints.load(path, {"model": cfg.model, "variant": cfg.variant,
                                        "dataset": cfg.dataset})  # fmt: skip
    except RunError as err:
        raise ValueError(str(err)) from None
    if "model" not in state:
        raise ValueError(f"{path} holds no model weights (keys: {', '.join(sorted(state))})")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"{path} does not fit {cfg.model}/{cfg.variant} ({reason})") from None
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *sample.shape, generator=generator)
    prepare = data.preprocessing(cfg.dataset, encoding, tuple(info.image_size))
    record = {"input": {**prepare, "shape": list(sample.shape)}}
    if "classes" in state:
        record["classes"] = list(state["classes"])
    return model.eval(), spec, example, record


def export_run(
    run_dir: str | os.PathLike,
    format: str,
    out: str | os.PathLike | None = None,
    *,
    fold: bool = True,
    checkpoint: str = "checkpoint.pt",
    check: bool = True,
    opset: int = ONNX_OPSET,
    exporter: str = "dynamo",
    sparse: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """Export the model of run ``run_dir`` in ``format`` (:data:`RUN_FORMATS`) to the file
    ``out``, or into the folder ``out`` as ``model.onnx``, ``model.ts``, ... (by
    :data:`SUFFIXES`; default: into ``run_dir``).

    ``fold`` (default) exports :func:`quatnn.export.fold` of the model; outputs are
    always checked against the unfolded PyTorch model (see :func:`quatnn.export.export`)
    unless ``check=False``. ``safetensors`` writes the compact checkpoint (quaternion
    weights, ``sparse`` optional; ``fold`` does not apply). The file's metadata holds
    ``model`` (the :func:`quatnn.models.create` arguments), ``checkpoint``, ``input``
    (the run's :func:`quatnn.data.preprocessing` and the ``shape`` of one input, after the
    batch axis) and ``classes`` (the name of each output, in order, where the checkpoint
    records them). Returns the report of the export plus ``model`` (``name/variant``),
    ``folded``, ``checkpoint``, ``input``, ``classes`` (if known) and ``finished``
    (whether the run finished training: it has ``summary.json``).
    """
    if format not in RUN_FORMATS:
        raise ValueError(f"format must be one of {', '.join(RUN_FORMATS)}, got {format!r}")
    model, spec, example, record = _load_run(run_dir, checkpoint, data_dir)
    folder = out is None or str(out).endswith(("/", os.sep))  # "exp/" names a folder
    out = Path(run_dir if out is None else out)
    if out.is_dir() or folder:  # a folder (the run's by default): the file goes into it
        out = out / f"model{SUFFIXES[format]}"
    extra = {"checkpoint": checkpoint, **record}
    summary = {"model": f"{spec['name']}/{spec['variant']}", **extra,
               "finished": (Path(run_dir) / "summary.json").is_file()}  # fmt: skip
    if format == "safetensors":
        info = save_compact(model, out, spec, sparse=sparse, extra=extra)
        return {**summary, "format": format, "folded": False, **info}
    target = fold_model(model) if fold else model
    report = export(target, example, out, format, reference=model, check=check, opset=opset,
                    exporter=exporter, metadata={"model": spec, **extra})  # fmt: skip
    return {**summary, "folded": fold, **report}
