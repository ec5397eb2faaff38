"""The compiled evaluation path of the sensitivity analysis: the network exported once, run by
Paddle Inference with oneDNN kernels on the CPU, with the mask as a second input.

Masking a group zeroes its channels' parameters everywhere (`surgery.Mask`). For the network's
output that is the same as zeroing those channels where a layer that mixes them reads them (the
input of a conv or linear taking them), provided every other layer they pass is channel-separable
(`LayerPruning.channel_separable`: conv, linear, BatchNorm, PReLU): a channel's stale values
then never reach another channel. So the network is exported once with a "keep" vector as input,
multiplied into the input of every such mixing layer, and every point of the analysis is one run
of that program with the keep vector of its mask: no recompilation, and 7-30x less time than an
eager forward on small images (oneDNN's depthwise and fused conv kernels; measured in
`benchmarks/bench_sensitivity.py`).

oneDNN's sums are not bit-identical to the eager kernels, so the path keeps the eager top-1
counts exactly instead: the largest difference between the two is measured on the unmasked
network, and every sample whose top-1 margin is within a safe multiple of it (or within 1e-4 of
its largest logit) is recomputed eagerly, in the aligned 8-row block that gives it the same
floats as its whole batch (`evaluation.ROW_BLOCK`). The first point of each group is also
checked eagerly on one block; a group that disagrees, one with a layer that is not
channel-separable or whose input axis is unknown, and a network that cannot be exported are
evaluated eagerly (`replay.Runner`), with the same numbers.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from ..layers.registry import layer_handler
from ..layers.surgery import Mask
from .evaluation import ROW_BLOCK, EvalData, main_output, top1_metric

logger = logging.getLogger(__name__)

SAFETY = 16.0
"""Samples whose top-1 margin is within SAFETY x the largest compiled-vs-eager difference seen on
the unmasked network are recomputed eagerly."""
REL_MARGIN = 1e-4
"""...and so are samples whose margin is within this share of their largest logit."""

ParamSlices = Mapping[str, Mapping[int, Any]]


@dataclass
class _Site:
    """Where the keep vector enters: the input of one mixing layer, along its channel axis."""

    path: str
    axis: int
    offset: int = 0
    channels: int = 0


@dataclass
class _Member:
    """How one (parameter, axis) of a mixing layer maps to positions of its site's input."""

    site: str
    per_block: int  # positions per block of a grouped conv's input axis; 0 for a plain axis
    positions: int  # all positions of the axis (blocks x per block)


def compilable(evaluate: Any) -> bool:
    """Whether the compiled path may serve this evaluation: an `EvalData` with engine "auto",
    scored by top-1 accuracy (the margin check is what keeps counts exact), on the CPU."""
    return (isinstance(evaluate, EvalData) and evaluate.engine == "auto"
            and evaluate.metric is top1_metric
            and paddle.device.get_device().startswith("cpu"))


class CompiledEval:
    """The exported network with its keep input; see the module docstring.

    Build with `CompiledEval.build(...)` (None when the network cannot be exported), then
    `calibrate(eager_outputs)` once with the eager baseline's outputs; `covers(name)` says which
    groups it serves and `outputs(drop)` gives the masked outputs with every doubtful sample
    already recomputed eagerly.
    """

    def __init__(self, net: nn.Layer, ev: EvalData, sites: Dict[str, _Site],
                 members: Dict[Tuple[str, int], _Member], groups: Set[str],
                 predictor: Any) -> None:
        self.net, self.ev = net, ev
        self.sites, self.members, self.groups = sites, members, groups
        self.predictor = predictor
        self.size = sum(s.channels for s in sites.values())
        self.delta: Optional[float] = None
        self.recomputed = 0  # samples recomputed eagerly, for the benchmark's report
        self._starts = np.cumsum([0] + [len(y) for _, y in ev.batches])

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(cls, net: nn.Layer, ev: EvalData, groups: Sequence[Tuple[int, Any]],
              param_axes: Mapping[Tuple[str, int], Any]) -> Optional["CompiledEval"]:
        """Export `net` (in its current, eval, mode) with a keep input for `groups`; None, with
        the reason logged, when no group qualifies or the export fails."""
        layers = dict(net.named_sublayers())
        wanted = _eligible(layers, groups, param_axes)
        if not wanted:
            logger.info("compiled sensitivity path: no group qualifies; evaluating eagerly")
            return None
        x = ev.batches[0][0]
        try:
            seen = _input_channels(net, layers, {m.site for ms in wanted.values() for _, m in ms}, x)
            sites, members, names = _sites(wanted, seen, layers)
            if not names:
                return None
            predictor = _export(net, layers, sites, x)
        except Exception as e:  # any failure to export leaves the eager path, same numbers
            logger.info("compiled sensitivity path unavailable (%s: %s); evaluating eagerly",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None
        return cls(net, ev, sites, members, names, predictor)

    def calibrate(self, eager: Sequence[np.ndarray]) -> bool:
        """Measure the largest difference from the eager baseline's outputs; False (do not use
        the path) when the outputs differ in shape or by more than a margin could cover."""
        got = self._run(np.ones(self.size, dtype=np.float32))
        ref = np.concatenate([np.asarray(o) for o in eager])
        if got.shape != ref.shape or not np.all(np.isfinite(got)):
            logger.info("compiled sensitivity path: outputs differ in shape or are not finite; "
                        "evaluating eagerly")
            return False
        self.delta = float(np.abs(got - ref).max()) if got.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        if self.delta > 1e-2 * max(scale, 1e-30):
            logger.info("compiled sensitivity path: differs from eager by %.3g (outputs up to "
                        "%.3g); evaluating eagerly", self.delta, scale)
            return False
        logger.info("compiled sensitivity path: %d groups, largest difference from eager %.3g",
                    len(self.groups), self.delta)
        return True

    def covers(self, name: str) -> bool:
        return self.delta is not None and name in self.groups

    # -- evaluating ------------------------------------------------------------------------
    def keep_vector(self, drop: ParamSlices) -> np.ndarray:
        """The keep input (1 = kept) for a mask that zeroes `drop`."""
        keep = np.ones(self.size, dtype=np.float32)
        for key, axes in drop.items():
            for axis, idx in axes.items():
                m = self.members.get((key, axis))
                if m is None or len(idx) == 0:
                    continue
                if m.per_block:
                    pos = [b * m.per_block + j for b, row in enumerate(idx) for j in row]
                else:
                    pos = list(idx)
                keep[self.sites[m.site].offset + np.asarray(pos, dtype=np.int64)] = 0.0
        return keep

    def outputs(self, drop: ParamSlices, verify: bool) -> Optional[List[np.ndarray]]:
        """Per batch, the masked network's outputs with eager top-1 decisions; None when
        `verify` finds that this group's compiled outputs disagree with eager masking."""
        out = self._run(self.keep_vector(drop))
        blocks = self._doubtful(out)
        if verify:
            blocks.add((0, min(ROW_BLOCK, int(self._starts[1]))))
        exact = self._eager(drop, sorted(blocks))
        if verify:
            a, z = 0, min(ROW_BLOCK, int(self._starts[1]))
            if not self._agree(out[a:z], exact[(a, z)]):
                return None
        for (a, z), rows in exact.items():
            out[a:z] = rows
        self.recomputed += sum(z - a for a, z in exact)
        return [out[a:z] for a, z in zip(self._starts[:-1], self._starts[1:])]

    def _run(self, keep: np.ndarray) -> np.ndarray:
        """Outputs of every evaluation row, batch by batch; inputs are copied out of the batches
        per run, not kept. A short last batch is padded to the full size: one input shape for
        every run, so oneDNN never rebuilds its kernels for a new shape."""
        rows = len(self.ev.batches[0][1])
        outs = []
        for x, y in self.ev.batches:
            data = x.numpy()
            if len(data) < rows:
                data = np.concatenate([data, np.zeros((rows - len(data),) + data.shape[1:],
                                                      dtype=data.dtype)])
            outs.append(_predict(self.predictor, data, keep)[:len(y)])
        return np.concatenate(outs)

    def _tolerance(self, out: np.ndarray) -> np.ndarray:
        flat = out.reshape(len(out), -1)
        return np.maximum(SAFETY * (self.delta or 0.0), REL_MARGIN * np.abs(flat).max(axis=1))

    def _doubtful(self, out: np.ndarray) -> Set[Tuple[int, int]]:
        """Aligned row blocks (start, end) holding a sample whose top-1 could flip."""
        flat = out.reshape(len(out), -1)
        if flat.shape[1] < 2:
            return set()
        top2 = -np.partition(-flat, 1, axis=1)[:, :2]
        close = np.flatnonzero(top2[:, 0] - top2[:, 1] <= self._tolerance(out))
        blocks = set()
        for i in close:
            b = int(np.searchsorted(self._starts, i, side="right") - 1)
            start = self._starts[b] + (i - self._starts[b]) // ROW_BLOCK * ROW_BLOCK
            blocks.add((int(start), int(min(start + ROW_BLOCK, self._starts[b + 1]))))
        return blocks

    def _eager(self, drop: ParamSlices,
               blocks: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], np.ndarray]:
        if not blocks:
            return {}
        out = {}
        with Mask(self.net, drop), paddle.no_grad():
            for a, z in blocks:
                b = int(np.searchsorted(self._starts, a, side="right") - 1)
                start = int(self._starts[b])
                y = self.net(self.ev.batches[b][0][a - start:z - start])
                out[(a, z)] = main_output(y[0] if isinstance(y, (tuple, list)) else y).numpy()
        return out

    def _agree(self, got: np.ndarray, exact: np.ndarray) -> bool:
        if got.shape != exact.shape:
            return False
        err = np.abs(got - exact).reshape(len(got), -1).max(axis=1)
        return bool(np.all(err <= self._tolerance(exact) / 2))


def _eligible(layers: Mapping[str, nn.Layer], groups: Sequence[Tuple[int, Any]],
              param_axes: Mapping[Tuple[str, int], Any]) -> Dict[str, List[Tuple[Tuple[str, int],
                                                                                    _Member]]]:
    """Per group name, the mixing (input-side) members it needs as sites, for the groups whose
    every other member is channel-separable."""
    out: Dict[str, List[Tuple[Tuple[str, int], _Member]]] = {}
    for gi, g in groups:
        needs: List[Tuple[Tuple[str, int], _Member]] = []
        ok = True
        for (key, axis), pa in param_axes.items():
            if not np.any(pa.group == gi):
                continue
            path = key.rpartition(".")[0]
            layer = layers.get(path)
            handler = layer_handler(layer) if layer is not None else None
            if handler is None:
                ok = False
            elif str(pa.role) == "in":
                if handler.input_channel_axis(layer) is None:
                    ok = False
                else:
                    per = pa.group.shape[1] if pa.group.ndim == 2 else 0
                    needs.append(((key, axis), _Member(path, per, int(pa.group.size))))
            elif not handler.channel_separable:
                ok = False
            if not ok:
                break
        if ok:
            out[g.name] = needs
    return out


def _input_channels(net: nn.Layer, layers: Mapping[str, nn.Layer], paths: Set[str],
                    x: paddle.Tensor) -> Dict[str, int]:
    """Channels of each site layer's input along its channel axis, from one forward of a row
    (layers that are not called are left out)."""
    seen: Dict[str, int] = {}
    hooks = []

    def make(path: str, axis: int) -> Any:
        def hook(layer: nn.Layer, inputs: Any) -> None:
            seen[path] = int(inputs[0].shape[axis])
        return hook

    try:
        for p in sorted(paths):
            layer = layers[p]
            hooks.append(layer.register_forward_pre_hook(
                make(p, layer_handler(layer).input_channel_axis(layer))))
        with paddle.no_grad():
            net(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _sites(wanted: Mapping[str, List[Tuple[Tuple[str, int], _Member]]], seen: Mapping[str, int],
           layers: Mapping[str, nn.Layer]
           ) -> Tuple[Dict[str, _Site], Dict[Tuple[str, int], _Member], Set[str]]:
    """The sites of the groups whose members all fit their layer's input, with offsets."""
    sites: Dict[str, _Site] = {}
    members: Dict[Tuple[str, int], _Member] = {}
    names: Set[str] = set()
    for name, needs in wanted.items():
        if any(seen.get(m.site) != m.positions for _, m in needs):
            continue  # a layer never called, or whose input does not match its parameter axis
        names.add(name)
        for key, m in needs:
            members[key] = m
            if m.site not in sites:
                layer = layers[m.site]
                sites[m.site] = _Site(m.site, layer_handler(layer).input_channel_axis(layer),
                                      channels=m.positions)
    offset = 0
    for s in sites.values():
        s.offset, offset = offset, offset + s.channels
    return sites, members, names


class _Keeps:
    """The keep slices the traced forward hands to the site hooks."""

    parts: List[Any] = []


@paddle.jit.not_to_static
def _first_output(y: Any) -> Any:
    return main_output(y)


class _KeepNet(nn.Layer):
    """`net(x)` whose site layers see their input times the keep vector's slice."""

    def __init__(self, net: nn.Layer, spans: List[Tuple[int, int]], keeps: _Keeps) -> None:
        super().__init__()
        self.net = net
        self.spans = spans
        self.keeps = keeps

    def forward(self, x: paddle.Tensor, keep: paddle.Tensor) -> paddle.Tensor:
        self.keeps.parts = [keep[a:a + n] for a, n in self.spans]
        return _first_output(self.net(x))


def _export(net: nn.Layer, layers: Mapping[str, nn.Layer], sites: Mapping[str, _Site],
            x: paddle.Tensor) -> Any:
    """Save `net` with its site hooks as an inference program and load it."""
    keeps = _Keeps()
    order = list(sites.values())

    def make(i: int, axis: int) -> Any:
        def hook(layer: nn.Layer, inputs: Any) -> Any:
            t = inputs[0]
            shape = [1] * len(t.shape)
            shape[axis] = -1
            return (t * keeps.parts[i].reshape(shape),) + tuple(inputs[1:])
        return hook

    hooks = [layers[s.path].register_forward_pre_hook(make(i, s.axis))
             for i, s in enumerate(order)]
    wrapper = _KeepNet(net, [(s.offset, s.channels) for s in order], keeps)
    specs = [InputSpec([None, *x.shape[1:]], x.dtype, "x"),
             InputSpec([sum(s.channels for s in order)], "float32", "keep")]
    try:
        with tempfile.TemporaryDirectory(prefix="prune_sensitivity_") as tmp, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prefix = os.path.join(tmp, "keep")
            paddle.jit.save(wrapper, prefix, input_spec=specs)
            model = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
            return _predictor(model, prefix + ".pdiparams")
    finally:
        for h in hooks:
            h.remove()


def _predictor(model: str, params: str) -> Any:
    """A Paddle Inference predictor with oneDNN on one thread. It runs in the analysis' own
    thread only: predictors (clones, or second ones) run from a new pool's worker threads after
    running elsewhere failed with a bare std::exception here; and one oneDNN thread
    because with two, on a CPU shared with other work, OpenMP's spinning barriers stalled runs
    from 0.02 s to 1-3 s (ShuffleNetV2, load average 4 on 2 cores)."""
    config = paddle.inference.Config(model, params)
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(1)
    config.enable_onednn()
    config.disable_glog_info()
    return paddle.inference.create_predictor(config)


def _predict(predictor: Any, rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
    for name, value in (("x", rows), ("keep", keep)):
        h = predictor.get_input_handle(name)
        h.reshape(list(value.shape))
        h.copy_from_cpu(np.ascontiguousarray(value))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
