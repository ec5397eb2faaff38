"""The app's keys for accuracy recovery: prune.sparsity.*, prune.distill.standardize and the
data-driven criteria, through train(cfg) on the shrunk run of test_app."""
from __future__ import annotations

from pathlib import Path

import pytest

from prune_callbacks.app import ConfigError, train
from test_app import SMALL, make_cfg


def test_sparse_training_taylor_and_distillation_end_to_end(tmp_path: Path):
    results = train(make_cfg([*SMALL, "prune.strategy=uniform", "callbacks=none",
                              "prune.criterion=taylor", "prune.sparsity.kind=group",
                              "prune.sparsity.strength=1e-3", "prune.sparsity.growing=1e-3",
                              "prune.sparsity.method=proximal", "prune.distill.alpha=0.5"], tmp_path))
    assert abs(results["flops_reduction"] - 0.4) <= 0.005
    assert 0.0 <= results["top1_finetuned"] <= 1.0


@pytest.mark.parametrize("overrides, message", [
    (["prune.sparsity.kind=l1"], r"prune\.sparsity\.kind='l1': kind must be one of \['bn_scale', 'group'\]"),
    (["prune.sparsity.kind=group", "prune.sparsity.strength=-1"],
     r"prune\.sparsity\.strength=-1(\.0)?: strength must be a finite number >= 0"),
    (["+prune.sparsity.lambda=1"], r"prune\.sparsity\.lambda"),
    (["prune.sparsity.kind=group", "prune.sparsity.method=prox"],
     r"prune\.sparsity\.method='prox': method must be one of \['auto', 'gradient', 'proximal'\]"),
])
def test_recovery_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg([*SMALL, "prune.strategy=uniform", "callbacks=none", *overrides]))
