"""Plain-data records of a pruning step: which channels each group kept, and what it cost.

A plan is produced by the pruner and consumed by the optimizer rebuild, the loggers and `io`.
It never holds a reference to a live network, so it can be saved as JSON and re-applied. The
plan ledger (`record_plan` / `recorded_plans`) remembers, on a network, which plans shaped it;
it knows only plans and a layer's `__dict__`, never the pruner, io or the callbacks.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from ..utils.files import write_json_atomic

PLAN_FORMAT = 1
_LEDGER_ATTR = "_prune_plans"  # a plain list in the layer's __dict__: never a parameter or buffer


@dataclass(frozen=True)
class GroupPlan:
    """What one coupled-channel group keeps.

    Args:
        name: the group's name (layer path of its leading conv).
        channels: channel count of the group before this step.
        kept: indices (in the group's channel order) that stay.
        removed: indices that go.
    """

    name: str
    channels: int
    kept: Tuple[int, ...]
    removed: Tuple[int, ...]

    @property
    def ratio(self) -> float:
        return len(self.removed) / self.channels if self.channels else 0.0


@dataclass(frozen=True)
class PrunePlan:
    """The record of one pruning step over a network.

    `param_slices` maps a parameter's structured name (its `state_dict` key) to the kept
    indices per axis; the optimizer rebuild uses it to slice optimizer state the same way.
    """

    groups: Tuple[GroupPlan, ...]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    input_shape: Tuple[int, ...]
    criterion: str = "l1"
    param_slices: Mapping[str, Mapping[int, Tuple[int, ...]]] = field(default_factory=dict)

    @property
    def pruned_flops(self) -> float:
        """Share of FLOPs removed by this step (PaddleSlim's `plan.pruned_flops`)."""
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def pruned_params(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def ratios(self) -> Dict[str, float]:
        return {g.name: g.ratio for g in self.groups}

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["format"] = PLAN_FORMAT
        d["param_slices"] = {
            k: {str(ax): list(idx) for ax, idx in v.items()} for k, v in self.param_slices.items()
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrunePlan":
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"unsupported plan format {d.get('format')!r} (this version reads {PLAN_FORMAT})"
            )
        groups = tuple(
            GroupPlan(g["name"], int(g["channels"]), tuple(g["kept"]), tuple(g["removed"]))
            for g in d["groups"]
        )
        slices = {
            k: {int(ax): tuple(idx) for ax, idx in v.items()}
            for k, v in d.get("param_slices", {}).items()
        }
        return cls(
            groups=groups,
            flops_before=int(d["flops_before"]),
            flops_after=int(d["flops_after"]),
            params_before=int(d["params_before"]),
            params_after=int(d["params_after"]),
            input_shape=tuple(d["input_shape"]),
            criterion=d.get("criterion", "l1"),
            param_slices=slices,
        )

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "PrunePlan":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# -- the plan ledger: which plans shaped a network -----------------------------------------------
def _network_of(target: Any) -> Any:
    """The layer a ledger lives on: a Model's network, a DataParallel's wrapped layer."""
    import paddle  # here, not at the top: plans themselves are plain data

    if isinstance(target, paddle.Model):
        target = target.network
    elif not isinstance(target, paddle.nn.Layer):
        raise TypeError(f"model_or_net must be a paddle.Model or a paddle.nn.Layer, "
                        f"got {type(target).__name__}")
    if isinstance(target, paddle.DataParallel):
        target = target._layers
    return target


def record_plan(model_or_net: Any, plan: PrunePlan) -> None:
    """Remember that `plan` was applied to a network, so that saving it also saves the plan.

    Call it right after every pruning step, in the order the plans were made (`FilterPruner`
    and the prune callback do). The plans live in a plain list attribute of the network
    (`_prune_plans`), outside its parameters and state_dict. Recording the same plan object
    twice is a no-op. Given a `paddle.Model`, it records on `model.network`.

    Args:
        model_or_net: the pruned `paddle.Model` or `paddle.nn.Layer`.
        plan: the plan returned by `FilterPruner.prune` (or `apply`, `prune_to_flops`, ...).

    Raises:
        TypeError: `model_or_net` is neither a Model nor a Layer, or `plan` is not a PrunePlan.

    Examples:
        >>> plan = prune_by_hand(net)
        >>> record_plan(net, plan)
    """
    if not isinstance(plan, PrunePlan):
        raise TypeError(f"plan must be a PrunePlan, got {type(plan).__name__}")
    net = _network_of(model_or_net)
    plans = net.__dict__.setdefault(_LEDGER_ATTR, [])  # via __dict__: Layer.__setattr__ not involved
    if not any(p is plan for p in plans):
        plans.append(plan)


def recorded_plans(model_or_net: Any) -> List[PrunePlan]:
    """The plans recorded on a network (or a Model's network), oldest first.

    Raises:
        TypeError: `model_or_net` is neither a Model nor a Layer.
    """
    return list(_network_of(model_or_net).__dict__.get(_LEDGER_ATTR, ()))
