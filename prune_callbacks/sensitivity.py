"""Sensitivity analysis: the accuracy lost when each group loses its weakest channels.

Pure engine code: takes a pruner and an evaluation, returns plain data, never keeps a change
to the network (masks are always restored) and never touches paddle.Model or VisualDL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass
class SensitivityResult:
    """Losses per group and ratio: `(baseline - metric) / baseline` (PaddleSlim's definition).

    `losses[group][ratio]` is None for a point that was not evaluated (early stop by `max_loss`).
    """

    baseline: float
    ratios: Tuple[float, ...]
    losses: Dict[str, Dict[float, Optional[float]]] = field(default_factory=dict)
    channels: Dict[str, int] = field(default_factory=dict)
    criterion: str = "l1"

    def curves(self) -> Dict[str, Dict[float, float]]:
        """Evaluated points only, as `{group: {ratio: loss}}` (PaddleSlim's `sensitive()` format)."""
        return {
            g: {r: l for r, l in pts.items() if l is not None} for g, pts in self.losses.items()
        }
