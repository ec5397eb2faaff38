"""Prunable groups and channels of the vision transformers of tests/transformer_nets.py (and the
app's vit_tiny), as zoo_coverage.py prints them for the zoo; run on two checkouts to compare.

Run it on each checkout to compare (the networks are plain paddle, loaded from this file's
tree; the engine is whichever `prune_callbacks` is imported):

    PYTHONPATH=/path/to/old/checkout python benchmarks/transformer_coverage.py
    PYTHONPATH=$PWD python benchmarks/transformer_coverage.py

Prints, per network: prunable groups / groups, prunable channels / channels (a channel counted
once per group; a head group's channels are its heads), the prunable head and width groups, and
the first reason of each group left whole.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import warnings
from pathlib import Path

import paddle

from prune_callbacks import FilterPruner

logger = logging.getLogger("transformer_coverage")

ROOT = Path(__file__).resolve().parent.parent


def _nets():
    spec = importlib.util.spec_from_file_location("transformer_nets",
                                                  ROOT / "tests" / "transformer_nets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    nets = {
        "vit (class token)": ([1, 3, 8, 8], lambda: mod.TinyViT()),
        "deit (class + dist tokens)": ([1, 3, 8, 8], lambda: mod.TinyViT(distilled=True)),
        "vit, PaddleClas sizes": ([1, 3, 8, 8], lambda: mod.TinyViT(paddleclas=True)),
        "swin (windows, rel. bias)": ([1, 3, 16, 16], lambda: mod.TinySwin()),
    }
    if hasattr(mod, "MHAViT"):
        nets["nn.MultiHeadAttention"] = ([1, 3, 16, 16], lambda: mod.MHAViT())
    spec = importlib.util.spec_from_file_location("app_vit",
                                                  ROOT / "prune_callbacks" / "app" / "vit.py")
    if spec is not None and Path(spec.origin).exists():
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
        nets["app vit_tiny (32x32)"] = ([1, 3, 32, 32], lambda: app.vit_tiny())
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reasons", action="store_true", help="print why groups stay whole")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%-28s %15s %19s  %s", "network", "prunable groups", "prunable channels",
                "prunable head groups (heads)")
    for name, (shape, build) in _nets().items():
        paddle.seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                groups = FilterPruner(build(), shape).groups
            except Exception as e:  # an engine that cannot trace it: say so and go on
                logger.info("%-28s fails: %s: %s", name, type(e).__name__, str(e)[:80])
                continue
        ok = [g for g in groups if g.prunable]
        heads = [g for g in ok if g.name.endswith(("qkv", "q_proj"))]
        logger.info("%-28s %7d / %5d %9d / %7d  %d (%s)", name, len(ok), len(groups),
                    sum(g.channels for g in ok), sum(g.channels for g in groups), len(heads),
                    ", ".join(str(g.channels) for g in heads))
        if args.reasons:
            seen = set()
            for g in groups:
                if not g.prunable and g.reason not in seen:
                    seen.add(g.reason)
                    logger.info("    whole: %s: %s", g.name, g.reason[:150])


if __name__ == "__main__":
    main()
