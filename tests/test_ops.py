"""Layers and ops real networks use beyond the classification zoo: each minimal
network prunes exactly (pruned == masked in eval and train mode, a training step, FLOPs fall,
predicted FLOPs == counted FLOPs), or keeps its channels with a reason that says why."""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from prune_callbacks import FilterPruner, count_flops
from pruning_checks import check_pruned

SHAPE = [2, 3, 8, 8]


def _groups(net: nn.Layer, shape=SHAPE) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {g.name: g for g in FilterPruner(net, shape).groups}


class PReLUs(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.act1 = nn.PReLU(8)  # one slope per channel: sliced with them
        self.conv2 = nn.Conv2D(8, 8, 3, padding=1)
        self.act2 = nn.PReLU()  # one slope: channels pass
        self.head = nn.Conv2D(8, 4, 1)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))))


def test_prelu_per_channel_and_shared():
    paddle.seed(0)
    net = PReLUs()
    check_pruned(net, SHAPE, expect_groups=["conv1", "conv2"])
    assert net.act1._weight.shape == [4] and net.act1._num_parameters == 4
    assert net.act2._weight.shape == [1]


class Decoder(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2D(3, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2DTranspose(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2D(6)
        self.dw = nn.Conv2DTranspose(6, 6, 3, padding=1, groups=6)
        self.out = nn.Conv2D(6, 2, 1)

    def forward(self, x):
        return self.out(self.dw(F.relu(self.bn(self.up(F.relu(self.enc(x)))))))


def test_transposed_convolutions():
    paddle.seed(0)
    net = Decoder()
    # MACs: one per filter element per input position
    assert count_flops(net, SHAPE) == (8 * 27 * 16) + (8 * 6 * 4 * 16) + (6 * 9 * 64) + 6 * 2 * 64
    check_pruned(net, SHAPE, expect_groups=["enc", "up"])
    assert net.up.weight.shape == [4, 3, 2, 2]
    assert (net.up._in_channels, net.up._out_channels) == (4, 3)
    assert net.dw.weight.shape[0] == 3 and net.dw._groups == 3 and net.out.weight.shape[1] == 3


class LayerScale(nn.Layer):
    """A ConvNeXt-style per-channel scale, a roll along space and an expand along space."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.gamma = self.create_parameter([1, 8, 1, 1])
        self.conv2 = nn.Conv2D(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x) * self.gamma
        y = paddle.roll(y, 1, axis=2)
        y = y + paddle.expand(y[:, :, :1, :], y.shape)
        return self.conv2(y)


def test_per_channel_parameter_roll_and_expand():
    paddle.seed(0)
    net = LayerScale()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op understood
        FilterPruner(net, SHAPE)
    check_pruned(net, SHAPE, expect_groups=["conv1"])
    assert net.gamma.shape == [1, 4, 1, 1]


class SpatialOps(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2D(8, 6, 3, padding=1)
        self.patch = nn.Linear(6 * 4, 5)  # on unfolded 2x2 patches
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        idx = paddle.to_tensor([1, 0, 2, 3, 4, 5, 6, 7])
        y = paddle.index_select(y, idx, axis=2)
        y = paddle.gather(y, idx, axis=3)
        y[:, :, 0:1, :] = 0.0
        y = F.interpolate(y, scale_factor=2, mode="bilinear")
        pooled = paddle.mean(y, axis=[2, 3])
        z = F.unfold(F.relu(self.conv2(y)), [2, 2], strides=2)  # [N, 6*4, L]
        tokens = self.patch(z.transpose([0, 2, 1]))  # [N, L, 5]
        return tokens.mean(1) + self.fc(pooled)


def test_unfold_index_select_gather_set_value_interp_mean():
    paddle.seed(0)
    net = SpatialOps()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FilterPruner(net, SHAPE)
    check_pruned(net, SHAPE, expect_groups=["conv1", "conv2"])
    assert net.patch.weight.shape == [3 * 4, 5] and net.fc.weight.shape == [4, 5]


class RunTimeShapes(nn.Layer):
    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        b = paddle.shape(y)[0]
        if self.literal:  # the failing case: 8 is written into the code
            t = y.reshape([b, 8, 64]).transpose([0, 2, 1])
        else:
            t = y.reshape([b, 0, -1]).transpose([0, 2, 1])
        return self.fc(t).mean(1)


def test_shapes_computed_at_run_time():
    paddle.seed(0)
    blocked = _groups(RunTimeShapes(literal=True))["conv"]
    assert not blocked.prunable and "reshape to a fixed channel count" in blocked.reason
    net = RunTimeShapes(literal=False)
    check_pruned(net, SHAPE, expect_groups=["conv"])
    assert net.fc.weight.shape == [4, 3]


class SizesReadFromTheTensor(nn.Layer):
    """PP-OCR's ClsHead and PaddleClas's custom layers: sizes read from `x.shape`, which the
    static program shows as literals; `written` writes the channel count into the code."""

    def __init__(self, written: bool) -> None:
        super().__init__()
        self.written = written
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1)
        n, c = y.shape[0], y.shape[1]
        m = y.mean(axis=[2, 3]).reshape([n, c, 1, 1])  # [N, C, 1, 1] from the tensor's sizes
        y = (y * m).reshape([n, 8] if self.written else [n, c])
        return self.fc(y)


def test_sizes_read_from_the_tensor_prune_and_written_ones_stay_whole():
    paddle.seed(0)
    check_pruned(SizesReadFromTheTensor(written=False), SHAPE, expect_groups=["conv"])
    blocked = _groups(SizesReadFromTheTensor(written=True))["conv"]
    assert not blocked.prunable
    assert "reshape to a fixed channel count" in blocked.reason and "did not reproduce" in blocked.reason


class ReadAndWritten(nn.Layer):
    """Two groups a trial prune decides: one reads its size from the tensor, one writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.read = nn.Conv2D(3, 8, 3, padding=1)
        self.written = nn.Conv2D(3, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        a = F.adaptive_avg_pool2d(self.read(x), 1)
        b = F.adaptive_avg_pool2d(self.written(x), 1)
        a = a.reshape([a.shape[0], a.shape[1]])
        b = b.reshape([b.shape[0], 8])
        return self.fc(paddle.concat([a, b], axis=1))


def test_groups_tried_together_fall_back_to_one_by_one():
    """The trial of all such groups together fails (one writes its size), so each is tried
    alone: the one that reads its size prunes, exactly."""
    paddle.seed(0)
    groups = _groups(ReadAndWritten())
    assert groups["read"].prunable and not groups["written"].prunable
    assert "did not reproduce masking" in groups["written"].reason
    check_pruned(ReadAndWritten(), SHAPE, expect_groups=["read"])


class Norms(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, 8)  # one channel per group: a per-channel norm
        self.conv2 = nn.Conv2D(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 8)
        self.conv3 = nn.Conv2D(8, 8, 1)
        self.ln = nn.LayerNorm(8)  # channels-last, as in ConvNeXt
        self.head = nn.Conv2D(8, 2, 1)

    def forward(self, x):
        y = self.conv2(F.relu(self.gn1(self.conv1(x))))
        y = self.conv3(self.gn2(y))
        y = self.ln(y.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])
        return self.head(y)


def test_group_norm_prunes_whole_groups_and_layer_norm_renormalises():
    paddle.seed(0)
    net = Norms()
    groups = _groups(net)
    assert groups["conv2"].channels == 4  # GroupNorm(4, 8): four units of two channels
    off = {g.name: g for g in FilterPruner(net, SHAPE, layer_norm_widths=False).groups}
    assert "LayerNorm normalises over these channels" in off["conv3"].reason
    assert "layer_norm_widths=False" in off["conv3"].reason
    check_pruned(net, SHAPE, expect_groups=["conv1", "conv2", "conv3"])
    assert net.ln._normalized_shape == [4] and net.ln.bias.shape == [4]
    assert net.gn1._num_channels == net.gn1._num_groups == 4 and net.gn1.weight.shape == [4]
    assert (net.gn2._num_channels, net.gn2._num_groups) == (4, 2)
    assert net.conv2.weight.shape[0] == 4 and net.conv3.weight.shape[1] == 4


class TokenMLP(nn.Layer):
    """A ViT-style block: conv patch embedding, tokens [N, L, C], LayerNorm, an MLP and a
    self-attention, a head on the mean token."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2D(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose([0, 2, 1])
        q, k, v = self.qkv(self.norm1(t)).chunk(3, axis=-1)
        attn = F.softmax(q @ k.transpose([0, 2, 1]), axis=-1)
        t = t + self.proj(attn @ v)
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


def test_transformer_mlp_hidden_channels_prune():
    paddle.seed(0)
    net = TokenMLP()
    groups = _groups(net, [2, 3, 16, 16])
    assert groups["fc1"].prunable and set(groups["fc1"].layers) == {"fc1", "fc2"}
    assert groups["embed"].prunable  # the embedding width, LayerNorms renormalising
    # no phantom groups of tokens: only layers' channels, the input and attention internals
    assert len(groups) < 10
    check_pruned(net, [2, 3, 16, 16], ratios={"fc1": 0.5, "embed": 0.25})
    assert net.fc1.weight.shape == [12, 16] and net.fc2.weight.shape == [16, 12]
    assert net.norm1._normalized_shape == [12] and net.head.weight.shape == [12, 10]


class RowLinear(nn.Layer):
    """A Linear over spatial positions ([N, C, H*W] -> [N, C, 5]): its input's channels vary
    along rows, a path the tracer cannot follow; its MACs still count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.mix = nn.Linear(64, 5)
        self.conv2 = nn.Conv2D(3, 4, 3, padding=1)

    def forward(self, x):
        a = self.mix(self.conv(x).flatten(2))
        return a.mean(axis=[1, 2]) + self.conv2(x).mean(axis=[1, 2, 3])


def test_predicted_flops_count_linears_on_untraced_paths():
    paddle.seed(0)
    net = RowLinear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = FilterPruner(net, SHAPE)
    assert pruner.flops() == count_flops(net, SHAPE) == 8 * 27 * 64 + 8 * 64 * 5 + 4 * 27 * 64


class EqualParts(nn.Layer):
    """CSP halves `x[:, :c // 2]`, a Res2Net-style split into 4 and a chunk: the parts keep
    equal counts, so the sizes the forward computes from the pruned count stay right."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2D(8)
        self.part = nn.Conv2D(2 if how == "split4" else 4, 2 if how == "split4" else 4, 3,
                              padding=1)
        self.head = nn.Conv2D(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        c = y.shape[1]
        if self.how == "slice":
            a, b = y[:, :c // 2], y[:, c // 2:]
            y = paddle.concat([a, self.part(b)], axis=1)
        elif self.how == "split4":
            parts = paddle.split(y, 4, axis=1)
            y = paddle.concat(parts[:3] + [self.part(parts[3])], axis=1)
        else:
            a, b = paddle.chunk(y, 2, axis=1)
            y = paddle.concat([self.part(a), b], axis=1)
        return self.head(y)


@pytest.mark.parametrize("how", ["slice", "split4", "chunk"])
def test_equal_parts_prune_with_equal_counts(how):
    paddle.seed(0)
    net = EqualParts(how)
    groups = _groups(net)
    conv1 = groups["conv1"]
    assert conv1.prunable and conv1.partition is not None
    parts = 4 if how == "split4" else 2
    assert len(np.unique(conv1.partition)) == parts
    check_pruned(net, SHAPE, ratios={"conv1": 0.5, "part": 0.5})
    assert net.conv1.weight.shape[0] == 4


def test_literal_and_unequal_sizes_stay_whole():
    class Unequal(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
            self.head = nn.Conv2D(8, 3, 1)

        def forward(self, x):
            a, b = paddle.split(self.conv1(x), [3, 5], axis=1)
            return self.head(paddle.concat([b, a], axis=1))

    conv1 = _groups(Unequal())["conv1"]
    assert not conv1.prunable and "unequal or literal sizes" in conv1.reason


def test_nested_channel_shuffles_are_routed():
    pruner = FilterPruner(paddle.vision.models.shufflenet_v2_x0_25(num_classes=10), [1, 3, 32, 32])
    # one group per stage, once whole (nested splits of shuffled channels would need a
    # width-dependent channel order): now every producer's channels, routed per width
    routed = [pruner.groups[gi] for gi in sorted(pruner.graph.routed)]
    assert [g.name for g in routed] == [f"{s}_1._conv_linear_1.0" for s in (2, 3, 4)]
    assert all(g.prunable for g in routed)
    assert not [g for g in pruner.groups if "ShuffleNetV2 stages" in g.reason]


def test_half_slices_written_into_the_code_are_caught_by_a_trial_prune():
    class LiteralHalves(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
            self.half = 4  # written in: stays 4 after pruning
            self.head = nn.Conv2D(8, 3, 1)

        def forward(self, x):
            y = self.conv1(x)
            return self.head(paddle.concat([y[:, self.half:], y[:, :self.half]], axis=1))

    net = LiteralHalves()
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="conv1 left unpruned: split or slice sizes written"):
        conv1 = {g.name: g for g in FilterPruner(net, SHAPE).groups}["conv1"]
    assert not conv1.prunable and "did not reproduce masking" in conv1.reason
    assert all(np.array_equal(before[k], v.numpy()) for k, v in net.state_dict().items())


class ConvNeXtBlock(nn.Layer):
    """dwconv -> channels-last LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> LayerScale ->
    residual: the 4C hidden channels prune, and so does the residual stream (LayerNorm sliced,
    its statistics over the kept channels)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, dim, 2, stride=2)
        self.dwconv = nn.Conv2D(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = self.create_parameter([dim])
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dwconv(x).transpose([0, 2, 3, 1]))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        x = x + y.transpose([0, 3, 1, 2])
        return self.head(x.mean(axis=[2, 3]))


def test_convnext_block_prunes_its_mlp():
    paddle.seed(0)
    net = ConvNeXtBlock()
    groups = _groups(net)
    assert groups["pwconv1"].prunable and groups["stem"].prunable
    check_pruned(net, SHAPE, ratios={"pwconv1": 0.5, "stem": 0.5})
    assert net.pwconv1.weight.shape == [4, 16] and net.pwconv2.weight.shape == [16, 4]
    assert net.norm._normalized_shape == [4] and net.gamma.shape == [4]
