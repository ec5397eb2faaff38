"""Where the time goes: ONNX Runtime's per-node profile of a network and its default-pruned copy.

Exports the network (seed 0, 10 classes) and a copy pruned with default settings (round_to "auto",
strategy uniform) to ONNX, runs each `--runs` times in ONNX Runtime with profiling on (one thread),
and prints the time per kind of node (depthwise conv, dense conv, everything else by op type), for
both, so the kinds whose time falls less than the FLOPs cut show what binds the latency cut. Times are wall time inside ONNX Runtime's kernels (its profiler's own clock), medians
per node over the runs.

    python benchmarks/profile_ops.py --model mobilenet_v2 --size 224 --batch 1 --flops 0.3
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import os
import statistics
import tempfile
import warnings
from typing import Dict, Tuple

import numpy as np
import paddle
from paddle.static import InputSpec
from paddle.vision import models

from prune_callbacks import FilterPruner
from prune_callbacks.deploy.onnx import export_onnx


def _kind(event: dict) -> str:
    """A node's kind from ONNX Runtime's profile: its op, and for a conv whether it is depthwise
    (weight `[C_out, 1, k, k]`); fused nodes keep the op they run (Conv + BN + Clip is a Conv)."""
    args = event.get("args", {})
    op = args.get("op_name", "?")
    if op == "Conv":
        shapes = [list(d.values())[0] for d in args.get("input_type_shape", [])]
        weight = shapes[1] if len(shapes) > 1 else []
        return "Conv depthwise" if len(weight) == 4 and weight[1] == 1 and weight[0] > 1 else "Conv dense"
    return op


def profile(net: paddle.nn.Layer, shape, batch: int, runs: int) -> Dict[str, float]:
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, os.path.join(tmp, "m"), [InputSpec([None, *shape[1:]], "float32", "x")])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        for _ in range(3):  # warm up without the profiler
            ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(runs + 2):
            sess.run(None, {name: x})
        with open(sess.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    per_node: Dict[Tuple[str, str], list] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["name"], _kind(e))].append(e["dur"])
    totals: Dict[str, float] = collections.defaultdict(float)
    for (_, kind), durs in per_node.items():
        totals[kind] += statistics.median(durs[2:] or durs) / 1000.0  # ms
    return dict(totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--flops", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("prune_callbacks").setLevel(logging.WARNING)
    paddle.seed(0)
    net = getattr(models, args.model)(num_classes=10)
    net.eval()
    shape = [1, 3, args.size, args.size]
    pruned = copy.deepcopy(net)
    plan = FilterPruner(pruned, shape, runtime="onnxruntime").prune_to_flops(args.flops)
    before = profile(net, shape, args.batch, args.runs)
    after = profile(pruned, shape, args.batch, args.runs)
    print(f"{args.model} {args.size}px bs{args.batch}, FLOPs cut {plan.pruned_flops:.3f}, onnxruntime 1 thread, "
          f"median kernel time per node over {args.runs} runs, summed by kind (ms)")
    print(f"{'kind':<34}{'before':>9}{'after':>9}{'cut':>8}")
    for kind in sorted(set(before) | set(after), key=lambda k: -before.get(k, 0.0)):
        b, a = before.get(kind, 0.0), after.get(kind, 0.0)
        print(f"{kind:<34}{b:>9.3f}{a:>9.3f}{(1 - a / b if b else float('nan')):>8.1%}")
    b, a = sum(before.values()), sum(after.values())
    print(f"{'all kernels':<34}{b:>9.3f}{a:>9.3f}{1 - a / b:>8.1%}")


if __name__ == "__main__":
    main()
