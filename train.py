"""Train, prune and fine-tune a `paddle.vision` classifier in one `model.fit`, driven by Hydra.

`python train.py prune.flops=0.4` trains for `trainer.epochs_before` epochs, analyses
sensitivity and prunes at the end of epoch `prune.at_epoch`, fine-tunes for `trainer.epochs_after`
epochs, and prints a results table (also `results.json` in the run dir). The app itself is
`prune_callbacks.app.train(cfg)`; this file is only its command line (`--help`, `-m`, `--cfg job`).
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from prune_callbacks.app import ConfigError, train  # also registers the `config_schema` Hydra composes against

log = logging.getLogger("train")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as exc:  # a user's mistake: the message says the fix, no traceback
        log.error("config error: %s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
