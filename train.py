"""Train, prune and fine-tune a classifier in one `model.fit`, driven by Hydra.

`python train.py prune.flops=0.4` trains for `trainer.epochs_before` epochs, analyses
sensitivity and prunes at the end of epoch `prune.at_epoch`, fine-tunes for `trainer.epochs_after`
epochs, and prints a results table (also `results.json` in the run dir). The app itself is
`prune_callbacks.app.train(cfg)`; this file is only its command line (`--help`, `-m`, `--cfg job`).
Exit codes: 0 done, 2 config error (nothing trained), 3 the training diverged (see the table).
Under `python -m paddle.distributed.launch --nproc_per_node N train.py ...` only rank 0 makes the
run dir, writes and prints.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Tuple

import hydra
from omegaconf import DictConfig

# A user's network (`model._target_=mypkg.nets.MyNet`) may live in the directory the command runs in,
# as with `python -m`; the directory of this file is on sys.path already.
if os.getcwd() not in sys.path:
    sys.path.insert(1, os.getcwd())

from prune_callbacks.app import ConfigError, train  # noqa: E402  (also registers `config_schema`)

log = logging.getLogger("train")
EXIT_CONFIG_ERROR, EXIT_DIVERGED = 2, 3
# Overrides a rank > 0 must not take from the command line: they would make it write a run dir.
_RANK0_ONLY = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=", "hydra.job_logging")


def other_rank_overrides(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """For rank > 0 of a `paddle.distributed.launch` job: Hydra runs in a scratch dir (returned, to
    be removed), saves no `.hydra/` and logs to stdout only (the launcher's workerlog.N); `train`
    then takes rank 0's output dir. Rank 0 and single processes keep `argv` (scratch None)."""
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)
    if rank == 0 or int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1) <= 1:
        return argv, None
    scratch = tempfile.mkdtemp(prefix=f"train-rank{rank}-")
    kept = [a for a in argv if not a.startswith(_RANK0_ONLY)]
    return kept + [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=stdout"], scratch


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        results = train(cfg)
    except ConfigError as exc:  # a user's mistake: the message says the fix, no traceback
        log.error("config error: %s", exc)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    if results.get("diverged"):
        raise SystemExit(EXIT_DIVERGED)


if __name__ == "__main__":
    sys.argv[1:], scratch = other_rank_overrides(sys.argv[1:])
    try:
        main()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
