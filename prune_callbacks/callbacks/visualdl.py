"""VisualDL logging of what the pruning callbacks published: sensitivity curves, FLOPs, ratios.

Reads only `history_of(model)` and writes VisualDL records; it never prunes, evaluates or
touches the network, and never writes the same (tag, step) point twice.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import paddle

from ..planning.plans import PrunePlan
from ..sensitivity import SensitivityResult
from ..utils.files import directory_problem
from .history import PruneEvent, PruneHistory, history_of

logger = logging.getLogger(__name__)

DEFAULT_RUN = "prune"


class PruneVisualDL(paddle.callbacks.Callback):
    """Log sensitivity curves, FLOPs/params drops and per-group ratios to VisualDL.

    VisualDL shows one log file per directory (the newest), so a second writer in the directory
    of `paddle.callbacks.VisualDL(log_dir)` would hide one of the two. By default this callback
    writes into the run `<log_dir>/prune`; `visualdl --logdir <log_dir>` shows both runs.

    Args:
        log_dir: VisualDL log directory (the one given to `paddle.callbacks.VisualDL`, if any).
        tag_prefix: prepended to every tag as `<tag_prefix>/<tag>`; empty for none.
        run: sub-directory of `log_dir` holding this callback's records; "" writes into
            `log_dir` itself (only safe when no other writer uses it).

    Raises:
        TypeError: `log_dir` is not a str/PathLike, or `tag_prefix`/`run` is not a str.
        ValueError: `log_dir` is empty, or `run` is absolute or leaves `log_dir`; at
            `on_train_begin` (before any training), a log directory that cannot be written.

    Examples:
        >>> model.fit(train_ds, epochs=10, callbacks=[
        ...     FilterPruneCallback(flops=0.4, at_epoch=4), PruneVisualDL("vdl_log"),  # uniform
        ...     paddle.callbacks.VisualDL("vdl_log")])
    """

    def __init__(self, log_dir: Union[str, "os.PathLike[str]"], tag_prefix: str = "",
                 run: str = DEFAULT_RUN) -> None:
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir={log_dir!r} must be a str or os.PathLike directory path")
        log_dir = os.fspath(log_dir)
        if not isinstance(log_dir, str):
            raise TypeError(f"log_dir={log_dir!r} must be a str path (got bytes from os.fspath)")
        if not log_dir.strip():
            raise ValueError(f"log_dir={log_dir!r} must be a non-empty directory path")
        if not isinstance(tag_prefix, str):
            raise TypeError(f"tag_prefix={tag_prefix!r} must be a str (\"\" for no prefix)")
        if not isinstance(run, str):
            raise TypeError(f"run={run!r} must be a str sub-directory name (\"\" for log_dir itself)")
        if os.path.isabs(run) or ".." in run.replace("\\", "/").split("/"):
            raise ValueError(f"run={run!r} must be a relative sub-directory inside log_dir")
        self.log_dir = log_dir
        self.run_dir = os.path.join(log_dir, run) if run else log_dir
        self.tag_prefix = tag_prefix.strip("/")
        self._writer: Any = None
        self._file_name = ""  # reopened (appended to) by later fits, so one run keeps one file
        self._written: Set[Tuple[str, int]] = set()
        self._events_done = 0
        self._figures = 0
        self._dirty = False

    def on_train_begin(self, logs: Optional[Dict] = None) -> None:
        """Fail before the first batch if the log directory cannot be written (rank 0 writes)."""
        if paddle.distributed.get_rank() != 0 or self._writer is not None:
            return
        probe = self.run_dir
        while probe and not os.path.isdir(probe):  # probe the nearest existing directory: no
            parent = os.path.dirname(probe)        # empty log directory is left behind
            if parent == probe:
                break
            probe = parent
        probe = probe or "."
        e = directory_problem(probe, create=False)
        if e is not None:
            raise ValueError(f"PruneVisualDL cannot write its logs to {self.run_dir!r}: "
                             f"{e.strerror} in {probe!r}; pass a writable log_dir") from e
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise ValueError(f"PruneVisualDL log directory {self.run_dir!r} is a file; pass a "
                             f"directory path as log_dir")

    # hooks: flush whatever the other callbacks published, whatever their order in fit()
    def on_epoch_begin(self, epoch: Optional[int] = None, logs: Optional[Dict] = None) -> None:
        self._flush()

    def on_epoch_end(self, epoch: Optional[int] = None, logs: Optional[Dict] = None) -> None:
        self._flush()

    def on_train_end(self, logs: Optional[Dict] = None) -> None:
        self._flush()
        self._close()

    def _flush(self) -> None:
        if self.model is None or paddle.distributed.get_rank() != 0:
            return
        hist: PruneHistory = history_of(self.model)
        if hist.sensitivity is not None:
            self._write_sensitivity(hist.sensitivity, hist.sensitivity_epoch)
        new_events = hist.events[self._events_done:]
        for event in new_events:
            self._write_event(event, hist.events[0].plan.flops_before,
                              [f"sensitivity fallback: {f}" for f in hist.sensitivity_fallbacks])
        self._events_done += len(new_events)
        if self._dirty:  # wait for the writer thread: a live dashboard sees them now
            self._writer.flush()
            self._dirty = False

    def _write_sensitivity(self, sens: SensitivityResult, epoch: Optional[int]) -> None:
        added = 0
        for group, points in sens.curves().items():
            for ratio, loss in sorted(points.items()):
                added += self._scalar(f"sensitivity/{group}", loss, int(round(ratio * 100)))
        if added:
            image = render_sensitivity(sens, title=f"sensitivity (epoch {epoch})"
                                       if epoch is not None else "sensitivity")
            self._out().add_image(tag=self._tag("sensitivity/figure"), img=image,
                                   step=self._figures)
            self._figures += 1
            logger.info("VisualDL: %d sensitivity points -> %s", added, self.run_dir)

    def _write_event(self, event: PruneEvent, flops_first: int, notes: Sequence[str] = ()) -> None:
        plan, epoch = event.plan, event.epoch
        self._scalar("prune/flops", plan.flops_before, epoch)
        self._scalar("prune/flops", plan.flops_after, epoch + 1)
        self._scalar("prune/params", plan.params_before, epoch)
        self._scalar("prune/params", plan.params_after, epoch + 1)
        self._scalar("prune/pruned_flops", plan.pruned_flops, epoch)
        total = 1.0 - plan.flops_after / flops_first if flops_first else 0.0
        self._scalar("prune/total_pruned_flops", total, epoch)
        for group in plan.groups:
            self._scalar(f"prune/ratio/{group.name}", group.ratio, epoch)
        self._out().add_text(tag=self._tag("prune/plan"),
                              text_string=plan_table(plan, event.flops, total, notes), step=epoch)
        logger.info("VisualDL: prune event at epoch %d (FLOPs -%.1f%%) -> %s",
                    epoch, 100 * total, self.run_dir)

    def _scalar(self, tag: str, value: float, step: int) -> int:
        """Write one point unless (tag, step) was written before; 1 if written, else 0."""
        key = (tag, step)
        if key in self._written:
            return 0
        self._out().add_scalar(tag=self._tag(tag), value=float(value), step=step)
        self._written.add(key)
        return 1

    def _tag(self, tag: str) -> str:
        return f"{self.tag_prefix}/{tag}" if self.tag_prefix else tag

    def _out(self) -> Any:
        """The writer, opened on first use; marks that something is waiting to be flushed."""
        self._dirty = True
        if self._writer is None:
            from visualdl import LogWriter  # lazy: importing the package needs no VisualDL
            if not self._file_name:
                _warn_if_shared(self.run_dir)
            self._writer = LogWriter(logdir=self.run_dir, file_name=self._file_name)
            self._file_name = os.path.basename(self._writer.file_name)
        return self._writer

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _warn_if_shared(run_dir: str) -> None:
    others = [f for f in os.listdir(run_dir) if "vdlrecords" in f] if os.path.isdir(run_dir) else []
    if others:
        logger.warning("VisualDL shows only the newest log file of %s, which already holds %s: "
                       "give PruneVisualDL its own run (run='prune') to keep both visible",
                       run_dir, ", ".join(sorted(others)))


def plan_table(plan: PrunePlan, flops: float, total_pruned: float, notes: Sequence[str] = ()) -> str:
    """A markdown table of a plan: channels before -> after and ratio per group, then totals.

    Args:
        plan: the pruning step's plan.
        flops: the share of FLOPs the step aimed to have removed.
        total_pruned: share of FLOPs removed so far, relative to before the first step.
        notes: lines printed under the table (e.g. a sensitivity fallback).

    Returns:
        The table as text, for `LogWriter.add_text`.
    """
    lines: List[str] = ["| group | channels | ratio |", "|---|---|---|"]
    for g in plan.groups:
        lines.append(f"| {g.name} | {g.channels} -> {len(g.kept)} | {100 * g.ratio:.1f}% |")
    lines.append(f"| **total** | FLOPs {plan.flops_before:,} -> {plan.flops_after:,} | "
                 f"pruned {100 * total_pruned:.1f}% (this step {100 * plan.pruned_flops:.1f}%) "
                 f"vs target {100 * flops:.1f}% |")
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines)


def render_sensitivity(sens: SensitivityResult, title: str = "sensitivity") -> np.ndarray:
    """Draw every group's loss curve in one figure (matplotlib Agg, no pyplot state).

    Args:
        sens: the analysis; unevaluated (None) points are left out.
        title: the figure title.

    Returns:
        An RGB uint8 array of shape (H, W, 3).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curves = sens.curves()
    for group, points in curves.items():
        xs = sorted(points)
        ax.plot([100 * r for r in xs], [points[r] for r in xs], marker="o", label=group)
    ax.set(xlabel="pruned ratio (%)", ylabel="loss (relative to baseline)", title=title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize="x-small", ncol=max(1, len(curves) // 12), loc="upper left")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
