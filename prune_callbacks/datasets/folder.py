"""A data set over a folder of the user's own images, in the `train/<class>/`, `val/<class>/` layout.

Images are decoded with Paddle's image backend (`paddle.vision.image_load`, PIL) and resized,
cropped and flipped with `paddle.vision.transforms`. Every file is checked when the data set is
built, so a damaged image is skipped with one warning then and never stops an epoch half-way.
This module never imports the rest of the package.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import paddle

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "FolderLayout", "scan_folder", "image_folder_dataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "validation", "valid", "test")
MODES = ("train", "val")
LAYOUT_HELP = ("expected <path>/train/<class>/*.jpg and <path>/val/<class>/*.jpg (the layout of "
               "PaddleClas and paddle.vision.datasets.DatasetFolder), or <path>/<class>/*.jpg split by "
               "val_fraction")
# The training crop is taken from the image resized to image_size / CROP_SHARE (ImageNet's 224 of 256).
CROP_SHARE = 0.875

Sample = Tuple[str, int]


@dataclass(frozen=True)
class FolderLayout:
    """The images of a folder, with classes from its sub-folder names.

    Attributes:
        classes: class names, sorted; a label is an index into this list.
        train: (file, label) pairs of the training split.
        val: (file, label) pairs of the validation split.
        split_by_fraction: True when one folder of classes was split by `val_fraction`.
    """

    classes: Tuple[str, ...]
    train: Tuple[Sample, ...]
    val: Tuple[Sample, ...]
    split_by_fraction: bool


def _class_dirs(folder: str) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_of(folder: str) -> List[str]:
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def _samples(folder: str, classes: Sequence[str]) -> List[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    return [(f, index[c]) for c in _class_dirs(folder) if c in index for f in _images_of(os.path.join(folder, c))]


def _split(samples: List[Sample], num_classes: int, val_fraction: float, seed: int) -> Tuple[list, list]:
    """A per-class random split (at least one validation image for a class of two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(num_classes):
        mine = [s for s in samples if s[1] == label]
        order = rng.permutation(len(mine))
        n_val = int(round(val_fraction * len(mine)))
        n_val = min(max(n_val, 1 if len(mine) >= 2 and val_fraction > 0 else 0), len(mine) - 1) if mine else 0
        val += [mine[i] for i in sorted(order[:n_val])]
        train += [mine[i] for i in sorted(order[n_val:])]
    return train, val


def scan_folder(path: str, val_fraction: float = 0.2, seed: int = 0) -> FolderLayout:
    """Find the classes and image files of `path`; no image is opened.

    With `path/train/` and `path/val/` (or `validation`, `valid`, `test`), the classes are the
    sub-folders of `train/`, and `val/` may hold only those. Otherwise the sub-folders of `path`
    are the classes and each class's files are split by `val_fraction`, with `seed` fixing the split.

    Args:
        path: the data folder.
        val_fraction: share of each class held out for validation when there is no `val/`, in [0, 1).
        seed: random seed of that split.

    Returns:
        A FolderLayout.

    Raises:
        FileNotFoundError: `path` is not a folder.
        ValueError: no class folders, no images, a validation class unknown to training, or
            `val_fraction` out of range.

    Examples:
        >>> layout = scan_folder("/data/flowers")
        >>> layout.classes, len(layout.train), len(layout.val)
    """
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must be a number in [0, 1), e.g. 0.2")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist or is not a folder; {LAYOUT_HELP}")
    subdirs = _class_dirs(path)
    train_dir = next((d for d in TRAIN_DIRS if d in subdirs), None)
    val_dir = next((d for d in VAL_DIRS if d in subdirs), None)
    if train_dir is not None:
        root = os.path.join(path, train_dir)
        classes = tuple(_class_dirs(root))
        if val_dir is None:
            train, val = _split(_samples(root, classes), len(classes), val_fraction, seed)
        else:
            extra = sorted(set(_class_dirs(os.path.join(path, val_dir))) - set(classes))
            if extra:
                raise ValueError(f"{os.path.join(path, val_dir)!r} has class folders {extra} that "
                                 f"{root!r} does not have; every validation class must be a training class")
            train, val = _samples(root, classes), _samples(os.path.join(path, val_dir), classes)
    else:
        classes = tuple(subdirs)
        train, val = _split(_samples(path, classes), len(classes), val_fraction, seed)
    if not classes:
        raise ValueError(f"no class folders in {path!r}; {LAYOUT_HELP}")
    if not train:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {path!r}; "
                         f"{LAYOUT_HELP}")
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in train)]
    if empty:
        logger.warning("class folder(s) %s of %s hold no training image", empty, path)
    return FolderLayout(classes, tuple(train), tuple(val), train_dir is None or val_dir is None)


def _readable(file: str) -> Optional[str]:
    """None if `file` decodes as an image, else why not (checked once, when the data set is built)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            img.verify()  # structure and checksums
        with Image.open(file) as img:  # verify() misses a truncated JPEG: decode it, at 1/8 scale (fast)
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return None
    except Exception as exc:  # PIL raises many types for damaged files; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"


def _check_files(samples: Sequence[Sample], what: str) -> List[Sample]:
    good, bad = [], []
    for sample in samples:
        why = _readable(sample[0])
        (bad if why else good).append((sample, why))
    if bad:
        shown = "; ".join(f"{s[0]} ({why})" for s, why in bad[:10])
        logger.warning("skipped %d unreadable image file(s) of the %s split: %s%s", len(bad), what, shown,
                       " ..." if len(bad) > 10 else "")
    return [s for s, _ in good]


def _as_list(values: Sequence[float], channels: int, name: str) -> np.ndarray:
    given = [values] if isinstance(values, (int, float)) else list(values)  # also an OmegaConf ListConfig
    arr = np.asarray(given, dtype=np.float32)
    if arr.ndim != 1 or len(arr) not in (1, channels):
        raise ValueError(f"{name}={given!r} must hold 1 or {channels} numbers (one per channel)")
    if name == "std" and (arr <= 0).any():
        raise ValueError(f"std={given!r} must be positive")
    return np.broadcast_to(arr, (channels,)).reshape(channels, 1, 1).copy()


def _transform(mode: str, image_size: int, augment: bool) -> Callable:
    import paddle.vision.transforms as T

    resize = T.Resize(int(round(image_size / CROP_SHARE)))
    if mode == "train" and augment:
        return T.Compose([resize, T.RandomCrop(image_size), T.RandomHorizontalFlip()])
    return T.Compose([resize, T.CenterCrop(image_size)])


class ImageFolderDataset(paddle.io.Dataset):
    """(image float32 [C, H, W], label int64 [1]) over a list of image files.

    Args:
        samples: (file, label) pairs; unreadable files are dropped when the data set is built,
            with one warning naming them.
        classes: class names (label i is `classes[i]`).
        mode: "train" (random crop + horizontal flip when `augment`) or "val" (centre crop).
        image_size: side of the square output.
        channels: 3 (RGB; grayscale, palette and RGBA images are converted) or 1 (grayscale).
        mean, std: per-channel normalisation of pixel values scaled to [0, 1] (1 or `channels` values).
        augment: random crop and flip for training.

    Raises:
        ValueError: a bad mode, channel count, image size, mean or std; no readable image.
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], mode: str = "train",
                 image_size: int = 224, channels: int = 3, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), augment: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} must be 3 (RGB) or 1 (grayscale)")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size={image_size!r} must be an int >= 8")
        self.classes, self.mode, self.channels = list(classes), mode, channels
        self.mean, self.std = _as_list(mean, channels, "mean"), _as_list(std, channels, "std")
        self.transform = _transform(mode, image_size, augment)
        self.samples = _check_files(samples, mode)
        if not self.samples:
            raise ValueError(f"no readable image in the {mode} split ({len(samples)} file(s) listed)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        from paddle.vision import image_load

        file, label = self.samples[idx]
        image = image_load(file, backend="pil").convert("RGB" if self.channels == 3 else "L")
        image = np.asarray(self.transform(image), dtype=np.float32) / 255.0
        image = image.reshape(image.shape[0], image.shape[1], -1).transpose(2, 0, 1)
        return (image - self.mean) / self.std, np.array([label], dtype=np.int64)


def image_folder_dataset(path: str, mode: str, image_size: int = 224, channels: int = 3,
                         val_fraction: float = 0.2, seed: int = 0, augment: bool = True,
                         mean: Sequence[float] = (0.485, 0.456, 0.406),
                         std: Sequence[float] = (0.229, 0.224, 0.225)) -> ImageFolderDataset:
    """The train or val split of an image folder (`data=folder data.path=...` in the app).

    Args:
        path: folder with `train/<class>/` and `val/<class>/`, or only `<class>/` folders
            (then split by `val_fraction` with `seed`, the same split for both modes).
        mode: "train" or "val".
        image_size, channels, mean, std, augment: as `ImageFolderDataset`.
        val_fraction, seed: as `scan_folder`.

    Returns:
        An ImageFolderDataset; `.classes` are the class folder names.

    Raises:
        FileNotFoundError, ValueError: as `scan_folder` and `ImageFolderDataset`.

    Examples:
        >>> train = image_folder_dataset("/data/flowers", "train", image_size=64)
        >>> len(train.classes), train[0][0].shape
        (5, (3, 64, 64))
    """
    if path is None:
        raise ValueError(f"path is required: the image folder ({LAYOUT_HELP})")
    layout = scan_folder(path, val_fraction, seed)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    samples = layout.train if mode == "train" else layout.val
    if not samples:
        raise ValueError(f"the {mode} split of {path!r} is empty: add images to its val/<class>/ folders or "
                         f"raise val_fraction (now {val_fraction})")
    return ImageFolderDataset(samples, layout.classes, mode, image_size, channels, mean, std, augment)
