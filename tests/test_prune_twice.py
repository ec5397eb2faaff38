"""Pruning more than once: two FilterPruneCallbacks in one fit, on the same or
on disjoint groups, and a FilterPruner whose network changed under it. Each plan starts from the
network as it is at that moment; each callback's target is a share of those FLOPs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from prune_callbacks import (FilterPruneCallback, FilterPruner, count_flops, history_of,
                             load_pruned, recorded_plans, save_pruned)

SHAPE = [1, 3, 12, 12]


def _fit(model: paddle.Model, ds: Any, callbacks: list, epochs: int = 3) -> None:
    model.fit(ds, ds, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks)


def _check_chain(model: paddle.Model, first: Any, second: Any, net: nn.Layer,
                 flops0: int) -> None:
    a, b = first.plans[0], second.plans[0]
    assert a.flops_before == flops0
    assert b.flops_before == a.flops_after  # the network as the first callback left it
    assert b.flops_after == count_flops(net, SHAPE)
    # each target is a share of the FLOPs at its callback's step: met, or passed by less than
    # the coarse channel steps of this tiny network
    assert 0.2 <= a.pruned_flops <= 0.26 and 0.2 <= b.pruned_flops <= 0.26
    remaining = b.flops_after / flops0
    assert remaining == pytest.approx((1 - a.pruned_flops) * (1 - b.pruned_flops))
    assert remaining <= 0.8 * 0.8 + 1e-9
    assert recorded_plans(net) == [a, b]
    assert [e.plan for e in history_of(model).events] == [a, b]


def test_two_callbacks_on_the_same_groups(tiny: Any, make_model: Any, tmp_path: Path) -> None:
    net, ds = tiny
    model = make_model(net, size=12)
    flops0 = count_flops(net, SHAPE)
    first = FilterPruneCallback(flops=0.2, at_epoch=0)
    second = FilterPruneCallback(flops=0.2, at_epoch=1)
    _fit(model, ds, [first, second])  # once an IndexError after the last epoch
    _check_chain(model, first, second, net, flops0)
    common = set(first.plans[0].ratios) & set(second.plans[0].ratios)
    assert common  # the second step cut groups the first had cut already
    for g in second.plans[0].groups:
        if g.name in first.plans[0].ratios:
            before = next(p for p in first.plans[0].groups if p.name == g.name)
            assert g.channels == len(before.kept)  # planned on the current channel counts
    # the model trains and saves and reloads with both plans
    save_pruned(model, str(tmp_path / "ck"))
    fresh = load_pruned(type(net)(), str(tmp_path / "ck"))
    x = paddle.randn([2, 3, 12, 12])
    fresh.eval()
    net.eval()
    np.testing.assert_allclose(fresh(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6)


def test_two_callbacks_on_disjoint_groups(tiny: Any, make_model: Any) -> None:
    net, ds = tiny
    names = [g.name for g in FilterPruner(net, SHAPE).prunable_groups]
    assert len(names) >= 2
    half = len(names) // 2
    model = make_model(net, size=12)
    flops0 = count_flops(net, SHAPE)
    first = FilterPruneCallback(flops=0.2, at_epoch=0, skip=names[half:])
    second = FilterPruneCallback(flops=0.2, at_epoch=1, skip=names[:half])
    measured = []

    class Measure(paddle.callbacks.Callback):  # the true FLOPs when the second callback plans
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch == 0:
                measured.append(count_flops(net, SHAPE))

    _fit(model, ds, [first, Measure(), second])
    assert set(first.plans[0].ratios) <= set(names[:half])
    assert set(second.plans[0].ratios) <= set(names[half:])
    assert second.plans[0].flops_before == measured[0]  # not the unpruned 663,712-style figure
    _check_chain(model, first, second, net, flops0)


def test_a_pruner_notices_its_network_changed(tiny: Any) -> None:
    net, _ = tiny
    stale = FilterPruner(net, SHAPE)
    assert stale.groups[stale.group_index("c1.0")].channels == 12
    FilterPruner(net, SHAPE).prune({"c1.0": 0.5})  # another pruner changes the network
    assert stale.groups[stale.group_index("c1.0")].channels == 6
    assert stale.flops() == count_flops(net, SHAPE)
    plan = stale.prune({"c1.0": 0.5})
    assert plan.groups[0].channels == 6 and len(plan.groups[0].kept) == 3
    assert plan.flops_after == count_flops(net, SHAPE)
    # a replaced layer is noticed too (same shapes elsewhere, a new sublayer)
    net.fc = nn.Linear(16, 7)
    assert stale.flops() == count_flops(net, SHAPE)
    kept = stale.plan(0.2, strategy="uniform")
    assert all(len(k) <= stale.groups[g].channels for g, k in kept.items())


def test_curves_of_the_unpruned_network_are_refused_after_pruning(tiny: Any) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, SHAPE)
    sens = pruner.sensitivity(ds, ratios=(0.25, 0.5))
    pruner.prune_to_flops(0.2, sens)
    with pytest.raises(ValueError, match="different network: group .* had 12 channels there, "
                                         "this network has"):
        pruner.prune_to_flops(0.2, sens)
