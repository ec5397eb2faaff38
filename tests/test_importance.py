"""Channel importance criteria checked against hand computations on a tiny weight, and the registry."""
from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import pytest

from prune_callbacks import FilterPruner, register_criterion
from prune_callbacks.planning.importance import (_CRITERIA, Criterion, Source, bn_scale, fpgm, get_criterion,
                                        l1, l2, random_score)

# 3 filters of a conv weight [out=3, in=1, 2, 1]: rows (1, -2), (0, 3), (-1, 1)
W = np.array([1.0, -2.0, 0.0, 3.0, -1.0, 1.0], dtype=np.float32).reshape(3, 1, 2, 1)


def test_l1_l2_by_hand() -> None:
    np.testing.assert_allclose(l1(W, 0), [3.0, 3.0, 2.0])
    np.testing.assert_allclose(l2(W, 0), [np.sqrt(5), 3.0, np.sqrt(2)])
    # along the input axis of a Linear weight [in=2, out=3]: column sums
    lin = np.array([[1.0, -2.0, 0.5], [-1.0, 0.0, 0.5]])
    np.testing.assert_allclose(l1(lin, 1), [2.0, 2.0, 1.0])


def test_fpgm_sums_distances_to_the_other_filters() -> None:
    # |(1,-2)-(0,3)| = sqrt(26), |(1,-2)-(-1,1)| = sqrt(13), |(0,3)-(-1,1)| = sqrt(5)
    s26, s13, s5 = np.sqrt(26), np.sqrt(13), np.sqrt(5)
    np.testing.assert_allclose(fpgm(W, 0), [s26 + s13, s26 + s5, s13 + s5], rtol=1e-6)


def test_bn_scale_is_the_absolute_scale_and_l1_on_a_vector() -> None:
    gamma = np.array([0.5, -2.0, 0.0, 1.5], dtype=np.float32)
    np.testing.assert_allclose(bn_scale(gamma, 0), [0.5, 2.0, 0.0, 1.5])
    assert get_criterion("bn_scale").source is Source.NORM
    assert get_criterion("l1").source is Source.PRODUCER


def test_random_is_repeatable_per_shape_and_in_unit_interval() -> None:
    a, b = random_score(W, 0), random_score(W.copy() * 7, 0)
    np.testing.assert_array_equal(a, b)  # seeded by the shape, not the values
    rng = np.random.default_rng(3 * 7919 + W.size)  # the documented seed, by hand
    np.testing.assert_array_equal(a, rng.random(3))
    assert a.shape == (3,) and np.all((0 <= a) & (a < 1))


def test_bn_scale_scores_a_groups_norm_through_the_pruner() -> None:
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(1, 4, 3, padding=1), paddle.nn.BatchNorm2D(4),
                               paddle.nn.ReLU(), paddle.nn.Conv2D(4, 2, 3))
    gamma = np.array([0.5, -2.0, 0.1, 1.5], dtype=np.float32)
    net[1].weight.set_value(gamma)
    pruner = FilterPruner(net, [1, 1, 8, 8], criterion="bn_scale")
    np.testing.assert_allclose(pruner.importance("0"), np.abs(gamma))
    kept = pruner.select({"0": 0.5})
    assert kept[pruner.group_index("0")].tolist() == [1, 3]  # |-2| and |1.5| stay


def test_register_criterion_is_used_by_the_pruner(monkeypatch: Any) -> None:
    monkeypatch.setitem(_CRITERIA, "linf", None)  # restored after the test
    crit = register_criterion("linf", lambda w, axis: np.abs(np.moveaxis(w, axis, 0))
                              .reshape(w.shape[axis], -1).max(axis=1))
    assert isinstance(crit, Criterion) and get_criterion("linf") is crit
    np.testing.assert_allclose(crit.score(W, 0), [2.0, 3.0, 1.0])
    net = paddle.nn.Sequential(paddle.nn.Conv2D(1, 3, (2, 1)), paddle.nn.ReLU(),
                               paddle.nn.Conv2D(3, 2, 1))
    net[0].weight.set_value(W)
    pruner = FilterPruner(net, [1, 1, 4, 4], criterion="linf")
    kept = pruner.select({"0": 0.34})[pruner.group_index("0")]
    assert kept.tolist() == [0, 1]  # the filter with max |w| = 1 goes


def test_register_criterion_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"source must be one of \['producer', 'norm', 'group'\], got 'bn'"):
        register_criterion("x", l1, source="bn")
    with pytest.raises(TypeError, match="score must be callable"):
        register_criterion("x", 3)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        register_criterion("", l1)
    assert "x" not in _CRITERIA
    with pytest.raises(ValueError,
                       match=r"unknown criterion 'nope'; choose one of .*'fpgm'.*register_criterion"):
        get_criterion("nope")
