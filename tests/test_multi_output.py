"""Networks with several outputs and branches that run only in training.

Each pruned network must equal the masked original in eval and in train mode, every output of
it, train for a step, and have the FLOPs the pruner predicted.
"""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from prune_callbacks import FilterPruner, count_flops
from prune_callbacks.graph.channels import ChannelGraph
from pruning_checks import check_pruned, run, train_step

SHAPE = [1, 3, 16, 16]


class Trunk(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2D(8, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU())
        self.head = nn.Conv2D(16, 4, 1)


class ListOut(Trunk):
    def forward(self, x):
        f = self.stem(x)
        g = self.mid(f)
        return [self.head(g), f]


class TupleOut(Trunk):
    def forward(self, x):
        g = self.mid(self.stem(x))
        return self.head(g), g.mean(axis=[2, 3])


class DictOut(Trunk):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2D(8, 2, 1)

    def forward(self, x):
        f = self.stem(x)
        return {"out": self.head(self.mid(f)), "aux": [self.aux(f)]}


@pytest.mark.parametrize("cls", [ListOut, TupleOut, DictOut])
def test_several_outputs_trace_and_prune(cls):
    paddle.seed(0)
    net = cls()
    result = check_pruned(net, SHAPE)
    groups = {g.name: g for g in result["pruner"].groups}
    # every output's channels stay whole
    assert net.head.weight.shape[0] == 4
    if cls is ListOut:  # f is an output: the stem's channels are never pruned
        assert not groups["stem.0"].prunable and "network output" in groups["stem.0"].reason
        assert net.stem[0].weight.shape[0] == 8 and net.mid[0].weight.shape[0] == 8
    if cls is TupleOut:
        assert not groups["mid.0"].prunable
    if cls is DictOut:
        assert net.aux.weight.shape[0] == 2 and net.stem[0].weight.shape[0] == 4


class AuxHead(nn.Layer):
    """A segmentation-style net: the auxiliary head on an intermediate feature runs only in
    training (its conv reads the stem's channels, which the eval graph never shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2D(16, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU())
        self.head = nn.Conv2D(16, 5, 1)
        self.aux = nn.Sequential(nn.Conv2D(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2D(8, 5, 1))
        self.aux_fc = nn.Linear(16, 5)

    def forward(self, x):
        f = self.stem(x)
        out = self.head(self.body(f))
        if self.training:
            return out, self.aux(f), self.aux_fc(f.mean(axis=[2, 3]))
        return out


def test_train_only_head_is_pruned_with_its_inputs():
    paddle.seed(0)
    net = AuxHead()
    graph = ChannelGraph(net, SHAPE)
    assert graph.two_modes
    by_name = {g.name: g for g in graph.groups}
    stem = by_name["stem.0"]
    assert stem.prunable and "aux.0" in stem.layers and "aux_fc" in stem.layers
    assert by_name["aux.0"].prunable  # the train-only hidden layer prunes too
    # eval FLOPs leave the aux head out; the training count holds it
    assert graph.flops() == count_flops(net, SHAPE)
    assert graph.flops(training=True) == count_flops(net, SHAPE, training=True) > graph.flops()
    result = check_pruned(net, SHAPE, expect_groups=["stem.0", "body.0", "aux.0"])
    assert net.aux[0].weight.shape[1] == net.stem[0].weight.shape[0] == 8
    assert net.aux_fc.weight.shape[0] == 8
    train_step(net, SHAPE)  # a second step, and the eval pass after it
    assert run(net, paddle.randn(SHAPE))[0].shape == (1, 5, 16, 16)
    plan = result["plan"]
    assert plan.flops_after == count_flops(net, SHAPE)


def test_train_mode_flops_restore_norm_statistics():
    paddle.seed(0)
    net = AuxHead()
    before = {k: t.numpy().copy() for k, t in net.state_dict().items()}
    count_flops(net, [4] + SHAPE[1:], training=True)
    assert all(np.array_equal(before[k], t.numpy()) for k, t in net.state_dict().items())


def test_same_graph_in_both_modes_is_traced_once():
    paddle.seed(0)
    net = ListOut()  # no forward mentions training
    assert not ChannelGraph(net, SHAPE).two_modes
    assert not ChannelGraph(nn.Sequential(nn.Conv2D(3, 4, 3), nn.Dropout()), SHAPE).two_modes


class ModeNoop(Trunk):
    def forward(self, x):
        y = self.head(self.mid(self.stem(x)))
        if self.training:  # mentions training, same graph
            y = y * 1.0
        return y


def test_mode_dependent_code_with_one_graph_keeps_one_trace():
    paddle.seed(0)
    net = ModeNoop()
    graph = ChannelGraph(net, SHAPE)
    assert graph.flops() == graph.flops(training=True)
    with pytest.raises(ValueError, match="modes must be 'auto', 'both' or 'eval'"):
        ChannelGraph(net, SHAPE, modes="train")


def test_eval_only_trace_misses_the_head():
    """Why both modes are traced: from the eval graph alone the stem's group does not know the
    aux conv, so pruning it would break training."""
    paddle.seed(0)
    stem = {g.name: g for g in ChannelGraph(AuxHead(), SHAPE, modes="eval").groups}["stem.0"]
    assert "aux.0" not in stem.layers


def test_per_sample_flops_whatever_the_batch():
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(3, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    one = count_flops(net, SHAPE)
    assert one == 8 * 27 * 14 * 14 + 8 * 14 * 14 * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eight = FilterPruner(net, [8] + SHAPE[1:])
    assert count_flops(net, [8] + SHAPE[1:]) == eight.flops() == one
    ratios = {"0": 0.5}
    pruned = eight.flops(ratios)
    eight.prune(ratios)
    assert count_flops(net, [8] + SHAPE[1:]) == pruned == count_flops(net, SHAPE)


def test_merging_an_identical_training_trace_changes_nothing():
    """Forcing both modes on a network whose graph is the same in both must give the same groups,
    members and FLOPs as the eval trace alone (the merge unites, never splits or blocks)."""
    from paddle.vision.models import resnet18
    from prune_callbacks.graph.tracing import TraceModes

    paddle.seed(0)
    net = resnet18(num_classes=10)
    one = ChannelGraph(net, [1, 3, 32, 32], modes="eval")
    two = ChannelGraph(net, [1, 3, 32, 32], modes=TraceModes.BOTH)
    assert two.two_modes and not one.two_modes
    assert [(g.name, g.channels, g.prunable, g.members) for g in one.groups] == \
        [(g.name, g.channels, g.prunable, g.members) for g in two.groups]
    kept = {i: g.channels // 2 for i, g in enumerate(one.groups) if g.prunable}
    assert one.flops(kept) == two.flops(kept) == two.flops(kept, training=True)
