"""Sensitivity analysis and FLOPs-target planning: exact losses, resume, file errors, targets."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.vision import models

from prune_callbacks import EvalData, FilterPruner, SensitivityResult, count_flops
from prune_callbacks.sensitivity import top1_metric


RATIOS = (0.25, 0.5, 0.75)


def naive_losses(net: nn.Layer, ds: Any, ratios: Any) -> Dict[str, Dict[float, float]]:
    """The reference: physically prune a copy, evaluate everything, for every group and ratio."""
    def top1(n: nn.Layer) -> float:
        n.eval()
        with paddle.no_grad():
            logits = n(paddle.to_tensor(ds.x)).numpy()
        c, t = top1_metric(logits, ds.y)
        return c / t

    base = top1(net)
    out: Dict[str, Dict[float, float]] = {}
    for g in FilterPruner(net, [1, *ds.x.shape[1:]]).prunable_groups:
        for r in ratios:
            twin = copy.deepcopy(net)
            FilterPruner(twin, [1, *ds.x.shape[1:]]).prune({g.name: r})
            out.setdefault(g.name, {})[r] = (base - top1(twin)) / base
    return out


def state(net: nn.Layer) -> Dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def test_losses_equal_naive_prune_and_evaluate(tiny: Any) -> None:
    net, ds = tiny
    ref = naive_losses(net, ds, RATIOS)
    for cache in (True, False):
        res = FilterPruner(net, [1, 3, 12, 12]).sensitivity(ds, ratios=RATIOS, cache=cache,
                                                           batch_size=16)
        assert set(res.losses) == set(ref)
        for g in ref:
            for r in RATIOS:
                assert res.losses[g][r] == pytest.approx(ref[g][r], abs=1e-6), (g, r, cache)
    # not a trivial reference: some groups do lose accuracy
    assert max(l for pts in ref.values() for l in pts.values()) > 0.05


@pytest.mark.parametrize("name,kwargs,hw", [
    ("mobilenet_v1", {"scale": 0.25}, 32),
    ("mobilenet_v3_small", {"scale": 0.5}, 32),
    ("resnet18", {}, 32),
])
def test_replay_cache_is_bit_identical_on_zoo(name: str, kwargs: Dict, hw: int,
                                             make_labelled: Any) -> None:
    """Replaying prefixes and masked producers gives exactly the masked network's numbers."""
    paddle.seed(0)
    net = getattr(models, name)(num_classes=10, **kwargs)
    ds = make_labelled(net, 24, [3, hw, hw], noise=0.0)
    pruner = FilterPruner(net, [1, 3, hw, hw])
    fast = pruner.sensitivity(EvalData(ds, batch_size=8, workers=2), ratios=(0.5, 0.9))
    slow = pruner.sensitivity(EvalData(ds, batch_size=8, workers=1), ratios=(0.5, 0.9),
                              cache=False)
    assert fast.losses == slow.losses
    assert any(l != 0 for pts in fast.losses.values() for l in pts.values())


def test_weights_buffers_and_mode_unchanged(tiny: Any) -> None:
    net, ds = tiny
    net.train()
    before = state(net)
    FilterPruner(net, [1, 3, 12, 12]).sensitivity(ds, ratios=RATIOS)
    after = state(net)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert net.training


def test_eval_fn_and_file_format(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])
    calls = []

    def eval_fn() -> float:
        calls.append(1)
        with paddle.no_grad():
            logits = net(paddle.to_tensor(ds.x)).numpy()
        c, t = top1_metric(logits, ds.y)
        return c / t

    path = tmp_path / "sen.json"
    res = pruner.sensitivity(eval_fn, ratios=RATIOS, path=str(path))
    groups = pruner.prunable_groups
    assert len(calls) == 1 + len(groups) * len(RATIOS)  # the baseline is evaluated once
    data = json.loads(path.read_text())
    assert data["format"] == "prune_callbacks.sensitivity/2"
    assert data["network"]["groups"]["c1.0"] == [12, True] and len(data["fingerprint"]) == 16
    assert data["criterion"] == "l1" and data["ratios"] == list(RATIOS)
    assert data["groups"] == {g.name: g.channels for g in groups}
    assert data["baseline"] == res.baseline
    loaded = SensitivityResult.load(str(path))
    assert loaded.losses == res.losses and loaded.complete
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp file behind


def test_resume_after_kill_evaluates_only_missing_points(tiny: Any, tmp_path: Path) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])
    full = pruner.sensitivity(ds, ratios=RATIOS)
    path = str(tmp_path / "sen.json")
    total = len(pruner.prunable_groups) * len(RATIOS)

    calls = []

    def dying(limit: int):
        def fn() -> float:
            if len(calls) == limit:
                raise KeyboardInterrupt  # a kill in the middle of a point
            calls.append(1)
            with paddle.no_grad():
                logits = net(paddle.to_tensor(ds.x)).numpy()
            return top1_metric(logits, ds.y)[0] / len(ds)
        return fn

    with pytest.raises(KeyboardInterrupt):
        pruner.sensitivity(dying(6), ratios=RATIOS, path=path)
    saved = json.loads(Path(path).read_text())
    done = sum(len(p) for p in saved["losses"].values())
    assert done == 5  # baseline + 5 points finished; the 6th call was killed
    calls.clear()
    res = pruner.sensitivity(dying(10**6), ratios=RATIOS, path=path)
    # the baseline once (checked against the file's), no finished point evaluated again
    assert len(calls) == 1 + total - done
    for g in full.losses:
        for r in RATIOS:
            assert res.losses[g][r] == pytest.approx(full.losses[g][r], abs=1e-9)
    calls.clear()
    calls.clear()
    pruner.sensitivity(dying(1), ratios=RATIOS, path=path)  # complete: only the baseline check
    assert len(calls) == 1


def test_file_errors(tiny: Any, tmp_path: Path, tiny_net: Any, array_ds: Any) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])
    path = tmp_path / "sen.json"
    pruner.sensitivity(ds, ratios=RATIOS, path=str(path))
    good = path.read_text()

    with pytest.raises(ValueError, match="criterion 'l1', not 'l2'"):
        FilterPruner(net, [1, 3, 12, 12], criterion="l2").sensitivity(ds, ratios=RATIOS,
                                                                      path=str(path))
    with pytest.raises(ValueError, match="ratios .* start afresh"):
        pruner.sensitivity(ds, ratios=(0.5,), path=str(path))
    with pytest.raises(ValueError, match="other data"):
        pruner.sensitivity(array_ds(ds.x[:20], ds.y[:20]), ratios=RATIOS, path=str(path))

    other = tiny_net()
    FilterPruner(other, [1, 3, 12, 12]).prune({"c1.0": 0.5})
    with pytest.raises(ValueError, match="different network: group 'c1.0' had 12 channels"):
        FilterPruner(other, [1, 3, 12, 12]).sensitivity(ds, ratios=RATIOS, path=str(path))

    path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt.*left untouched"):
        pruner.sensitivity(ds, ratios=RATIOS, path=str(path))
    assert path.read_text() == good[: len(good) // 2]  # never overwritten silently

    path.write_text(json.dumps({"format": "paddleslim", "x": 1}))
    with pytest.raises(ValueError, match="not a sensitivity file of this version"):
        pruner.sensitivity(ds, ratios=RATIOS, path=str(path))


def test_bad_arguments(tiny: Any) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])
    with pytest.raises(ValueError, match=r"ratios must be numbers in \(0, 1\)"):
        pruner.sensitivity(ds, ratios=(0.5, 1.0))
    with pytest.raises(TypeError, match="callable returning a float, or a dataset"):
        pruner.sensitivity(42)
    with pytest.raises(ValueError, match="no group named|unknown group|did you mean"):
        pruner.sensitivity(ds, ratios=RATIOS, skip=["c1.O"])
    with pytest.raises(ValueError, match="batch_size"):
        EvalData(ds, batch_size=0)


def test_max_loss_stops_a_curve_without_inventing_points(tiny: Any) -> None:
    net, ds = tiny
    ratios = (0.2, 0.4, 0.6, 0.8)
    pruner = FilterPruner(net, [1, 3, 12, 12])
    full = pruner.sensitivity(ds, ratios=ratios)
    cut = pruner.sensitivity(ds, ratios=ratios, max_loss=0.05)
    stopped = 0
    for g, pts in full.losses.items():
        seen_over = False
        for r in ratios:
            if seen_over:
                assert cut.losses[g][r] is None
                stopped += 1
            else:
                assert cut.losses[g][r] == full.losses[g][r]
                seen_over = full.losses[g][r] > 0.05
    assert stopped > 0
    assert all(None not in c.values() for c in cut.curves().values())


def test_progress_log(tiny: Any, caplog: Any) -> None:
    net, ds = tiny
    with caplog.at_level(logging.INFO, logger="prune_callbacks.sensitivity"):
        FilterPruner(net, [1, 3, 12, 12]).sensitivity(ds, ratios=RATIOS)
    lines = [r.getMessage() for r in caplog.records if "points done" in r.getMessage()]
    n = len(FilterPruner(net, [1, 3, 12, 12]).prunable_groups)
    assert len(lines) == n
    assert "ETA" in lines[0] and f"{n * len(RATIOS)}" in lines[0] and "0 left" in lines[-1]


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def fake_sensitivity(pruner: FilterPruner, seed: int = 0) -> SensitivityResult:
    """Monotone curves of different steepness per group (planning needs no evaluation)."""
    rng = np.random.RandomState(seed)
    ratios = tuple(round(0.1 * i, 1) for i in range(1, 10))
    res = SensitivityResult(baseline=0.9, ratios=ratios)
    for g in pruner.prunable_groups:
        k = rng.uniform(0.05, 2.0)
        res.losses[g.name] = {r: float(k * r ** 2) for r in ratios}
        res.channels[g.name] = g.channels
    return res


@pytest.mark.parametrize("name", ["mobilenet_v1", "resnet18", "vgg16"])
def test_targets_met_within_half_a_point(name: str) -> None:
    paddle.seed(0)
    net = getattr(models, name)(num_classes=10)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    sens = fake_sensitivity(pruner)
    base = pruner.graph.flops({})
    for target in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        for strategy in ("sensitivity", "uniform"):
            kept = pruner.plan(target, sens, strategy=strategy)
            achieved = 1 - pruner.graph.flops({g: len(k) for g, k in kept.items()}) / base
            assert abs(achieved - target) <= 0.005, (name, target, strategy, achieved)
    if name == "vgg16":
        return  # 120M parameters in its classifier: slicing them takes long; shown on the others
    # the analytic figure is what the pruned network really has
    before = count_flops(net, [1, 3, 32, 32])
    plan = pruner.prune_to_flops(0.4, sensitivities=sens)
    assert plan.flops_before == before
    assert plan.flops_after == count_flops(net, [1, 3, 32, 32])
    assert abs(plan.pruned_flops - 0.4) <= 0.005


def test_planning_prefers_insensitive_groups_and_is_deterministic() -> None:
    paddle.seed(0)
    net = models.mobilenet_v1(num_classes=10, scale=0.5)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    sens = fake_sensitivity(pruner, seed=1)
    a = pruner.plan(0.4, sens)
    b = pruner.plan(0.4, sens)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    groups = pruner.groups
    steep = {groups[g].name: sens.losses[groups[g].name][0.5] for g in a}
    removed = {groups[g].name: 1 - len(k) / groups[g].channels for g, k in a.items()}
    flat = min(steep, key=steep.get)
    sharp = max(steep, key=steep.get)
    assert removed.get(flat, 0) > removed.get(sharp, 0)


def test_unreachable_and_bad_targets() -> None:
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    sens = fake_sensitivity(pruner)
    skip = [g.name for g in pruner.prunable_groups][2:]
    with pytest.raises(ValueError, match=r"cannot be reached: the largest reachable .* is 0\.\d+"):
        pruner.prune_to_flops(0.95, sensitivities=sens, skip=skip)
    for bad in (-0.1, 0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            pruner.prune_to_flops(bad, sensitivities=sens)
    with pytest.raises(ValueError, match="needs sensitivities"):
        FilterPruner(net, [1, 3, 32, 32]).prune_to_flops(0.4, strategy="sensitivity")
    # no curves and no strategy: uniform (the default is chosen from whether curves are given)
    plan = FilterPruner(net, [1, 3, 32, 32]).prune_to_flops(0.4, round_to=1)  # exact: ratios comparable
    assert len({round(g.ratio, 1) for g in plan.groups}) <= 2


def test_paddleslim_aliases(tiny: Any, tmp_path: Path) -> None:
    """A script written from PaddleSlim's tutorial runs with its imports changed."""
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])

    def eval_top1() -> float:  # the tutorial's `test()`
        with paddle.no_grad():
            logits = net(paddle.to_tensor(ds.x)).numpy()
        return top1_metric(logits, ds.y)[0] / len(ds)

    sen_file = str(tmp_path / "sensitivities_0.data")
    sens = pruner.sensitive(eval_func=eval_top1, sen_file=sen_file)
    assert pruner.sensitive() == sens
    assert set(sens) == {g.name for g in pruner.prunable_groups}
    assert all(set(v) == set(round(0.1 * i, 1) for i in range(1, 10)) for v in sens.values())
    skip = pruner.groups[pruner.group_index("c1.0")].param_name
    plan = pruner.sensitive_prune(0.3, skip_vars=[skip])
    assert 0.295 <= plan.pruned_flops <= 0.305
    assert "c1.0" not in {g.name for g in plan.groups if g.removed}


def test_flat_curves_spread_the_cut_evenly() -> None:
    """All losses equal (an untrained network): no group is emptied while others stay whole."""
    net = models.mobilenet_v1(num_classes=10, scale=0.5)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    sens = fake_sensitivity(pruner)
    for pts in sens.losses.values():
        for r in pts:
            pts[r] = 0.0
    kept = pruner.plan(0.4, sens, round_to=1)  # exact counts: 16-channel groups move in steps of 1, not 8
    groups = pruner.groups
    removed = [1 - len(kept.get(i, range(g.channels))) / g.channels
               for i, g in enumerate(groups) if g.name in sens.losses]
    assert max(removed) - min(removed) < 0.2, removed


def test_users_own_instance_forward_is_used_and_put_back(tiny: Any) -> None:
    """The replay patches `forward` on layer instances for one pass at a time: a forward the user
    set on an instance is called for live calls and is the same object afterwards."""
    net, ds = tiny
    conv = net.c1[0]
    calls = []

    def own_forward(x: paddle.Tensor) -> paddle.Tensor:
        calls.append(1)
        return type(conv).forward(conv, x)

    conv.forward = own_forward
    pruner = FilterPruner(net, [1, 3, 12, 12])
    fast = pruner.sensitivity(EvalData(ds, batch_size=16, workers=1), ratios=RATIOS)
    assert conv.__dict__["forward"] is own_forward
    assert calls  # used while the replay was installed (live calls) and outside it
    del conv.forward
    plain = pruner.sensitivity(EvalData(ds, batch_size=16, workers=1), ratios=RATIOS, cache=False)
    assert fast.losses == plain.losses
    assert not any("forward" in vars(layer) for layer in net.sublayers(include_self=True))


def test_replay_restores_patches_when_evaluation_fails(tiny: Any) -> None:
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])

    def bad_metric(logits: np.ndarray, labels: np.ndarray) -> Any:
        raise RuntimeError("metric failed")

    before = state(net)
    with pytest.raises(RuntimeError, match="metric failed"):
        pruner.sensitivity(EvalData(ds, metric=bad_metric, batch_size=16), ratios=RATIOS)
    assert not any("forward" in vars(layer) for layer in net.sublayers(include_self=True))
    assert all(not layer._forward_post_hooks for layer in net.sublayers())
    after = state(net)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_mixed_train_eval_modes_come_back_exactly(tiny: Any) -> None:
    net, ds = tiny
    net.train()
    net.c1[1].eval()  # a frozen BatchNorm in a training network
    FilterPruner(net, [1, 3, 12, 12]).sensitivity(ds, ratios=(0.5,))
    assert net.training and not net.c1[1].training and net.c2[1].training


def test_eval_mode_restores_each_sublayers_flag(tiny: Any) -> None:
    from prune_callbacks.utils.modes import eval_mode
    net, _ = tiny
    net.train()
    net.dw[1].eval()
    with eval_mode(net) as inside:
        assert inside is net and not any(l.training for l in net.sublayers(include_self=True))
    assert net.training and not net.dw[1].training and net.c1[0].training
    with pytest.raises(KeyError):
        with eval_mode(net):
            raise KeyError("x")
    assert net.training and not net.dw[1].training


def test_runner_group_evaluates_masked_variants_without_protocol_steps(tiny: Any) -> None:
    """One context per group yields evaluate(drop): masking, capture and replay happen inside."""
    from prune_callbacks.sensitivity import Runner
    net, ds = tiny
    pruner = FilterPruner(net, [1, 3, 12, 12])
    ev = EvalData(ds, batch_size=16, workers=1)
    groups = [(i, g) for i, g in enumerate(pruner.groups) if g.prunable]
    runner = Runner(net, ev, True, groups, pruner.graph.param_axes)
    base = runner.baseline()
    gi, g = groups[-1]
    _, drop = pruner.slices(pruner.select({g.name: 0.5}))
    with runner.group(g) as evaluate:
        first, second = evaluate(drop), evaluate(drop)  # full pass, then replay: same number
        assert evaluate({}) == base
    assert first == second
    slow = Runner(net, ev, False)
    with slow.group(g) as evaluate:
        assert evaluate(drop) == first
