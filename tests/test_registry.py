"""The README's extension recipe as written: a custom layer and a custom op, then an exact prune.

The network uses a layer the package has never heard of (one learnable scale per channel) and an
op the tracer has no handler for (`erf`). The unknown op keeps conv1's channels; the layer, once
the op is known, prunes because a trial prune shows its `channels` int right when kept in sync;
registered in the README's few lines, the network prunes and the pruned output equals the
masked one.
"""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from prune_callbacks import FilterPruner, count_flops
from prune_callbacks.layers import registry as layers
from prune_callbacks.graph import tracing


@pytest.fixture
def isolated_registries(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(layers, "_HANDLERS", dict(layers._HANDLERS))
    monkeypatch.setattr(tracing, "OP_HANDLERS", dict(tracing.OP_HANDLERS))


# --- the README snippet's layer -------------------------------------------------------------
class ChannelScale(nn.Layer):  # a layer of your own: one learnable scale per channel
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.scale = self.create_parameter([channels],
                                           default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return x * self.scale.reshape([1, -1, 1, 1])


class _Net(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.gain = ChannelScale(8)
        self.conv2 = nn.Conv2D(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = paddle.erf(self.gain(self.conv1(x)))
        y = F.relu(self.conv2(y))
        return self.fc(paddle.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _register_as_in_readme():
    # --- the README snippet, verbatim from here -----------------------------------------------
    from prune_callbacks import register_op
    from prune_callbacks.layers.registry import LayerPruning, register_layer_type

    @register_layer_type(ChannelScale)  # its surgery, FLOPs and output channels, in one place
    class ChannelScalePruning(LayerPruning):
        def sync(self, layer, old_shapes):  # parameters were just sliced: update the size
            layer.channels = layer.scale.shape[0]

        def output_channel_axis(self, layer):  # where its output carries channels
            return 1

    @register_op("erf")  # an op the tracer does not know: channels pass through it unchanged
    def _(state, op, ins, outs):
        outs[0].ids = state.ids_of(ins[0])
    # --- end of the snippet --------------------------------------------------------------------
    return ChannelScalePruning


def _run(net: nn.Layer, x: paddle.Tensor) -> np.ndarray:
    net.eval()
    with paddle.no_grad():
        return net(x).numpy()


SHAPE = [1, 3, 6, 6]


def test_unregistered_layer_and_op_keep_their_channels(isolated_registries):
    paddle.seed(0)
    with pytest.warns(UserWarning, match=r"left unpruned: pd_op\.erf \(x1\).*register_op"):
        pruner = FilterPruner(_Net(), SHAPE)
    conv1 = {g.name: g for g in pruner.groups}["conv1"]
    assert not conv1.prunable and "op pd_op.erf is not supported" in conv1.reason

    tracing.register_op("erf")(lambda state, op, ins, outs: setattr(outs[0], "ids",
                                                                     state.ids_of(ins[0])))
    # no handler for ChannelScale: its scale is sliced as a plain parameter, and the trial
    # prune on a copy decides its `channels` int (kept in sync, which leaves the output right)
    net = _Net()
    net.gain.scale.set_value(np.linspace(0.5, 1.5, 8).astype("float32"))
    pruner = FilterPruner(net, SHAPE)
    assert {g.name: g for g in pruner.groups}["conv1"].prunable
    x = paddle.randn(SHAPE)
    with pruner.mask({"conv1": 0.5}):
        masked = _run(net, x)
    pruner.prune({"conv1": 0.5})
    assert net.gain.channels == 4 and net.gain.scale.shape == [4]
    np.testing.assert_allclose(_run(net, x), masked, rtol=1e-5, atol=1e-6)


def test_readme_recipe_prunes_the_custom_layer_exactly(isolated_registries):
    handler_cls = _register_as_in_readme()
    paddle.seed(0)
    net = _Net()
    net.gain.scale.set_value(np.linspace(0.5, 1.5, 8).astype("float32"))
    net.conv1.bias.set_value(np.linspace(-0.2, 0.2, 8).astype("float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # erf is understood now
        pruner = FilterPruner(net, SHAPE)
    by_name = {g.name: g for g in pruner.groups}
    assert by_name["conv1"].prunable and ("gain.scale", 0) in by_name["conv1"].members
    assert isinstance(layers.layer_handler(net.gain), handler_cls)
    assert layers.output_channel_axis(net.gain) == 1

    x = paddle.randn(SHAPE)
    ratios = {"conv1": 0.5, "conv2": 0.5}
    full = _run(net, x)
    with pruner.mask(ratios):
        masked = _run(net, x)
    assert not np.allclose(full, masked)  # the removed channels mattered
    analytic = pruner.flops(ratios)
    pruner.prune(ratios)
    assert net.gain.channels == 4 and net.gain.scale.shape == [4]
    assert net.conv1.weight.shape == [4, 3, 3, 3] and net.conv2.weight.shape == [3, 4, 3, 3]
    np.testing.assert_allclose(_run(net, x), masked, rtol=1e-5, atol=1e-6)
    assert count_flops(net, SHAPE) == analytic
