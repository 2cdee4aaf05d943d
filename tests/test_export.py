"""Deployment: fold() equality over the zoo, ONNX/TorchScript/pt2 round trips, compact
checkpoints (size, exact reload, sparse storage, clear errors) and run-folder export."""

import io
import json
import os

import pytest
import torch
from torch import nn

from quatnn import data, models, train
from quatnn import nn as qnn
from quatnn.export import (
    FORMAT,
    NormAdaptiveMaxPool,
    PermutedConv,
    QuaternionAffine,
    export,
    export_run,
    fold,
    is_quaternion_module,
    load,
    load_weights,
    read_export_metadata,
    read_metadata,
    save_compact,
)
from quatnn.nn.base import QuaternionLayer
from quatnn.nn.norm import QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, _QBatchNorm
from quatnn.train import checkpoint
from quatnn.train.config import TrainConfig

CONVNETS = ("conv2", "conv4", "conv6")


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so the fold is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm | _QBatchNorm):
                continue
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            if getattr(m, "running_cov", None) is not None:
                a = torch.eye(4) + 0.3 * torch.randn(*m.running_cov.shape, generator=g)
                m.running_cov.copy_(a @ a.mT + 0.1 * torch.eye(4))
            else:
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = max(1.0, float(want.detach().abs().max()))
    diff = float((got - want).detach().abs().max())
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} (output scale {scale:.3g})"


def _input(name: str, variant: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    shape = (models.default_in_channels(name, variant), *models.spec(name).default_input_size)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _check_fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    folded = fold(model)
    with torch.no_grad():
        _assert_close(folded(x), model(x))
    left = [n for n, m in folded.named_modules() if is_quaternion_module(m)]
    assert not left, left
    assert not any(isinstance(m, QuaternionLayer | _QBatchNorm) for m in folded.modules())
    return folded


# --------------------------------------------------------------------------- fold: the zoo


def _zoo_cases():
    for name in models.names():
        real = "real" if models.spec(name).input_kind == "flat" else "real4"
        yield name, "quaternion"
        yield name, real


@pytest.mark.parametrize("name, variant", list(_zoo_cases()))
def test_fold_matches_every_zoo_model(name, variant):
    torch.manual_seed(0)
    model = _randomize_norms(models.create(name, variant, num_classes=7))
    folded = _check_fold(model, _input(name, variant))
    # every batch norm of the zoo follows its convolution: all of them are folded away
    norms = (nn.modules.batchnorm._BatchNorm, QuaternionAffine)
    assert not any(isinstance(m, norms) for m in folded.modules())


@pytest.mark.parametrize("norm", ["variance", "split", "real"])
def test_fold_resnet_with_other_norms(norm):
    torch.manual_seed(0)
    model = _randomize_norms(models.create("resnet20", "quaternion", num_classes=5, norm=norm))
    _check_fold(model, _input("resnet20", "quaternion"))


def test_fold_imagenet_stem_and_real_first_layer():
    torch.manual_seed(0)
    model = models.create(
        "resnet18", "quaternion", 3, in_channels=3, small_input=False, quaternion_first=False
    )
    _check_fold(_randomize_norms(model), torch.randn(2, 3, 32, 32))


def test_fold_leaves_the_original_untouched():
    model = models.create("conv2", "quaternion").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold(model)
    assert isinstance(model.features[0], qnn.QConv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- fold: layers


def test_fold_layer_zoo_without_norm_fusion():
    """Grouped, transposed, 1d/3d layers, padding modes, standalone norms of every mode."""
    torch.manual_seed(0)
    conv = nn.Sequential(
        qnn.QConv2d(8, 16, 3, padding="same", padding_mode="reflect"),
        QBatchNorm2d(16, mode="whiten"),
        nn.ReLU(),
        qnn.QConv2d(16, 16, 3, stride=2, padding=1, groups=2),
        QBatchNorm2d(16, mode="variance"),
        qnn.QConvTranspose2d(16, 8, 3, stride=2, output_padding=1, groups=2),
        QBatchNorm2d(8, mode="split"),
        qnn.QDropout(0.3),
        qnn.QMaxPool2d(3, 2, 1),
        qnn.QModReLU(8),
        qnn.QAdaptiveMaxPool2d((3, None)),
    )
    _randomize_norms(conv)
    for fuse in (False, True):
        conv.eval()
        folded = fold(conv, fuse_norms=fuse)
        with torch.no_grad():
            x = torch.randn(2, 8, 9, 11)
            _assert_close(folded(x), conv(x))
        kinds = [type(m) for m in folded]
        assert PermutedConv in kinds and NormAdaptiveMaxPool in kinds
        assert (QuaternionAffine in kinds) is not fuse
        assert kinds[7] is nn.Identity  # dropout

    seq1 = nn.Sequential(
        qnn.QConv1d(4, 8, 3, dilation=2, padding_mode="circular", padding=2),
        QBatchNorm1d(8),
        qnn.QConvTranspose1d(8, 4, 4, stride=3, dilation=2),
        QBatchNorm1d(4, mode="variance"),
    )
    seq3 = nn.Sequential(
        qnn.QConv3d(4, 8, 3, padding=1, groups=1, bias=False),
        QBatchNorm3d(8),
        qnn.QConvTranspose3d(8, 8, 2, stride=2, groups=2, bias=False),
        QBatchNorm3d(8),
        qnn.QMaxPool3d(2),
        qnn.QAdaptiveMaxPool3d(1),
    )
    head = nn.Sequential(QBatchNorm1d(8), qnn.QLinear(8, 12), QBatchNorm1d(12, mode="split"))
    standalone = nn.Sequential(  # no layer to fuse into; without shift or affine parameters
        *(QBatchNorm2d(8, mode=mode, bias=False) for mode in ("whiten", "variance", "split")),
        *(QBatchNorm2d(8, mode=mode, affine=False) for mode in ("whiten", "variance", "split")),
    )
    for module, x in (
        (seq1, torch.randn(2, 4, 13)),
        (seq3, torch.randn(2, 4, 4, 5, 6)),
        (head, torch.randn(3, 8)),
        (standalone, torch.randn(2, 8, 3, 4)),
    ):
        _check_fold(_randomize_norms(module), x)


def test_fold_root_modules():
    layer = qnn.QConv2d(8, 8, 3, groups=2).eval()
    x = torch.randn(2, 8, 6, 6)
    assert isinstance(fold(layer), PermutedConv)
    _assert_close(fold(layer)(x), layer(x))
    norm = _randomize_norms(QBatchNorm2d(8)).eval()
    assert isinstance(fold(norm), QuaternionAffine)
    _assert_close(fold(norm)(x), norm(x))


def test_norm_adaptive_max_pool_matches_quaternion_pool():
    torch.manual_seed(0)
    for pool, x in (
        (qnn.QAdaptiveMaxPool1d(3), torch.randn(2, 8, 7)),
        (qnn.QAdaptiveMaxPool2d((2, 3)), torch.randn(2, 8, 5, 7)),
        (qnn.QAdaptiveMaxPool2d(1), torch.randn(2, 8, 5, 5)),
        (qnn.QAdaptiveMaxPool3d((2, None, 1)), torch.randn(1, 4, 3, 4, 5)),
    ):
        assert torch.equal(fold(pool.eval())(x), pool(x))
    pool = qnn.QAdaptiveMaxPool2d(1, return_indices=True).eval()  # indices: kept as it is
    x = torch.randn(2, 8, 5, 5)
    assert all(map(torch.equal, fold(pool)(x), pool(x)))


@pytest.mark.parametrize("transposed", [False, True])
def test_fold_grouped_convolution_with_a_bias(transposed):
    torch.manual_seed(0)
    cls = qnn.QConvTranspose2d if transposed else qnn.QConv2d
    layer = cls(8, 16, 3, groups=2).double().eval()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold(layer)(x), layer(x))


@pytest.mark.parametrize("fuse", [False, True])
def test_fold_whitening_with_a_non_default_eps(fuse):
    torch.manual_seed(0)
    model = nn.Sequential(qnn.QConv2d(8, 8, 3), QBatchNorm2d(8, eps=0.1)).double()
    x = torch.randn(16, 8, 6, 6, dtype=torch.float64) * 0.3
    for _ in range(3):
        model(x)  # running statistics of the order of eps
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fold(model, fuse_norms=fuse)(x), model(x))


# --------------------------------------------------------------------------- fold: errors


class _MyQuaternionLayer(QuaternionLayer):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 1, 1))

    def forward(self, x):
        return x


def test_fold_names_unsupported_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(_MyQuaternionLayer())).eval()
    with pytest.raises(ValueError, match=r"1\.0 \(_MyQuaternionLayer\)"):
        fold(model)


def test_fold_needs_eval_mode_and_running_statistics():
    with pytest.raises(ValueError, match="eval mode"):
        fold(models.create("conv2", "quaternion"))
    model = nn.Sequential(qnn.QConv2d(4, 8, 3), QBatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match=r"1 \(QBatchNorm2d\) has no running statistics"):
        fold(model.eval())


# --------------------------------------------------------------------------- formats


def _onnxruntime():
    return pytest.importorskip(
        "onnxruntime", reason="onnxruntime not installed (pip install 'quatnn[export]')"
    )


def _ort_outputs(path: str, x: torch.Tensor) -> torch.Tensor:
    ort = _onnxruntime()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize(
    "name, options, exporter",
    [("conv2", {}, "dynamo"), ("resnet20", {"norm": "whiten"}, "dynamo"),
     ("resnet20", {"norm": "variance"}, "legacy")],
)  # fmt: skip
def test_onnx_round_trip(tmp_path, name, options, exporter):
    _onnxruntime()
    torch.manual_seed(0)
    model = _randomize_norms(models.create(name, "quaternion", num_classes=10, **options)).eval()
    path = tmp_path / f"{name}.onnx"
    meta = {"name": name, "options": options}
    report = export(fold(model), _input(name, "quaternion"), path, "onnx", reference=model,
                    exporter=exporter, metadata=meta)  # fmt: skip
    assert path.is_file() and report["batches"] == [2, 3]
    assert report["max_abs_diff"] <= report["tolerance"]
    x = _input(name, "quaternion", batch=5, seed=3)  # another batch size: dynamic axis
    with torch.no_grad():
        _assert_close(_ort_outputs(str(path), x), model(x))
    assert read_export_metadata(path) == meta
    session = _onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["quatnn"]) == meta


def test_unfolded_quaternion_layers_round_trip_through_onnx(tmp_path):
    """Without folding, the traced fold of each layer (a constant gather and sign) is
    plain ONNX: grouped, transposed and linear layers export and keep the batch dynamic."""
    _onnxruntime()
    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QConv2d(8, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        qnn.QConvTranspose2d(16, 4, 2, stride=2),
        nn.Flatten(),
        qnn.QLinear(4 * 12 * 12, 8),
    ).eval()
    path = tmp_path / "unfolded.onnx"
    report = export(model, torch.randn(2, 8, 6, 6), path, "onnx")
    assert report["max_abs_diff"] <= report["tolerance"]
    x = torch.randn(5, 8, 6, 6)
    with torch.no_grad():
        _assert_close(_ort_outputs(str(path), x), model(x))


def test_onnx_opset_is_the_one_asked_for_or_a_clear_error(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    newest = onnx.defs.onnx_opset_version()
    for opset, message in ((13, "legacy exporter"), (newest + 1, f"newer than .* \\({newest}\\)")):
        path = tmp_path / f"{opset}.onnx"
        with pytest.raises(ValueError, match=message):
            export(model, torch.randn(2, 8), path, "onnx", opset=opset, exporter="dynamo")
        assert not path.exists() and not list(tmp_path.iterdir())
    for opset, exporter in ((13, "legacy"), (20, "dynamo")):
        path = tmp_path / f"{opset}.onnx"
        export(model, torch.randn(2, 8), path, "onnx", opset=opset, exporter=exporter)
        versions = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
        assert versions[""] == opset


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torch_formats_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QConv2d(4, 8, 3, padding=1),
        QBatchNorm2d(8),
        nn.ReLU(),
        qnn.QConv2d(8, 8, 3, groups=2),
        qnn.QMaxPool2d(2),
        nn.Flatten(),
        qnn.QLinear(8 * 3 * 3, 12),
    )
    model = _randomize_norms(model).eval()
    path = tmp_path / f"model.{fmt}"
    meta = {"classes": ["cat", "dog"], "mean": [0.5]}
    report = export(fold(model), torch.randn(2, 4, 8, 8), path, fmt, reference=model, metadata=meta)
    assert path.is_file() and report["max_abs_diff"] <= report["tolerance"]
    assert read_export_metadata(path) == meta
    export(fold(model), torch.randn(2, 4, 8, 8), path, fmt)
    assert read_export_metadata(path) == {}
    with pytest.raises(ValueError, match="metadata must be JSON-serializable"):
        export(fold(model), torch.randn(2, 4, 8, 8), path, fmt, metadata={"x": torch.ones(1)})


class _SignFlip(nn.Module):
    """A branch on the data: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_failed_export_names_the_cause_and_writes_nothing(tmp_path):
    path = tmp_path / "model.pt2"
    model = nn.Sequential(qnn.QConv2d(4, 8, 3), _SignFlip()).eval()
    with pytest.raises(ValueError, match="export it folded"):
        export(model, torch.randn(2, 4, 32, 32), path, "pt2")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="format must be one of"):
        export(model, torch.randn(2, 4, 32, 32), path, "tflite")


@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_batch_statistics_in_eval_export_to_pt2(tmp_path, mode):
    """track_running_stats=False: eval mode normalizes with batch statistics, traced as
    plain ops (no finiteness check branches on the data)."""
    norm = QBatchNorm2d(8, mode=mode, track_running_stats=False)
    model = nn.Sequential(qnn.QConv2d(4, 8, 3), norm).eval()
    report = export(model, torch.randn(2, 4, 32, 32), tmp_path / "model.pt2", "pt2")
    assert report["max_abs_diff"] <= report["tolerance"]


def test_unfolded_whitening_model_exports_to_pt2(tmp_path):
    """Eval-mode whitening traces as plain ops, so torch.export takes the model as is."""
    torch.manual_seed(0)
    model = _randomize_norms(models.create("resnet20", "quaternion")).eval()
    report = export(model, torch.randn(2, 4, 32, 32), tmp_path / "m.pt2", "pt2")
    assert report["max_abs_diff"] <= report["tolerance"]


# --------------------------------------------------------------------------- compact


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("name", CONVNETS)
def test_compact_is_a_quarter_of_real4_and_reloads_exactly(tmp_path, name):
    torch.manual_seed(0)
    sizes = {}
    for variant in ("real4", "quaternion"):
        meta = {"name": name, "variant": variant, "num_classes": 10}
        model = models.create(**meta).eval()
        path = tmp_path / f"{variant}.safetensors"
        sizes[variant] = save_compact(model, path, meta)["bytes"]
        assert sizes[variant] == path.stat().st_size
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        sizes[variant + ".pt"] = buffer.tell()
        loaded = load(path)
        assert type(loaded) is type(model) and not loaded.training
        x = _input(name, variant)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    assert sizes["quaternion"] <= 0.27 * sizes["real4"]
    assert sizes["quaternion"] <= 0.27 * sizes["real4.pt"]


def test_compact_keeps_norm_buffers_and_metadata(tmp_path):
    meta = {"name": "resnet20", "variant": "quaternion", "num_classes": 4, "norm": "whiten"}
    model = _randomize_norms(models.create(**meta)).eval()
    path = tmp_path / "r.safetensors"
    save_compact(model, path, meta, extra={"dataset": "cifar10"})
    loaded = load(path, expect={"name": "resnet20", "variant": "quaternion"})
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    info = read_metadata(path)
    assert info["format"] == FORMAT and info["model"] == meta
    assert info["extra"] == {"dataset": "cifar10"}
    fresh = models.create(**meta)
    load_weights(fresh, path)
    assert torch.equal(fresh.stem[0].weight, model.stem[0].weight)


def test_sparse_round_trip_is_smaller_and_bit_exact(tmp_path):
    torch.manual_seed(0)
    meta = {"name": "conv4", "variant": "quaternion"}
    model = models.create(**meta).eval()
    with torch.no_grad():
        for p in model.parameters():  # 90% zeros, as a pruning mask leaves them (-0.0 too)
            p.mul_((torch.rand(p.shape) < 0.1).to(p.dtype))
    dense = save_compact(model, tmp_path / "dense.safetensors", meta)
    sparse = save_compact(model, tmp_path / "sparse.safetensors", meta, sparse=True)
    assert "features.2.weight" in sparse["sparse"]
    assert sparse["bytes"] < 0.25 * dense["bytes"]
    loaded = load(tmp_path / "sparse.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(_bits(loaded.state_dict()[key]), _bits(value)), key
    x = _input("conv4", "quaternion")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_sparse_round_trip_of_a_quatnn_pruned_model(tmp_path):
    from quatnn import prune

    torch.manual_seed(0)
    meta = {"name": "conv2", "variant": "quaternion"}
    model = models.create(**meta).eval()
    prune.attach(model, prune.prune(model, prune.dense_masks(model), prune.PruneSpec(rate=0.9)))
    dense = save_compact(model, tmp_path / "dense.safetensors", meta)
    sparse = save_compact(model, tmp_path / "sparse.safetensors", meta, sparse=True)
    assert sparse["bytes"] < 0.25 * dense["bytes"]
    loaded = load(tmp_path / "sparse.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(_bits(loaded.state_dict()[key]), _bits(value)), key
    _check_fold(model, _input("conv2", "quaternion"))


def test_sparse_indices_for_very_sparse_tensors(tmp_path):
    meta = {"name": "lenet_300_100", "variant": "real", "num_classes": 10}
    model = models.create(**meta).eval()
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.weight[3, 5] = 1.5
    path = tmp_path / "s.safetensors"
    save_compact(model, path, meta, sparse=True)
    assert read_metadata(path)["sparse"]["fc1.weight"]["encoding"] == "indices"
    assert torch.equal(load(path).fc1.weight, model.fc1.weight)


def test_compact_errors(tmp_path):
    meta = {"name": "conv2", "variant": "quaternion", "num_classes": 10}
    model = models.create(**meta).eval()
    path = tmp_path / "c.safetensors"
    save_compact(model, path, meta)
    # another model/variant than expected
    with pytest.raises(ValueError, match=r"holds conv2/quaternion .*expected conv4/real4"):
        load(path, expect={"name": "conv4", "variant": "real4"})
    # truncated file
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        load(cut)
    # metadata describing another model than the weights
    with pytest.raises(ValueError, match="describes conv4/quaternion"):
        save_compact(model, tmp_path / "x.safetensors", {**meta, "name": "conv4"})
    import safetensors.torch

    lying = tmp_path / "lying.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "model": '{"name": "conv4", "variant": "quaternion"}'}
    safetensors.torch.save_file(tensors, lying, metadata=header)
    with pytest.raises(ValueError, match=r"do not fit conv4/quaternion.*shape"):
        load(lying)
    # not a quatnn file, or not a safetensors file at all
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a quatnn compact checkpoint"):
        load(foreign)
    junk = tmp_path / "junk.pt"
    torch.save(model.state_dict(), junk)
    with pytest.raises(ValueError, match="expected a quatnn compact checkpoint"):
        load(junk)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="do not fit this Sequential"):
        load_weights(models.create("conv4", "quaternion"), path)


# --------------------------------------------------------------------------- run folders


def _fake_run(folder, model_name="lenet_300_100", variant="quaternion", dataset="digits"):
    """A run folder as `quatnn train` writes it (config.toml + checkpoint.pt), untrained."""
    from quatnn.train.config import TrainConfig, dumps_toml

    cfg = TrainConfig(model=model_name, variant=variant, dataset=dataset, encoding="auto")
    os.makedirs(folder, exist_ok=True)
    (folder / "config.toml").write_text(dumps_toml(cfg.to_dict()))
    return cfg, checkpoint


def test_export_run_folder(tmp_path):
    run = tmp_path / "run"
    cfg, checkpoint = _fake_run(run)
    torch.manual_seed(0)
    model = models.create("lenet_300_100", "quaternion", in_channels=1).eval()
    tags = {"model": cfg.model, "variant": cfg.variant, "dataset": cfg.dataset}
    checkpoint.save(run / "checkpoint.pt", tags, {"model": model.state_dict()})
    report = export_run(run, "torchscript", tmp_path / "m.ts")
    assert report["folded"] and report["max_abs_diff"] <= report["tolerance"]
    encoding = data.default_encoding("digits", "quaternion", flat=True)
    prepare = {**data.preprocessing("digits", encoding, (28, 28)), "shape": [784]}
    meta = read_export_metadata(tmp_path / "m.ts")
    assert meta["input"] == report["input"] == prepare and meta["checkpoint"] == "checkpoint.pt"
    rebuilt = models.create(**{**meta["model"], "input_size": (28, 28)})
    rebuilt.load_state_dict(model.state_dict())  # the metadata names the model that was saved
    report = export_run(run, "safetensors", tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    x = torch.randn(3, 784)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    compact = read_metadata(tmp_path / "m.safetensors")
    assert compact["model"]["input_size"] == [28, 28] and compact["extra"]["input"] == prepare
    assert read_export_metadata(tmp_path / "m.safetensors") == {**meta, "model": compact["model"]}
    # a checkpoint of another run, a missing one, a folder that is no run
    checkpoint.save(run / "best.pt", {**tags, "variant": "real"}, {"model": {}})
    with pytest.raises(ValueError, match="belongs to another run"):
        export_run(run, "onnx", tmp_path / "m.onnx", checkpoint="best.pt")
    with pytest.raises(ValueError, match="no checkpoint"):
        export_run(run, "onnx", tmp_path / "m.onnx", checkpoint="nothing.pt")
    with pytest.raises(ValueError, match="no config.toml"):
        export_run(tmp_path, "onnx", tmp_path / "m.onnx")


def test_cli_export(tmp_path, capsys):
    from quatnn import cli

    run = tmp_path / "run"
    cfg, checkpoint = _fake_run(run, "conv2", "quaternion", "digits-color")
    model = models.create("conv2", "quaternion").eval()
    tags = {"model": cfg.model, "variant": cfg.variant, "dataset": cfg.dataset}
    checkpoint.save(run / "checkpoint.pt", tags, {"model": model.state_dict()})
    assert cli.main(["export", str(run), "--format", "torchscript"]) == 0
    said = capsys.readouterr()
    assert (run / "model.ts").is_file() and "matches PyTorch" in said.out
    mean = data.preprocessing("digits-color", "rgb_gray", (32, 32))["mean"]
    assert "input (N, 4, 32, 32): rgb_gray((x - mean) / std) of the 32x32 image" in said.out
    assert f"mean {' '.join(f'{v:.4g}' for v in mean)}, std" in said.out
    assert "has not finished training" in said.err  # no summary.json: the user is told
    (run / "summary.json").write_text("{}")
    assert cli.main(["export", str(run), "--format", "torchscript"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["export", str(tmp_path), "--format", "pt2"]) == 2
    assert "no config.toml" in capsys.readouterr().err
    # --out an existing folder: the file goes into it; a missing folder: one line
    (tmp_path / "exports").mkdir()
    for fmt, name in (("torchscript", "model.ts"), ("safetensors", "model.safetensors")):
        assert (
            cli.main(["export", str(run), "--format", fmt, "--out", str(tmp_path / "exports")]) == 0
        )
        assert (tmp_path / "exports" / name).is_file()
    capsys.readouterr()
    for fmt, out in (("torchscript", "none/m.x"), ("safetensors", "none/")):
        assert cli.main(["export", str(run), "--format", fmt, "--out", f"{tmp_path}/{out}"]) == 2
        assert f"export: folder {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a folder; give the file to write"):
        save_compact(model, tmp_path, {"name": "conv2", "variant": "quaternion"})


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes must not leave the 0600 mode of a private temporary file behind."""
    model = models.create("lenet_300_100", "quaternion").eval()
    previous = os.umask(0o022)
    try:
        save_compact(model, tmp_path / "m.safetensors", {"name": "lenet_300_100"})
        export(fold(model), torch.randn(2, 784), tmp_path / "m.pt2", "pt2", reference=model)
    finally:
        os.umask(previous)
    for name in ("m.safetensors", "m.pt2"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "m.safetensors"]


def test_bench_infer_times_every_contender_with_quiet_onnx_sessions(monkeypatch):
    """``quatnn bench infer`` end to end on Lenet; no ONNX Runtime session may spin (idle
    spinning threads take the cores from the PyTorch contender timed next)."""
    ort = _onnxruntime()
    from quatnn.bench import infer

    sessions = []
    opened = ort.InferenceSession
    monkeypatch.setattr(
        ort, "InferenceSession", lambda *a, **k: sessions.append(opened(*a, **k)) or sessions[-1]
    )
    rows = infer.run("lenet_300_100", (1, 3), repeats=1)
    assert [r["model"] for r in rows] == [
        "real (PyTorch)",
        "real (ONNX Runtime)",
        "quaternion (quaternion layers)",
        "quaternion folded (PyTorch)",
        "quaternion folded (ONNX Runtime)",
    ]
    by_name = {r["model"]: r for r in rows}
    base = by_name["real (PyTorch)"]
    for r in rows:  # every ratio is to the real PyTorch row of its batch size
        for b in (1, 3):
            assert r[f"b{b}_x"] == pytest.approx(r[f"b{b}_ms"] / base[f"b{b}_ms"])
    assert by_name["quaternion (quaternion layers)"]["params"] == 67_710  # Lenet's quarter
    assert 0.24 < by_name["quaternion folded (PyTorch)"]["size_x"] < 0.27
    assert all(r[f"b{b}_ms"] > 0 for r in rows for b in (1, 3))
    assert len(sessions) == 4  # each export's check, then each timed session
    for session in sessions:
        config = session.get_session_options().get_session_config_entry
        assert config("session.intra_op.allow_spinning") == "0"


# ---------------------------------------------------------------- export/compact


def _lenet_with(weight_fn):
    from quatnn import models

    meta = {"name": "lenet_300_100", "variant": "real", "num_classes": 10}
    torch.manual_seed(0)
    model = models.create(**meta).eval()
    with torch.no_grad():
        weight_fn(model.fc1.weight)
    return model, meta


def test_sparse_bit_masks_are_most_significant_bit_first(tmp_path):
    """The file format: 1 bit per entry, most significant bit first (numpy.packbits)."""
    import numpy as np
    import safetensors.torch

    from quatnn.export import save_compact

    def keep_a_third(w):
        w.mul_((torch.rand(w.shape) < 0.3).to(w.dtype))

    model, meta = _lenet_with(keep_a_third)
    path = tmp_path / "m.safetensors"
    assert "fc1.weight" in save_compact(model, path, meta, sparse=True)["sparse"]
    raw = safetensors.torch.load_file(path)
    assert "fc1.weight::mask" in raw  # 30% non-zeros: a bit mask beats int32 indices
    want = np.packbits((model.fc1.weight.reshape(-1) != 0).numpy())
    assert np.array_equal(raw["fc1.weight::mask"].numpy(), want)


def test_a_tensor_of_exactly_the_threshold_zeros_is_stored_sparse(tmp_path):
    """'at least sparse_threshold zeros': half zeros at threshold 0.5 (and smaller sparse:
    n/8 mask bytes + n/2 values < n values)."""
    from quatnn.export import load, save_compact

    def every_other(w):
        w.view(-1)[::2] = 0.0

    model, meta = _lenet_with(every_other)
    w = model.fc1.weight
    assert int((w == 0).sum()) * 2 == w.numel()
    info = save_compact(model, tmp_path / "h.safetensors", meta, sparse=True, sparse_threshold=0.5)
    assert info["sparse"] == ["fc1.weight"]
    assert torch.equal(load(tmp_path / "h.safetensors").fc1.weight, w)


def test_a_sparse_index_past_the_end_is_a_damaged_file(tmp_path):
    import safetensors.torch

    from quatnn.export import load, read_metadata, save_compact

    def one_entry(w):
        w.zero_()
        w[3, 5] = 1.5

    model, meta = _lenet_with(one_entry)
    path = tmp_path / "s.safetensors"
    save_compact(model, path, meta, sparse=True)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in read_metadata(path).items()}
    tensors = safetensors.torch.load_file(path)
    n = model.fc1.weight.numel()
    assert tensors["fc1.weight::indices"].tolist() == [3 * 784 + 5]
    tensors["fc1.weight::indices"] = torch.tensor([n], dtype=torch.int32)  # one past the end
    damaged = tmp_path / "damaged.safetensors"
    safetensors.torch.save_file(tensors, damaged, metadata=header)
    with pytest.raises(ValueError, match="damaged"):
        load(damaged)


def test_compact_file_one_byte_short_is_called_truncated(tmp_path):
    from quatnn.export import load, save_compact

    model, meta = _lenet_with(lambda w: None)
    path = tmp_path / "m.safetensors"
    save_compact(model, path, meta)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load(cut)


# ---------------------------------------------------------------- export/modules


def _slow_norm_adaptive_max_pool_2d(x: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
    """Per window (torch's rule: [floor(i s / o), ceil((i + 1) s / o))), the quaternion of
    largest norm, the first in row-major order on ties."""
    n, c4, h, w = x.shape
    q = x.view(n, 4, c4 // 4, h, w)
    norms = q.square().sum(1)
    y = torch.empty(n, 4, c4 // 4, *out, dtype=x.dtype)
    for i in range(out[0]):
        r0, r1 = (i * h) // out[0], -(-(i + 1) * h // out[0])
        for j in range(out[1]):
            c0, c1 = (j * w) // out[1], -(-(j + 1) * w // out[1])
            for b in range(n):
                for ch in range(c4 // 4):
                    best, where = None, None
                    for r in range(r0, r1):
                        for s in range(c0, c1):
                            v = float(norms[b, ch, r, s])
                            if best is None or v > best:
                                best, where = v, (r, s)
                    y[b, :, ch, i, j] = q[b, :, ch, where[0], where[1]]
    return y.reshape(n, c4, *out)


@pytest.mark.parametrize(("size", "out"), [((5, 6), (3, 4)), ((7, 5), (4, 2)), ((5, 5), (3, 3))])
def test_norm_adaptive_max_pool_with_uneven_windows_and_ties(size, out):
    """Windows of different widths (5 -> 3: widths 2, 3, 2) and tied norms (small integer
    components): the exported pool keeps the first quaternion of largest norm."""
    from quatnn.export.modules import NormAdaptiveMaxPool

    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 2, (2, 8, *size), generator=g).double()
    torch.testing.assert_close(
        NormAdaptiveMaxPool(2, out)(x), _slow_norm_adaptive_max_pool_2d(x, out), rtol=0, atol=0
    )


# ---------------------------------------------------------------- export/run


def test_export_run_records_the_checkpoint_it_read(tmp_path):
    from quatnn.export import export_run, read_metadata

    cfg = TrainConfig(variant="real", epochs=1, max_steps=1, device="cpu")
    train.train(cfg, tmp_path / "run", progress="off")
    info = export_run(tmp_path / "run", "safetensors", tmp_path / "best.safetensors",
                      checkpoint="best.pt")  # fmt: skip
    assert info["checkpoint"] == "best.pt"
    assert read_metadata(tmp_path / "best.safetensors")["extra"]["checkpoint"] == "best.pt"


def test_exports_of_a_trained_run_name_its_classes(tmp_path, capsys):
    from quatnn import cli
    from quatnn.export import read_export_metadata

    cfg = TrainConfig(epochs=1, max_steps=1, device="cpu")
    train.train(cfg, tmp_path / "run", progress="off")
    capsys.readouterr()
    names = [str(c) for c in range(10)]
    for flags in ([], ["--best"]):  # checkpoint.pt and best.pt
        assert cli.main(["export", str(tmp_path / "run"), "--format", "torchscript", *flags]) == 0
        assert read_export_metadata(tmp_path / "run" / "model.ts")["classes"] == names
        assert "output (N, 10): the logits of classes 0, 1, 2" in capsys.readouterr().out
