"""Helpers shared by the app's tests: the repository root, composing the app's config on tiny
settings, and writing a small image folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

SMALL = [
    "data.train_samples=96",
    "data.val_samples=48",
    "model.scale=0.25",
    "trainer.epochs_before=1",
    "trainer.epochs_after=1",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=48",
    "trainer.verbose=0",
    "prune.ratios=[0.3,0.6]",
    "prune.sensitivity_samples=32",
    "trainer.measure_latency=false",  # the latency timing has its own test (test_sensitivity_fallback)
]


def make_cfg(overrides: Sequence[str] = (), tmp_path: Optional[Path] = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    if tmp_path is not None:
        cfg.output_dir = str(tmp_path)
    return cfg


CLASSES = ("cat", "dog", "fox")


def write_images(folder: Path, per_class: int, rng: np.random.Generator, start: int = 0) -> None:
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            # a class-dependent colour so that a tiny net can learn something
            pixels = np.clip(rng.normal(60 + 70 * label, 30, (20 + i % 5, 24, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(folder / name / f"img{i}.{ext}")
