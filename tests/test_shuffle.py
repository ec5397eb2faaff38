"""Channel shuffles (issue 12.1): `reshape([n, g, c // g, h, w]) -> transpose -> reshape([n, c,
h, w])` with `c` read from the input's shape. The shuffle ties position i of every run, so every
run keeps the same positions and the pruned shuffle meets them in the masked order; pruned ==
masked in eval and train mode, a training step, predicted FLOPs == counted FLOPs. Sizes the
code writes as literals are caught by a trial prune; ShuffleNetV2's stage widths stay whole with
a reason (nested splits of shuffled channels)."""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from prune_callbacks import FilterPruner
from pruning_checks import check_pruned

SHAPE = [2, 3, 8, 8]


def shuffle(x: paddle.Tensor, groups: int, runs_first: bool = True) -> paddle.Tensor:
    n, c, h, w = x.shape
    if runs_first:  # paddle.vision's channel_shuffle
        y = x.reshape([n, groups, c // groups, h, w]).transpose([0, 2, 1, 3, 4])
    else:  # the run axis inner, its length computed by reshape (-1)
        y = x.reshape([n, -1, groups, h, w]).transpose([0, 2, 1, 3, 4])
    return y.reshape([n, c, h, w])


class Repro(nn.Layer):
    """The issue's repro: split into halves, a conv on one, concat, shuffle."""

    def __init__(self, runs_first: bool = True) -> None:
        super().__init__()
        self.runs_first = runs_first
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2D(8)
        self.conv = nn.Conv2D(4, 4, 1)
        self.head = nn.Conv2D(8, 3, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        a, b = paddle.split(x, 2, axis=1)
        y = paddle.concat([a, self.conv(b)], 1)
        return self.head(shuffle(y, 2, self.runs_first))


def _groups(net: nn.Layer, shape=SHAPE) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {g.name: g for g in FilterPruner(net, shape).groups}


def test_issue_repro_prunes_exactly():
    paddle.seed(0)
    net = Repro()
    conv1 = _groups(net)["conv1"]
    assert conv1.prunable, conv1.reason
    # the halves of the split lose equal counts; the branch conv's outputs follow half 0
    assert sorted(np.unique(conv1.partition).tolist()) == [0, 1]
    assert ("conv.weight", 0) in conv1.members
    check_pruned(net, SHAPE, ratios={"conv1": 0.5})
    assert net.conv1.weight.shape[0] == 4 and net.conv.weight.shape[:2] == [2, 2]
    assert net.head.weight.shape[1] == 4


def test_run_axis_computed_by_reshape():
    """`reshape([n, -1, g])`: rows of g channels go together (the -1 axis shrinks)."""
    class Rows(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
            self.head = nn.Conv2D(8, 3, 1)

        def forward(self, x):
            return self.head(shuffle(F.relu(self.conv1(x)), 2, runs_first=False))

    paddle.seed(0)
    net = Rows()
    assert _groups(net)["conv1"].channels == 4  # 4 rows of 2 tied channels
    check_pruned(net, SHAPE, ratios={"conv1": 0.5})
    assert net.conv1.weight.shape[0] == 4


def test_split_cutting_tied_channels_unevenly_stays_whole():
    net = Repro(runs_first=False)  # rows of a tie in pairs, the conv's inputs do not
    g = _groups(net)["conv1"]
    assert not g.prunable and "holds them unevenly" in g.reason


class ShuffleUnit(nn.Layer):
    """A ShuffleNetV1-style unit: grouped 1x1 conv, shuffle, depthwise, grouped 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 12, 3, padding=1)
        self.gconv1 = nn.Conv2D(12, 12, 1, groups=3)
        self.bn1 = nn.BatchNorm2D(12)
        self.dw = nn.Conv2D(12, 12, 3, padding=1, groups=12)
        self.gconv2 = nn.Conv2D(12, 12, 1, groups=3)
        self.head = nn.Conv2D(12, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = shuffle(F.relu(self.bn1(self.gconv1(x))), 3)
        return self.head(F.relu(x + self.gconv2(self.dw(y))))


def test_shuffle_between_grouped_convs_stays_whole_with_a_reason():
    """Every run of the shuffle keeps the same positions, but then the second grouped conv's
    blocks would keep unequal counts (runs of 4 tied channels straddle its blocks)."""
    net = ShuffleUnit()
    g = _groups(net)["gconv1"]
    assert not g.prunable and "channel shuffle tied channels" in g.reason
    check_pruned(net, SHAPE, ratios={"stem": 0.5})  # the rest still prunes exactly


def test_literal_shuffle_sizes_are_caught_by_a_trial_prune():
    class Literal(Repro):
        def forward(self, x):
            x = self.conv1(x)
            a, b = paddle.split(x, 2, axis=1)
            y = paddle.concat([a, self.conv(b)], 1)
            y = y.reshape([-1, 2, 4, 8, 8]).transpose([0, 2, 1, 3, 4]).reshape([-1, 8, 8, 8])
            return self.head(y)

    with pytest.warns(UserWarning, match="conv1 left unpruned: channel shuffle sizes written"):
        pruner = FilterPruner(Literal(), SHAPE)
    g = {g.name: g for g in pruner.groups}["conv1"]
    assert not g.prunable and "did not reproduce masking" in g.reason


def test_shufflenet_v2_prunes_30_percent_of_every_prunable_group():
    paddle.seed(0)
    shape = [1, 3, 32, 32]
    net = paddle.vision.models.shufflenet_v2_x0_25(num_classes=10)
    groups = _groups(net, shape)
    prunable = [n for n, g in groups.items() if g.prunable]
    # every branch's inner channels, the stem and the last conv; each stage's width stays whole
    assert len(prunable) == 18 and len(groups) == 23
    stages = [g for g in groups.values() if "ShuffleNetV2 stages" in g.reason]
    assert [g.channels for g in stages] == [12, 24, 48]
    check_pruned(net, shape, ratios={n: 0.3 for n in prunable})
