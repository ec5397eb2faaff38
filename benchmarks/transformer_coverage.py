"""Prunable groups and channels of the vision transformers of tests/transformer_nets.py (and the
app's vit_tiny), as zoo_coverage.py prints them for the zoo; run on two checkouts to compare.

Run it on each checkout to compare (the networks are plain paddle, loaded from this file's
tree; the engine is whichever `prune_callbacks` is imported):

    PYTHONPATH=/path/to/old/checkout python benchmarks/transformer_coverage.py
    PYTHONPATH=$PWD python benchmarks/transformer_coverage.py

Prints, per network: prunable groups / groups, prunable channels / channels (a channel counted
once per group; a head group's channels are its heads), the prunable head and width groups, and
the first reason of each group left whole.

`--paddleclas PATH` does the same for real PaddleClas networks (PATH: the directory holding its
`ppcls` package; nothing is installed or downloaded), 224x224, 10 classes, and also says whether
`FilterPruner.flops()` equals `count_flops`; networks that fail to import are skipped with the
error. `--forwards` first registers the example attention forwards of
benchmarks/paddleclas_forwards.py (`AttentionPruning(forward=...)`):

    PYTHONPATH=$PWD python benchmarks/transformer_coverage.py --paddleclas /path/to/PaddleClas
    PYTHONPATH=$PWD python benchmarks/transformer_coverage.py --paddleclas /path/to/PaddleClas --forwards
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time
import warnings
from pathlib import Path

import paddle

from prune_callbacks import FilterPruner, count_flops

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


# real PaddleClas networks (module under ppcls.arch.backbone, constructor), smallest of each family
PADDLECLAS = [
    ("model_zoo.vision_transformer", "ViT_small_patch16_224"),
    ("model_zoo.distilled_vision_transformer", "DeiT_tiny_patch16_224"),
    ("model_zoo.distilled_vision_transformer", "DeiT_tiny_distilled_patch16_224"),
    ("legendary_models.swin_transformer", "SwinTransformer_tiny_patch4_window7_224"),
    ("model_zoo.swin_transformer_v2", "SwinTransformerV2_tiny_patch4_window8_256"),
    ("model_zoo.convnext", "ConvNeXt_tiny"),
    ("model_zoo.mobilevit", "MobileViT_XXS"),
    ("model_zoo.pvt_v2", "PVT_V2_B0"),
    ("model_zoo.cswin_transformer", "CSWinTransformer_tiny_224"),
    ("model_zoo.levit", "LeViT_128S"),
    ("model_zoo.cvt", "CvT_13_224"),
    ("model_zoo.twins", "pcpvt_small"),
    ("model_zoo.twins", "alt_gvt_small"),
    ("model_zoo.tnt", "TNT_small"),
]


def _paddleclas_nets(path: str):
    """Constructors of the PADDLECLAS networks found under `path` (or why each fails)."""
    sys.path.insert(0, str(Path(path).resolve()))
    nets = {}
    for module, fn in PADDLECLAS:
        try:
            build = getattr(importlib.import_module(f"ppcls.arch.backbone.{module}"), fn)
        except Exception as e:  # not in this PaddleClas, or its imports fail here
            nets[fn] = e
            continue
        size = 256 if "256" in fn else 224
        nets[fn] = ([1, 3, size, size], lambda build=build: build(class_num=10))
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reasons", action="store_true", help="print why groups stay whole")
    parser.add_argument("--paddleclas", metavar="PATH",
                        help="real PaddleClas networks from the PaddleClas tree at PATH")
    parser.add_argument("--forwards", action="store_true",
                        help="with --paddleclas: register benchmarks/paddleclas_forwards.py first")
    args = parser.parse_args()
    handler = logging.StreamHandler()  # its own: PaddleClas configures the root logger
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if args.paddleclas:
        nets = _paddleclas_nets(args.paddleclas)
        if args.forwards:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from paddleclas_forwards import register
            logger.info("registered forwards: %s", ", ".join(register()))
    else:
        nets = _nets()
    logger.info("%-28s %15s %19s  %s", "network", "prunable groups", "prunable channels",
                "prunable head groups (heads)" + (";  flops() == count_flops; trace s"
                                                  if args.paddleclas else ""))
    for name, entry in nets.items():
        if isinstance(entry, Exception):
            logger.info("%-28s skipped, import fails: %s: %s", name, type(entry).__name__,
                        str(entry).strip().splitlines()[-1][:80] if str(entry).strip() else "")
            continue
        shape, build = entry
        paddle.seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                net = build()
                net.eval()
                with paddle.no_grad():
                    net(paddle.randn(shape))
            except Exception as e:  # the network itself does not run (PaddleClas's own bug)
                logger.info("%-28s skipped, its forward fails: %s: %s", name, type(e).__name__,
                            str(e).strip().splitlines()[-1][:80] if str(e).strip() else "")
                continue
            try:
                start = time.perf_counter()
                pruner = FilterPruner(net, shape)
                groups = pruner.groups
                took = time.perf_counter() - start
            except Exception as e:  # an engine that cannot trace it: say so and go on
                logger.info("%-28s fails: %s: %s", name, type(e).__name__, str(e)[:80])
                continue
        ok = [g for g in groups if g.prunable]
        heads = [g for g in ok if g.name.endswith(("qkv", "q_proj", ".q"))]
        extra = ""
        if args.paddleclas:
            same = pruner.flops() == count_flops(net, shape)
            extra = f";  {'yes' if same else 'NO'}; {took:.1f}"
        logger.info("%-28s %7d / %5d %9d / %7d  %d (%s)%s", name, len(ok), len(groups),
                    sum(g.channels for g in ok), sum(g.channels for g in groups), len(heads),
                    ", ".join(str(g.channels) for g in heads), extra)
        if args.reasons:  # one line per kind of reason (its start), with how many groups
            kinds: dict = {}
            for g in groups:
                if not g.prunable:
                    kinds.setdefault(g.reason[:60], []).append(g)
            for same in kinds.values():
                where = same[0].reason.rfind("(in layer ")
                tail = f" ... {same[0].reason[where:where + 90]}" if where > 150 else ""
                logger.info("    whole: %d x, e.g. %s: %s%s", len(same), same[0].name,
                            same[0].reason[:150], tail)


if __name__ == "__main__":
    main()
