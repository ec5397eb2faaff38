"""Save a pruned network with the plans that shaped it, load it into a freshly built one, export it.

A checkpoint is paddle's own files (`.pdparams`, `.pdopt`) plus `<prefix>.prune.json`, the ordered
plans; loading rebuilds the shapes by re-applying those plans (without a plan file, from the weights'
shapes: `deploy.shapes`). Never pickle layers or plans, never
replace a method of the user's Model, never import the pruner facade or the callbacks.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import paddle
import paddle.nn as nn

from ..graph.channels import ChannelGraph
from ..graph.training_graph import LATER
from ..utils.modes import eval_mode
from ..planning.plans import PrunePlan, record_plan, recorded_plans
from ..utils.files import atomic_path, replace_with, write_json_atomic
from ..layers.surgery import apply_slices, supports_layer
from .shapes import shrink_to_shapes

logger = logging.getLogger(__name__)

__all__ = ["save_pruned", "load_pruned", "read_plans", "reapply_plan", "export", "PLANS_SUFFIX",
           "PLANS_FORMAT"]

PLANS_SUFFIX = ".prune.json"
"""Suffix of the plan file written beside ``<prefix>.pdparams``."""
PLANS_FORMAT = 1
_PRODUCER = "prune_callbacks.io"
_EXPORT_SUFFIXES = (".json", ".pdmodel", ".pdiparams", ".pdiparams.info")
_KNOWN_SUFFIXES = (PLANS_SUFFIX, ".pdparams", ".pdopt")

Target = Union[paddle.Model, nn.Layer]
PathLike = Union[str, "os.PathLike[str]"]


# -- which plans shaped a network ----------------------------------------------------------------
def _unwrap(target: Any, what: str = "model_or_net") -> tuple[paddle.Model | None, nn.Layer]:
    if isinstance(target, paddle.Model):
        net = target.network
        model: paddle.Model | None = target
    elif isinstance(target, nn.Layer):
        net, model = target, None
    else:
        raise TypeError(f"{what} must be a paddle.Model or a paddle.nn.Layer, got {type(target).__name__}")
    if isinstance(net, paddle.DataParallel):
        net = net._layers
    return model, net


# -- saving ------------------------------------------------------------------------------------
def _prefix(path: Any, arg: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a str or os.PathLike file prefix such as 'ckpt/final', "
                        f"got {type(path).__name__}")
    path = os.fspath(path)
    for suffix in _KNOWN_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"{arg} must be a file prefix such as 'ckpt/final' (files 'ckpt/final.pdparams' "
                         f"and so on are written beside it), got {path!r}")
    return path


def _header(net: nn.Layer, plans: Sequence[PrunePlan]) -> dict[str, Any]:
    return {
        "format": PLANS_FORMAT,
        "producer": _PRODUCER,
        "network": type(net).__name__,
        # each parameter's unique name at save time: lets the optimizer state be matched again
        "param_names": {key: p.name for key, p in net.named_parameters()},
        "plans": [p.to_dict() for p in plans],
    }


def _write_plans(prefix: str, net: nn.Layer, plans: Sequence[PrunePlan]) -> str:
    path = prefix + PLANS_SUFFIX
    write_json_atomic(path, _header(net, plans))
    logger.info("wrote %d pruning plan(s) to %s", len(plans), path)
    return path


def _as_plans(plans: Any) -> list[PrunePlan]:
    if isinstance(plans, (PrunePlan, dict, str, bytes)) or not isinstance(plans, Sequence):
        raise TypeError(f"plans must be a list of PrunePlan in the order they were applied, "
                        f"got {type(plans).__name__}")
    out = []
    for i, p in enumerate(plans):
        if isinstance(p, dict):
            p = PrunePlan.from_dict(p)
        if not isinstance(p, PrunePlan):
            raise TypeError(f"plans[{i}] must be a PrunePlan (or its to_dict()), got {type(p).__name__}")
        out.append(p)
    return out


def save_pruned(model_or_net: Target, path_prefix: PathLike,
                plans: Sequence[PrunePlan] | None = None) -> list[str]:
    """Save a (pruned) network's weights and the plans that shaped it.

    Writes ``<prefix>.pdparams`` (the state_dict, as ``paddle.save``), for a ``paddle.Model`` also
    ``<prefix>.pdopt`` and ``<prefix>.pdscaler`` (the files ``model.save(prefix)`` writes), and
    ``<prefix>.prune.json``: a format-versioned header with the plans as dicts, oldest first.
    Every file is written to a temp file beside it, flushed to disk and renamed over the old one,
    in that order (weights first, plans last): a kill at any moment leaves every file whole, old
    or new, so the previous checkpoint under the same prefix still loads. (Only a kill in the
    milliseconds between the renames of a save whose plans differ from the previous save's can
    pair new weights with old plans; ``load_pruned`` then says the shapes do not fit.) Modes
    follow the umask, as ``paddle.save``'s.
    :func:`load_pruned` reads them back into a freshly built network.

    Args:
        model_or_net: a ``paddle.Model`` or a ``paddle.nn.Layer``.
        path_prefix: file prefix such as ``"ckpt/pruned"`` (a ``.pdparams`` suffix is dropped).
        plans: the plans applied to the network, oldest first. Default: :func:`recorded_plans`
            (those recorded with :func:`record_plan`, as FilterPruner and the callbacks do). A network
            with no plans is saved as unpruned (an empty list).

    Returns:
        The paths written (nothing on a Model's non-zero local rank, as ``model.save``).

    Raises:
        TypeError: not a Model or Layer, a bad path type, or ``plans`` not a list of PrunePlan.
        ValueError: ``path_prefix`` is empty or a directory.

    Examples:
        >>> save_pruned(model, "ckpt/pruned")       # ckpt/pruned.pdparams, .pdopt, .prune.json
        >>> net = load_pruned(build_net(), "ckpt/pruned")
    """
    model, net = _unwrap(model_or_net)
    prefix = _prefix(path_prefix, "path_prefix")
    plans = recorded_plans(model_or_net) if plans is None else _as_plans(plans)
    if not plans:
        logger.info("no pruning plans recorded for %s: saving it as an unpruned network", type(net).__name__)
    directory = os.path.dirname(prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if model is not None and paddle.distributed.ParallelEnv().local_rank != 0:
        return []
    written = []
    for suffix, state in _states(model, net):
        with atomic_path(prefix + suffix) as tmp:
            paddle.save(state, tmp)
        written.append(prefix + suffix)
    return written + [_write_plans(prefix, net, plans)]


def _states(model: paddle.Model | None, net: nn.Layer) -> list[tuple[str, Any]]:
    """What ``model.save(prefix)`` writes, by file suffix: weights, optimizer and AMP scaler state
    (the last two only when not empty, as paddle does)."""
    out: list[tuple[str, Any]] = [(".pdparams", net.state_dict())]
    if model is None:
        return out
    opt = model._optimizer
    if opt is not None and opt.state_dict():
        out.append((".pdopt", opt.state_dict()))
    scaler = getattr(model, "_scaler", None)
    if scaler is not None and scaler.state_dict():
        out.append((".pdscaler", scaler.state_dict()))
    return out


# -- loading -----------------------------------------------------------------------------------
def read_plans(path: PathLike) -> list[PrunePlan]:
    """The plans stored beside a checkpoint (``path``: its prefix, ``.pdparams`` or ``.prune.json``)."""
    return list(_read_header(_prefix(path, "path"))["plans"])


def _read_header(prefix: str) -> dict[str, Any]:
    path = prefix + PLANS_SUFFIX
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no plan file {path!r}: the checkpoint {prefix!r} was not made by "
            f"prune_callbacks.save_pruned nor by the PrunedModelCheckpoint callback (model.save and "
            f"paddle's ModelCheckpoint write no plans). load_pruned still loads it: it reads the "
            f"architecture from the weights' shapes.")
    try:
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {path!r} is not valid JSON ({e}); it is damaged") from e
    if not isinstance(header, dict) or header.get("producer") != _PRODUCER or "plans" not in header:
        raise ValueError(f"{path!r} is not a plan file written by {_PRODUCER}")
    if header.get("format") != PLANS_FORMAT:
        raise ValueError(f"plan file {path!r} has format {header.get('format')!r}; this version of "
                         f"prune_callbacks reads format {PLANS_FORMAT}")
    try:
        header["plans"] = [PrunePlan.from_dict(d) for d in header["plans"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"plan file {path!r} holds a damaged plan: {e!r}") from e
    return header


def _same_plan(a: PrunePlan, b: PrunePlan) -> bool:
    # through JSON: an in-memory plan and its reloaded copy differ only in tuple vs list
    return json.loads(json.dumps(a.to_dict())) == json.loads(json.dumps(b.to_dict()))


def _plans_to_apply(net: nn.Layer, plans: list[PrunePlan], where: str) -> list[PrunePlan]:
    done = recorded_plans(net)
    if len(done) <= len(plans) and all(_same_plan(a, b) for a, b in zip(done, plans)):
        return plans[len(done):]
    raise ValueError(
        f"the network was already pruned by {len(done)} plan(s) that do not begin the {len(plans)} "
        f"plan(s) of {where}; load into a freshly built network")


def _check_keys(net: nn.Layer, state: dict[str, Any], where: str, network: str | None) -> None:
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        made_by = f" (it was saved from a {network})" if network else ""
        raise ValueError(
            f"{where}{made_by} does not match {type(net).__name__}: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Build the network with the same architecture and "
            f"arguments as the saved one.")


def _check_shapes(net: nn.Layer, state: dict[str, Any], where: str, n_plans: int) -> None:
    bad = [(k, list(state[k].shape), list(v.shape)) for k, v in net.state_dict().items()
           if list(state[k].shape) != list(v.shape)]
    if bad:
        lines = "; ".join(f"{k}: checkpoint {a}, network {b}" for k, a, b in bad[:8])
        raise ValueError(
            f"{len(bad)} tensor(s) of {where} do not fit the network after re-applying its {n_plans} "
            f"plan(s): {lines}{' ...' if len(bad) > 8 else ''}. The plans saved with the weights must be "
            f"all the plans that pruned the network: record every pruning step with "
            f"prune_callbacks.record_plan(model_or_net, plan) (or pass plans=[...] to save_pruned), "
            f"and load into a network built like the saved one. If the plan file is older than the "
            f"weights, load_pruned(..., from_shapes=True) reads the architecture from the weights' "
            f"shapes alone.")


def _load_file(path: str) -> Any:
    """``paddle.load(path)``, with an error naming the file when it is empty or damaged."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes): it was cut off while being written (a kill "
                         f"during a save by another tool); load an earlier checkpoint")
    try:
        return paddle.load(path)
    except (EOFError, ValueError, RuntimeError, OSError, TypeError, KeyError, IndexError,
            AttributeError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path!r} cannot be read ({type(e).__name__}: {e}); it is damaged or not "
                         f"a paddle.save file: load an earlier checkpoint") from e


def _load_scaler(model: paddle.Model, prefix: str) -> bool:
    """Restore the AMP GradScaler state ``model.save`` wrote (``<prefix>.pdscaler``), if both exist."""
    path = prefix + ".pdscaler"
    if not os.path.exists(path):
        return False
    scaler = getattr(model, "_scaler", None)
    adapter = getattr(model, "_adapter", None)
    if scaler is None and getattr(adapter, "_amp_level", "O0") != "O0":
        # paddle makes the scaler on the first training batch, only when there is none yet: made
        # here the same way, it is the one fit trains with
        scaler = model._scaler = paddle.amp.GradScaler(**adapter._amp_configs)
    if scaler is None:
        logger.info("%s not loaded: the model was prepared without AMP (amp_configs) and has no loss "
                    "scaler", path)
        return False
    scaler.load_state_dict(_load_file(path))
    return True


def _rename_state(saved: dict[str, Any], rename: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Optimizer state keyed by this process's parameter names instead of the saving process's."""
    olds = sorted(rename, key=len, reverse=True)  # longest first: 'fc_1.w_0' before 'fc_1.w'
    out: dict[str, Any] = {}
    unmatched = []
    for key, value in saved.items():
        if key == "LR_Scheduler":
            out[key] = value
        elif key == "master_weights":
            out[key] = {rename.get(k, k): v for k, v in value.items()}
        else:
            old = next((o for o in olds if key.startswith(o + "_")), None)
            if old is None:
                unmatched.append(key)
                out[key] = value
            else:
                out[rename[old] + key[len(old):]] = value
    return out, unmatched


def _load_optimizer(model: paddle.Model, net: nn.Layer, prefix: str, header: dict[str, Any],
                    state: dict[str, Any]) -> bool:
    opt_path = prefix + ".pdopt"
    if not os.path.exists(opt_path):
        return False
    if model._optimizer is None:
        logger.info("%s not loaded: the model has no optimizer yet (model.prepare(optimizer, ...) before "
                    "load_pruned resumes its state)", opt_path)
        return False
    old_names = header.get("param_names") or {k: v.name for k, v in state.items()}
    rename = {old_names[k]: p.name for k, p in net.named_parameters() if k in old_names}
    saved, unmatched = _rename_state(_load_file(opt_path), rename)
    if unmatched:
        logger.warning("%d optimizer tensors of %s belong to no parameter of the network: %s",
                       len(unmatched), opt_path, unmatched[:5])
    try:
        model._optimizer.set_state_dict(saved)
    except (AssertionError, KeyError, ValueError) as e:
        raise ValueError(
            f"the optimizer state in {opt_path!r} does not fit the model's "
            f"{type(model._optimizer).__name__} ({e}); prepare the model with the optimizer (and LR "
            f"scheduler) it was trained with, or pass optimizer=False to start the optimizer afresh") from e
    return True


def reapply_plan(net: nn.Layer, plan: PrunePlan) -> None:
    """Prune `net` exactly as `plan` pruned the network it was made on (its parameter slices),
    and record the plan on `net` (so `save_pruned(net, ...)` saves it).

    The one way to re-apply a plan (`load_pruned` calls it for each saved plan). The network is
    traced at the plan's input shape first, to check that every group of the plan exists with
    the channel count the plan was made for.

    Examples:
        >>> plan = FilterPruner(net, [1, 3, 32, 32]).prune({"conv1.0": 0.5})
        >>> reapply_plan(fresh_net, PrunePlan.load("plan.json"))  # fresh_net now equals net's shapes

    Raises:
        ValueError: a group of the plan is missing, or has another channel count.
        KeyError: a parameter of the plan is missing.
    """
    # names and counts only: a training forward that needs targets is not traced (LATER)
    groups = {g.name: g for g in ChannelGraph(net, plan.input_shape, supports_layer,
                                              train_inputs=LATER).groups}
    for gp in plan.groups:
        g = groups.get(gp.name)
        if g is None:
            raise ValueError(f"no group {gp.name!r} in this network; apply plans in the order they were made")
        if g.channels != gp.channels:
            raise ValueError(
                f"plan was made for {gp.channels} channels in group {gp.name!r}, but this "
                f"network has {g.channels}; apply plans in the order they were made")
    _check_slices(net, plan)
    apply_slices(net, {k: dict(axes) for k, axes in plan.param_slices.items()})
    record_plan(net, plan)  # as saved, its criterion included


def _check_slices(net: nn.Layer, plan: PrunePlan) -> None:
    """Every parameter and index of the plan exists in `net`: a damaged plan must not half-prune."""
    params = dict(net.named_parameters())
    for key, axes in plan.param_slices.items():
        if key not in params:
            raise ValueError(f"the plan slices parameter {key!r}, which this network does not have")
        shape = list(params[key].shape)
        for axis, idx in axes.items():
            if not 0 <= int(axis) < len(shape):
                raise ValueError(f"the plan slices axis {axis} of {key!r}, which has shape {shape}")
            flat = [i for block in idx for i in block] if idx and isinstance(idx[0], (list, tuple)) \
                else list(idx)
            size = shape[int(axis)]  # per-block indices count within a block, as the axis does
            bad = [i for i in flat if not 0 <= int(i) < size]
            if bad or not flat:
                raise ValueError(f"the plan keeps index {bad[0] if bad else 'none'} on axis {axis} "
                                 f"of {key!r}, whose size is {size}: the plan is damaged or was made "
                                 f"for another network")


def _model_input_shape(model: paddle.Model | None) -> tuple[int, ...] | None:
    """One input's shape from a Model's first input spec, when its sizes (batch aside) are known."""
    specs = getattr(model, "_inputs", None) if model is not None else None
    spec = specs[0] if isinstance(specs, (list, tuple)) and specs else specs
    shape = list(getattr(spec, "shape", None) or [])
    if len(shape) < 2 or any(d is None or int(d) < 1 for d in shape[1:]):
        return None
    return (1, *(int(d) for d in shape[1:]))


def _load_from_shapes(model: paddle.Model | None, net: nn.Layer, prefix: str, optimizer: bool,
                      input_shape: Sequence[int] | None) -> nn.Layer:
    """`load_pruned` of a checkpoint with no plan file: the architecture from the weights' shapes."""
    params_path = prefix + ".pdparams"
    state = _load_file(params_path)
    _check_keys(net, state, params_path, None)
    opt = model._optimizer if model is not None and optimizer else None
    shapes_differ = any(list(state[k].shape) != list(v.shape) for k, v in net.state_dict().items())
    if shapes_differ and opt is not None and opt._accumulators:
        raise ValueError("the model's optimizer has already stepped on the unpruned network; call "
                         "load_pruned on a freshly prepared model (before fit)")
    shape = input_shape if input_shape is not None else _model_input_shape(model)
    try:
        plan = shrink_to_shapes(net, state, shape)
    except ValueError as e:
        raise ValueError(f"{params_path!r} has no plan file beside it and its shapes do not fit this "
                         f"{type(net).__name__}: {e}") from e
    net.set_state_dict(state)
    opt_loaded = scaler_loaded = False
    if model is not None and optimizer:
        opt_loaded = _load_optimizer(model, net, prefix, {}, state)
        scaler_loaded = _load_scaler(model, prefix)
    logger.info("loaded %s: no plan file, so the architecture was inferred from the weights' shapes (%d "
                "group(s) pruned, FLOPs %d -> %d), %d tensors%s%s", prefix, len(plan.groups),
                plan.flops_before, plan.flops_after, len(state),
                ", optimizer state" if opt_loaded else "", ", AMP scaler state" if scaler_loaded else "")
    return net


def load_pruned(model_or_net: Target, path: PathLike, *, optimizer: bool = True,
                input_shape: Sequence[int] | None = None, from_shapes: bool = False) -> nn.Layer:
    """Load a checkpoint of a pruned network into a freshly built, unpruned copy of it.

    Reads ``<prefix>.prune.json``, re-applies its plans in order (:func:`reapply_plan`, at each
    plan's ``input_shape``), then loads ``<prefix>.pdparams`` after checking that every key is there
    with a matching shape. The loaded plans are recorded on the network (see :func:`record_plan`),
    so saving it again keeps them. A checkpoint with an empty plan list just loads.

    A checkpoint without a plan file (paddle's ``ModelCheckpoint``, ``model.save``,
    ``paddle.save(net.state_dict(), ...)``, another tool) loads too: the architecture is read from
    the weights' shapes (:func:`prune_callbacks.deploy.shapes.prune_to_state_dict`: each group's
    kept count, checked across every parameter of the group), the first channels of each group
    are kept (the weights overwrite them anyway), and the inferred plan is recorded, so saving
    again writes a plan file. The log line says so.

    Given a ``paddle.Model``, the plans are applied to ``model.network``, and if ``<prefix>.pdopt``
    exists and the model was
    prepared with an optimizer, its state (accumulators of the kept channels, LR scheduler) is
    loaded too, matched to the parameters by their structured names, so ``model.fit`` resumes
    where it stopped; so is the AMP loss scaler's state (``<prefix>.pdscaler``) when the model was
    prepared with ``amp_configs``. The optimizer must not have stepped yet: its parameters are shrunk in place
    (same objects), so it needs no rebuild. A model with no optimizer gets only the weights.

    Args:
        model_or_net: a freshly built ``paddle.nn.Layer`` or ``paddle.Model`` of the saved
            architecture. A network already pruned by the first plans of the file gets the rest.
        path: the checkpoint prefix, or its ``.pdparams`` / ``.prune.json`` file.
        optimizer: for a Model, whether to load ``<prefix>.pdopt``.
        input_shape: one input's shape, batch first, for a checkpoint without a plan file (the
            network is traced at it). Default: a Model's input spec when its sizes are set, else
            ``[1, 3, 224, 224]``.
        from_shapes: infer the architecture from the weights' shapes even when there is a plan
            file (one left over from an older save under the same prefix).

    Returns:
        The pruned, loaded network (``model.network`` for a Model).

    Raises:
        TypeError: not a Model or Layer, or ``path`` not a str or PathLike.
        ValueError: a bad path; a plan that does not fit the network (the message names the plan
            and the group); keys or shapes that do not match after re-applying the plans; optimizer
            state that does not fit the model's optimizer; an empty (0-byte) or damaged ``.pdparams``
            or ``.pdopt``; a plan whose indices do not fit the network. The network may be partly pruned when a
            plan or the weights do not fit: build it afresh before trying again.
            Without a plan file: shapes that disagree within a group (the message names the parameter
            and the two counts) or that no pruning of this network gives.
        FileNotFoundError: no ``.pdparams``.

    Examples:
        >>> model = paddle.Model(build_net(), inputs, labels)
        >>> model.prepare(optimizer_over(model.parameters()), loss, metrics)
        >>> load_pruned(model, "checkpoints/3")
        >>> model.fit(train_ds, epochs=2)     # continues with the pruned network and its state
    """
    model, net = _unwrap(model_or_net)
    prefix = _prefix(path, "path")
    params_path = prefix + ".pdparams"
    if not os.path.exists(params_path):
        raise FileNotFoundError(f"no weights at {params_path!r}: pass the prefix given to save_pruned or "
                                f"PrunedModelCheckpoint (e.g. 'checkpoints/final'), or its .pdparams file")
    if from_shapes or not os.path.exists(prefix + PLANS_SUFFIX):
        return _load_from_shapes(model, net, prefix, optimizer, input_shape)
    header = _read_header(prefix)
    plans: list[PrunePlan] = header["plans"]
    where = prefix + PLANS_SUFFIX
    state = _load_file(params_path)
    _check_keys(net, state, params_path, header.get("network"))
    todo = _plans_to_apply(net, plans, where)
    opt = model._optimizer if model is not None and optimizer else None
    if todo and opt is not None and opt._accumulators:
        raise ValueError("the model's optimizer has already stepped on the unpruned network; call "
                         "load_pruned on a freshly prepared model (before fit)")
    first = len(plans) - len(todo)
    for i, plan in enumerate(todo, start=first + 1):
        try:
            reapply_plan(net, plan)
        except (ValueError, KeyError) as e:
            raise ValueError(f"plan {i} of {len(plans)} in {where!r} does not fit this "
                             f"{type(net).__name__} (saved from a {header.get('network')}): {e}") from e
    _check_shapes(net, state, params_path, len(plans))
    net.set_state_dict(state)

    opt_loaded = scaler_loaded = False
    if model is not None and optimizer:
        opt_loaded = _load_optimizer(model, net, prefix, header, state)
        scaler_loaded = _load_scaler(model, prefix)
    logger.info("loaded %s: %d plan(s) re-applied, %d tensors%s%s", prefix, len(todo), len(state),
                ", optimizer state" if opt_loaded else "", ", AMP scaler state" if scaler_loaded else "")
    return net


# -- export ------------------------------------------------------------------------------------
def _input_specs(input_spec: Any, net: nn.Layer) -> list[paddle.static.InputSpec]:
    if input_spec is None:
        plans = recorded_plans(net)
        if not plans:
            raise ValueError("input_spec is required for a network with no recorded plans, e.g. "
                             "[None, 3, 32, 32] or [paddle.static.InputSpec([None, 3, 32, 32], 'float32')]")
        return [paddle.static.InputSpec([None, *plans[-1].input_shape[1:]], "float32")]
    if isinstance(input_spec, paddle.static.InputSpec):
        return [input_spec]
    if not isinstance(input_spec, (list, tuple)) or not input_spec:
        raise TypeError(f"input_spec must be a shape such as [None, 3, 32, 32], a list of shapes or a list "
                        f"of paddle.static.InputSpec, got {input_spec!r}")

    def is_dim(d: Any) -> bool:
        return d is None or (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and (d > 0 or d == -1))

    if all(is_dim(d) for d in input_spec):
        shapes = [input_spec]
    elif all(isinstance(s, paddle.static.InputSpec) for s in input_spec):
        return list(input_spec)
    elif all(isinstance(s, (list, tuple)) and s and all(is_dim(d) for d in s) for s in input_spec):
        shapes = list(input_spec)
    else:
        raise ValueError(f"input_spec {input_spec!r} is not a shape (positive ints, None or -1), a list of "
                         f"shapes, or a list of paddle.static.InputSpec")
    return [paddle.static.InputSpec(list(s), "float32") for s in shapes]


def export(net: Target, path_prefix: PathLike, input_spec: Any = None, format: str = "paddle") -> list[str]:
    """Save the (pruned) network for inference with ``paddle.jit.save`` (or to ONNX), traced in eval mode.

    The train/eval mode of every sublayer is restored afterwards. Load the result with
    ``paddle.jit.load(prefix)`` or ``paddle.inference.Config(prefix + ".json", prefix + ".pdiparams")``
    (``.pdmodel`` instead of ``.json`` when PIR is off).

    Args:
        net: a ``paddle.nn.Layer`` (or a ``paddle.Model``: its network).
        path_prefix: file prefix of the exported files.
        input_spec: the input shape (``[None, 3, 32, 32]``, ``None`` for a free batch size), a list
            of shapes for several inputs, or a list of ``paddle.static.InputSpec``. Default: the
            input shape of the last recorded plan with a free batch size.
        format: "paddle" (``paddle.jit.save``) or "onnx" (``<prefix>.onnx`` through paddle2onnx, the
            optional extra ``pip install -e ".[onnx]"``; see :func:`prune_callbacks.deploy.onnx.export_onnx`).

    Returns:
        The paths written.

    Raises:
        TypeError: not a Layer or Model, a bad path or a bad ``input_spec`` type.
        ValueError: a bad path or shape, or no ``input_spec`` and no recorded plan, or an unknown format.
        ImportError: format "onnx" without paddle2onnx (the message names the extra).

    Examples:
        >>> export(net, "inference/pruned", [None, 3, 32, 32])
        >>> loaded = paddle.jit.load("inference/pruned")
    """
    if format not in ("paddle", "onnx"):
        raise ValueError(f"format must be 'paddle' or 'onnx', got {format!r}")
    _, layer = _unwrap(net, "net")
    prefix = _prefix(path_prefix, "path_prefix")
    specs = _input_specs(input_spec, layer)
    if format == "onnx":
        from .onnx import export_onnx  # layer 1, imports nothing of io: no cycle
        return [export_onnx(layer, prefix, specs)]
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    # saved under a temp prefix beside the real one, then each file renamed over the old one:
    # a kill while saving leaves the previous export whole
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(prefix)}.", suffix=".tmp", dir=directory)
    try:
        with eval_mode(layer):
            paddle.jit.save(layer, os.path.join(tmp, "model"), input_spec=specs)
        written = []
        for suffix in _EXPORT_SUFFIXES:
            part = os.path.join(tmp, "model" + suffix)
            if os.path.exists(part):
                replace_with(part, prefix + suffix)
                written.append(prefix + suffix)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s for inference: %s", type(layer).__name__, written)
    return written
