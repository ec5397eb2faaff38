"""`trainer.resume`: find where an interrupted run stopped and check that this config can continue it.

Reads checkpoints only (through `prune_callbacks.deploy.io`); loading them into the model is `load_pruned`'s
work. Every mismatch is a ConfigError raised before anything is built or trained.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from ..deploy.io import PLANS_SUFFIX, read_plans
from ..planning.plans import PrunePlan
from .artefacts import STATE_SUFFIX
from .schema import ConfigError

RESUME_PREFIX = os.path.join("resume", "last")  # under a run's output dir (conf/callbacks/resume.yaml)
HELP = ("give the output dir of a run made with the default callbacks (its resume/last.* files), a resume "
        "point prefix such as <run>/resume/last, or a paddle ModelCheckpoint prefix <save_dir>/<epoch>")


@dataclass(frozen=True)
class ResumeState:
    """Where a run stopped.

    Attributes:
        prefix: the checkpoint prefix (`<prefix>.pdparams`, `.pdopt`, `.prune.json`).
        epochs_done: epochs trained before it was saved; the resumed fit starts at this epoch.
        plans: the pruning plans already applied, oldest first.
        state: the rest of `<prefix>.state.json` (e.g. the phase figures), {} for a ModelCheckpoint.
        steps_done: pruning steps this config makes in the epochs done (the checkpoint's plans).
        from_shapes: the checkpoint has no plan file (paddle's ModelCheckpoint): `plans` is empty
            until `load_pruned` has read the architecture from the weights' shapes.
    """

    prefix: str
    epochs_done: int
    plans: List[PrunePlan]
    state: Dict[str, Any] = field(default_factory=dict)
    steps_done: int = 0
    from_shapes: bool = False


def _prefix_of(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        return os.path.join(path, RESUME_PREFIX)
    for suffix in (STATE_SUFFIX, ".pdparams", ".pdopt", ".prune.json"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _epochs_done(prefix: str, key: str) -> tuple[int, Dict[str, Any]]:
    state_file = prefix + STATE_SUFFIX
    if os.path.exists(state_file):
        try:
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            return int(state["epochs_done"]), state
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{key}: {state_file!r} is damaged ({exc}); {HELP}") from None
    name = os.path.basename(prefix)
    if name.isdigit():  # paddle's ModelCheckpoint saves <save_dir>/<epoch> at that epoch's end
        return int(name) + 1, {}
    raise ConfigError(f"{key}: cannot tell which epoch {prefix!r} was saved at (no {STATE_SUFFIX} beside it "
                      f"and not named after its epoch); {HELP}")


def find_resume_point(cfg: DictConfig) -> Optional[ResumeState]:
    """The checkpoint `trainer.resume` names, checked against this config's epochs and pruning steps.

    Returns:
        None when `trainer.resume` is null.

    Raises:
        ConfigError: no checkpoint there, nothing left to train, or the checkpoint's pruning state
            does not match this config's `prune.at_epoch` / `prune.steps` (the message says why).
    """
    if not cfg.trainer.resume:
        return None
    key = f"trainer.resume={cfg.trainer.resume!r}"
    prefix = _prefix_of(str(cfg.trainer.resume))
    if not os.path.exists(prefix + ".pdparams"):
        raise ConfigError(f"{key}: no checkpoint {prefix + '.pdparams'!r}; {HELP}")
    from_shapes = not os.path.exists(prefix + PLANS_SUFFIX)  # e.g. paddle's ModelCheckpoint
    try:
        plans = [] if from_shapes else read_plans(prefix)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    done, state = _epochs_done(prefix, key)
    t, p = cfg.trainer, cfg.prune
    epochs = t.epochs_before + t.epochs_after
    if done >= epochs:
        raise ConfigError(f"{key}: that checkpoint has all {done} epochs of this config trained; nothing to "
                          f"resume (raise trainer.epochs_after to fine-tune for longer)")
    at = p.at_epoch if p.at_epoch is not None else t.epochs_before - 1
    expected = min(max(done - at, 0), p.steps)  # pruning steps this config makes in the first `done` epochs
    if not from_shapes and len(plans) != expected:
        raise ConfigError(
            f"{key}: the checkpoint holds {len(plans)} pruning plan(s) after {done} epoch(s), but with "
            f"prune.at_epoch={at} and prune.steps={p.steps} this config prunes {expected} time(s) by then; "
            f"resume with the pruning settings of the interrupted run")
    steps_state = state.get("prune_steps") or {}
    if 0 < expected < p.steps and steps_state.get("steps_done") != expected:
        raise ConfigError(
            f"{key}: the run stopped between two of its {p.steps} pruning steps (after step {expected}), and "
            f"the checkpoint does not hold the final plan the remaining steps move toward (only a resume point, "
            f"<run>/resume/last, does): resume from a point before epoch {at} or after epoch {at + p.steps - 1}")
    return ResumeState(prefix, done, plans, state, steps_done=expected, from_shapes=from_shapes)


def check_inferred_plans(cfg: DictConfig, resume: ResumeState, plans: List[PrunePlan]) -> List[PrunePlan]:
    """The plans `load_pruned` inferred from a checkpoint without a plan file, checked against
    the config: pruned exactly when this config had pruned by then.

    Raises:
        ConfigError: the shapes say pruned and the config had not pruned yet, or the reverse.
    """
    if bool(plans) != bool(resume.steps_done):
        state = "a pruned" if plans else "an unpruned"
        raise ConfigError(
            f"trainer.resume={cfg.trainer.resume!r}: the checkpoint has no plan file and its weights' shapes "
            f"show {state} network after {resume.epochs_done} epoch(s), but this config prunes "
            f"{resume.steps_done} time(s) by then; resume with the pruning settings of the interrupted run")
    return plans
