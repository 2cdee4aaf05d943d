"""``quatnn bench infer``: file size and CPU inference latency of a deployed quaternion model
against the real4 model of the same widths.

In one process, for one zoo model, it builds the ``real4`` (for flat-input models such as
Lenet-300-100: ``real``) and ``quaternion`` variants and measures, side by side
(round-robin timing, eval mode, no gradients):

* ``real4``: the real model in PyTorch, and in ONNX Runtime;
* ``quaternion``: the model with its quaternion layers; the same model folded into plain
  real layers (:func:`quatnn.export.fold`); the folded model in ONNX Runtime.

File sizes are the compact safetensors checkpoints (:func:`quatnn.export.save_compact`)
for the PyTorch rows and the ``.onnx`` files for the ONNX Runtime rows; every ratio is to
the real4 PyTorch row (below 1 = smaller or faster). ONNX Runtime runs with as many
threads as torch. Batch-norm models are timed with their default (untrained) statistics.

Example:
    quatnn bench infer
    quatnn bench infer --model resnet20 --batch 1,64 --threads 1 --out bench-infer.csv
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from quatnn.bench.timing import interleaved_seconds, markdown_table, positive_int, write_rows

__all__ = ["run", "main"]


def _torch_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return model(x)

    return call


def _onnx_session(model: nn.Module, reference: nn.Module, example: torch.Tensor, path: str):
    """Export (checked against ``reference``) and open an ONNX Runtime session, or None
    when onnxruntime is missing."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None, 0
    from quatnn.export import export
    from quatnn.export.formats import onnx_session

    report = export(model, example, path, "onnx", reference=reference)
    return onnx_session(path, threads=torch.get_num_threads()), report["bytes"]


def _ort_fn(session, x: torch.Tensor) -> Callable[[], object]:
    name, data = session.get_inputs()[0].name, x.numpy()
    return lambda: session.run(None, {name: data})


def run(
    model: str = "conv4",
    batches: tuple[int, ...] = (1, 64),
    repeats: int = 20,
    num_classes: int = 10,
    options: dict | None = None,
) -> list[dict]:
    """One row per contender: ``model``, ``params``, ``file_MB``, ``size_x`` and, per
    batch size ``B``, ``bB_ms`` (median latency) and ``bB_x`` (ratio to real4 PyTorch)."""
    from quatnn import models
    from quatnn.export import fold, save_compact

    options = dict(options or {})
    spec = models.spec(model)
    real_variant = spec.real_variant
    torch.manual_seed(0)
    built = {}
    for variant in (real_variant, "quaternion"):
        meta = {"name": model, "variant": variant, "num_classes": num_classes, **options}
        built[variant] = (models.create(**meta).eval(), meta)
    contenders: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, (net, meta) in built.items():
            path = os.path.join(tmp, f"{variant}.safetensors")
            size = save_compact(net, path, meta)["bytes"]
            shape = (models.default_in_channels(model, variant), *spec.default_input_size)
            example = torch.randn(2, *shape)
            params = models.count_parameters(net)
            if variant == "quaternion":
                folded = fold(net)
                contenders["quaternion (quaternion layers)"] = {
                    "module": net,
                    "shape": shape,
                    "bytes": size,
                    "params": params,
                }
                contenders["quaternion folded (PyTorch)"] = {
                    "module": folded,
                    "shape": shape,
                    "bytes": size,
                    "params": params,
                }
                onnx_model, reference = folded, net
            else:
                contenders[f"{variant} (PyTorch)"] = {
                    "module": net,
                    "shape": shape,
                    "bytes": size,
                    "params": params,
                }
                onnx_model, reference = net, net
            session, onnx_bytes = _onnx_session(
                onnx_model, reference, example, os.path.join(tmp, f"{variant}.onnx")
            )
            if session is not None:
                label = (
                    "quaternion folded (ONNX Runtime)"
                    if variant == "quaternion"
                    else (f"{variant} (ONNX Runtime)")
                )
                contenders[label] = {"session": session, "shape": shape, "bytes": onnx_bytes,
                                     "params": params}  # fmt: skip
        base = f"{real_variant} (PyTorch)"
        rows = [{"model": label, "params": c["params"], "file_MB": c["bytes"] / 2**20,
                 "size_x": c["bytes"] / contenders[base]["bytes"]}
                for label, c in contenders.items()]  # fmt: skip
        for batch in batches:
            fns = {}
            for label, c in contenders.items():
                x = torch.randn(batch, *c["shape"])
                fns[label] = (
                    _ort_fn(c["session"], x) if "session" in c else _torch_fn(c["module"], x)
                )
            seconds = interleaved_seconds(fns, "cpu", repeats)
            for row, label in zip(rows, contenders, strict=True):
                row[f"b{batch}_ms"] = 1e3 * seconds[label]
                row[f"b{batch}_x"] = seconds[label] / seconds[base]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quatnn bench infer",
        description="File size and CPU inference latency of a model's quaternion variant "
        "(quaternion layers, folded, ONNX Runtime) against its real variant (real4; real "
        "for flat-input models such as lenet_300_100), side by side; ratios to that real "
        "variant in PyTorch (< 1 is smaller / faster).",
    )
    parser.add_argument("--model", default="conv4", help="zoo model (default: conv4)")
    parser.add_argument(
        "--batch", default="1,64", help="comma-separated batch sizes (default: 1,64)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=20, help="timed runs per measurement (default: 20)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (torch and ORT)"
    )
    parser.add_argument("--num-classes", type=positive_int, default=10, help="classifier outputs")
    parser.add_argument("--out", default=None, help="also write the table (.csv or .json)")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
        if any(b < 1 for b in batches):
            raise ValueError
    except ValueError:
        parser.error(f"--batch must be positive integers separated by commas, got {args.batch!r}")
    from quatnn import models

    if args.model not in models.names():
        parser.error(f"unknown model {args.model!r}; models: {', '.join(models.names())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, cpu, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = run(args.model, batches, args.repeats, args.num_classes)
    print(markdown_table(rows, list(rows[0])))
    if args.out:
        write_rows(rows, args.out)
    return 0
