"""Reporting: the results figures, their table and `results.json`, and a sweep's CSV and table.

Reads finished results only; never trains or evaluates.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig

from ..callbacks import SensitivityCallback
from ..utils.files import write_json_atomic
from .phases import PhaseClock

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SWEEP_CSV = "results.csv"
SWEEP_COLUMNS = [
    "job", "override", "model", "data", "criterion", "strategy", "flops_target", "flops_reduction",
    "params_reduction", "top1_before", "top1_pruned", "top1_finetuned", "top5_finetuned",
    "time_sensitivity_s", "time_total_s", "output_dir",
]


def _reduction(before: Optional[float], after: Optional[float]) -> Optional[float]:
    if before is None or after is None:
        return None
    return 1.0 - after / before if before else 0.0


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _diverged(run: Any) -> Optional[Dict[str, Any]]:
    exc = getattr(run, "diverged", None)
    if exc is None:
        return None
    return {"epoch": exc.epoch, "step": exc.step, "loss": str(exc.loss),
            "message": f"{exc}; the run stopped there (lower optim.learning_rate)"}


def collect_results(cfg: DictConfig, run: Any, final: Optional[Dict[str, float]],
                    eval_time: float) -> Dict[str, Any]:
    """The figures of the results table, from the config, the finished run and the final evaluation.

    Args:
        cfg: the validated config.
        run: the `run.Run` that was fitted (datasets, plans, phase clock, artefact paths).
        final: `evaluate_net` of the fine-tuned network; None when the run diverged.
        eval_time: seconds that final evaluation took.

    Returns:
        A JSON-ready dict (non-finite numbers as null): sizes, FLOPs/params, accuracies, phase
        times, ratios, paths, and `diverged` (null, or where the loss became non-finite).
    """
    p, t, clock = cfg.prune, cfg.trainer, run.clock
    before, pruned, final = clock.metrics.get("before", {}), clock.metrics.get("pruned", {}), final or {}
    plans = run.plans
    first, last = (plans[0], plans[-1]) if plans else (None, None)
    flops_before, flops_after = (int(first.flops_before), int(last.flops_after)) if plans else (None, None)
    params_before, params_after = (int(first.params_before), int(last.params_after)) if plans else (None, None)
    resume = getattr(run, "resume", None)
    sens = next((c for c in getattr(run, "callbacks", ()) if isinstance(c, SensitivityCallback)), None)
    latency = getattr(run, "latency", None)
    return finite({
        "model": str(cfg.model._target_).rsplit(".", 1)[-1],
        "data": cfg.data.name,
        "num_classes": int(cfg.data.num_classes),
        "criterion": str(p.criterion),
        "strategy": str(p.strategy),
        "at_epoch": run.at_epoch,
        "epochs_before": t.epochs_before,
        "epochs_after": t.epochs_after,
        "resumed_from": resume.prefix if resume else None,
        "resumed_at_epoch": resume.epochs_done if resume else None,
        "distill_alpha": p.distill.alpha or None,
        "train_samples": len(run.train_ds),
        "val_samples": len(run.val_ds),
        "flops_target": p.flops if p.latency is None else None,
        "latency_target": p.latency,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_reduction": _reduction(flops_before, flops_after),
        "params_before": params_before,
        "params_after": params_after,
        "params_reduction": _reduction(params_before, params_after),
        # the exported model's median latency before and after, timed on the run's backend
        "latency_before_ms": latency["before_ms"] if latency else None,
        "latency_after_ms": latency["after_ms"] if latency else None,
        "latency_reduction": _reduction(latency["before_ms"], latency["after_ms"]) if latency else None,
        "latency_measured": latency,
        "top1_before": before.get("top1"),
        "top5_before": before.get("top5"),
        "top1_pruned": pruned.get("top1"),
        "top5_pruned": pruned.get("top5"),
        "top1_finetuned": final.get("top1"),
        "top5_finetuned": final.get("top5"),
        "loss_before": before.get("loss"),
        "loss_pruned": pruned.get("loss"),
        "loss_finetuned": final.get("loss"),
        **_phase_times(clock, eval_time),
        "ratios": {k: float(v) for k, v in last.ratios.items()} if last else {},
        "sensitivity_metric": sens.metric_name if sens is not None else None,
        # what the analysis fell back to when its metric could not resolve the curves
        "sensitivity_fallback": [f.to_dict() for f in sens.fallbacks] if sens is not None else [],
        "diverged": _diverged(run),
        "paths": run.paths,
    })


def _phase_times(clock: PhaseClock, eval_time: float) -> Dict[str, Optional[float]]:
    return {
        "time_train_before_s": clock.span("start", "before"),
        "time_sensitivity_s": clock.span("before_evaluated", "sensitivity_done"),
        "time_prune_s": clock.span("sensitivity_done", "pruned"),
        "time_finetune_s": clock.span("pruned_evaluated", "end"),
        "time_eval_s": (clock.span("before", "before_evaluated") or 0.0)
        + (clock.span("pruned", "pruned_evaluated") or 0.0)
        + eval_time,
        "time_total_s": (clock.span("start", "end") or 0.0) + eval_time,
    }


def write_results(path: str, results: Dict[str, Any]) -> None:
    """`results.json`, written atomically (a killed run never leaves half a file)."""
    write_json_atomic(path, results)


def _fmt(value: Optional[float], kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "s":
        return f"{value:.1f} s"
    return f"{int(value):,}"


def _table(body: Sequence[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(row[i]) for row in body) for i in range(len(body[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]


def _target(r: Dict[str, Any]) -> str:
    if r.get("latency_target") is not None:  # the FLOPs cut was chosen by measuring latency
        return f"latency target {_fmt(r['latency_target'], 'pct')} of the original"
    return f"target {_fmt(r['flops_target'], 'pct')}"


def format_results(r: Dict[str, Any]) -> str:
    """The plain-text results table printed at the end of a run."""
    rows: List[Tuple[str, str, str, str]] = [
        ("", "before", "after", "reduction"),
        ("FLOPs", _fmt(r["flops_before"], "n"), _fmt(r["flops_after"], "n"),
         f"{_fmt(r['flops_reduction'], 'pct')} ({_target(r)})"),
        ("params", _fmt(r["params_before"], "n"), _fmt(r["params_after"], "n"), _fmt(r["params_reduction"], "pct")),
    ]
    measured = r.get("latency_measured")
    if measured:
        rows.append((f"latency ({measured['backend']}, batch {measured['batch']})",
                     f"{r['latency_before_ms']:.3f} ms", f"{r['latency_after_ms']:.3f} ms",
                     _fmt(r["latency_reduction"], "pct")))
    acc: List[Tuple[str, str, str, str]] = [
        ("accuracy", "before pruning", "pruned, no fine-tune", "fine-tuned"),
        ("top-1", _fmt(r["top1_before"], "acc"), _fmt(r["top1_pruned"], "acc"), _fmt(r["top1_finetuned"], "acc")),
        ("top-5", _fmt(r["top5_before"], "acc"), _fmt(r["top5_pruned"], "acc"), _fmt(r["top5_finetuned"], "acc")),
    ]
    times = [
        ("train before", r["time_train_before_s"]),
        ("sensitivity", r["time_sensitivity_s"]),
        ("prune", r["time_prune_s"]),
        ("fine-tune", r["time_finetune_s"]),
        ("evaluations", r["time_eval_s"]),
        ("total", r["time_total_s"]),
    ]
    title = (f"Results: {r['model']} on {r['data']}, criterion {r['criterion']}, "
             f"strategy {r['strategy']}, pruned at end of epoch {r['at_epoch']}")
    lines = [title, "=" * len(title)]
    if r.get("diverged"):
        lines += [f"DIVERGED: {r['diverged']['message']}", ""]
    for fallback in r.get("sensitivity_fallback") or ():
        lines += [f"sensitivity fallback: {fallback['metric']} -> {fallback['to']} ({fallback['reason']})", ""]
    if r.get("resumed_from"):
        lines += [f"resumed from {r['resumed_from']} after {r['resumed_at_epoch']} epoch(s)", ""]
    lines += _table(rows) + [""] + _table(acc) + [""]
    lines += _table([("wall time", "")] + [(k, _fmt(v, "s")) for k, v in times]) + [""]
    paths = r["paths"]
    for label, key in (("VisualDL logs", "vdl_log"), ("sensitivity", "sensitivity"),
                       ("pruned checkpoint", "checkpoint"), ("inference model", "inference_model"),
                       ("resume point", "resume"), ("results", "results")):
        lines.append(f"{label + ':':20s}{paths.get(key) or '(off)'}")
    return "\n".join(lines)


def append_sweep_row(results: Dict[str, Any]) -> None:
    """Under `-m`, add this job's row to `<sweep dir>/results.csv` (locked: launchers may be parallel)."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    import fcntl

    row = {k: results.get(k) for k in SWEEP_COLUMNS}
    row["job"] = hc.job.num
    row["override"] = " ".join(hc.overrides.task)
    row["output_dir"] = results["paths"]["output_dir"]
    path = os.path.join(hc.sweep.dir, SWEEP_CSV)
    os.makedirs(hc.sweep.dir, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sweep_cell(key: str, value: str) -> str:
    if value in ("", "None"):
        return "-"
    if key.endswith("reduction"):
        return f"{100 * float(value):.1f}%"
    if key.startswith("top"):
        return f"{float(value):.4f}"
    if key.startswith("time"):
        return f"{float(value):.0f}"
    return value


def format_sweep(path: str) -> str:
    """The comparison table of a sweep's `results.csv`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["job"]))
    cols = [("job", "job"), ("override", "override"), ("flops_reduction", "FLOPs -"),
            ("params_reduction", "params -"), ("top1_before", "top1 before"), ("top1_pruned", "top1 pruned"),
            ("top1_finetuned", "top1 tuned"), ("time_total_s", "time s")]
    # show only the overrides that differ between jobs (the swept ones)
    tokens = [r.get("override", "").split() for r in rows]
    shared = set.intersection(*(set(t) for t in tokens)) if len(tokens) > 1 else set()
    for r, t in zip(rows, tokens):
        r["override"] = " ".join(x for x in t if x not in shared)
    body = [[h for _, h in cols]] + [[_sweep_cell(k, r.get(k, "")) for k, _ in cols] for r in rows]
    return f"Sweep results ({path})\n" + "\n".join(_table(body))


class MultirunResultsTable(HydraCallback):
    """Hydra callback (conf/config.yaml's hydra.callbacks): print the sweep's table once every job has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = os.path.join(config.hydra.sweep.dir, SWEEP_CSV)
        if os.path.exists(path):
            print(format_sweep(path))
        else:
            log.warning("no %s in the sweep dir: did every job fail?", path)
