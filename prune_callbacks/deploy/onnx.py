"""Export a (pruned) network to ONNX through paddle2onnx, and save it for Paddle Inference.

Both exports trace the network in eval mode and give every sublayer its own mode back. ONNX needs
the optional extra (`pip install -e ".[onnx]"`); nothing here imports paddle2onnx or onnxruntime
before it is used. It never changes the network's weights or shapes.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from ..utils.modes import eval_mode
from ..planning.plans import recorded_plans

logger = logging.getLogger(__name__)

__all__ = ["export_onnx", "save_inference", "onnx_max_error", "require_onnx", "as_input_specs",
           "ONNX_EXTRA", "DEFAULT_OPSET"]

ONNX_EXTRA = 'pip install -e ".[onnx]"'
"""How to install what the ONNX export and the onnxruntime backend need (paddle2onnx, onnxruntime)."""
DEFAULT_OPSET = 13
# polygraphy (paddle2onnx's default optimiser) pip-installs onnx_graphsurgeon at run time and took
# 20 s on MobileNetV1; paddle2onnx 2.1's onnxoptimizer pass list names a pass that does not exist
# and falls back with a warning. ONNX Runtime folds constants itself when it loads the model.
_OPTIMIZE_TOOL = "None"

PathLike = Union[str, "os.PathLike[str]"]


def require_onnx(module: str = "paddle2onnx") -> Any:
    """Import `module` (paddle2onnx or onnxruntime), or say which extra installs it.

    Raises:
        ImportError: the module is absent; the message names the extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed: ONNX export and the onnxruntime backend need the "
                          f"'onnx' extra: {ONNX_EXTRA} (or pip install paddle2onnx onnxruntime)") from e


def _is_dim(d: Any) -> bool:
    return d is None or (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and (d > 0 or d == -1))


def as_input_specs(input_spec: Any, net: nn.Layer | None = None) -> list[InputSpec]:
    """Input specs from a shape (`[None, 3, 32, 32]`), a list of shapes, or InputSpecs.

    Unnamed inputs given as shapes are named `x`, `x1`, ... so the exported model's input names
    are stable. `None` takes the last recorded plan's input shape with a free batch size.

    Raises:
        TypeError, ValueError: not one of those forms, or `None` for a network with no plan.
    """
    if input_spec is None:
        plans = recorded_plans(net) if net is not None else []
        if not plans:
            raise ValueError("input_spec is required for a network with no recorded plans, e.g. "
                             "[None, 3, 32, 32] or [paddle.static.InputSpec([None, 3, 32, 32], 'float32')]")
        return [InputSpec([None, *plans[-1].input_shape[1:]], "float32", "x")]
    if isinstance(input_spec, InputSpec):
        return [input_spec]
    if not isinstance(input_spec, (list, tuple)) or not input_spec:
        raise TypeError(f"input_spec must be a shape such as [None, 3, 32, 32], a list of shapes or a list "
                        f"of paddle.static.InputSpec, got {input_spec!r}")
    if all(isinstance(s, InputSpec) for s in input_spec):
        return list(input_spec)
    if all(_is_dim(d) for d in input_spec):
        shapes = [input_spec]
    elif all(isinstance(s, (list, tuple)) and s and all(_is_dim(d) for d in s) for s in input_spec):
        shapes = list(input_spec)
    else:
        raise ValueError(f"input_spec {input_spec!r} is not a shape (positive ints, None or -1), a list of "
                         f"shapes, or a list of paddle.static.InputSpec")
    return [InputSpec(list(s), "float32", "x" if i == 0 else f"x{i}") for i, s in enumerate(shapes)]


def _layer(net: Any) -> nn.Layer:
    if isinstance(net, paddle.Model):
        net = net.network
    if isinstance(net, paddle.DataParallel):
        net = net._layers
    if not isinstance(net, nn.Layer):
        raise TypeError(f"net must be a paddle.nn.Layer (or a paddle.Model), got {type(net).__name__}")
    return net


def _prefix(path_prefix: Any) -> str:
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise TypeError(f"path_prefix must be a str or os.PathLike such as 'inference/model', "
                        f"got {type(path_prefix).__name__}")
    prefix = os.fspath(path_prefix)
    if prefix.endswith(".onnx"):
        prefix = prefix[: -len(".onnx")]
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise ValueError(f"path_prefix must be a file prefix such as 'inference/model' (it writes "
                         f"'inference/model.onnx'), got {prefix!r}")
    return prefix


def save_inference(net: nn.Layer, path_prefix: str, specs: Sequence[InputSpec]) -> tuple[str, str]:
    """`paddle.jit.save` in eval mode; the (model, params) files Paddle Inference reads.

    Returns:
        `(<prefix>.json, <prefix>.pdiparams)` (`.pdmodel` instead of `.json` when PIR is off).
    """
    with eval_mode(net):
        paddle.jit.save(net, path_prefix, input_spec=list(specs))
    model = path_prefix + ".json"
    if not os.path.exists(model):
        model = path_prefix + ".pdmodel"
    return model, path_prefix + ".pdiparams"


def export_onnx(net: Any, path_prefix: PathLike, input_spec: Any = None,
                opset_version: int = DEFAULT_OPSET) -> str:
    """Write `<path_prefix>.onnx`: the (pruned) network traced in eval mode, through paddle2onnx.

    The network is saved with `paddle.jit.save` into a temporary folder and converted from there;
    the train/eval mode of every sublayer is restored afterwards.

    Args:
        net: a `paddle.nn.Layer` (or a `paddle.Model`: its network).
        path_prefix: file prefix (`"inference/model"` writes `inference/model.onnx`).
        input_spec: a shape with `None` for a free batch size (`[None, 3, 32, 32]`), a list of shapes,
            or a list of `paddle.static.InputSpec`; default: the last recorded plan's input shape.
        opset_version: the ONNX opset (paddle2onnx raises it when an op needs a newer one).

    Returns:
        The path of the `.onnx` file.

    Raises:
        ImportError: paddle2onnx is not installed (the message names the extra).
        TypeError, ValueError: a bad network, path or input spec.
        RuntimeError: paddle2onnx could not convert the network (the message holds its error).

    Examples:
        >>> path = export_onnx(net, "inference/pruned", [None, 3, 32, 32])
        >>> import onnxruntime
        >>> session = onnxruntime.InferenceSession(path)
    """
    p2o = require_onnx("paddle2onnx")
    layer = _layer(net)
    prefix = _prefix(path_prefix)
    specs = as_input_specs(input_spec, layer)
    if not isinstance(opset_version, int) or not 7 <= opset_version <= 21:
        raise ValueError(f"opset_version must be an int in 7..21, got {opset_version!r}")
    out = prefix + ".onnx"
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    before = os.stat(out).st_mtime_ns if os.path.exists(out) else None
    with tempfile.TemporaryDirectory(prefix="prune_onnx_") as tmp:
        model, params = save_inference(layer, os.path.join(tmp, "model"), specs)
        try:
            p2o.export(model, params, out, opset_version=opset_version, optimize_tool=_OPTIMIZE_TOOL)
        except Exception as e:  # paddle2onnx logs its own error and fails later with another
            raise RuntimeError(f"paddle2onnx could not convert {type(layer).__name__}: {e!r}; see the "
                               f"[Paddle2ONNX] log above for the op it stopped at") from e
    if not os.path.exists(out) or os.stat(out).st_mtime_ns == before:
        raise RuntimeError(f"paddle2onnx wrote no {out!r} for {type(layer).__name__}; see the "
                           f"[Paddle2ONNX] log above for the op it stopped at")
    logger.info("exported %s to ONNX: %s", type(layer).__name__, out)
    return out


def onnx_max_error(net: Any, onnx_path: PathLike, inputs: Sequence[np.ndarray]) -> float:
    """Largest absolute difference between the network's outputs (eval mode) and ONNX Runtime's.

    Args:
        net: the network that was exported.
        onnx_path: its `.onnx` file.
        inputs: one array per model input, in order.

    Returns:
        max |paddle - onnxruntime| over every output.

    Raises:
        ImportError: onnxruntime is not installed (the message names the extra).
    """
    ort = require_onnx("onnxruntime")
    layer = _layer(net)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # paddle2onnx leaves unused initializers: ORT warns, harmlessly
    session = ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(x) for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    with eval_mode(layer), paddle.no_grad():
        want = layer(*[paddle.to_tensor(x) for x in inputs])
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    if len(want) != len(got):
        raise ValueError(f"the network has {len(want)} outputs, the ONNX model {len(got)}")
    return max(float(np.max(np.abs(w.numpy() - g))) for w, g in zip(want, got))
