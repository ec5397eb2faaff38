"""Data sets for the app and the tests: real digits offline, CIFAR-10 from a local tarball, noise.

Every data set yields ``(image float32 [3, H, W], label int64 [1])``, the shapes that
``paddle.Model`` with ``CrossEntropyLoss`` and ``paddle.metric.Accuracy`` expect.
This module never imports the rest of the package and never waits on the network for long.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import paddle

logger = logging.getLogger(__name__)

__all__ = [
    "ArrayDataset",
    "CIFAR10_URL",
    "DIGITS_TEST_SIZE",
    "DIGITS_TRAIN_SIZE",
    "cifar10_dataset",
    "digits_dataset",
    "hard_digits_dataset",
    "subset",
    "synthetic_dataset",
]

MODES = ("train", "test")

# load_digits has 1,797 images; a stratified 80/20 split gives these sizes (for any seed).
DIGITS_TRAIN_SIZE = 1437
DIGITS_TEST_SIZE = 360

CIFAR10_URL = "https://dataset.bj.bcebos.com/cifar/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_HELP = (
    "Get cifar-10-python.tar.gz (the 'CIFAR-10 python version', 163 MB) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html or " + CIFAR10_URL + " and pass its path "
    "with data.path=/path/to/cifar-10-python.tar.gz (or the `path` argument)."
)


class ArrayDataset(paddle.io.Dataset):
    """A data set over in-memory arrays.

    Args:
        images: float32 array ``[N, C, H, W]``.
        labels: integer array ``[N]``; yielded as int64 ``[1]``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        super().__init__()
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1, 1)

    def __getitem__(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.images[idx], self.labels[idx]

    def __len__(self) -> int:
        return len(self.images)


class _LabelAsColumn(paddle.io.Dataset):
    """Reshape a wrapped data set's scalar labels to int64 ``[1]``."""

    def __init__(self, base: paddle.io.Dataset) -> None:
        super().__init__()
        self.base = base

    def __getitem__(self, idx: int) -> Tuple[Any, np.ndarray]:
        image, label = self.base[idx]
        return image, np.asarray(label, dtype=np.int64).reshape(1)

    def __len__(self) -> int:
        return len(self.base)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    return mode


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """Row-interpolation matrix ``[dst, src]`` of bilinear resizing (half-pixel centres)."""
    scale = src / dst
    coords = np.clip((np.arange(dst) + 0.5) * scale - 0.5, 0, src - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = coords - lo
    mat = np.zeros((dst, src), dtype=np.float64)
    mat[np.arange(dst), lo] += 1.0 - frac
    mat[np.arange(dst), hi] += frac
    return mat


def digits_dataset(mode: str, image_size: int = 32, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits as 3-channel images, with a fixed split.

    The 1,797 images are split 80/20, stratified by class, with ``seed`` fixing the
    shuffle: 1,437 train and 360 test images (``DIGITS_TRAIN_SIZE``/``DIGITS_TEST_SIZE``).
    Images are upscaled bilinearly to ``image_size``, grey replicated to 3 channels and
    scaled from [0, 16] to [-1, 1].

    Args:
        mode: "train" or "test".
        image_size: side of the square output image (>= 8).
        seed: random state of the split; keep it fixed to compare runs.

    Returns:
        A data set of ``(float32 [3, image_size, image_size], int64 [1])``.

    Raises:
        ValueError: on an unknown mode or an image size below 8.

    Examples:
        >>> ds = digits_dataset("train")
        >>> len(ds), ds[0][0].shape
        (1437, (3, 32, 32))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_mode(mode)
    if int(image_size) < 8:
        raise ValueError(f"image_size={image_size} must be >= 8 (the digits are 8x8)")
    digits = load_digits()
    images = digits.images.astype(np.float64)  # [N, 8, 8], values 0..16
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=seed
    )
    idx = idx_train if mode == "train" else idx_test
    mat = _bilinear_matrix(8, int(image_size))
    up = np.einsum("hi,nij,wj->nhw", mat, images[idx], mat)  # separable bilinear resize
    up = up / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    rgb = np.repeat(up[:, None, :, :], 3, axis=1).astype(np.float32)
    return ArrayDataset(rgb, labels[idx])


def hard_digits_dataset(mode: str, image_size: int = 32, seed: int = 0,
                        copies: int = 3) -> ArrayDataset:
    """The digits made hard enough to tell pruning methods apart (a benchmark task, offline).

    Each image of `digits_dataset` is warped by a random affine map (rotation up to 20 degrees,
    scale 0.85-1.1, shear, shifts up to 3 pixels), tinted with a random colour, overlaid with a
    faint fragment of another digit, partly covered by a noise patch, and given Gaussian noise.
    Training uses `copies` differently warped versions of each image; the test split one each.
    The draws are fixed by `seed`, so every run sees the same images.

    Args:
        mode: "train" or "test".
        image_size: side of the square image.
        seed: split and augmentation seed.
        copies: warped versions per training image (>= 1).

    Returns:
        A data set of ``(float32 [3, image_size, image_size], int64 [1])``: 1,437 x `copies`
        training or 360 test images.

    Examples:
        >>> train = hard_digits_dataset("train")       # 4,311 images
    """
    from scipy import ndimage

    base = digits_dataset(mode, image_size, seed)
    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    n_copies = copies if mode == "train" else 1
    rng = np.random.default_rng([seed, 0 if mode == "train" else 1])
    grey = (base.images[:, 0] + 1.0) / 2.0  # [N, S, S] in [0, 1]
    size = grey.shape[-1]
    out = np.empty((len(grey) * n_copies, 3, size, size), dtype=np.float32)
    centre = np.array([size / 2 - 0.5, size / 2 - 0.5])
    for k in range(n_copies):
        for i, img in enumerate(grey):
            angle = np.deg2rad(rng.uniform(-20, 20))
            scale = rng.uniform(0.85, 1.1)
            shear = rng.uniform(-0.15, 0.15)
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            mat = np.linalg.inv(rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale)
            shift = rng.uniform(-3, 3, size=2)
            offset = centre - mat @ (centre + shift)
            warped = ndimage.affine_transform(img, mat, offset=offset, order=1)
            other = grey[rng.integers(len(grey))]
            clutter = np.roll(other, rng.integers(-size // 2, size // 2, 2), axis=(0, 1))
            fg = np.clip(warped + 0.15 * clutter, 0, 1)
            tint = rng.uniform(0.3, 1.0, size=3)[:, None, None]
            rgb = fg[None] * tint + rng.uniform(0, 0.3, size=3)[:, None, None]
            h = rng.integers(3, 7)
            y0, x0 = rng.integers(0, size - h, 2)
            rgb[:, y0:y0 + h, x0:x0 + h] = rng.uniform(0, 1, (3, h, h))
            rgb += rng.normal(0, 0.1, rgb.shape)
            out[k * len(grey) + i] = (rgb * 2.0 - 1.0).astype(np.float32)
    labels = np.tile(base.labels.reshape(-1), n_copies)
    return ArrayDataset(out, labels)


def synthetic_dataset(
    num_samples: int = 64,
    image_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> ArrayDataset:
    """Gaussian-noise images with uniform random labels, for smoke tests.

    Args:
        num_samples: number of samples.
        image_shape: ``(C, H, W)``.
        num_classes: labels are drawn from ``range(num_classes)``.
        seed: numpy seed; the same seed gives the same data.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(
            f"num_samples={num_samples} and num_classes={num_classes} must both be >= 1"
        )
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((num_samples, *tuple(image_shape))).astype(np.float32)
    labels = rng.integers(0, num_classes, size=num_samples)
    return ArrayDataset(images, labels)


def subset(dataset: paddle.io.Dataset, num_samples: Optional[int], seed: int = 0) -> paddle.io.Dataset:
    """A fixed random subset of ``num_samples`` items (the whole set if None or larger).

    Args:
        dataset: any map-style data set.
        num_samples: how many items to keep, or None for all.
        seed: fixes which items are chosen.
    """
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1 or None")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(dataset), size=int(num_samples), replace=False))
    return paddle.io.Subset(dataset, indices.tolist())


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_cifar10_file() -> str:
    from paddle.dataset.common import DATA_HOME

    return os.path.join(DATA_HOME, "cifar", "cifar-10-python.tar.gz")


def _download_once(url: str, target: str, md5: str, timeout: float) -> None:
    """One download attempt with a timeout (Paddle's own retries 3 times with no timeout)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if _md5(tmp) != md5:
            raise RuntimeError(f"downloaded {url} but its md5 is not {md5}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cifar10_dataset(
    mode: str,
    path: Optional[str] = None,
    download: bool = True,
    timeout: float = 20.0,
) -> paddle.io.Dataset:
    """CIFAR-10 as in the PaddleSlim filter-pruning tutorial, with labels as int64 ``[1]``.

    Images go through ``T.Transpose()`` and ``T.Normalize([127.5], [127.5])``: float32
    ``[3, 32, 32]`` in [-1, 1].

    Args:
        mode: "train" (50,000 images) or "test" (10,000).
        path: a local ``cifar-10-python.tar.gz``. If None, Paddle's cache
            (``~/.cache/paddle/dataset/cifar/``) is used, downloading once into it if allowed.
        download: whether to try one download when ``path`` is None and the cache is empty.
        timeout: seconds before the download attempt gives up.

    Raises:
        ValueError: on an unknown mode.
        FileNotFoundError: ``path`` is given but missing, or no file and no download.
        RuntimeError: the download failed (e.g. no network).
    """
    import paddle.vision.transforms as T
    from paddle.vision.datasets import Cifar10

    _check_mode(mode)
    if path is not None:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-10 file not found: {path}. {CIFAR10_HELP}")
    else:
        path = _default_cifar10_file()
        if not os.path.isfile(path):
            if not download:
                raise FileNotFoundError(
                    f"CIFAR-10 is not in Paddle's cache ({path}) and download=False. {CIFAR10_HELP}"
                )
            logger.info("downloading %s to %s", CIFAR10_URL, path)
            try:
                _download_once(CIFAR10_URL, path, CIFAR10_MD5, timeout)
            except (OSError, urllib.error.URLError, RuntimeError) as exc:
                raise RuntimeError(
                    f"could not download CIFAR-10 ({type(exc).__name__}: {exc}). {CIFAR10_HELP}"
                ) from None
    transform = T.Compose([T.Transpose(), T.Normalize([127.5], [127.5])])
    # backend "cv2" keeps images as numpy (no OpenCV needed for these transforms).
    base = Cifar10(data_file=path, mode=mode, transform=transform, download=False, backend="cv2")
    return _LabelAsColumn(base)
