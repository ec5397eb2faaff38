"""Plain-data records of a pruning step: which channels each group kept, and what it cost.

A plan is produced by the pruner and consumed by the optimizer rebuild, the loggers and `io`.
It never holds a reference to a live network, so it can be saved as JSON and re-applied. The
plan ledger (`record_plan` / `recorded_plans`) remembers, on a network, which plans shaped it;
it knows only plans and a layer's `__dict__`, never the pruner, io or the callbacks.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Tuple, Union

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


def _file_mode(path: str) -> int:
    """The mode `open(path, "w")` would give: the old file's if it exists, else 0666 minus the umask
    (what `paddle.save` produces), never the 0600 of a bare temp file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cannot_write(path: str, e: OSError) -> OSError:
    """The error of a failed write, naming the user's file (not a temp file) and the fix."""
    return type(e)(e.errno, f"cannot write {path!r} ({e.strerror}): pass a path in a writable "
                            f"directory")


@contextlib.contextmanager
def atomic_path(path: Union[str, "os.PathLike[str]"]) -> Iterator[str]:
    """A temp path beside `path` to write to; on success it replaces `path` in one rename.

    The temp file is flushed to disk (fsync) before the rename and the directory after it, so a
    kill at any moment leaves either the old file or the new one, never half of one. The file
    gets the mode `open(path, "w")` would give (see `_file_mode`). On error the temp file is
    removed and `path` is untouched.

    Args:
        path: the file to (re)write; its directory is created if missing.

    Yields:
        The temp path: write the whole file there, then leave the block.

    Raises:
        OSError: the directory cannot be created or written (the message names `path`).

    Examples:
        >>> with atomic_path("ckpt/final.pdparams") as tmp:
        ...     paddle.save(state, tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as e:
        raise _cannot_write(path, e) from e
    os.close(fd)
    try:
        yield tmp
        replace_with(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_with(tmp: str, path: str) -> None:
    """Put the finished file `tmp` (in `path`'s directory) in place of `path`, durably: flushed
    to disk, given the mode `open(path, "w")` would give, renamed, the directory flushed."""
    with open(tmp, "rb+") as f:  # whatever wrote it (paddle.save too), it is on disk now
        os.fsync(f.fileno())
    os.chmod(tmp, _file_mode(path))
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def check_writable(path: Union[str, "os.PathLike[str]"], what: str = "file") -> str:
    """Fail now, not after hours of work, if `path` cannot be written later.

    Creates the directory if missing and writes (then removes) a probe file in it.

    Args:
        path: the file that will be written.
        what: how the message names it ("sensitivity file", ...).

    Returns:
        `path` as a str.

    Raises:
        ValueError: `path` is a directory, or its directory cannot be created or written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory: pass a file path such as "
                         f"{os.path.join(path, 'sensitivity.json')!r}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {what} {path!r}: {e.strerror} in {directory!r}; pass a "
                         f"path in a writable directory") from e
    return path


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to `path` atomically (see `atomic_path`): a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)


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
