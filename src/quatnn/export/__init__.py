"""Deployment: fold quaternion models into plain real ones, export them, ship compact weights.

* :func:`fold` -- a plain ``torch.nn`` copy of a model (eval mode) with the same outputs:
  quaternion layers become real layers with the folded weight, batch norms are folded
  into the preceding layer (:mod:`quatnn.export.folding`).
* :func:`export` -- ONNX (checked with ONNX Runtime), TorchScript or ``torch.export``
  (pt2), dynamic batch axis, outputs checked before the file is written
  (:mod:`quatnn.export.formats`).
* :func:`save_compact` / :func:`load` -- safetensors files holding only the quaternion
  weights (about 1/4 of the real model's bytes), optionally sparse, that rebuild the model
  from their metadata (:mod:`quatnn.export.compact`).
* :func:`export_run` / :func:`load_run` -- the same for a training run folder
  (``quatnn export RUN_DIR``, :mod:`quatnn.export.run`).

Needs the ``export`` extra for ONNX and safetensors: ``pip install 'quatnn[export]'``
(imported on use, so ``import quatnn.export`` works without it).

Example:
    >>> import torch
    >>> from quatnn import models, export
    >>> model = models.create("conv2", "quaternion").eval()
    >>> real = export.fold(model)
    >>> x = torch.randn(2, 4, 32, 32)
    >>> torch.allclose(real(x), model(x), atol=1e-5)
    True
"""

from quatnn._lazy import lazy_names

FORMATS = ("onnx", "torchscript", "pt2")
"""Formats of :func:`export`."""
RUN_FORMATS = (*FORMATS, "safetensors")
"""Formats of :func:`export_run` (``quatnn export``)."""
ONNX_OPSET = 18
"""The ONNX opset written unless asked otherwise (the dynamo exporter writes 18 or newer)."""

_ORIGINS = {
    **dict.fromkeys(("FORMAT", "load", "load_weights", "read_metadata", "save_compact"), "compact"),
    **dict.fromkeys(("fold", "is_quaternion_module"), "folding"),
    **dict.fromkeys(("export", "read_export_metadata", "tolerance"), "formats"),
    **dict.fromkeys(
        ("ChannelPermute", "NormAdaptiveMaxPool", "PermutedConv", "QuaternionAffine"), "modules"
    ),
    **dict.fromkeys(("export_run", "load_run"), "run"),
}
__all__ = sorted(("FORMATS", "ONNX_OPSET", "RUN_FORMATS", *_ORIGINS))
__getattr__, __dir__ = lazy_names(__name__, _ORIGINS)
