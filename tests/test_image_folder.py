"""The app on the user's own images and own network: `data=folder`, `model._target_=<a user
class>`, `trainer.resume`.

The image folder is written by the tests (PNG and JPEG, a grayscale and an RGBA image, one broken
file); the user network is `TinyNet` below, imported by the app as `test_image_folder.TinyNet`.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np
import paddle
import pytest
from PIL import Image

from prune_callbacks.app import ConfigError, train
from prune_callbacks.datasets.folder import image_folder_dataset, scan_folder
from app_helpers import CLASSES, make_cfg, write_images



class TinyNet(paddle.nn.Layer):
    """A user's own network: its own arguments, any input channel count."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.features = paddle.nn.Sequential(
            paddle.nn.Conv2D(in_channels, width, 3, padding=1), paddle.nn.BatchNorm2D(width), paddle.nn.ReLU(),
            paddle.nn.Conv2D(width, 2 * width, 3, padding=1, stride=2), paddle.nn.BatchNorm2D(2 * width),
            paddle.nn.ReLU(), paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten())
        self.fc = paddle.nn.Linear(2 * width, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(self.features(x))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/<class>/ and val/<class>/, with a grayscale and an RGBA image and one broken file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "flowers"
    write_images(root / "train", 8, rng)
    write_images(root / "val", 3, rng, start=100)
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(root / "train" / "cat" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), mode="RGBA").save(root / "train" / "dog" / "rgba.png")
    (root / "train" / "fox" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    whole = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    (root / "val" / "dog" / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "train" / "fox" / "notes.txt").write_text("not an image: ignored")
    return root


FOLDER_RUN = [
    "data=folder", "data.image_size=16", "model._target_=test_image_folder.TinyNet", "+model.width=8",
    "trainer.epochs_before=1", "trainer.epochs_after=1", "trainer.batch_size=8", "trainer.eval_batch_size=16",
    "trainer.verbose=0", "prune.ratios=[0.3,0.6]", "prune.sensitivity_samples=8", "prune.flops=0.3",
    "trainer.measure_latency=false",  # timed in test_sensitivity_fallback
]


def folder_cfg(overrides: Sequence[str], out: Path) -> Any:
    """FOLDER_RUN + `overrides`, with no callbacks unless `overrides` choose some."""
    chosen = any(o.startswith("callbacks=") for o in overrides)
    return make_cfg([*FOLDER_RUN, *overrides, *([] if chosen else ["callbacks=none"])], out)


def _warnings_naming(records: Sequence[logging.LogRecord], text: str) -> List[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_scan_folder_layouts(image_folder: Path, tmp_path: Path) -> None:
    layout = scan_folder(str(image_folder))
    assert layout.classes == CLASSES and not layout.split_by_fraction
    assert len(layout.train) == 3 * 8 + 3 and len(layout.val) == 3 * 3 + 1  # + grey, rgba, broken, truncated
    # one folder of classes: split per class by val_fraction, the same split every time
    flat = tmp_path / "flat"
    write_images(flat, 10, np.random.default_rng(1))
    a, b = scan_folder(str(flat), val_fraction=0.3, seed=0), scan_folder(str(flat), val_fraction=0.3, seed=0)
    assert a == b and a.split_by_fraction and len(a.val) == 9 and len(a.train) == 21
    assert not set(a.train) & set(a.val)
    assert scan_folder(str(flat), val_fraction=0.3, seed=1).val != a.val


def test_folder_errors_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train/<class>/\*\.jpg"):
        scan_folder(str(tmp_path / "nope"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images"):
        scan_folder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"val_fraction=1\.5 must be a number in \[0, 1\)"):
        scan_folder(str(tmp_path / "empty"), val_fraction=1.5)
    root = tmp_path / "mismatch"
    write_images(root / "train", 1, np.random.default_rng(0))
    (root / "val" / "wolf").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folders \['wolf'\] that .* does not have"):
        scan_folder(str(root))


def test_images_are_decoded_converted_and_normalised(image_folder: Path, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING):
        train = image_folder_dataset(str(image_folder), "train", image_size=16, augment=False,
                                     mean=[0.5], std=[0.25])
    assert len(_warnings_naming(caplog.records, "broken.jpg")) == 1
    assert len(train) == 3 * 8 + 2 and train.classes == list(CLASSES)
    files = [os.path.basename(f) for f, _ in train.samples]
    assert "broken.jpg" not in files and "grey.png" in files and "rgba.png" in files
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 16, 16) and image.dtype == np.float32 and label.dtype == np.int64
    grey, _ = train[files.index("grey.png")]
    np.testing.assert_allclose(grey[0], grey[1])  # grey -> RGB: equal channels
    # (pixel / 255 - 0.5) / 0.25 spans [-2, 2]
    assert -2.0 - 1e-6 <= float(np.min(grey)) and float(np.max(grey)) <= 2.0 + 1e-6
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        one = image_folder_dataset(str(image_folder), "val", image_size=12, channels=1, mean=[0.5], std=[0.5])
    assert one[0][0].shape == (1, 12, 12) and len(one) == 9
    assert len(_warnings_naming(caplog.records, "truncated.jpg")) == 1  # opens, but would fail mid-epoch
    with pytest.raises(ValueError, match=r"mean=\[0\.1, 0\.2\] must hold 1 or 3 numbers"):
        image_folder_dataset(str(image_folder), "val", image_size=12, mean=[0.1, 0.2])


def test_augmentation_is_random_and_can_be_turned_off(image_folder: Path) -> None:
    on = image_folder_dataset(str(image_folder), "train", image_size=16, augment=True)
    off = image_folder_dataset(str(image_folder), "train", image_size=16, augment=False)
    np.random.seed(0)
    draws = [on[0][0] for _ in range(8)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    np.testing.assert_array_equal(off[0][0], off[0][0])


def test_app_trains_a_user_net_on_an_image_folder(image_folder: Path, tmp_path: Path, caplog: Any,
                                                  capsys: Any) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        results = train(folder_cfg([f"data.path={image_folder}", "+model.in_channels=${data.channels}",
                                  "callbacks=[none,resume]"], out))
    # the broken file: one warning naming it, when the data set was built, never again mid-epoch
    assert len(_warnings_naming(caplog.records, "broken.jpg")) == 1
    assert results["num_classes"] == 3 and results["train_samples"] == 26 and results["val_samples"] == 9
    assert len(_warnings_naming(caplog.records, "truncated.jpg")) == 1
    assert results["model"] == "TinyNet" and results["data"] == "folder"
    assert 0 < results["flops_after"] < results["flops_before"]
    for key in ("top1_before", "top1_pruned", "top1_finetuned"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["diverged"] is None
    printed = capsys.readouterr().out
    assert "Results: TinyNet on folder" in printed and "top-1" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_classes"] == 3 and saved["flops_after"] == results["flops_after"]
    # the classifier was built for the 3 class folders; MobileNet's scale/pretrained were not passed on
    state = paddle.load(str(out / "resume" / "last.pdparams"))
    assert list(state["fc.bias"].shape) == [3]


def test_grayscale_input_reaches_the_user_net(image_folder: Path, tmp_path: Path) -> None:
    results = train(folder_cfg([f"data.path={image_folder}", "data.channels=1", "data.mean=[0.5]",
                              "data.std=[0.5]", "+model.in_channels=${data.channels}", "prune.strategy=uniform",
                              "data.augment=false"], tmp_path))
    assert results["flops_after"] < results["flops_before"]


def test_one_folder_split_by_val_fraction(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    write_images(flat, 6, np.random.default_rng(2))
    results = train(folder_cfg([f"data.path={flat}", "data.val_fraction=0.5",
                              "prune.strategy=uniform"], tmp_path / "run"))
    assert results["train_samples"] == 9 and results["val_samples"] == 9 and results["num_classes"] == 3


@pytest.mark.parametrize("overrides, message", [
    (["data.path=/no/such/folder"],
     r"data\.train \(prune_callbacks\.datasets\.folder\.image_folder_dataset\) could not be built "
     r"\(data\.path='/no/such/folder'\): FileNotFoundError: image folder '/no/such/folder' does not exist"),
    (["data=folder"], r"data\.train .* could not be built: ValueError: path is required"),
    (["data.num_classes=5"], r"data\.num_classes=5, but the data set has 3 classes \(cat, dog, fox\); set "
                             r"data\.num_classes=null"),
    (["data.channels=1"], r"model\._target_='test_image_folder\.TinyNet' could not be traced at input shape "
                          r"\[1, 1, 16, 16\] \(data\.channels=1, data\.image_size=16\)"),
])
def test_folder_config_errors(image_folder: Path, tmp_path: Path, overrides: List[str], message: str) -> None:
    path = [] if overrides == ["data=folder"] else [f"data.path={image_folder}"]
    with pytest.raises(ConfigError, match=message):
        train(folder_cfg([*path, *overrides, "data.mean=[0.5]", "data.std=[0.5]"], tmp_path))


def test_a_user_net_that_cannot_be_imported_or_built(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\._target_='mypkg\.nets\.MyNet' cannot be imported as a callable "
                                          r"\(ModuleNotFoundError: No module named 'mypkg'\)"):
        train(folder_cfg([f"data.path={image_folder}", "model._target_=mypkg.nets.MyNet"], tmp_path))
    with pytest.raises(ConfigError, match=r"model\._target_='test_image_folder\.TinyNet' could not be built from "
                                          r"model\.\{num_classes, width, depth\} \(num_classes=3, width=8, depth=2\): "
                                          r".*unexpected keyword argument 'depth'"):
        train(folder_cfg([f"data.path={image_folder}", "+model.depth=2"], tmp_path))


def test_resume_after_pruning_continues_with_the_plan(image_folder: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    base = [f"data.path={image_folder}", "prune.strategy=uniform", "callbacks=[none,resume]"]
    done = train(folder_cfg([*base, "trainer.epochs_after=1"], first))
    state = json.loads((first / "resume" / "last.state.json").read_text())
    assert state["epochs_done"] == 2
    # the same job with one more fine-tuning epoch continues from the saved point: pruned, trained
    again = train(folder_cfg([*base, "trainer.epochs_after=2", f"trainer.resume={first}"], tmp_path / "second"))
    assert again["resumed_at_epoch"] == 2 and again["resumed_from"] == str(first / "resume" / "last")
    assert again["flops_after"] == done["flops_after"] and again["flops_before"] == done["flops_before"]
    assert again["top1_before"] == done["top1_before"]  # the first part's figures are carried over
    second = json.loads((tmp_path / "second" / "resume" / "last.state.json").read_text())
    assert second["epochs_done"] == 3
    with pytest.raises(ConfigError, match=r"trainer\.resume=.*all 2 epochs of this config trained; nothing to resume"):
        train(folder_cfg([*base, f"trainer.resume={first}"], tmp_path / "third"))
    with pytest.raises(ConfigError, match=r"holds 1 pruning plan\(s\) after 2 epoch\(s\), but with "
                                          r"prune\.at_epoch=2 .* prunes 0 time\(s\)"):
        train(folder_cfg([*base, "trainer.epochs_before=3", f"trainer.resume={first}"], tmp_path / "fourth"))


def test_resume_before_pruning_prunes_later(image_folder: Path, tmp_path: Path) -> None:
    """A paddle ModelCheckpoint of an unpruned epoch (`<save_dir>/<epoch>`) resumes too."""
    first = tmp_path / "first"
    base = [f"data.path={image_folder}", "prune.strategy=uniform", "trainer.epochs_before=2"]
    train(folder_cfg([*base, "callbacks=[none,model_checkpoint]"], first))
    assert json.loads((first / "checkpoints" / "0.prune.json").read_text())["plans"] == []
    again = train(folder_cfg([*base, f"trainer.resume={first / 'checkpoints' / '0'}"], tmp_path / "second"))
    assert again["resumed_at_epoch"] == 1 and again["at_epoch"] == 1
    assert again["top1_before"] is not None and again["flops_after"] < again["flops_before"]
    with pytest.raises(ConfigError, match=r"trainer\.resume=.*no checkpoint .*nope\.pdparams"):
        train(folder_cfg([*base, f"trainer.resume={tmp_path / 'nope'}"], tmp_path / "third"))
