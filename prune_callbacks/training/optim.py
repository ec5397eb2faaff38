"""Rebuild an optimizer of the same kind over parameters that were shrunk in place by pruning.

The new optimizer keeps hyper-parameters, the very same LRScheduler object and the state of the
kept channels; it must never copy, re-create or reorder the parameters it drives.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import paddle

from ..layers.surgery import AxisSlice, ParamSlices, slice_array

logger = logging.getLogger(__name__)

OptimizerReader = Callable[[paddle.optimizer.Optimizer], dict[str, Any]]
"""Reads an optimizer's constructor kwargs (all but ``parameters``) back from the optimizer."""

_READERS: dict[type, OptimizerReader] = {}


def register_optimizer(cls: type, reader: OptimizerReader) -> None:
    """Teach :func:`rebuild_optimizer` how to rebuild another optimizer class.

    Args:
        cls: The optimizer class, matched exactly (subclasses need their own entry).
        reader: Returns the constructor kwargs of an instance, without ``parameters``.

    Raises:
        TypeError: If ``cls`` is not an optimizer class or ``reader`` is not callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, paddle.optimizer.Optimizer)):
        raise TypeError(f"cls must be a paddle.optimizer.Optimizer subclass, got {cls!r}")
    if not callable(reader):
        raise TypeError(f"reader must be callable, got {type(reader).__name__}")
    _READERS[cls] = reader


def _reader(weight_decay: Callable[[Any], Any] | None = None, **attrs: str) -> OptimizerReader:
    """Builds a reader: learning rate, grad clip, name, weight decay, plus kwarg <- private attribute."""
    def read(opt: paddle.optimizer.Optimizer) -> dict[str, Any]:
        kwargs = {"learning_rate": opt._learning_rate, "grad_clip": opt._grad_clip, "name": opt._name,
                  "weight_decay": weight_decay(opt) if weight_decay else opt.regularization}
        kwargs.update({kw: getattr(opt, attr) for kw, attr in attrs.items()})
        return kwargs
    return read


def _momentum_decay(opt: Any) -> Any:
    # Momentum folds a float/L2Decay weight decay into its kernel and keeps `regularization` None.
    if opt.regularization is not None:
        return opt.regularization
    return opt._regularization_coeff if opt._regularization_method == "l2_decay" else None


_ADAM = {"beta1": "_beta1", "beta2": "_beta2", "epsilon": "_epsilon", "lazy_mode": "_lazy_mode",
         "multi_precision": "_multi_precision", "amsgrad": "_amsgrad"}
register_optimizer(paddle.optimizer.SGD, _reader(multi_precision="_multi_precision"))
register_optimizer(paddle.optimizer.Momentum, _reader(
    _momentum_decay, momentum="_momentum", use_nesterov="_use_nesterov", rescale_grad="_rescale_grad",
    multi_precision="_multi_precision", use_multi_tensor="_use_multi_tensor"))
register_optimizer(paddle.optimizer.Adam, _reader(use_multi_tensor="_use_multi_tensor", **_ADAM))
register_optimizer(paddle.optimizer.AdamW, _reader(
    lambda opt: opt._weight_decay, lr_ratio="_lr_ratio", apply_decay_param_fun="_apply_decay_param_fun",
    use_lowprecision_moment="_use_lowprecision_moment", **_ADAM))
register_optimizer(paddle.optimizer.RMSProp, _reader(
    rho="_rho", epsilon="_epsilon", momentum="_momentum", centered="_centered"))
register_optimizer(paddle.optimizer.Adagrad, _reader(
    epsilon="_epsilon", initial_accumulator_value="initial_accumulator_value"))


def _copy_group(group: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(group, params=list(group["params"]))
    # Momentum stores an L2 group decay as regularization_method/coeff and blanks weight_decay.
    if out.get("regularization_method") == "l2_decay" and out.get("weight_decay") is None:
        out["weight_decay"] = out["regularization_coeff"]
    return out


def _is_blockwise(idx: AxisSlice) -> bool:
    return len(idx) > 0 and isinstance(idx[0], (Sequence, np.ndarray))


def _kept_count(idx: AxisSlice) -> int:
    """Size an axis has after keeping ``idx`` (per block for a grouped conv's input axis)."""
    return len(idx[0]) if _is_blockwise(idx) else len(idx)


def _largest(idx: AxisSlice) -> int:
    return max(max(block) for block in idx) if _is_blockwise(idx) else max(idx)


def _normalise(key: str, axis: int, idx: AxisSlice, shape: list[int]) -> AxisSlice:
    """Checks one axis slice against the already shrunk parameter; returns it as plain int lists."""
    if _is_blockwise(idx):
        blocks = [[int(i) for i in block] for block in idx]
        if axis == 0:
            raise ValueError(f"{key}: per-block kept indices are only valid on a grouped conv's input axis, "
                             f"not on axis 0")
        if any(len(b) != shape[axis] for b in blocks) or min(min(b) for b in blocks) < 0:
            raise ValueError(f"{key}: per-block kept indices on axis {axis} must keep {shape[axis]} valid "
                             f"indices in each of the {len(blocks)} blocks (the parameter now has shape "
                             f"{shape}); slice the parameters before rebuilding the optimizer")
        return blocks
    if len(idx) == 0 or len(idx) != shape[axis] or min(idx) < 0:
        raise ValueError(f"{key}: {len(idx)} kept indices on axis {axis} but the parameter now has "
                         f"shape {shape}; slice the parameters before rebuilding the optimizer")
    return [int(i) for i in idx]


def _slices_by_name(net: paddle.nn.Layer, param_slices: ParamSlices
                    ) -> dict[str, tuple[list[int], dict[int, AxisSlice]]]:
    """Maps each sliced parameter's ``param.name`` to (its new shape, {axis: kept indices})."""
    params = dict(net.named_parameters())
    out = {}
    for key, axes in param_slices.items():
        if key not in params:
            raise ValueError(f"param_slices names {key!r}, which is not a parameter of the network; "
                             f"valid names are {sorted(params)}")
        param = params[key]
        shape = list(param.shape)
        checked = {}
        for axis, idx in axes.items():
            if not 0 <= int(axis) < len(shape):
                raise ValueError(f"{key}: axis {axis} is out of range for shape {shape}")
            checked[int(axis)] = _normalise(key, int(axis), idx, shape)
        out[param.name] = (shape, checked)
    return out


@paddle.no_grad()
def _slice_state(tensor: paddle.Tensor, new_shape: list[int], axes: Mapping[int, AxisSlice]) -> paddle.Tensor:
    """A copy of ``tensor``, sliced like its parameter if it has the parameter's old shape."""
    shape = list(tensor.shape)
    # same rank and same size on the untouched axes: this is state of the parameter's (old) shape
    same_frame = len(shape) == len(new_shape) and all(
        shape[a] == n for a, n in enumerate(new_shape) if a not in axes)
    param_shaped = same_frame and all(
        shape[a] > _largest(idx) and (not _is_blockwise(idx) or shape[0] % len(idx) == 0)
        for a, idx in axes.items())
    if same_frame and not param_shaped and tensor.numel() > 1:  # numel 1: a counter such as beta1_pow
        raise ValueError(f"optimizer state {tensor.name} of shape {shape} cannot be sliced by {dict(axes)}: "
                         f"kept indices must lie within the parameter's original size")
    out = tensor.clone()
    # an axis that already has the kept size was sliced before (or loses nothing)
    todo = {a: idx for a, idx in axes.items() if shape[a] != _kept_count(idx)} if param_shaped else {}
    if todo:
        # Slice a grid of flat positions with surgery's own helper, then gather: the state is cut exactly
        # as its parameter was (per-block slices included) and keeps its dtype and place.
        picked = slice_array(np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape), todo)
        flat_idx = paddle.to_tensor(picked.ravel(), dtype="int64", place=out.place)
        out = paddle.gather(out.flatten(), flat_idx).reshape(list(picked.shape))
    out.name = tensor.name  # keep names so a checkpoint of the new optimizer loads in a fresh process
    out.persistable = True
    out.stop_gradient = True
    return out


def rebuild_optimizer(optimizer: paddle.optimizer.Optimizer, net: paddle.nn.Layer,
                      param_slices: ParamSlices) -> paddle.optimizer.Optimizer:
    """Builds a new optimizer of the same class over the already shrunk parameters of ``net``.

    The new optimizer drives exactly the parameter objects (and parameter groups) of the old one,
    with the same hyper-parameters and the same learning-rate scheduler object. Its accumulators and
    fp32 master weights are the old ones with the pruned channels removed; step counters such as
    Adam's beta powers carry on.

    Args:
        optimizer: The optimizer that trained the network before pruning. It is not modified.
        net: The pruned network; used to resolve the structured names in ``param_slices``.
        param_slices: ``{structured parameter name: {axis: kept indices in the original index
            space}}`` (``PrunePlan.param_slices``); on a grouped conv's input axis, one list of kept
            indices per block. Parameters not named are unchanged.

    Returns:
        The new optimizer.

    Raises:
        TypeError: If the optimizer class is not registered (see :func:`register_optimizer`).
        ValueError: If ``param_slices`` names an unknown parameter, an axis or index count that
            does not match the parameter's current shape, or indices beyond its original size.
    """
    reader = _READERS.get(type(optimizer))
    if reader is None:
        raise TypeError(
            f"rebuild_optimizer cannot rebuild {type(optimizer).__module__}.{type(optimizer).__name__}; "
            f"supported: {sorted(c.__name__ for c in _READERS)}. Register it with "
            f"prune_callbacks.register_optimizer(cls, reader), or build a new optimizer over "
            f"net.parameters() yourself (its state then starts afresh).")
    targets = _slices_by_name(net, param_slices)
    groups = optimizer._param_groups
    params = ([_copy_group(g) for g in groups] if groups and isinstance(groups[0], dict)
              else list(optimizer._parameter_list))
    new = type(optimizer)(parameters=params, **reader(optimizer))

    for pname, master in optimizer._master_weights.items():
        if pname in targets:
            targets[master.name] = targets[pname]  # accumulators of fp16 params live under the master
        new._master_weights[pname] = _slice_state(master, *targets.get(pname, (master.shape, {})))
    for acc_name, per_param in optimizer._accumulators.items():
        for owner, tensor in per_param.items():
            new._accumulators[acc_name][owner] = _slice_state(tensor, *targets.get(owner, (tensor.shape, {})))
            new._opti_name_list.append(tensor.name)
    if not optimizer._accumulators and optimizer._accumulators_holder:
        logger.warning("%s has loaded state (set_state_dict) that no step has applied yet; it is not "
                       "carried over to the rebuilt optimizer", type(optimizer).__name__)
    logger.info("rebuilt %s: %d parameter tensors sliced, %d accumulators carried over",
                type(optimizer).__name__, len(param_slices),
                sum(len(v) for v in optimizer._accumulators.values()))
    return new
