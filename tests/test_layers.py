"""Per-layer-type extension point: registration, class-hierarchy lookup, the compatibility
wrappers (surgery.register_layer, flops.register_flops, layers.register_output_axis), channel
roles, and the op-callstack switch the tracer uses."""
from __future__ import annotations

import threading
import traceback

import paddle
import paddle.nn as nn
import pytest

from prune_callbacks import FilterPruner, count_flops
from prune_callbacks.layers import registry as layers
from prune_callbacks.layers import surgery
from prune_callbacks.graph import tracing
from prune_callbacks.graph.tracing import MacKind, Role
from prune_callbacks.layers.registry import (ConvPruning, LayerPruning, lookup_by_class,
                                    output_channel_axis, register_layer_type, supports_layer)


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(layers, "_HANDLERS", dict(layers._HANDLERS))


class MyConv(nn.Conv2D):
    pass


class Plain(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.w = self.create_parameter([4])

    def forward(self, x):
        return x


# --- lookup -----------------------------------------------------------------------------------

def test_lookup_takes_the_nearest_registered_class():
    table = {nn.Layer: "layer", nn.Conv2D: "conv"}
    assert lookup_by_class(table, MyConv) == "conv"
    assert lookup_by_class(table, nn.ReLU) == "layer"
    assert lookup_by_class(table, nn.Conv2D, inherited=True) == "layer"
    assert lookup_by_class({nn.Conv2D: 1}, nn.ReLU) is None


# --- built-in types ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer, sliceable, axis", [
    (nn.Conv2D(3, 4, 3), True, 1),
    (nn.Conv2D(3, 4, 3, data_format="NHWC"), True, -1),
    (MyConv(3, 4, 3), True, 1),
    (nn.BatchNorm2D(4), True, 1),
    (nn.BatchNorm2D(4, data_format="NHWC"), True, -1),
    (nn.BatchNorm(4), True, 1),
    (nn.InstanceNorm2D(4), True, 1),
    (nn.Linear(3, 4), True, -1),
    (nn.Conv1D(3, 4, 3), False, 1),
    (nn.Conv1D(3, 4, 3, data_format="NLC"), False, -1),
    (nn.Conv3D(3, 4, 3), False, 1),
    (nn.LayerNorm(4), True, None),  # sliced; its output cannot be masked (statistics)
    (nn.ReLU(), False, None),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Layer) else str(v))
def test_built_in_types(layer, sliceable, axis):
    assert supports_layer(layer) is sliceable
    assert output_channel_axis(layer) == axis


def test_conv_macs_count_groups_and_positions():
    conv = nn.Conv2D(4, 8, 3, padding=1, groups=2)
    assert count_flops(conv, [1, 4, 5, 5]) == 8 * 2 * 9 * 25
    assert count_flops(nn.Linear(3, 4), [2, 3]) == 12  # axis 0 (the batch) is not counted


# --- register_layer_type ----------------------------------------------------------------------

def test_register_layer_type_as_decorator_or_call():
    @register_layer_type(Plain)
    class PlainPruning(LayerPruning):
        def macs(self, layer, output):
            return 7

    assert PlainPruning.__name__ == "PlainPruning"  # the decorator returns the class
    assert isinstance(layers.layer_handler(Plain()), PlainPruning)
    assert supports_layer(Plain()) and output_channel_axis(Plain()) is None
    assert count_flops(Plain(), [1, 4]) == 7

    handler = ConvPruning()
    assert register_layer_type([Plain, MyConv], handler) is handler
    assert layers.layer_handler(Plain()) is handler
    assert layers.layer_handler(MyConv(1, 1, 1)) is handler


def test_register_layer_type_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"paddle\.nn\.Layer subclasses.*not an instance"):
        register_layer_type(nn.ReLU(), LayerPruning())
    with pytest.raises(TypeError, match="paddle.nn.Layer subclasses"):
        register_layer_type(int, LayerPruning())
    with pytest.raises(TypeError, match="LayerPruning instance or subclass"):
        register_layer_type(Plain, lambda layer, old: None)


def test_unsupported_layer_surgery_error_names_the_fix():
    net = nn.Sequential(Plain())
    with pytest.raises(TypeError,
                       match=r"'0' \(Plain\) has no registered surgery.*register_layer_type"):
        surgery.apply_slices(net, {"0.w": {0: [0, 1]}})


# --- roles ------------------------------------------------------------------------------------

def test_roles_are_string_enums():
    assert Role.IN == "in" and str(Role.OUT) == "out" and f"{Role.NORM}" == "norm"
    assert MacKind.DEPTHWISE == "depthwise"
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(3, 4, 3), nn.BatchNorm2D(4), nn.Conv2D(4, 2, 1))
    axes = FilterPruner(net, [1, 3, 6, 6]).graph.param_axes
    assert axes[("0.weight", 0)].role is Role.OUT and axes[("2.weight", 1)].role == "in"
    assert axes[("1.weight", 0)].role is Role.NORM


# --- op callstacks ----------------------------------------------------------------------------

def test_op_callstacks_are_skipped_only_on_the_tracing_thread_and_restored():
    original = traceback.extract_stack
    other = []
    with pytest.raises(RuntimeError, match="boom"):
        with tracing._no_op_callstacks():
            assert len(traceback.extract_stack()) == 0
            assert len(traceback.extract_stack(limit=2)) > 0  # explicit calls are left alone
            with tracing._no_op_callstacks():  # nested
                assert len(traceback.extract_stack()) == 0
            assert len(traceback.extract_stack()) == 0
            t = threading.Thread(target=lambda: other.append(len(traceback.extract_stack())))
            t.start()
            t.join()
            raise RuntimeError("boom")
    assert other and other[0] > 0
    assert traceback.extract_stack is original
    assert len(traceback.extract_stack()) > 0


def test_tracing_leaves_extract_stack_alone():
    original = traceback.extract_stack
    FilterPruner(nn.Sequential(nn.Conv2D(3, 4, 3), nn.Conv2D(4, 2, 1)), [1, 3, 6, 6]).groups
    assert traceback.extract_stack is original
