"""The sensitivity result and its JSON file: losses per group and ratio, resumable.

Plain data and file format only: never evaluates or touches a network.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ..utils.files import write_json_atomic
from .fingerprint import differences, fingerprint

FORMAT = "prune_callbacks.sensitivity/2"
"""Format 2 records the network the file was measured on (`network`, `fingerprint`)."""
_OLD_FORMATS = ("prune_callbacks.sensitivity/1",)
_REQUIRED = ("criterion", "ratios", "groups", "baseline", "losses", "network")
_FIX = "delete it or pass another path to start afresh"
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SensitivityResult:
    """Losses per group and ratio: `(baseline - metric) / baseline` (PaddleSlim's definition).

    `losses[group][ratio]` is None for a point that was not evaluated (early stop by `max_loss`).
    `network` is the signature of the network it was measured on
    (`fingerprint.network_signature`); None for results built by hand.
    """

    baseline: float
    ratios: Tuple[float, ...]
    losses: Dict[str, Dict[float, Optional[float]]] = field(default_factory=dict)
    channels: Dict[str, int] = field(default_factory=dict)
    criterion: str = "l1"
    network: Optional[Dict[str, Any]] = None

    @property
    def fingerprint(self) -> Optional[str]:
        """Short hash of `network` (None when unknown)."""
        return fingerprint(self.network) if self.network is not None else None

    def check_network(self, signature: Mapping[str, Any], where: str = "the sensitivity result") -> None:
        """Raise unless this result was measured on a network with `signature`.

        Raises:
            ValueError: the networks differ (the message says how); nothing is checked for a
                result built by hand (`network` None).
        """
        check_same_network(where, self.network, signature)

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
        data = read_result(path)
        res = cls(baseline=data["baseline"], ratios=tuple(data["ratios"]),
                  channels=dict(data["groups"]), criterion=data["criterion"],
                  network=data["network"])
        res.losses = {g: {float(r): l for r, l in pts.items()}
                      for g, pts in data["losses"].items()}
        return res


def read_result(path: str) -> Dict[str, Any]:
    """The content of a sensitivity file, checked to be one of this version, whole."""
    if os.path.isdir(path):
        raise ValueError(f"sensitivity path {path!r} is a directory: pass a file path such as "
                         f"{os.path.join(path, 'sensitivity.json')!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"sensitivity file {path!r} is corrupt ({e}); it was left untouched: move or delete "
            "it, or pass another path, to start afresh") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds a JSON {type(data).__name__} ({json.dumps(data)[:40]}), not "
                         f"a sensitivity analysis; {_FIX}")
    if data.get("format") in _OLD_FORMATS:
        raise ValueError(
            f"{path!r} was written by an older prune_callbacks (format {data['format']!r}) that did "
            f"not record which network and weights it was measured on, so it cannot be checked "
            f"against this one; run the analysis again: {_FIX}")
    if data.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a sensitivity file of this version (format {data.get('format')!r}, "
            f"expected {FORMAT!r}); {_FIX}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"sensitivity file {path!r} is damaged: it has no {', '.join(missing)}; "
                         f"{_FIX}")
    baseline = data["baseline"]
    if baseline is not None and (not isinstance(baseline, (int, float)) or not math.isfinite(baseline)):
        raise ValueError(f"sensitivity file {path!r} has baseline metric {baseline!r}: the network "
                         f"had diverged (NaN) when it was analysed; {_FIX}")
    return data


def ratio_key(r: float) -> str:
    return repr(round(float(r), 6))


def check_same_network(where: str, made_for: Optional[Mapping[str, Any]],
                       now: Mapping[str, Any]) -> None:
    """Raise unless the network signature `made_for` (None: unknown, not checked) equals `now`."""
    if made_for is None or fingerprint(made_for) == fingerprint(now):
        return
    diff = "; ".join(differences(made_for, now)) or "their signatures differ"
    raise ValueError(f"{where} was made for a different network: {diff}. Its curves do not "
                     f"describe this network: {_FIX} (or analyse this network)")


def check_header(path: str, data: Dict[str, Any], network: Mapping[str, Any], criterion: str,
                  ratios: Sequence[float], describe: str) -> None:
    if data["criterion"] != criterion:
        raise ValueError(f"{path!r} was made with criterion {data['criterion']!r}, not "
                         f"{criterion!r}; {_FIX}")
    if [ratio_key(r) for r in data["ratios"]] != [ratio_key(r) for r in ratios]:
        raise ValueError(f"{path!r} was made for ratios {data['ratios']}, not {list(ratios)}; {_FIX}")
    check_same_network(repr(path), data["network"], network)
    if describe and data.get("data") and data["data"] != describe:
        raise ValueError(f"{path!r} was made on other data ({data['data']!r}, now {describe!r}); "
                         f"{_FIX}")


def save_result(path: Optional[str], data: Dict[str, Any]) -> None:
    if path:
        write_json_atomic(path, data)
