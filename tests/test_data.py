"""Tests of prune_callbacks.datasets.bundled: shapes, dtypes, split sizes, a miniature CIFAR-10 tarball."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import paddle
import pytest

from prune_callbacks.datasets import bundled as D


def test_digits_train_and_test_shapes_and_split() -> None:
    train = D.digits_dataset("train")
    test = D.digits_dataset("test")
    assert (len(train), len(test)) == (D.DIGITS_TRAIN_SIZE, D.DIGITS_TEST_SIZE) == (1437, 360)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == np.float32
    assert label.shape == (1,) and label.dtype == np.int64
    assert -1.0 <= train.images.min() and train.images.max() <= 1.0
    assert train.images.min() < -0.9 and train.images.max() > 0.9
    # grey replicated to three channels
    np.testing.assert_array_equal(image[0], image[1])
    np.testing.assert_array_equal(image[0], image[2])
    # stratified: every class in both halves, in the same proportion (within one sample)
    tr = np.bincount(train.labels[:, 0], minlength=10)
    te = np.bincount(test.labels[:, 0], minlength=10)
    assert np.all(te > 0) and np.all(np.abs(tr / 4 - te) <= 1.5)


def test_digits_split_is_fixed_and_disjoint() -> None:
    a, b = D.digits_dataset("test"), D.digits_dataset("test")
    np.testing.assert_array_equal(a.images, b.images)
    train = D.digits_dataset("train", image_size=8)
    test = D.digits_dataset("test", image_size=8)
    train_rows = {r.tobytes() for r in train.images[:, 0]}
    overlap = sum(r.tobytes() in train_rows for r in test.images[:, 0])
    assert overlap < 10  # load_digits has a handful of exact duplicate images, no more
    assert len(train) + len(test) == 1797


def test_digits_image_size_and_upscaling_keeps_the_picture() -> None:
    small = D.digits_dataset("test", image_size=8)
    big = D.digits_dataset("test", image_size=16)
    assert big[0][0].shape == (3, 16, 16)
    # at size 8 the upscaling is the identity: values are exactly pixel / 8 - 1
    from sklearn.datasets import load_digits

    values = set(np.round((load_digits().images.ravel() / 8.0 - 1.0), 6))
    assert set(np.round(np.unique(small.images), 6)) <= values
    # the resize matches Paddle's bilinear interpolation (half-pixel centres)
    ref = paddle.nn.functional.interpolate(
        paddle.to_tensor(small.images[:20]), size=[16, 16], mode="bilinear", align_corners=False
    ).numpy()
    np.testing.assert_allclose(big.images[:20], ref, atol=1e-5)


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"mode='val' is not one of \['train', 'test'\]"):
        D.digits_dataset("val")
    with pytest.raises(ValueError, match="image_size=4 must be >= 8"):
        D.digits_dataset("train", image_size=4)


def test_digits_batches_through_dataloader() -> None:
    loader = paddle.io.DataLoader(D.digits_dataset("test"), batch_size=32)
    images, labels = next(iter(loader))
    assert images.shape == [32, 3, 32, 32] and images.dtype == paddle.float32
    assert labels.shape == [32, 1] and labels.dtype == paddle.int64


def test_synthetic_dataset() -> None:
    ds = D.synthetic_dataset(num_samples=10, image_shape=(3, 16, 16), num_classes=4, seed=1)
    assert len(ds) == 10
    image, label = ds[3]
    assert image.shape == (3, 16, 16) and image.dtype == np.float32
    assert label.shape == (1,) and label.dtype == np.int64 and 0 <= label[0] < 4
    np.testing.assert_array_equal(ds.images, D.synthetic_dataset(10, (3, 16, 16), 4, 1).images)
    with pytest.raises(ValueError, match="num_samples=0"):
        D.synthetic_dataset(num_samples=0)


def test_subset() -> None:
    ds = D.synthetic_dataset(num_samples=20)
    assert D.subset(ds, None) is ds and D.subset(ds, 50) is ds
    sub = D.subset(ds, 5, seed=3)
    assert len(sub) == 5
    again = D.subset(ds, 5, seed=3)
    np.testing.assert_array_equal(sub[0][0], again[0][0])
    with pytest.raises(ValueError, match="num_samples=0"):
        D.subset(ds, 0)


def _pickle_member(tar: tarfile.TarFile, name: str, payload: dict) -> None:
    raw = pickle.dumps(payload)
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


@pytest.fixture()
def mini_cifar(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    """A cifar-10-python.tar.gz in the real layout: 5 train batches of 4 and a test batch of 6.

    The real pickles come from Python 2, so their keys are bytes; Paddle's loader reads
    `batch[b'data']` (uint8 [N, 3072], channel-major) and `batch[b'labels']`.
    """
    rng = np.random.default_rng(0)
    path = tmp_path / "cifar-10-python.tar.gz"
    labels: dict[str, list[int]] = {"train": [], "test": []}
    first = {}
    with tarfile.open(path, "w:gz") as tar:
        members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for member in members:
            n = 6 if member == "test_batch" else 4
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            lab = rng.integers(0, 10, size=n).tolist()
            mode = "test" if member == "test_batch" else "train"
            labels[mode] += lab
            first.setdefault(mode, data[0])
            _pickle_member(
                tar,
                f"cifar-10-batches-py/{member}",
                {b"batch_label": member.encode(), b"labels": lab, b"data": data},
            )
        _pickle_member(tar, "cifar-10-batches-py/batches.meta", {b"label_names": []})
    return str(path), {"labels_train": np.array(labels["train"]),
                       "labels_test": np.array(labels["test"]), **{f"first_{k}": v for k, v in first.items()}}


def test_cifar10_from_local_tarball(mini_cifar) -> None:
    path, truth = mini_cifar
    train = D.cifar10_dataset("train", path=path)
    test = D.cifar10_dataset("test", path=path)
    assert (len(train), len(test)) == (20, 6)
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == np.float32
    assert label.shape == (1,) and label.dtype == np.int64
    np.testing.assert_allclose(image, truth["first_test"].reshape(3, 32, 32) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal([int(test[i][1][0]) for i in range(6)], truth["labels_test"])
    np.testing.assert_array_equal(
        sorted(int(train[i][1][0]) for i in range(20)), sorted(truth["labels_train"])
    )
    # it feeds the loss and metric the app uses
    loader = paddle.io.DataLoader(test, batch_size=3)
    images, labels = next(iter(loader))
    assert images.shape == [3, 3, 32, 32] and labels.shape == [3, 1]
    logits = paddle.randn([3, 10])
    paddle.nn.CrossEntropyLoss()(logits, labels)
    acc = paddle.metric.Accuracy(topk=(1, 5))
    acc.update(acc.compute(logits, labels))


def test_cifar10_missing_path_says_where_to_get_it(tmp_path) -> None:
    missing = os.path.join(tmp_path, "nope.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"(?s)not found: .*nope\.tar\.gz.*cifar-10-python\.tar\.gz.*data\.path="):
        D.cifar10_dataset("train", path=missing)
    with pytest.raises(ValueError, match="mode='valid'"):
        D.cifar10_dataset("valid", path=missing)


def test_cifar10_failed_download_is_one_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(D, "_default_cifar10_file", lambda: str(tmp_path / "cifar" / "c.tar.gz"))

    def offline(*args, **kwargs):
        raise D.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"(?s)could not download CIFAR-10.*data\.path="):
        D.cifar10_dataset("test")
    assert not list((tmp_path / "cifar").iterdir())  # no half-written file left behind
    with pytest.raises(FileNotFoundError, match="download=False"):
        D.cifar10_dataset("test", download=False)
