"""PrunedModelCheckpoint: paddle's ModelCheckpoint, saving the pruning plans beside each checkpoint.

It saves through `io.save_pruned` (what `model.save` writes, plus `<prefix>.prune.json`), so
`load_pruned` can rebuild the pruned shapes. It never replaces `model.save` on the user's Model.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import paddle

from ..deploy.io import save_pruned

logger = logging.getLogger(__name__)


class PrunedModelCheckpoint(paddle.callbacks.ModelCheckpoint):
    """`paddle.callbacks.ModelCheckpoint` whose checkpoints reload into a fresh network.

    Same schedule and files as ModelCheckpoint (`<save_dir>/<epoch>` every `save_freq` epochs
    and `<save_dir>/final`, rank 0 only), each with its `.prune.json` of the plans recorded on
    the network. Being a ModelCheckpoint, it also stops `fit` from adding its own (which would
    write checkpoints without plans): pass it instead of `fit(save_dir=...)`.

    Args:
        save_freq: save every `save_freq` epochs; 0 saves only `<save_dir>/final`, when fit ends.
        save_dir: directory of the checkpoints; None saves nothing.

    Raises:
        ValueError: `save_freq` is not an int >= 0.
        TypeError: `save_dir` is not a str, os.PathLike or None.

    Examples:
        >>> model.fit(train_ds, epochs=6, callbacks=[
        ...     FilterPruneCallback(flops=0.4, at_epoch=2, strategy="uniform"),
        ...     PrunedModelCheckpoint(save_dir="checkpoints")])
        >>> net = load_pruned(build_net(), "checkpoints/final")
    """

    def __init__(self, save_freq: int = 1, save_dir: Optional[str] = None) -> None:
        if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 0:
            raise ValueError(f"save_freq must be an int >= 0 (epochs between checkpoints; 0 saves "
                             f"only the final one), got {save_freq!r}")
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise TypeError(f"save_dir must be a directory path or None, got {save_dir!r}")
        super().__init__(save_freq, os.fspath(save_dir) if save_dir is not None else None)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict] = None) -> None:
        if self._is_save() and self.save_freq and self.epoch % self.save_freq == 0:  # as ModelCheckpoint
            self._save(f"{self.save_dir}/{epoch}")

    def on_train_end(self, logs: Optional[Dict] = None) -> None:
        if self._is_save():
            self._save(f"{self.save_dir}/final")

    def _save(self, prefix: str) -> None:
        logger.info("saving checkpoint and pruning plans at %s", os.path.abspath(prefix))
        save_pruned(self.model, prefix)
