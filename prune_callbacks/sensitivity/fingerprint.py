"""What a sensitivity file was measured on: a signature of the whole traced network.

Groups (names, channel counts, prunability), layers (paths, types) and parameters (structured
names, shapes), plus a short hash of them. Read-only: never changes or evaluates a network.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import paddle.nn as nn

Signature = Dict[str, Any]


def network_signature(net: nn.Layer, groups: Sequence[Any]) -> Signature:
    """The signature of a traced network, as JSON-ready plain data.

    Args:
        net: the network (unwrapped from DataParallel).
        groups: its traced groups (`FilterPruner.groups`), each with `name`, `channels`, `prunable`.

    Returns:
        `{"class", "groups": {name: [channels, prunable]}, "layers": {path: type},
        "params": {structured name: shape}}`.
    """
    return {
        "class": type(net).__name__,
        "groups": {g.name: [int(g.channels), bool(g.prunable)] for g in groups},
        "layers": {path: type(layer).__name__ for path, layer in net.named_sublayers()},
        "params": {key: [int(s) for s in p.shape] for key, p in net.named_parameters()},
    }


def fingerprint(signature: Mapping[str, Any]) -> str:
    """A short, stable hash of a signature (equal signatures, equal fingerprints)."""
    text = json.dumps(signature, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def differences(made_for: Mapping[str, Any], now: Mapping[str, Any], limit: int = 3) -> List[str]:
    """What differs between the network a file was made for and this one, most telling first."""
    out: List[str] = []
    if made_for.get("class") != now.get("class"):
        out.append(f"it was made for a {made_for.get('class')}, this network is a {now.get('class')}")
    for section, noun, show in (("groups", "group", _show_group), ("layers", "layer", str),
                                ("params", "parameter", str)):
        old, new = made_for.get(section, {}), now.get(section, {})
        for key in list(old) + [k for k in new if k not in old]:
            a, b = old.get(key), new.get(key)
            if a == b:
                continue
            there = "no such " + noun if a is None else show(a)
            here = "no such " + noun if b is None else show(b)
            if section == "groups" and a is not None and b is not None:
                out.append(f"group {key!r} had {a[0]} channels there, this network has {b[0]}")
            else:
                out.append(f"{noun} {key!r}: {there} there, {here} in this network")
            if len(out) >= limit:
                return out
    return out


def _show_group(value: Optional[List[Any]]) -> str:
    return f"{value[0]} channels" if value else "none"
