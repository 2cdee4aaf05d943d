"""Export a model to ONNX, TorchScript or ``torch.export`` (pt2), checked before success.

Every export writes a temporary file beside the target, loads it back with the runtime
that will serve it (ONNX Runtime, ``torch.jit.load``, ``torch.export.load``), compares its
outputs with the PyTorch reference on the example batch and on a batch of another size
(the batch axis is dynamic), and only then renames it onto the target: a failed export or
check leaves no file behind. ``metadata`` (JSON) travels inside the file, where each
runtime reads it (:func:`read_export_metadata`); :func:`quatnn.export.export_run` puts the
input preprocessing there.

ONNX uses the ``torch.export``-based exporter (``dynamo=True``, the default and maintained
one in torch 2.9+) at opset 18; ``exporter="legacy"`` selects the deprecated TorchScript
exporter (much faster to run, same graphs for folded models). Quaternion models are
exported folded (:func:`quatnn.export.fold`): their batch norms and rank-8 kernels hold
data-dependent checks and custom autograd functions that no exporter can trace.

Example:
    >>> import os, tempfile, torch
    >>> from quatnn import models
    >>> from quatnn.export import fold
    >>> model = models.create("conv2", "quaternion").eval()
    >>> path = os.path.join(tempfile.mkdtemp(), "conv2.pt2")
    >>> report = export(fold(model), torch.randn(2, 4, 32, 32), path, "pt2", reference=model)
    >>> report["max_abs_diff"] < 1e-4
    True
    >>> _ = export(fold(model), torch.randn(2, 4, 32, 32), path, "pt2", metadata={"a": 1})
    >>> read_export_metadata(path)
    {'a': 1}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from quatnn.export import FORMATS, ONNX_OPSET

__all__ = ["export", "read_export_metadata", "tolerance"]

EXPORTERS = ("dynamo", "legacy")
METADATA = "quatnn"
"""Where the metadata lives: ONNX metadata property ``quatnn``; TorchScript and pt2 extra
file ``quatnn.json``."""


def tolerance(reference: Tensor) -> float:
    """Largest accepted max-abs difference: ``1e-4 * max(1, max |reference|)``."""
    return 1e-4 * max(1.0, float(reference.abs().max()) if reference.numel() else 1.0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the deprecation notices of torch.jit and of the legacy ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=1 << 20)


def _onnx(
    model: nn.Module, example: Tensor, path: str, metadata: str, opset: int, exporter: str
) -> int:
    """Write the ONNX file; return the opset it has (the dynamo exporter keeps its own when
    it cannot convert to ``opset``)."""
    names = {"input_names": ["input"], "output_names": ["output"], "opset_version": opset}
    with _quiet():
        if exporter == "legacy":
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                **names,
            )
            _onnx_metadata(path, metadata)
            return opset
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: _batch_dim()},),
            verbose=False,
            **names,
        )
        program.model.metadata_props[METADATA] = metadata
        program.save(path, external_data=False)  # one file (models under 2 GB)
        return program.model.opset_imports.get("", opset)


def _onnx_metadata(path: str, metadata: str) -> None:
    import onnx

    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {METADATA: metadata})
    onnx.save(proto, path)


def onnx_session(path: str, threads: int | None = None) -> object:
    """An ONNX Runtime CPU session of the file at ``path`` (``threads`` intra-op threads,
    else ONNX Runtime's default). Its idle threads do not spin: by default they keep
    spinning after each run and take the cores from whatever runs next in this process
    (on 2 threads, ResNet-18 real4 in PyTorch took 20.7 ms at batch 1 beside spinning
    sessions, 10.1 ms alone)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "checking an ONNX export needs onnxruntime: pip install 'quatnn[export]' "
            "(or skip the check)"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _onnx_runner(path: str) -> Callable[[Tensor], Tensor]:
    session = onnx_session(path)
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])

    return run


def _torchscript(model: nn.Module, example: Tensor, path: str, metadata: str) -> None:
    with _quiet():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        traced.save(path, _extra_files={f"{METADATA}.json": metadata})


def _torchscript_runner(path: str) -> Callable[[Tensor], Tensor]:
    with _quiet():
        module = torch.jit.load(path, map_location="cpu")
    return module


def _pt2(model: nn.Module, example: Tensor, path: str, metadata: str) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, path, extra_files={f"{METADATA}.json": metadata})


def _pt2_runner(path: str) -> Callable[[Tensor], Tensor]:
    return torch.export.load(path).module()


def _inputs(example: Tensor) -> list[Tensor]:
    """The example batch and a seeded batch of another size (checks the dynamic axis)."""
    generator = torch.Generator().manual_seed(1234)
    other = example.shape[0] + 1
    extra = torch.randn(other, *example.shape[1:], generator=generator, dtype=example.dtype)
    return [example, extra.to(example.device)]


def export(
    model: nn.Module,
    example: Tensor,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    reference: nn.Module | None = None,
    check: bool = True,
    opset: int = ONNX_OPSET,
    exporter: str = "dynamo",
    metadata: Mapping | None = None,
) -> dict:
    """Export ``model`` (eval mode, on the CPU; dynamic batch axis) traced on ``example``
    to ``path``.

    Args:
        model: usually ``fold(quaternion_model)``.
        example: an input batch (its batch size is not baked in).
        format: ``"onnx"``, ``"torchscript"`` (``torch.jit.trace``) or ``"pt2"``
            (``torch.export.save``).
        reference: the model whose outputs the export must reproduce (default ``model``;
            pass the unfolded model to check the fold as well).
        check: load the file back and compare outputs (ONNX: with ONNX Runtime) within
            :func:`tolerance` before writing ``path``.
        opset, exporter: ONNX opset and exporter (``"dynamo"`` or ``"legacy"``).
        metadata: JSON-serializable information stored in the file (default ``{}``);
            :func:`read_export_metadata` reads it back.

    Returns ``{"format", "path", "bytes", "max_abs_diff", "tolerance", "batches"}``
    (``max_abs_diff`` None when unchecked). Raises ValueError when the export fails or
    its outputs differ (nothing is written then), ImportError when the checking runtime
    is missing.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    newest = _newest_onnx_opset() if format == "onnx" else None
    if newest is not None and opset > newest:
        raise ValueError(f"opset {opset} is newer than this onnx package knows ({newest})")
    if format == "onnx" and exporter == "dynamo" and opset < ONNX_OPSET:
        raise ValueError(
            f"the dynamo ONNX exporter writes opset {ONNX_OPSET} or newer (got {opset}); "
            "use the legacy exporter for older opsets"
        )
    if model.training or (reference is not None and reference.training):
        raise ValueError("export: call model.eval() first (exports are for inference)")
    try:
        text = json.dumps(dict(metadata or {}), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"export: metadata must be JSON-serializable ({err})") from None
    reference = model if reference is None else reference
    tensors = [example, *model.parameters(), *model.buffers(), *reference.parameters()]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("export: move the model(s) and the example to the CPU first (.cpu())")
    path = writable(path)
    suffix = ".tmp.pt2" if format == "pt2" else ".tmp"  # torch.export wants a .pt2 name
    # a fresh name beside the target (created by the exporter with the usual permissions)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"))
    try:
        try:
            with torch.no_grad():
                if format == "onnx":
                    written = _onnx(model, example, tmp, text, opset, exporter)
                elif format == "torchscript":
                    _torchscript(model, example, tmp, text)
                else:
                    _pt2(model, example, tmp, text)
        except Exception as err:
            raise ValueError(_failure(model, format, err)) from err
        if format == "onnx" and written != opset:
            raise ValueError(
                f"the dynamo ONNX exporter could not convert this model to opset {opset} "
                f"(it wrote {written}); use opset {written}, or the legacy exporter"
            )
        report = {"format": format, "path": str(path), "bytes": os.path.getsize(tmp),
                  "max_abs_diff": None, "tolerance": None, "batches": []}  # fmt: skip
        if check:
            run = {"onnx": _onnx_runner, "torchscript": _torchscript_runner, "pt2": _pt2_runner}
            runner = run[format](tmp)
            worst, limit = 0.0, float("inf")
            for x in _inputs(example):
                with torch.no_grad():
                    want, got = reference(x), runner(x)
                if got.shape != want.shape:
                    raise ValueError(
                        f"the exported {format} model returns shape {tuple(got.shape)} for a "
                        f"batch of {x.shape[0]}, the PyTorch model {tuple(want.shape)}"
                    )
                diff = float((got.to(want.dtype) - want).abs().max()) if want.numel() else 0.0
                worst, limit = max(worst, diff), min(limit, tolerance(want))
                report["batches"].append(x.shape[0])
            report["max_abs_diff"], report["tolerance"] = worst, limit
            if not worst <= limit:
                raise ValueError(
                    f"the exported {format} model differs from the PyTorch model: max abs "
                    f"diff {worst:.3g} > tolerance {limit:.3g}; nothing was written"
                )
        os.replace(tmp, path)
        return report
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` that :func:`export` stored in the ONNX, TorchScript or pt2 file
    ``path`` (by its suffix; ``{}`` for a file written without). Runtimes read it too:
    ONNX Runtime as ``session.get_modelmeta().custom_metadata_map["quatnn"]``, TorchScript
    as ``torch.jit.load(path, _extra_files={"quatnn.json": ""})``, pt2 as
    ``torch.export.load(path, extra_files={"quatnn.json": ""})``. For a compact
    ``.safetensors`` checkpoint: its ``extra`` and ``model`` (see
    :func:`quatnn.export.read_metadata`), the keys every file of
    :func:`quatnn.export.export_run` holds."""
    path = str(path)
    if path.endswith(".safetensors"):
        from quatnn.export.compact import read_metadata

        compact = read_metadata(path)
        return {**compact["extra"], "model": compact["model"]}
    if path.endswith(".onnx"):
        import onnx

        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        text = props.get(METADATA, "")
    else:
        files = {f"{METADATA}.json": ""}
        if path.endswith(".pt2"):
            torch.export.load(path, extra_files=files)
        else:
            with _quiet():
                torch.jit.load(path, map_location="cpu", _extra_files=files)
        text = files[f"{METADATA}.json"]
    return json.loads(text) if text else {}


def _newest_onnx_opset() -> int | None:
    """The newest opset of the installed onnx package (None without it)."""
    try:
        import onnx
    except ImportError:
        return None
    return onnx.defs.onnx_opset_version()


def writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path; ValueError if it cannot be written as a file (a folder, or in a
    folder that does not exist)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"export: {path} is a folder; give the file to write")
    if not path.parent.is_dir():
        raise ValueError(f"export: folder {path.parent} does not exist")
    return path


def _failure(model: nn.Module, format: str, err: Exception) -> str:
    from quatnn.export.folding import is_quaternion_module

    reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())[:300]  # no colours
    reason = reason or type(err).__name__
    left = [n or "<root>" for n, m in model.named_modules() if is_quaternion_module(m)]
    hint = ""
    if left:
        hint = (
            f"; the model still holds quaternion modules (e.g. {left[0]}), which do not "
            "trace: export it folded (quatnn.export.fold, or --fold)"
        )
    return f"{format} export failed ({type(err).__name__}: {reason}){hint}"
