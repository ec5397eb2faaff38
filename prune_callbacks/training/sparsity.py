"""Sparsity regularisers over traced channel groups, as differentiable terms added to the loss.

`bn_scale` is L1 on the normalisation scales (network slimming); `group` is group lasso over
every trainable parameter of a coupled channel group (producers, consumers, norms, biases),
one L2 norm per channel. Both take a per-channel strength so the "growing" schedule can push
harder on the channels ranked for removal. Never changes the network's structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle

from ..graph.channels import ChannelGraph

EPS = 1e-8  # inside the square root: the group norm's gradient stays finite at zero


class Regulariser(str, Enum):
    """What the sparsity term penalises."""

    BN_SCALE = "bn_scale"  # sum |gamma| of the normalisation after each group's producers
    GROUP = "group"  # sum over channels of the L2 norm of all the group's parameters at it


@dataclass(frozen=True)
class _Piece:
    """The positions of one parameter axis that belong to one group, and their channels."""

    key: str
    axis: int
    blocks: int  # > 1: a grouped conv's input axis, positions counted per output block
    positions: np.ndarray  # flat indices into the per-position vector
    channels: np.ndarray  # group channel of each of those positions
    whole: bool  # every position, in channel order: no gather needed


def _pieces(graph: ChannelGraph, gi: int, keys: Sequence[str],
            param_keys: Mapping[str, object]) -> List[_Piece]:
    out = []
    channels = graph.groups[gi].channels
    for (key, axis), pa in graph.param_axes.items():
        p = param_keys.get(key)
        if key not in keys or p is None or p.stop_gradient:  # running mean/var are not trained
            continue
        grp, ch = pa.group.ravel(), pa.channel.ravel()
        sel = np.flatnonzero(grp == gi)
        if not len(sel):
            continue
        whole = len(sel) == len(grp) == channels and np.array_equal(ch[sel], np.arange(channels))
        out.append(_Piece(key, axis, pa.blocks, sel, ch[sel].astype(np.int64), whole))
    return out


def _position_squares(w: paddle.Tensor, axis: int, blocks: int) -> paddle.Tensor:
    """Sum of squares of `w` at each position of `axis` (per block for a grouped conv's input
    axis, whose blocks are the output filters split `blocks` ways), flattened."""
    sq = w.astype("float32") ** 2
    if blocks > 1:
        shape = [blocks, w.shape[0] // blocks] + list(w.shape[1:])
        sq = sq.reshape(shape)  # [blocks, out/blocks, per_block, ...]
        return sq.sum(axis=[1] + list(range(3, len(shape)))).flatten()
    dims = [d for d in range(len(w.shape)) if d != axis]
    return sq.sum(axis=dims) if dims else sq


def _positions(w: paddle.Tensor, axis: int, blocks: int) -> int:
    """The length of `_position_squares`' result."""
    return blocks * int(w.shape[1]) if blocks > 1 else int(w.shape[axis])


def _scaled(w: paddle.Tensor, factor: np.ndarray, axis: int, blocks: int) -> np.ndarray:
    """`w` times a per-position factor along `axis` (laid out as `_position_squares` lays the
    positions out), as an array of `w`'s dtype."""
    arr = w.numpy()
    if blocks > 1:  # [out, per_block, ...] -> [blocks, out / blocks, per_block, ...]
        shape = [blocks, arr.shape[0] // blocks] + list(arr.shape[1:])
        f = factor.reshape([blocks, 1, arr.shape[1]] + [1] * (arr.ndim - 2))
        return (arr.reshape(shape) * f).reshape(arr.shape).astype(arr.dtype)
    f = factor.reshape([-1 if d == axis else 1 for d in range(arr.ndim)])
    return (arr * f).astype(arr.dtype)


class GroupSparsity:
    """The sparsity term of some groups of a traced network.

    Args:
        graph: the network's channel graph (`FilterPruner.graph`).
        params: structured name -> Parameter of the same network (`dict(net.named_parameters())`).
        groups: indices of the groups penalised.
        kind: `Regulariser.GROUP` or `Regulariser.BN_SCALE`.

    Raises:
        ValueError: `bn_scale` on groups none of which has a normalisation scale.
    """

    def __init__(self, graph: ChannelGraph, params: Mapping[str, paddle.Tensor],
                 groups: Sequence[int], kind: Regulariser) -> None:
        self.params = params
        self.kind = Regulariser(kind)
        self.groups: List[int] = []
        self.names: List[str] = []
        self.channels: List[int] = []
        self._pieces: List[List[_Piece]] = []
        self._scatters: Dict[Tuple[str, int, bytes, int], Tuple[paddle.Tensor, paddle.Tensor]] = {}
        for gi in groups:
            g = graph.groups[gi]
            keys = set(g.norms) if self.kind is Regulariser.BN_SCALE else \
                {k for (k, _), pa in graph.param_axes.items() if (pa.group == gi).any()}
            if self.kind is Regulariser.BN_SCALE:  # the scale only, not the shift
                keys = {k for k in keys if k.endswith("weight")}
            pieces = _pieces(graph, gi, sorted(keys), params)
            if not pieces:
                continue
            self.groups.append(gi)
            self.names.append(g.name)
            self.channels.append(g.channels)
            self._pieces.append(pieces)
        if not self.groups:
            raise ValueError(
                f"no group to regularise with {self.kind.value!r}: "
                + ("none of the groups has a BatchNorm scale; use kind='group'"
                   if self.kind is Regulariser.BN_SCALE else "no prunable group has parameters"))

    def per_channel(self) -> List[paddle.Tensor]:
        """Each group's per-channel magnitude: the L2 norm of all its parameters at the channel
        (`group`), or |gamma| summed over its scales (`bn_scale`). Differentiable."""
        out = []
        for pieces, channels in zip(self._pieces, self.channels):
            total = None
            for pc in pieces:
                w = self.params[pc.key]
                if self.kind is Regulariser.BN_SCALE:
                    pos = w.astype("float32").abs().flatten()
                else:
                    pos = _position_squares(w, pc.axis, pc.blocks)
                if pc.whole:
                    part = pos
                else:  # scatter the positions onto the group's channels (sums repeats)
                    positions, onehot = self._scatter(pc, channels)
                    part = paddle.matmul(paddle.gather(pos, positions), onehot)
                total = part if total is None else total + part
            out.append(total if self.kind is Regulariser.BN_SCALE else paddle.sqrt(total + EPS))
        return out

    def _scatter(self, pc: _Piece, channels: int) -> Tuple[paddle.Tensor, paddle.Tensor]:
        key = (pc.key, pc.axis, pc.positions.tobytes(), channels)  # one per group's share
        if key not in self._scatters:
            onehot = np.zeros((len(pc.positions), channels), dtype="float32")
            onehot[np.arange(len(pc.positions)), pc.channels] = 1.0
            self._scatters[key] = (paddle.to_tensor(pc.positions), paddle.to_tensor(onehot))
        return self._scatters[key]

    def penalty(self, strengths: Sequence[np.ndarray]) -> paddle.Tensor:
        """`sum_g sum_c strength[g][c] * magnitude[g][c]`: the term added to the loss."""
        total = paddle.zeros([], dtype="float32")
        for mag, lam in zip(self.per_channel(), strengths):
            total = total + (mag * paddle.to_tensor(lam.astype("float32"))).sum()
        return total

    def proximal_step(self, strengths: Sequence[np.ndarray], lr: float,
                      extra: Optional[Mapping[str, paddle.Tensor]] = None) -> float:
        """One proximal step of the term, after the optimizer's: every channel's parameters are
        scaled by `max(0, 1 - lr * strength / magnitude)`, the proximal operator of the group
        lasso (`group`); for `bn_scale` each scale is soft-thresholded, `max(0, 1 - lr *
        strength / |gamma|)`. Unlike the term's gradient, this shrinks by the same amount
        whatever the optimizer does to its steps (Adam's per-element normalisation makes a
        gradient penalty almost powerless on weak channels), and zeroes a channel exactly.
        Each group's strongest channel is left alone, so a strength too high for the learning
        rate can empty a group's other channels but never the whole group (which would cut the
        network in two).

        Args:
            strengths: per group, each channel's strength.
            lr: the optimizer's learning rate now.
            extra: structured name -> another copy of a parameter scaled alike (AMP O2's
                float32 master weights).

        Returns:
            The term's value before the step (what `penalty` gives).
        """
        extra = extra or {}
        with paddle.no_grad():
            mags = [m.numpy().astype(np.float64) for m in self.per_channel()]
            value = float(sum((lam * mag).sum() for mag, lam in zip(mags, strengths)))
            for pieces, mag, lam in zip(self._pieces, mags, strengths):
                for pc in pieces:
                    w = self.params[pc.key]
                    if self.kind is Regulariser.BN_SCALE:
                        pos = np.abs(w.numpy().astype(np.float64).ravel())[pc.positions]
                    else:
                        pos = mag[pc.channels]
                    shrink = np.clip(1.0 - lr * lam[pc.channels] / np.maximum(pos, 1e-12), 0.0, 1.0)
                    shrink[pc.channels == int(np.argmax(mag))] = 1.0  # the group never empties
                    if np.all(shrink == 1.0):
                        continue
                    factor = np.ones(_positions(w, pc.axis, pc.blocks), dtype=np.float64)
                    factor[pc.positions] = shrink
                    for t in (w, extra.get(pc.key)):
                        if t is not None:
                            t.set_value(_scaled(t, factor, pc.axis, pc.blocks))
        return value

    def magnitudes(self) -> Dict[str, np.ndarray]:
        """Group name -> per-channel magnitude now, as numpy (no gradient)."""
        with paddle.no_grad():
            return {n: m.numpy().astype(np.float64) for n, m in zip(self.names, self.per_channel())}


def grow(strengths: Sequence[np.ndarray], magnitudes: Sequence[np.ndarray],
         delta: float) -> List[np.ndarray]:
    """One growth step (Torch-Pruning's GrowingReg): each channel's strength rises by `delta`
    times how far its magnitude is below its group's largest, scaled to [0, 1], so the channels
    ranked for removal are pushed hardest and the most important not at all."""
    out = []
    for lam, mag in zip(strengths, magnitudes):
        span = float(mag.max() - mag.min())
        rank = (mag.max() - mag) / span if span > 0 else np.zeros_like(mag)
        out.append(lam + delta * rank)
    return out


def spread(magnitudes: Mapping[str, np.ndarray]) -> Tuple[float, float]:
    """How spread the channels' magnitudes are, over all groups: the mean over groups of the
    coefficient of variation (std / mean), and the share of channels below 1% of their
    group's largest. Both rise as sparse training separates the channels to remove."""
    cvs, small, count = [], 0, 0
    for m in magnitudes.values():
        if m.size == 0 or m.max() <= 0:
            continue
        cvs.append(float(m.std() / (m.mean() + 1e-12)))
        small += int((m < 0.01 * m.max()).sum())
        count += m.size
    return (float(np.mean(cvs)) if cvs else 0.0, small / count if count else 0.0)
