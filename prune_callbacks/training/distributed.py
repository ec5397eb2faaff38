"""Collective helpers for pruning under `paddle.distributed` (launch or spawn; gloo or NCCL).

Who writes files, how work is shared out, how ranks agree before surgery, and how a data-parallel
wrapper is rebuilt after it. Every function is a no-op in one process; none starts a parallel
environment itself (paddle.Model or the user does that).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, TypeVar

import paddle
import paddle.distributed as dist
import paddle.nn as nn

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RankMismatchError(RuntimeError):
    """Ranks computed different results where they must agree (e.g. different pruning plans)."""


def world_size() -> int:
    """Number of processes in the job (1 when no parallel environment is initialised)."""
    if not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


def rank() -> int:
    """This process's global rank (0 when no parallel environment is initialised)."""
    return int(dist.get_rank()) if world_size() > 1 else 0


def is_main() -> bool:
    """True on the process that writes files and logs (global rank 0)."""
    return rank() == 0


def all_gather(obj: T) -> List[T]:
    """Every rank's `obj`, in rank order (`[obj]` in one process). A picklable object."""
    if world_size() == 1:
        return [obj]
    out: List[T] = []
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T]) -> List[T]:
    """This rank's share of `items` (round robin, so neighbouring items spread over ranks)."""
    n, r = world_size(), rank()
    return [it for i, it in enumerate(items) if i % n == r]


def digest(obj: Any) -> str:
    """A short, order-stable fingerprint of JSON-like data."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_agree(what: str, parts: Mapping[str, Any]) -> None:
    """Stop every rank with the same error unless all ranks hold equal `parts`.

    Only digests travel (one small all-gather), so a mismatch is found within a collective's time,
    and every rank raises (none waits for the others in a later collective).

    Args:
        what: what is compared, for the message (e.g. "pruning plan").
        parts: named parts (e.g. group name -> kept channels), compared one by one.

    Raises:
        RankMismatchError: naming the first part (in `parts` order) that differs, and the ranks.
    """
    if world_size() == 1:
        return
    mine = [(name, digest(value)) for name, value in parts.items()]
    every = all_gather(mine)
    for r, theirs in enumerate(every):
        if theirs == mine:
            continue
        names = [n for n, _ in mine]
        other = dict(theirs)
        first = next((n for n, d in mine if other.get(n) != d),
                     next((n for n, _ in theirs if n not in names), "?"))
        raise RankMismatchError(
            f"the {what} differs between rank {rank()} and rank {r}, first at {first!r}: every "
            "rank must see the same network, weights and settings (seed the job, load the same "
            "checkpoint on every rank, and pass the same sensitivity file or analysis)")


def broadcast_state(net: nn.Layer) -> int:
    """Copy rank 0's non-trainable parameters and buffers (BatchNorm running statistics) to every
    rank; returns how many tensors were sent.

    `paddle.DataParallel` keeps trainable parameters equal across ranks but lets each rank keep
    the running statistics of the batches it saw; evaluations that must agree across ranks (the
    shared sensitivity analysis) first take rank 0's, the ones its checkpoints hold.
    """
    if world_size() == 1:
        return 0
    tensors = [p for p in net.parameters() if p.stop_gradient or not p.trainable]
    tensors += [b for b in net.buffers() if b is not None]
    with paddle.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)
    return len(tensors)


def fresh_parameters(net: nn.Layer) -> Dict[int, Any]:
    """Replace every parameter of `net` by a new Parameter object with the same name, value and
    attributes. Returns {id(old): new}.

    A `paddle.DataParallel` reducer hooks the gradients of the parameter objects it was built on,
    with buffers of their old sizes; those hooks cannot be removed, and freeing that reducer
    while its hooks remain crashes. New objects leave the old hooks on orphans, so a new reducer
    can be built over the pruned shapes.
    """
    swap: Dict[int, Any] = {}
    for layer in net.sublayers(include_self=True):
        for key, p in list(layer._parameters.items()):
            if p is None or id(p) in swap:
                if p is not None:
                    layer._parameters[key] = swap[id(p)]
                continue
            state = copy.deepcopy(p.__dict__)
            state["name"] = p.name  # optimizer state and checkpoints are keyed by this name
            q = paddle.base.framework.EagerParamBase(list(p.shape), p.dtype, **state)
            q.copy_(p, True)
            q.stop_gradient = p.stop_gradient
            layer._parameters[key] = q
            swap[id(p)] = q
    return swap


def remap_optimizer(optimizer: paddle.optimizer.Optimizer, swap: Mapping[int, Any]) -> None:
    """Point `optimizer` at the new parameter objects of `fresh_parameters` (state is keyed by
    parameter name, which is unchanged)."""
    optimizer._parameter_list = [swap.get(id(p), p) for p in optimizer._parameter_list]
    groups = optimizer._param_groups
    if groups and isinstance(groups[0], dict):
        for g in groups:
            g["params"] = [swap.get(id(p), p) for p in g["params"]]
    elif groups:
        optimizer._param_groups = [swap.get(id(p), p) for p in groups]


def rebuild_data_parallel(wrapper: paddle.DataParallel, net: nn.Layer,
                          optimizer: Optional[paddle.optimizer.Optimizer]) -> paddle.DataParallel:
    """A new `paddle.DataParallel` over `net`'s (pruned) parameters, replacing `wrapper`.

    The parameters are replaced by new objects (see `fresh_parameters`) and `optimizer` is pointed
    at them; the new wrapper keeps the old one's options. Call on every rank after surgery.
    """
    swap = fresh_parameters(net)
    if optimizer is not None:
        remap_optimizer(optimizer, swap)
    options = {"find_unused_parameters": getattr(wrapper, "find_unused_parameters", False)}
    if hasattr(wrapper, "comm_buffer_size"):  # stored in bytes; the arguments are in MB
        options["comm_buffer_size"] = max(1, wrapper.comm_buffer_size // (1024 * 1024))
        options["last_comm_buffer_size"] = wrapper.last_comm_buffer_size / (1024 * 1024)
    new = paddle.DataParallel(net, strategy=getattr(wrapper, "_strategy", None),
                              group=getattr(wrapper, "group", None), **options)
    logger.info("rebuilt the DataParallel wrapper over %d pruned parameters on rank %d",
                len(swap), rank())
    return new
