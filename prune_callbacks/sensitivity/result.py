"""The sensitivity result and its JSON file: losses per group and ratio, resumable.

Plain data and file format only: never evaluates or touches a network.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from ..plan import write_json_atomic

FORMAT = "prune_callbacks.sensitivity/1"
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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

    @property
    def complete(self) -> bool:
        return all(len(self.losses.get(g, {})) == len(self.ratios) for g in self.channels)

    @classmethod
    def load(cls, path: str) -> "SensitivityResult":
        """Read an analysis written by `analyse` (complete or not)."""
        data = _read(path)
        res = cls(baseline=data["baseline"], ratios=tuple(data["ratios"]),
                  channels=dict(data["groups"]), criterion=data["criterion"])
        res.losses = {g: {float(r): l for r, l in pts.items()}
                      for g, pts in data["losses"].items()}
        return res



def _read(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"sensitivity file {path!r} is corrupt ({e}); it was left untouched: move or delete "
            "it, or pass another path, to start afresh") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a sensitivity file of this version (format {data.get('format')!r} "
            f"if a dict, expected {FORMAT!r}); delete it or pass another path to start afresh")
    return data


def _key(r: float) -> str:
    return repr(round(float(r), 6))


def _check_header(path: str, data: Dict[str, Any], channels: Dict[str, int], criterion: str,
                  ratios: Sequence[float], describe: str) -> None:
    fix = "delete it or pass another path to start afresh"
    if data["criterion"] != criterion:
        raise ValueError(f"{path!r} was made with criterion {data['criterion']!r}, not "
                         f"{criterion!r}; {fix}")
    if [_key(r) for r in data["ratios"]] != [_key(r) for r in ratios]:
        raise ValueError(f"{path!r} was made for ratios {data['ratios']}, not {list(ratios)}; {fix}")
    for g, c in data["groups"].items():
        if channels.get(g) != c:
            now = channels.get(g)
            what = "no such group" if now is None else f"{now} channels"
            raise ValueError(f"{path!r} was made for a different network: group {g!r} had {c} "
                             f"channels there, this network has {what}; {fix}")
    if describe and data.get("data") and data["data"] != describe:
        raise ValueError(f"{path!r} was made on other data ({data['data']!r}, now {describe!r}); "
                         f"{fix}")



def _save(path: Optional[str], data: Dict[str, Any]) -> None:
    if path:
        write_json_atomic(path, data)
