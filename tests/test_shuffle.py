"""Channel shuffles: `reshape([n, g, c // g, h, w]) -> transpose -> reshape([n, c,
h, w])` with `c` read from the input's shape. One shuffle ties position i of every run, so every
run keeps the same positions and the pruned shuffle meets them in the masked order. Where the
splits of shuffled channels nest (ShuffleNetV2 stages), the groups are routed instead
(`routes.RoutedGroup`): pruned == masked in eval and train mode, a training step, predicted FLOPs
== counted FLOPs, a FLOPs plan and a save/load round trip. Sizes the code writes as literals are
caught by a trial prune and leave the group whole with a reason."""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from prune_callbacks import FilterPruner, count_flops, load_pruned, save_pruned
from pruning_checks import check_pruned, randomise, run

SHAPE = [2, 3, 8, 8]


def shuffle(x: paddle.Tensor, groups: int, runs_first: bool = True) -> paddle.Tensor:
    n, c, h, w = x.shape
    if runs_first:  # paddle.vision's channel_shuffle
        y = x.reshape([n, groups, c // groups, h, w]).transpose([0, 2, 1, 3, 4])
    else:  # the run axis inner, its length computed by reshape (-1)
        y = x.reshape([n, -1, groups, h, w]).transpose([0, 2, 1, 3, 4])
    return y.reshape([n, c, h, w])


class Repro(nn.Layer):
    """The failing case: split into halves, a conv on one, concat, shuffle."""

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
    assert "nor can routes describe it: a parameter axis also holds channels" in g.reason


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
    assert "routes do not describe" in g.reason  # a grouped conv reads them in blocks
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


class ConvBN(nn.Layer):
    """conv -> BatchNorm (-> ReLU); plain attributes, no nn.Sequential: tracing a Sequential's
    loop costs several times more, and routed groups trace a copy per width."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                              bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Branch(nn.Layer):
    """pointwise -> depthwise (stride) -> pointwise, ShuffleNetV2's branch."""

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.pw = ConvBN(cin, c)
        self.dw = ConvBN(c, c, 3, stride, c, act=False)
        self.linear = ConvBN(c, c)

    def forward(self, x):
        return self.linear(self.dw(self.pw(x)))


class Unit(nn.Layer):
    """A ShuffleNetV2 unit (stride 1): halves, the second through a branch, concat, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = Branch(c // 2, c // 2)

    def halves(self, x: paddle.Tensor) -> list:
        return paddle.split(x, [x.shape[1] // 2, x.shape[1] // 2], axis=1)

    def forward(self, x):
        x1, x2 = self.halves(x)
        return shuffle(paddle.concat([x1, self.branch(x2)], 1), 2)


class LiteralUnit(Unit):
    """The same unit with the shuffle's sizes written in: it cannot follow a pruned width."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.c = c

    def forward(self, x):
        x1, x2 = self.halves(x)
        y = paddle.concat([x1, self.branch(x2)], 1)
        n, _, h, w = y.shape
        y = y.reshape([n, 2, self.c // 2, h, w]).transpose([0, 2, 1, 3, 4])
        return y.reshape([n, self.c, h, w])


class SlicedUnit(Unit):
    """The unit written another way: half slices, the shuffle's run length left to reshape
    (-1) and merged back by flatten."""

    def forward(self, x):
        c = x.shape[1]
        y = paddle.concat([x[:, :c // 2], self.branch(x[:, c // 2:])], 1)
        n, _, h, w = y.shape
        return paddle.flatten(y.reshape([n, 2, -1, h, w]).transpose([0, 2, 1, 3, 4]), 1, 2)


class Down(nn.Layer):
    """The first block of a stage (stride 2): two branches on the whole input, concat, shuffle."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.dw = ConvBN(cin, cin, 3, 2, cin, act=False)
        self.linear = ConvBN(cin, c // 2)
        self.branch = Branch(cin, c // 2, stride=2)

    def forward(self, x):
        return shuffle(paddle.concat([self.linear(self.dw(x)), self.branch(x)], 1), 2)


class TinyShuffleNetV2(nn.Layer):
    """Two stages of a down block and two units: the smallest net whose splits of shuffled
    channels nest (with one unit per stage a single tie of the shuffle's runs still fits)."""

    def __init__(self, unit: type = Unit) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8, 3)
        self.down1, self.unit1a, self.unit1b = Down(8, 16), unit(16), unit(16)
        self.down2, self.unit2a, self.unit2b = Down(16, 32), unit(32), unit(32)
        self.last = ConvBN(32, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.unit1b(self.unit1a(self.down1(self.stem(x))))
        x = self.last(self.unit2b(self.unit2a(self.down2(x))))
        return self.fc(paddle.flatten(F.adaptive_avg_pool2d(x, 1), 1))


TINY = [2, 3, 16, 16]
STAGES = ["down1.linear.conv", "down2.linear.conv"]


def test_nested_shuffle_stages_are_routed():
    """Every channel of the stage's producers (the down block's two branches, each unit's
    branch: 4 x 8 and 4 x 16) is a channel of the group; each producer keeps the same count."""
    pruner = FilterPruner(TinyShuffleNetV2(), TINY)
    groups = {g.name: g for g in pruner.groups}
    assert [groups[n].channels for n in STAGES] == [32, 64]
    assert all(groups[n].prunable for n in STAGES)
    assert [n for n, g in groups.items() if not g.prunable] == ["<unnamed:0>", "fc"]
    gi = pruner.group_index(STAGES[0])
    assert np.bincount(groups[STAGES[0]].partition).tolist() == [8, 8, 8, 8]
    rg = pruner.graph.routed[gi]
    # every width down to 1: at 1 the shuffle's reshape is [n, 2, 1, h, w], whose sizes the
    # program shows as literals; a trial prune of the copy confirms the forward computes them
    assert rg.width == 8 and all(rg.feasible(w) for w in range(1, 9)) and rg.nearest(1) == 1
    assert rg.why_not(1) == ""
    kept = pruner.select({STAGES[0]: 0.5})[gi]
    assert np.bincount(groups[STAGES[0]].partition[kept]).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("ratio", [0.25, 0.7, 0.875])  # 0.875: one channel per producer
def test_nested_shuffle_stages_prune_exactly(ratio):
    paddle.seed(0)
    net = TinyShuffleNetV2()
    out = check_pruned(net, TINY, ratio=ratio, expect_groups=STAGES)
    plan = {g.name: g for g in out["plan"].groups}
    kept = [len(plan[n].kept) // 4 for n in STAGES]
    assert net.unit1b.branch.pw.conv.weight.shape[1] == kept[0]
    assert net.last.conv.weight.shape[1] == 2 * kept[1]


def test_nested_shuffles_written_another_way_prune_exactly():
    paddle.seed(0)
    check_pruned(TinyShuffleNetV2(SlicedUnit), TINY, ratio=0.5, expect_groups=STAGES)


def test_kept_channels_that_break_the_routes_are_refused():
    pruner = FilterPruner(TinyShuffleNetV2(), TINY)
    gi = pruner.group_index(STAGES[0])
    # the first 4 channels of every producer: a width of 4, but not the routes it needs
    part = pruner.groups[gi].partition
    kept = np.concatenate([np.flatnonzero(part == b)[:4] for b in range(4)])
    with pytest.raises(ValueError, match="do not follow the routes"):
        pruner.apply({gi: kept})
    with pytest.raises(ValueError, match="same number of channels"):
        pruner.apply({gi: np.arange(20)})


def test_nested_shuffle_stages_plan_to_a_flops_target(tmp_path):
    paddle.seed(0)
    net = TinyShuffleNetV2()
    randomise(net)
    pruner = FilterPruner(net, TINY)
    plan = pruner.prune_to_flops(0.5)
    assert plan.pruned_flops >= 0.5 and count_flops(net, TINY) == plan.flops_after
    assert {STAGES[0], STAGES[1]} <= {g.name for g in plan.groups}
    x = paddle.randn(TINY)
    save_pruned(net, tmp_path / "tiny")
    fresh = load_pruned(TinyShuffleNetV2(), tmp_path / "tiny")
    for training in (False, True):
        np.testing.assert_allclose(run(fresh, x, training)[0], run(net, x, training)[0],
                                   rtol=1e-5, atol=1e-6)


def test_literal_sizes_in_nested_shuffles_leave_the_stage_whole():
    with pytest.warns(UserWarning, match="down1.linear.conv left unpruned: .* nor do routes"):
        pruner = FilterPruner(TinyShuffleNetV2(LiteralUnit), TINY)
    g = {g.name: g for g in pruner.groups}[STAGES[0]]
    assert not g.prunable and "disagree on channel blocks" in g.reason
    assert "nor do routes prune it" in g.reason and "failed" in g.reason
    assert pruner.groups[pruner.group_index("stem.conv")].prunable


SHUFFLENET = [1, 3, 32, 32]


def _shufflenet(seed: int = 0) -> nn.Layer:
    paddle.seed(seed)
    return paddle.vision.models.shufflenet_v2_x0_25(num_classes=10)


def test_shufflenet_v2_stage_widths_are_prunable():
    groups = _groups(_shufflenet(), SHUFFLENET)
    whole = {n: g.reason for n, g in groups.items() if not g.prunable}
    assert len(groups) == 23 and list(whole) == ["<unnamed:0>", "_fc"], whole
    stages = [groups[f"{s}_1._conv_linear_1.0"] for s in (2, 3, 4)]
    # every producer's channels: the down block's two branches and each unit's branch
    assert [g.channels for g in stages] == [5 * 12, 9 * 24, 5 * 48]


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_shufflenet_v2_prunes_every_group_at_once(ratio):
    net = _shufflenet()
    out = check_pruned(net, SHUFFLENET, ratio=ratio, expect_groups=[
        f"{s}_1._conv_linear_1.0" for s in (2, 3, 4)])
    assert len(out["plan"].groups) == 21
    kept = {g.name: len(g.kept) for g in out["plan"].groups}
    # stage 3 (8 blocks, 24 per producer) prunes at 2..8 and 17..24 channels only: 0.6 -> 10
    # rounds to 8
    assert kept["3_1._conv_linear_1.0"] == 9 * {0.3: 17, 0.6: 8}[ratio]


def test_pruned_shufflenet_v2_saves_and_loads(tmp_path):
    net = _shufflenet()
    randomise(net)
    pruner = FilterPruner(net, SHUFFLENET)
    pruner.prune({n: 0.5 for n in ("2_1._conv_linear_1.0", "3_1._conv_linear_1.0",
                                   "4_1._conv_linear_1.0")})
    save_pruned(net, tmp_path / "shufflenet")
    fresh = load_pruned(_shufflenet(seed=1), tmp_path / "shufflenet")
    x = paddle.randn(SHUFFLENET)
    for training in (False, True):
        np.testing.assert_allclose(run(fresh, x, training)[0], run(net, x, training)[0],
                                   rtol=1e-5, atol=1e-6)
