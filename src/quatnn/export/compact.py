"""Compact checkpoints: the quaternion weights (4 numbers per quaternion, never the folded
16-block real matrix) and buffers in one safetensors file, plus the model's
:func:`quatnn.models.create` arguments as JSON metadata, so :func:`load` rebuilds it.

File layout (safetensors): one tensor per ``state_dict`` entry; the header metadata holds
``format`` (:data:`FORMAT`), ``model`` (JSON of the ``create`` keyword arguments:
``name``, ``variant``, ``num_classes``, ``in_channels``, ``input_size`` and model options),
``sparse`` (JSON: entries stored sparse), ``extra`` (JSON, free-form) and the versions.
With ``sparse=True`` a floating tensor that is mostly zeros is stored as its non-zero
values (``NAME::values``) plus either a bit mask (``NAME::mask``, 1 bit per entry) or
``int32``/``int64`` flat indices (``NAME::indices``), whichever is smaller; it reloads
bit for bit (zeros stored as ``-0.0`` are recorded in a bit mask ``NAME::negzero``).
Tensors pruned with ``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``) are
stored as the effective ``weight``.

Example:
    >>> import os, tempfile, torch
    >>> from quatnn import models
    >>> meta = {"name": "conv2", "variant": "quaternion", "num_classes": 10}
    >>> model = models.create(**meta).eval()
    >>> path = os.path.join(tempfile.mkdtemp(), "conv2.safetensors")
    >>> _ = save_compact(model, path, meta)
    >>> x = torch.randn(2, 4, 32, 32)
    >>> torch.equal(load(path)(x), model(x))
    True
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from quatnn.export.formats import writable
from quatnn.train.checkpoint import write_atomic

__all__ = ["FORMAT", "save_compact", "load", "load_weights", "read_metadata"]

FORMAT = "quatnn-compact-1"
_SEP = "::"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "compact checkpoints need the safetensors package: pip install 'quatnn[export]'"
        ) from None
    return safetensors.torch


# --------------------------------------------------------------------------- state


def _effective_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with ``torch.nn.utils.prune`` pairs (``X_orig``, ``X_mask``)
    replaced by the effective ``X``."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")
    return state


def _describe(spec: Mapping) -> str:
    return "/".join(str(spec.get(k, "?")) for k in ("name", "variant"))


def _skeleton(spec: Mapping) -> nn.Module:
    """The model ``spec`` describes, built on the meta device (no memory, no init)."""
    from quatnn import models

    kwargs = dict(spec)
    if kwargs.get("input_size") is not None:
        kwargs["input_size"] = tuple(kwargs["input_size"])
    if "name" not in kwargs:
        raise ValueError(
            "compact checkpoint metadata needs at least 'name' (and usually 'variant', "
            f"'num_classes', 'in_channels', 'input_size'), got keys {sorted(kwargs)}"
        )
    try:
        with torch.device("meta"):
            return models.create(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build the model {_describe(spec)} from {kwargs}: {err}") from None


def _mismatch(found: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """What differs between two name -> tensor maps ('' when keys and shapes agree)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- sparse


def _pack(bits: Tensor) -> Tensor:
    """Flat bool -> uint8, 8 entries per byte (most significant bit first)."""
    padded = torch.zeros(math.ceil(bits.numel() / 8) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    return (padded.view(-1, 8) * _BITS).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack(packed: Tensor, n: int) -> Tensor:
    return (packed.unsqueeze(1) & _BITS).ne(0).view(-1)[:n]


def _encode_sparse(name: str, t: Tensor, threshold: float) -> dict[str, Tensor] | None:
    """The sparse entries of ``t`` when it is at least ``threshold`` zeros and the
    encoding is smaller than the dense tensor, else None. Zeros stored as ``-0.0`` (what
    multiplying a negative weight by a 0 mask gives) are kept in a bit mask
    ``NAME::negzero``, so the reload is bit-exact."""
    n = t.numel()
    if not t.is_floating_point() or n < 64:
        return None
    flat = t.reshape(-1)
    mask = flat != 0  # NaN counts as non-zero
    nnz = int(mask.sum())
    if 1 - nnz / n < threshold:
        return None
    negzero = ~mask & torch.signbit(flat)
    item = t.element_size()
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    index_bytes = nnz * torch.empty((), dtype=index_dtype).element_size()
    mask_bytes = math.ceil(n / 8)
    extra = mask_bytes if bool(negzero.any()) else 0
    if min(index_bytes, mask_bytes) + nnz * item + extra >= n * item:
        return None
    out = {f"{name}{_SEP}values": flat[mask].clone()}
    if index_bytes < mask_bytes:
        out[f"{name}{_SEP}indices"] = mask.nonzero().view(-1).to(index_dtype)
    else:
        out[f"{name}{_SEP}mask"] = _pack(mask)
    if extra:
        out[f"{name}{_SEP}negzero"] = _pack(negzero)
    return out


def _decode_sparse(name: str, info: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
    shape, n = tuple(info["shape"]), math.prod(info["shape"])
    values = tensors[f"{name}{_SEP}values"]
    out = torch.zeros(n, dtype=values.dtype)
    if info["encoding"] == "indices":
        index = tensors[f"{name}{_SEP}indices"].long()
    else:
        index = _unpack(tensors[f"{name}{_SEP}mask"], n).nonzero().view(-1)
    if index.numel() != values.numel() or (index.numel() and int(index.max()) >= n):
        raise ValueError(f"{name}: {values.numel()} values for {index.numel()} positions")
    out[index] = values
    if f"{name}{_SEP}negzero" in tensors:
        out[_unpack(tensors[f"{name}{_SEP}negzero"], n)] = -0.0
    return out.view(shape)


# --------------------------------------------------------------------------- save


def save_compact(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: Mapping,
    *,
    sparse: bool = False,
    sparse_threshold: float = 0.5,
    extra: Mapping | None = None,
) -> dict:
    """Write ``model``'s parameters and buffers to the safetensors file ``path``.

    Args:
        model: the model (any variant); its quaternion layers hold 4 numbers per
            quaternion weight, so a quaternion model's file is about 1/4 of its real
            counterpart's.
        metadata: the :func:`quatnn.models.create` keyword arguments that rebuild it
            (``name`` required; ``variant``, ``num_classes``, ``in_channels``,
            ``input_size`` and model options as needed). Checked here: the model they
            describe must have exactly the same weight names and shapes.
        sparse: store floating tensors with at least ``sparse_threshold`` zeros sparse
            (only where that is smaller).
        extra: JSON-serializable information kept in the file (e.g. dataset, accuracy).

    Returns ``{"path", "bytes", "tensors", "sparse"}`` (``sparse``: names stored sparse).
    Writes atomically (temporary file, then rename).
    """
    path = writable(path)
    spec = dict(metadata)
    if spec.get("input_size") is not None:
        spec["input_size"] = list(spec["input_size"])
    try:
        spec_json = json.dumps(spec, sort_keys=True)
        extra_json = json.dumps(dict(extra or {}), sort_keys=True)
    except TypeError as err:
        raise ValueError(f"save_compact: metadata must be JSON-serializable ({err})") from None
    state = _effective_state(model)
    reason = _mismatch(state, _skeleton(spec).state_dict())
    if reason:
        raise ValueError(
            f"save_compact: the metadata describes {_describe(spec)} ({spec_json}) but the "
            f"model's weights differ ({reason})"
        )
    tensors: dict[str, Tensor] = {}
    sparse_info: dict[str, dict] = {}
    for name, t in state.items():
        t = t.cpu().contiguous()
        encoded = _encode_sparse(name, t, sparse_threshold) if sparse else None
        if encoded is None:
            tensors[name] = t.clone()
            continue
        tensors.update(encoded)
        kind = "indices" if f"{name}{_SEP}indices" in encoded else "mask"
        sparse_info[name] = {"shape": list(t.shape), "encoding": kind}
    import quatnn

    header = {
        "format": FORMAT,
        "model": spec_json,
        "sparse": json.dumps(sparse_info, sort_keys=True),
        "extra": extra_json,
        "quatnn": quatnn.__version__,
        "torch": torch.__version__,
    }
    data = _safetensors().save(tensors, metadata=header)
    write_atomic(path, lambda f: f.write(data))
    return {"path": str(path), "bytes": len(data), "tensors": len(state),
            "sparse": sorted(sparse_info)}  # fmt: skip


# --------------------------------------------------------------------------- load


def _read(path: str | os.PathLike) -> tuple[bytes, dict]:
    """The file's bytes and its safetensors header metadata, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no compact checkpoint at {path}")
    data = path.read_bytes()
    what = f"expected a quatnn compact checkpoint ({FORMAT}, safetensors)"
    if len(data) < 8:
        raise ValueError(f"{path} is truncated or empty ({len(data)} bytes); {what}")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError(
            f"{path} is truncated or not a safetensors file: its header announces {size} "
            f"bytes but the file holds {len(data) - 8} after the length; {what}"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file (unreadable header); {what}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (unreadable header); {what}")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    body = len(data) - 8 - size
    if ends and max(ends) > body:
        raise ValueError(
            f"{path} is truncated: its tensors need {max(ends)} bytes, the file holds {body}; "
            f"{what}"
        )
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        found = meta.get("format", "no format tag")
        raise ValueError(f"{path} is not a quatnn compact checkpoint: {what}, found {found!r}")
    return data, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a compact checkpoint: ``model`` (the ``create`` arguments),
    ``sparse``, ``extra`` and the ``quatnn``/``torch`` versions that wrote it."""
    _, meta = _read(path)
    out = dict(meta)
    for key in ("model", "sparse", "extra"):
        out[key] = json.loads(meta.get(key) or "{}")
    return out


def _state(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    data, meta = _read(path)
    try:
        raw = _safetensors().load(data)
    except Exception as err:  # safetensors raises its own error type for damaged files
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"{path} is damaged ({reason}); expected a quatnn compact "
                         f"checkpoint ({FORMAT})") from None  # fmt: skip
    spec, sparse = json.loads(meta["model"]), json.loads(meta.get("sparse") or "{}")
    try:
        state = {k: v for k, v in raw.items() if _SEP not in k}
        for name, info in sparse.items():
            state[name] = _decode_sparse(name, info, raw)
    except (KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is damaged: bad sparse entry ({err})") from None
    return spec, state


def _check_expected(path: str | os.PathLike, spec: Mapping, expect: Mapping | None) -> None:
    if not expect:
        return
    wrong = {k: v for k, v in expect.items() if _jsonable(spec.get(k)) != _jsonable(v)}
    if wrong:
        found = ", ".join(f"{k}={spec.get(k)!r}" for k in wrong)
        wanted = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        raise ValueError(
            f"{path} holds {_describe(spec)} ({found}), expected {_describe({**spec, **expect})}"
            f" ({wanted})"
        )


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value if not isinstance(value, tuple) else list(value)))


def load(path: str | os.PathLike, *, expect: Mapping | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save_compact` (``quatnn.models.create`` with the
    stored arguments) and load its weights; returned in eval mode on the CPU.

    ``expect`` (e.g. ``{"name": "conv4", "variant": "quaternion"}``) must match the stored
    arguments. Raises FileNotFoundError if ``path`` is missing, and ValueError with what
    was expected and what was found if the file is truncated, damaged, not a compact
    checkpoint, of another model than ``expect`` names, or its weights do not fit the
    model its metadata describes.
    """
    spec, state = _state(path)
    _check_expected(path, spec, expect)
    model = _skeleton(spec)
    reason = _mismatch(state, model.state_dict())
    if reason:
        raise ValueError(
            f"{path}: the stored weights do not fit {_describe(spec)} as its metadata "
            f"describes it ({json.dumps(spec, sort_keys=True)}): {reason}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (non-persistent buffer): build it for real
        model = _skeleton_real(spec)
        model.load_state_dict(state, strict=True)
    return model.eval()


def _skeleton_real(spec: Mapping) -> nn.Module:
    from quatnn import models

    kwargs = dict(spec)
    if kwargs.get("input_size") is not None:
        kwargs["input_size"] = tuple(kwargs["input_size"])
    return models.create(**kwargs)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a compact checkpoint into an existing ``model`` (ValueError naming what differs
    if the names or shapes disagree); returns ``model``."""
    spec, state = _state(path)
    reason = _mismatch(state, model.state_dict())
    if reason:
        raise ValueError(
            f"{path} holds the weights of {_describe(spec)}, which do not fit this "
            f"{type(model).__name__}: {reason}"
        )
    model.load_state_dict(state, strict=True)
    return model
