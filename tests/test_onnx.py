"""ONNX export: a pruned network's ONNX Runtime outputs equal Paddle's; a clear error without the extra."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import paddle
import pytest
from paddle.static import InputSpec
from paddle.vision.models import mobilenet_v1, resnet18

from prune_callbacks import FilterPruner
from prune_callbacks.deploy.onnx import as_input_specs, export_onnx, onnx_max_error

MISSING = [m for m in ("paddle2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not installed: "
                                                      f"pip install -e \".[onnx]\"")


def _random_bn_stats(net: paddle.nn.Layer, seed: int = 0) -> None:
    """Fresh BatchNorm statistics are 0 and 1: random ones make eval-mode export matter."""
    rng = np.random.default_rng(seed)
    for layer in net.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            n = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, n).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, n).astype("float32"))


@needs_onnx
@pytest.mark.parametrize("build, prune", [
    (mobilenet_v1, "uniform"),
    (resnet18, "ratios"),
])
def test_pruned_network_onnx_matches_paddle(tmp_path, build, prune) -> None:
    paddle.seed(0)
    net = build(num_classes=10)
    _random_bn_stats(net)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    if prune == "uniform":
        plan = pruner.prune_to_flops(0.4, strategy="uniform", round_to=8)
    else:  # residual groups (the coupled adds) and plain convs, odd counts
        names = [g.name for g in pruner.prunable_groups]
        plan = pruner.prune({name: 0.3 + 0.05 * (i % 3) for i, name in enumerate(names)})
    assert plan.pruned_flops > 0.2
    net.train()
    path = export_onnx(net, tmp_path / "pruned", [None, 3, 32, 32])
    assert path == str(tmp_path / "pruned.onnx")
    assert net.training and all(layer.training for layer in net.sublayers())  # modes given back
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype("float32")  # a free batch size
    assert onnx_max_error(net, path, [x]) < 1e-4


@needs_onnx
def test_export_onnx_takes_the_recorded_plan_shape_and_input_specs(tmp_path, tiny_net) -> None:
    net = tiny_net()
    FilterPruner(net, [1, 3, 12, 12]).prune({"c1.0": 0.5})
    path = export_onnx(net, tmp_path / "a" / "tiny.onnx")  # folders made, '.onnx' not doubled
    assert path.endswith("a/tiny.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype("float32")
    assert onnx_max_error(net, path, [x]) < 1e-4
    spec = [InputSpec([None, 3, 12, 12], "float32", "image")]
    assert onnx_max_error(net, export_onnx(net, tmp_path / "b", spec), [x]) < 1e-4


def test_export_onnx_errors_name_the_fix(tmp_path, tiny_net) -> None:
    net = tiny_net()
    with pytest.raises(ValueError, match="input_spec is required"):
        as_input_specs(None, net)
    with pytest.raises(ValueError, match="is not a shape"):
        as_input_specs([None, "3", 32], net)
    with pytest.raises(TypeError, match="paddle.nn.Layer"):
        export_onnx("net", tmp_path / "x", [None, 3, 12, 12])
    with pytest.raises(ValueError, match="file prefix"):
        export_onnx(net, str(tmp_path) + "/", [None, 3, 12, 12])


def test_missing_extra_names_it(monkeypatch, tmp_path, tiny_net) -> None:
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # `import paddle2onnx` now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[onnx\]"'):
        export_onnx(tiny_net(), tmp_path / "x", [None, 3, 12, 12])
