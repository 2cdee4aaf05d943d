"""Tests of quatnn.data: encodings, the bundled digits, on-disk loaders, missing-data errors."""

import os
import pickle
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from fixtures_data import write_cifar10, write_imagenet, write_mnist
from PIL import Image
from torchvision import transforms as T

from quatnn import data
from quatnn.data import batches, bundled

# ---------------------------------------------------------------- encodings


def test_encoding_names():
    assert set(data.ENCODINGS) == {
        "identity",
        "rgb_gray",
        "gray_real",
        "pure",
        "group4",
        "gray_repeat",
    }


def test_colour_encodings_component_order():
    x = torch.rand(3, 5, 6)
    r, g, b = x
    y = 0.299 * r + 0.587 * g + 0.114 * b
    torch.testing.assert_close(data.ENCODINGS["rgb_gray"](x), torch.stack([r, g, b, y]))
    torch.testing.assert_close(data.ENCODINGS["gray_real"](x), torch.stack([y, r, g, b]))
    out = data.ENCODINGS["pure"](x)
    assert torch.equal(out[0], torch.zeros(5, 6))
    assert torch.equal(out[1:], x)
    assert data.ENCODINGS["identity"](x) is x


def test_luma_uses_bt601_weights():
    primaries = torch.eye(3).view(3, 3, 1, 1)  # a batch: pure red, green, blue pixels
    luma = data.ENCODINGS["rgb_gray"](primaries)[:, 3].flatten()
    torch.testing.assert_close(luma, torch.tensor([0.299, 0.587, 0.114]))


@pytest.mark.parametrize("name", ["rgb_gray", "gray_real", "pure", "gray_repeat", "group4"])
def test_encodings_work_on_batches(name):
    channels = 1 if name in ("gray_repeat", "group4") else 3
    batch = torch.randn(4, channels, 8, 8)
    encode = data.ENCODINGS[name]
    torch.testing.assert_close(encode(batch), torch.stack([encode(im) for im in batch]))


def test_group4_index_mapping():
    image = torch.arange(784.0).reshape(1, 28, 28)
    out = data.ENCODINGS["group4"](image)
    assert out.shape == (784,)
    for q in (0, 1, 57, 195):
        for c in range(4):
            assert out[c * 196 + q] == 4 * q + c


def test_gray_repeat_copies_gray_into_all_components():
    image = torch.randn(1, 7, 9)
    out = data.ENCODINGS["gray_repeat"](image)
    assert out.shape == (4, 7, 9)
    assert all(torch.equal(out[c], image[0]) for c in range(4))


@pytest.mark.parametrize(
    ("name", "shape"),
    [("rgb_gray", (1, 4, 4)), ("pure", (4, 4)), ("group4", (3, 4, 4)), ("group4", (1, 3, 3))],
)
def test_encodings_reject_wrong_shapes(name, shape):
    with pytest.raises(ValueError, match=name):
        data.ENCODINGS[name](torch.zeros(shape))


# ---------------------------------------------------------------- registry


def test_names_and_static_info():
    assert data.names() == [
        "digits",
        "digits-color",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "imagenet32",
        "imagenet64",
        "imagefolder",
    ]
    assert data.info("digits") == data.DatasetInfo("digits", 10, 1, (28, 28), False, True)
    assert data.info("digits-color") == data.DatasetInfo(
        "digits-color", 10, 3, (32, 32), True, True
    )
    assert data.info("fashion-mnist") == data.DatasetInfo(
        "fashion-mnist", 10, 1, (28, 28), False, False
    )
    assert data.info("cifar100").num_classes == 100
    assert data.info("svhn").color
    assert data.info("imagenet64") == data.DatasetInfo("imagenet64", 1000, 3, (64, 64), True, False)


@pytest.mark.parametrize(
    ("dataset", "variant", "flat", "expected"),
    [
        ("cifar10", "real3", False, "identity"),
        ("cifar10", "real4", False, "rgb_gray"),
        ("svhn", "quaternion", True, "rgb_gray"),
        ("digits-color", "quaternion", False, "rgb_gray"),
        ("mnist", "real", True, "identity"),
        ("mnist", "quaternion", True, "group4"),
        ("digits", "quaternion", False, "gray_repeat"),
    ],
)
def test_default_encoding_rules(dataset, variant, flat, expected):
    assert data.default_encoding(dataset, variant, flat) == expected
    assert data.default_encoding(data.info(dataset), variant, flat) == expected


def test_default_encoding_errors():
    with pytest.raises(ValueError, match="grayscale.*real, quaternion"):
        data.default_encoding("mnist", "real3")
    with pytest.raises(ValueError, match="colour.*real3, real4, quaternion"):
        data.default_encoding("cifar10", "real")
    with pytest.raises(ValueError, match="valid datasets: .*fashion-mnist"):
        data.default_encoding("imagenet", "real")


def test_load_rejects_unknown_or_unfitting_arguments():
    with pytest.raises(ValueError, match="valid datasets"):
        data.load("nope", train=True)
    with pytest.raises(ValueError, match="valid encodings: .*gray_repeat"):
        data.load("digits", train=True, encoding="rgbg")
    with pytest.raises(ValueError, match="identity, group4, gray_repeat"):
        data.load("digits", train=True, encoding="rgb_gray")
    with pytest.raises(ValueError, match="image_size"):
        data.load("mnist", train=True, image_size=32)


# ---------------------------------------------------------------- bundled digits


def _stack(ds):
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test_x.flatten(1), centroids.flatten(1)).argmin(1)
    return (predicted == test_y).float().mean().item()


def test_digits_split_sizes_disjoint_deterministic_balanced():
    train = data.load("digits", train=True)
    test = data.load("digits", train=False)
    assert (len(train), len(test)) == (1438, 359)
    assert not set(train.indices) & set(test.indices)
    assert set(train.indices) | set(test.indices) == set(range(1797))
    again = data.load("digits", train=False)
    assert np.array_equal(again.indices, test.indices)
    assert torch.equal(again[7][0], test[7][0])
    for split in (train, test):
        counts = np.bincount(split.targets, minlength=10) / len(split)
        assert counts.min() > 0.08 and counts.max() < 0.12
        assert split.classes == [str(c) for c in range(10)]
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert type(label) is int


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_validation_split_holds_out_the_same_unaugmented_images_of_every_class(fraction):
    train = data.load("digits-color", train=True)  # augmented: random crops
    plain = data.load("digits-color", train=True, augment=False)
    torch.manual_seed(1)
    np.random.seed(1)
    rest, val = data.validation_split(train, plain, fraction)
    torch.manual_seed(2)  # the split ignores the global generators: the same for any seed
    np.random.seed(2)
    rest_again, val_again = data.validation_split(train, plain, fraction)
    assert val.indices == val_again.indices and rest.indices == rest_again.indices
    assert rest.dataset is train and val.dataset is plain
    assert not set(rest.indices) & set(val.indices)
    assert sorted(rest.indices + val.indices) == list(range(len(train)))
    labels = np.array(train.targets)
    held = np.bincount(labels[val.indices], minlength=10)
    assert held.tolist() == [round(fraction * n) for n in np.bincount(labels, minlength=10)]
    for i in (0, len(val) - 1):  # validation images are the test-time (uncropped) ones
        image, label = val[i]
        assert torch.equal(image, plain[val.indices[i]][0]) and label == labels[val.indices[i]]
    cropped = [not torch.equal(train[j][0], plain[j][0]) for j in val.indices[:20]]
    assert any(cropped)  # (so the comparison above could fail)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.003, 0.997])  # 0.003 * 146 < 0.5
def test_validation_split_refuses_an_empty_part(fraction):
    train = data.load("digits", train=True)
    with pytest.raises(ValueError, match="validation fraction"):
        data.validation_split(train, train, fraction)


def test_digits_normalized_and_learnable():
    train_x, train_y = _stack(data.load("digits", train=True, augment=False))
    test_x, test_y = _stack(data.load("digits", train=False))
    assert abs(train_x.mean().item()) < 1e-4
    assert abs(train_x.std().item() - 1) < 1e-4
    assert _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) > 0.85


def test_augmentation_defaults_to_train_split():
    # the train split is randomly cropped, the test split and augment=False are not
    torch.manual_seed(0)
    train = data.load("digits", train=True)
    assert len({train[0][0].sum().item() for _ in range(10)}) > 1
    test = data.load("digits", train=False)
    assert torch.equal(test[0][0], test[0][0])
    fixed = data.load("digits", train=True, augment=False)
    assert torch.equal(fixed[0][0], fixed[0][0])
    forced = data.load("digits", train=False, augment=True)
    assert len({forced[0][0].sum().item() for _ in range(10)}) > 1


def _unnormalize(x, name):
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in bundled.train_stats(name))
    return x * std + mean


def test_digits_color_paints_the_gray_digit_in_its_colours():
    gray = data.load("digits", train=True, augment=False)
    colour = data.load("digits-color", train=True, augment=False)
    assert np.array_equal(colour.indices, gray.indices) and colour.targets == gray.targets
    assert colour[0][0].shape == (3, 32, 32)
    ink = F.pad(_unnormalize(_stack(gray)[0], "digits"), (2, 2, 2, 2))
    fg, bg = (
        torch.from_numpy(np.stack(c)).view(-1, 3, 1, 1)
        for c in zip(*(bundled.colours(i) for i in colour.indices), strict=True)
    )
    image = _unnormalize(_stack(colour)[0], "digits-color")
    torch.testing.assert_close(image, ink * fg + (1 - ink) * bg, atol=1e-5, rtol=0)
    assert (fg - bg).norm(dim=1).min() >= bundled.MIN_CONTRAST


def test_digits_color_colour_does_not_predict_the_label():
    labels = data.load("digits", train=True).targets + data.load("digits", train=False).targets
    indices = np.concatenate([bundled.split_indices(True), bundled.split_indices(False)])
    pairs = np.array([np.concatenate(bundled.colours(i)) for i in indices])  # fg rgb, bg rgb
    labels = np.array(labels)
    overall = pairs.mean(0)
    for c in range(10):
        assert np.abs(pairs[labels == c].mean(0) - overall).max() < 0.08
        assert np.abs(pairs[labels == c].std(0) - pairs.std(0)).max() < 0.05
    n = len(bundled.split_indices(True))
    x, y = torch.from_numpy(pairs), torch.from_numpy(labels)
    assert _nearest_centroid_accuracy(x[:n], y[:n], x[n:], y[n:]) < 0.2


def test_digits_color_digit_is_recoverable_without_knowing_the_colours():
    def shape_only(ds):
        x, y = _stack(ds)
        distance = (x - x[:, :, :1, :1]).norm(dim=1)  # from the background (corner) colour
        return distance / distance.amax(dim=(1, 2), keepdim=True), y

    train_x, train_y = shape_only(data.load("digits-color", train=True, augment=False))
    test_x, test_y = shape_only(data.load("digits-color", train=False))
    assert _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) > 0.8


# ---------------------------------------------------------------- loaders on tiny real-format files


def _write_idx(path, array):
    magic = 0x0800 + array.ndim  # unsigned byte data
    with open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes())


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion-mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_like_reads_idx_files(tmp_path, name, folder, mean, std):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, n in (("train", 20), ("t10k", 6)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix == "train"] = images, labels
    for train in (True, False):
        ds = data.load(name, tmp_path, train=train, augment=False, download=False)
        images, labels = splits[train]
        assert len(ds) == len(labels)
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
            expected = (torch.from_numpy(images[i]).float() / 255 - mean) / std
            torch.testing.assert_close(x[0], expected)
            assert y == labels[i]
    flat = data.load(name, tmp_path, train=True, encoding="group4", download=False)
    assert flat[0][0].shape == (784,)


CIFAR10_STATS = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_STATS = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane


def _check_cifar_item(ds, i, row, label, mean, std):
    x, y = ds[i]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    raw = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    torch.testing.assert_close(raw * 255, torch.from_numpy(row).float().view(3, 32, 32))
    assert y == label


def test_cifar10_reads_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for b in range(1, 6):
        batch = {"data": _cifar_images(rng, 4), "labels": rng.integers(0, 10, 4).tolist()}
        batch["batch_label"] = f"training batch {b} of 5"
        _pickle(folder / f"data_batch_{b}", batch)
        batches.append(batch)
    test = {"data": _cifar_images(rng, 3), "labels": [9, 0, 4], "batch_label": "testing"}
    _pickle(folder / "test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})

    train = data.load("cifar10", tmp_path, train=True, augment=False, download=False)
    assert len(train) == 20 and train.classes == names
    for i in (0, 5, 19):  # first batch, second batch, last batch
        batch = batches[i // 4]
        row, label = batch["data"][i % 4], batch["labels"][i % 4]
        _check_cifar_item(train, i, row, label, *CIFAR10_STATS)
    test_ds = data.load("cifar10", tmp_path, train=False, download=False)
    assert test_ds.targets == [9, 0, 4]
    _check_cifar_item(test_ds, 2, test["data"][2], 4, *CIFAR10_STATS)
    quat = data.load("cifar10", tmp_path, train=False, encoding="pure", download=False)
    assert quat[0][0].shape == (4, 32, 32) and torch.equal(quat[0][0][0], torch.zeros(32, 32))


@pytest.mark.parametrize(
    "name, encoding",
    [("cifar10", "rgb_gray"), ("mnist", "gray_repeat"), ("digits-color", "pure"),
     ("digits", "group4")],
)  # fmt: skip
def test_preprocessing_turns_raw_pixels_into_the_test_items(tmp_path, name, encoding):
    """A deployed model is fed what preprocessing() says: on the raw pixels of the test
    split, its steps give the tensors load() gave the model in training."""
    write_cifar10(tmp_path, n_test=3)
    write_mnist(tmp_path, n_test=3)
    info = data.info(name, tmp_path)
    p = data.preprocessing(name, encoding, info.image_size)
    assert p["image_size"] == list(info.image_size) and p["encoding"] == encoding
    if name == "cifar10":
        raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())["data"]
        pixels = torch.from_numpy(raw).view(-1, 3, 32, 32)
    elif name == "mnist":
        pixels = torchvision.datasets.MNIST(tmp_path, train=False).data.unsqueeze(1)
    else:
        images = bundled.colour_images() if name == "digits-color" else bundled.gray_images()
        pixels = images[bundled.split_indices(False)] * 255  # the bundled sets are floats
    mean, std = (torch.tensor(p[k]).view(-1, 1, 1) for k in ("mean", "std"))
    x = (pixels[:3] / 255 - mean) / std
    test = data.load(name, tmp_path, train=False, encoding=encoding, download=False)
    for i in range(3):
        torch.testing.assert_close(data.ENCODINGS[encoding](x[i]), test[i][0])


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    splits = {}
    for split, n in (("train", 6), ("test", 2)):
        fine = rng.integers(20, 100, n).tolist()
        entry = {"data": _cifar_images(rng, n), "fine_labels": fine, "coarse_labels": [1] * n}
        _pickle(folder / split, entry)
        splits[split == "train"] = entry
    fine_names = [f"class{c}" for c in range(100)]
    _pickle(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": ["x"] * 20})
    for train in (True, False):
        ds = data.load("cifar100", tmp_path, train=train, augment=False, download=False)
        entry = splits[train]
        assert ds.targets == entry["fine_labels"] and ds.classes == fine_names
        _check_cifar_item(ds, 1, entry["data"][1], entry["fine_labels"][1], *CIFAR100_STATS)


def _image_tree(root, split, rng, size=(6, 8)):
    """Two classes of RGB PNGs of size (H, W); returns {path: (pixels, label)}."""
    written = {}
    for label, cls in enumerate(["cat", "dog"]):
        (root / split / cls).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            path = root / split / cls / f"{k}.png"
            Image.fromarray(pixels).save(path)
            written[str(path)] = pixels, label
    return written


@pytest.mark.parametrize("name", ["digits-color", "cifar10", "imagefolder"])
def test_an_unaugmented_view_shares_the_files_already_read(tmp_path, name):
    """load(..., images=train) reads no file again (an image tree is not walked again: the
    view holds the very arrays and sample list of ``train``) and gives what a fresh
    unaugmented load gives."""
    if name == "cifar10":
        write_cifar10(tmp_path)
    elif name == "imagefolder":
        rng = np.random.default_rng(0)
        _image_tree(tmp_path, "train", rng, size=(32, 32))
        _image_tree(tmp_path, "val", rng, size=(32, 32))
    train = data.load(name, tmp_path, train=True, download=False)  # augmented
    fresh = data.load(name, tmp_path, train=True, augment=False, download=False)
    view = data.load(name, tmp_path, train=True, augment=False, download=False, images=train)
    assert len(view) == len(train) and view.targets == train.targets
    stored = {"digits-color": "images", "cifar10": "data", "imagefolder": "samples"}[name]
    assert getattr(view, stored) is getattr(train, stored)  # the same arrays, not a copy
    torch.manual_seed(0)
    for i in (0, len(view) - 1):
        assert torch.equal(view[i][0], fresh[i][0])
    assert any(not torch.equal(train[i][0], fresh[i][0]) for i in range(len(train)))


def test_imagefolder_reads_pngs(tmp_path):
    rng = np.random.default_rng(3)
    written = _image_tree(tmp_path, "train", rng)
    written |= _image_tree(tmp_path, "val", rng)
    assert data.info("imagefolder", tmp_path) == data.DatasetInfo(
        "imagefolder", 2, 3, (6, 8), True, False
    )
    for train, split in ((True, "train"), (False, "val")):
        ds = data.load("imagefolder", tmp_path, train=train, augment=False)
        assert len(ds) == 4 and ds.classes == ["cat", "dog"]
        for i, (path, label) in enumerate(ds.samples):
            assert os.sep + split + os.sep in path
            pixels, expected_label = written[path]
            x, y = ds[i]
            assert x.shape == (3, 6, 8) and y == label == expected_label
            raw = x * torch.tensor(IMAGENET_STD).view(3, 1, 1)
            raw += torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            expected = torch.from_numpy(pixels).permute(2, 0, 1).float()
            torch.testing.assert_close(raw * 255, expected, atol=1e-3, rtol=0)
    resized = data.load("imagefolder", tmp_path, train=True, image_size=4, encoding="gray_real")
    assert resized[0][0].shape == (4, 4, 4)


def test_imagefolder_falls_back_to_test_folder(tmp_path):
    rng = np.random.default_rng(4)
    _image_tree(tmp_path, "train", rng)
    _image_tree(tmp_path, "test", rng, size=(5, 5))
    ds = data.load("imagefolder", tmp_path, train=False)
    assert os.sep + "test" + os.sep in ds.samples[0][0]
    assert ds[0][0].shape == (3, 6, 8)  # resized to the train images' size


def test_standard_augmentation_steps(tmp_path):
    def steps(name, **kwargs):
        return [type(t) for t in data.load(name, tmp_path, **kwargs).transform.transforms]

    _image_tree(tmp_path, "train", np.random.default_rng(5))
    assert T.RandomHorizontalFlip in steps("imagefolder", train=True)
    assert T.RandomCrop not in steps("imagefolder", train=True, augment=False)
    digits = steps("digits", train=True)
    assert T.RandomCrop in digits and T.RandomHorizontalFlip not in digits
    assert T.RandomHorizontalFlip not in steps("digits-color", train=True)
    crops = {
        name: next(
            (t.padding, t.padding_mode)
            for t in data.load(name, tmp_path, train=True).transform.transforms
            if isinstance(t, T.RandomCrop)
        )
        for name in ("digits", "digits-color")
    }
    assert crops == {"digits": (2, "constant"), "digits-color": (4, "edge")}


def test_digits_color_crops_pad_with_the_background_not_black(tmp_path):
    """Each augmented digits-color image is a 32x32 window of the plain one padded by
    repeating its edge (its background colour); zeros would frame it in black."""
    plain = data.load("digits-color", tmp_path, train=True, augment=False)
    augmented = data.load("digits-color", tmp_path, train=True, augment=True)
    black = (0 - torch.tensor(plain.transform.transforms[-2].mean)) / torch.tensor(
        plain.transform.transforms[-2].std
    )
    shifted = 0
    for i in range(12):
        x, a = plain[i][0], augmented[i][0]
        padded = F.pad(x.unsqueeze(0), (4, 4, 4, 4), mode="replicate")[0]
        windows = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.allclose(padded[:, dy:dy + 32, dx:dx + 32], a)]  # fmt: skip
        assert windows, i
        shifted += windows != [(4, 4)]
        assert not torch.isclose(a, black.view(3, 1, 1)).all(0).any(), i  # no black pixel
    assert shifted >= 8  # the crops do move


# ---------------------------------------------------------------- downsampled ImageNet


def _imagenet_rows(folder: Path, name: str) -> tuple[np.ndarray, list[int]]:
    """The image rows and labels of one batch file as written (pickle or .npz)."""
    if (folder / f"{name}.npz").is_file():
        with np.load(folder / f"{name}.npz") as z:
            return z["data"], z["labels"].tolist()
    batch = pickle.loads((folder / name).read_bytes())
    return batch["data"], batch["labels"]


@pytest.mark.parametrize(("size", "npz"), [(32, False), (64, True)])
def test_downsampled_imagenet_reads_the_batches_of_either_format(tmp_path, size, npz):
    name = f"imagenet{size}"
    write_imagenet(tmp_path, size, per_batch=3, n_val=5, npz=npz)
    folder = tmp_path / name
    train = batches.DownsampledImageNet(folder, size, train=True)
    val = batches.DownsampledImageNet(folder, size, train=False)
    assert (len(train), len(val)) == (30, 5)
    assert train.classes == val.classes == [str(k) for k in range(1, 1001)]
    for dataset, names, i in ((train, batches.IMAGENET_FILES[True], 0), (train, [], 17),
                              (train, [], 29), (val, ["val_data"], 4)):  # fmt: skip
        file = names[0] if names else f"train_data_batch_{i // 3 + 1}"
        rows, labels = _imagenet_rows(folder, file)
        image, label = dataset[i]
        expected = rows[i % 3 if dataset is train else i].reshape(3, size, size).transpose(1, 2, 0)
        assert np.array_equal(image, expected)  # red plane, then green, then blue
        assert label == labels[i % 3 if dataset is train else i] - 1
    with pytest.raises(IndexError):
        train[30]
    # through load(): normalized with ImageNet's statistics, then encoded
    x, y = data.load(name, tmp_path, train=False, encoding="rgb_gray", download=False)[4]
    rows, labels = _imagenet_rows(folder, "val_data")
    rgb = torch.from_numpy(rows[4].reshape(3, size, size)).float() / 255
    mean, std = (
        torch.tensor(v).view(3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    assert x.shape == (4, size, size) and y == labels[4] - 1
    torch.testing.assert_close(x[:3], (rgb - mean) / std)  # (rgb_gray: the colours first)


def test_downsampled_imagenet_converts_each_file_once_and_again_when_it_changes(tmp_path):
    write_imagenet(tmp_path, 32, per_batch=2, n_val=4)
    folder = tmp_path / "imagenet32"
    first = batches.DownsampledImageNet(folder, 32, train=False)
    converted = [folder / "val_data.images.npy", folder / "val_data.labels.npy"]
    stamps = [p.stat().st_mtime_ns for p in converted]
    assert np.load(converted[0], mmap_mode="r").shape == (4, 32, 32, 3)
    again = batches.DownsampledImageNet(folder, 32, train=False)
    assert [p.stat().st_mtime_ns for p in converted] == stamps  # read, not converted
    assert np.array_equal(again[3][0], first[3][0])
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    # a source replaced by a newer file is converted again
    rows = np.full((2, 3 * 32 * 32), 7, np.uint8)
    (folder / "val_data").write_bytes(pickle.dumps({"data": rows, "labels": [5, 6]}))
    os.utime(folder / "val_data", ns=(stamps[0] + 10**9, stamps[0] + 10**9))
    changed = batches.DownsampledImageNet(folder, 32, train=False)
    assert len(changed) == 2 and changed.targets.tolist() == [4, 5]
    assert (changed[1][0] == 7).all()
    # a process that unpickles the dataset (a spawned loader worker) maps the file itself
    shipped = pickle.dumps(changed)  # (after a read: the maps are open)
    assert rows[0].tobytes() not in shipped
    assert np.array_equal(pickle.loads(shipped)[1][0], changed[1][0])


def test_downsampled_imagenet_in_loader_workers_reads_what_one_process_reads(tmp_path):
    write_imagenet(tmp_path, 32, per_batch=4, n_val=2)
    train = data.load("imagenet32", tmp_path, train=True, encoding="rgb_gray", augment=False)
    batches_seen = list(torch.utils.data.DataLoader(train, batch_size=8, num_workers=2))
    x = torch.cat([b[0] for b in batches_seen])
    y = torch.cat([b[1] for b in batches_seen])
    assert len(y) == 40 and torch.equal(y, torch.as_tensor(train.targets))
    assert torch.equal(x[[0, 13, 39]], torch.stack([train[i][0] for i in (0, 13, 39)]))


def test_downsampled_imagenet_errors_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetMissingError) as excinfo:
        data.load("imagenet64", tmp_path, train=True)  # (download=True: still none)
    message = str(excinfo.value)
    assert str(tmp_path / "imagenet64") in message and "train_data_batch_10" in message
    assert "image-net.org" in message and "cannot download" in message
    assert list(tmp_path.iterdir()) == []
    write_imagenet(tmp_path / "other", 64, per_batch=1, n_val=2)
    (tmp_path / "imagenet32").mkdir()
    write_imagenet(tmp_path, 32, per_batch=1, n_val=2)
    val = tmp_path / "imagenet32" / "val_data"
    for damaged, why in (
        ((tmp_path / "other" / "imagenet64" / "val_data").read_bytes(), "another resolution"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}),
         "one label from 1 to 1000"),
        (b"junk", "val_data is damaged"),
    ):  # fmt: skip
        val.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"'imagenet32' in .* cannot be read: .*{why}"):
            data.load("imagenet32", tmp_path, train=False, download=False)
    val.unlink()
    (tmp_path / "imagenet32" / "val_data.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="val_data.npz is damaged"):
        data.load("imagenet32", tmp_path, train=False, download=False)
    # a folder it cannot write its .npy files into (as root, chmod would not stop the test)
    write_imagenet(tmp_path, 32, per_batch=1, n_val=2, npz=True)

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(
        ValueError, match="val_data.labels.npy .*Permission denied.*must be writable"
    ):
        data.load("imagenet32", tmp_path, train=False, download=False)
    assert not [p.name for p in (tmp_path / "imagenet32").iterdir() if ".npy" in p.name]


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("name", "folder", "a_file"),
    [
        ("mnist", os.path.join("MNIST", "raw"), "train-images-idx3-ubyte"),
        ("fashion-mnist", os.path.join("FashionMNIST", "raw"), "t10k-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py", "data_batch_5"),
        ("cifar100", "cifar-100-python", "meta"),
        ("svhn", "svhn", "train_32x32.mat"),
    ],
)
def test_missing_dataset_without_download(tmp_path, name, folder, a_file):
    with pytest.raises(data.DatasetMissingError) as excinfo:
        data.load(name, tmp_path, train=True, download=False)
    message = str(excinfo.value)
    assert repr(name) in message
    assert str(tmp_path / folder) in message
    assert a_file in message and "--no-download" in message
    assert "You can use download=True" not in message  # torchvision's hint, for its API
    assert list(tmp_path.iterdir()) == []  # no empty folders left behind


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn"])
def test_missing_dataset_when_offline(tmp_path, monkeypatch, name):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DatasetMissingError, match="network is unreachable") as excinfo:
        data.load(name, tmp_path, train=False)
    assert calls, "a download should have been attempted"
    assert repr(name) in str(excinfo.value) and str(tmp_path) in str(excinfo.value)
    assert "download=True" in str(excinfo.value)
    root = tmp_path / "not" / "there"
    with pytest.raises(data.DatasetMissingError):
        data.load(name, root, train=False)
    assert not (tmp_path / "not").exists()  # the folders the attempt made are gone


def test_missing_image_folder(tmp_path):
    with pytest.raises(data.DatasetMissingError, match="imagefolder") as excinfo:
        data.info("imagefolder", tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(excinfo.value)
    _image_tree(tmp_path, "train", np.random.default_rng(6))
    with pytest.raises(data.DatasetMissingError, match="val/<class>"):
        data.load("imagefolder", tmp_path, train=False)


def test_imagefolder_val_split_keeps_the_train_class_indices(tmp_path):
    """A val split lacking a class still labels the others as train does."""
    rng = np.random.default_rng(7)
    for split, classes in (("train", ["cat", "dog", "fox"]), ("val", ["cat", "fox"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / name / "0.png")
    train = data.load("imagefolder", tmp_path, train=True)
    val = data.load("imagefolder", tmp_path, train=False)
    assert val.classes == train.classes == ["cat", "dog", "fox"]
    assert [(os.path.basename(os.path.dirname(p)), y) for p, y in val.samples] == [
        ("cat", 0),
        ("fox", 2),
    ]
    (tmp_path / "val" / "owl").mkdir()
    Image.fromarray(pixels).save(tmp_path / "val" / "owl" / "0.png")
    with pytest.raises(ValueError, match="classes that the train split lacks: owl"):
        data.load("imagefolder", tmp_path, train=False)


def test_damaged_files_are_named_not_called_missing(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    good = batch.read_bytes()
    for damaged, why in (
        (good[:100], "data_batch_3 is damaged .*truncated"),
        (b"", "data_batch_3 is damaged .*EOFError"),
        (pickle.dumps({"data": np.zeros((3, 1000), np.uint8), "labels": [0, 1, 2]}),
         "data_batch_3 holds no CIFAR batch"),
        (pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0]}),
         "data_batch_3 holds 3 images, 1 labels"),
    ):  # fmt: skip
        batch.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"'cifar10' in .* cannot be read: .*{why}"):
            data.load("cifar10", tmp_path, train=True, download=False)
    batch.write_bytes(good)
    assert len(data.load("cifar10", tmp_path, train=False, download=False)) == 20
    write_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(ValueError, match="'mnist' in .* cannot be read: .*invalid"):
        data.load("mnist", tmp_path, train=True, download=False)
    other = write_mnist(tmp_path / "other", n_test=5) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="20 images but 5 labels"):
        data.load("mnist", tmp_path, train=False, download=False)


def test_svhn_reads_mat_files(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    labels = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)  # SVHN writes 0 as 10
    (tmp_path / "svhn").mkdir()
    scipy_io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": images, "y": labels})
    # torchvision checks the published file's MD5, which a generated file cannot match
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    test = data.load("svhn", tmp_path, train=False, download=False)
    assert test.targets == [0, 1, 9, 0, 3] and test.classes == [str(d) for d in range(10)]
    p = data.preprocessing("svhn", "identity", (32, 32))
    mean, std = (torch.tensor(p[k]).view(3, 1, 1) for k in ("mean", "std"))
    pixels = torch.from_numpy(images[..., 2]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(test[2][0], (pixels - mean) / std)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ValueError, match=r"reading SVHN needs scipy: pip install 'quatnn\[svhn\]'"):
        data.load("svhn", tmp_path, train=False, download=False)


# ---------------------------------------------------------------- data


def test_imagefolder_prefers_val_over_test(tmp_path):
    import numpy as np
    from PIL import Image

    from quatnn import data

    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 3), ("test", 5)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{k}.png")
    ds = data.load("imagefolder", tmp_path, train=False)
    assert len(ds) == 6 and all(os.sep + "val" + os.sep in p for p, _ in ds.samples)


def test_standard_augmentation_flips_only_the_datasets_the_docs_name():
    """load(): svhn, digits-color: RandomCrop(32, padding=4) only (digits are not mirror
    symmetric); cifar10, cifar100, imagefolder: plus RandomHorizontalFlip."""
    from torchvision import transforms as T

    from quatnn.data import datasets

    for name, flips in (("svhn", False), ("digits-color", False), ("digits", False),
                        ("mnist", False), ("cifar10", True), ("cifar100", True)):  # fmt: skip
        size = (28, 28) if name in ("digits", "mnist") else (32, 32)
        steps = datasets._transform(name, True, None, lambda x: x, size).transforms
        assert any(isinstance(t, T.RandomHorizontalFlip) for t in steps) == flips, name
        assert any(isinstance(t, T.RandomCrop) for t in steps), name
