"""Shared checks for the small networks of the engine tests: a pruned network must equal the
masked original in eval and in train mode (every output of it), train for a step, and have the
FLOPs the pruner predicted (per sample, as `count_flops` counts them)."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from prune_callbacks import FilterPruner, count_flops
from prune_callbacks.sensitivity import top1_metric


def leaves(out: Any) -> List[paddle.Tensor]:
    """Every tensor of a (nested) output, dicts in key order."""
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in leaves(item)]
    return [out]


def run(net: nn.Layer, x: paddle.Tensor, training: bool = False) -> List[np.ndarray]:
    """Every output of `net(x)` as arrays, in the given mode, without moving norm statistics
    (a train-mode pass would update them) and with dropout seeded alike for every call."""
    saved = [(t, t.numpy().copy()) for t in net.state_dict().values()]  # BN stats too
    net.train() if training else net.eval()
    paddle.seed(123)
    try:
        with paddle.no_grad():
            return [t.numpy() for t in leaves(net(x))]
    finally:
        for b, value in saved:
            b.set_value(value)
        net.eval()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def randomise(net: nn.Layer, seed: int = 0) -> None:
    """Distinct per-channel values in every 1-D parameter (uniform init hides forgotten slices)."""
    rng = np.random.default_rng(seed)
    for p in net.parameters():
        if p.ndim == 1 or (p.ndim == 4 and p.shape[0] == 1):  # biases, norms, layer scales
            p.set_value(rng.uniform(0.5, 1.5, p.shape).astype("float32"))


def train_step(net: nn.Layer, shape: Sequence[int]) -> None:
    """One optimizer step in training mode on the sum of every output."""
    net.train()
    opt = paddle.optimizer.Momentum(learning_rate=0.01, parameters=net.parameters())
    x = paddle.randn([2] + list(shape[1:]))
    loss = sum(t.mean() for t in leaves(net(x)))
    loss.backward()
    for name, p in net.named_parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape, name
    opt.step()
    opt.clear_grad()
    assert np.isfinite(float(loss))
    net.eval()


def check_pruned(net: nn.Layer, shape: Sequence[int], ratios: Optional[Mapping[str, float]] = None,
                 modes: Sequence[bool] = (False, True), rtol: float = 1e-4,
                 expect_groups: Optional[Sequence[str]] = None,
                 ratio: float = 0.5) -> Dict[str, Any]:
    """Prune `ratios` (default `ratio` of every prunable group) and check the pruned network against
    the masked one in each mode of `modes` (False: eval), then a training step; FLOPs fall and
    `pruner.flops()` equals `count_flops` before and after.

    Returns:
        {"pruner", "plan"} for further checks.
    """
    randomise(net)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = FilterPruner(net, shape)
    names = [g.name for g in pruner.prunable_groups]
    if expect_groups is not None:
        assert set(expect_groups) <= set(names), (names, [(g.name, g.reason) for g in
                                                          pruner.groups if not g.prunable])
    ratios = dict(ratios) if ratios is not None else {n: ratio for n in names}
    assert ratios, "no prunable group"
    assert pruner.flops() == count_flops(net, shape)
    x = paddle.randn(list(shape))
    with pruner.mask(ratios):
        masked = {m: run(net, x, m) for m in modes}
    predicted = pruner.flops(ratios)
    plan = pruner.prune(ratios)
    for m in modes:
        pruned = run(net, x, m)
        assert len(pruned) == len(masked[m])
        for p, q in zip(pruned, masked[m]):
            assert p.shape == q.shape
            assert rel_err(p, q) <= rtol, ("train" if m else "eval", rel_err(p, q))
    assert plan.flops_after < plan.flops_before
    assert count_flops(net, shape) == plan.flops_after == predicted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert FilterPruner(net, shape).flops() == plan.flops_after
    train_step(net, shape)
    return {"pruner": pruner, "plan": plan}


def masked_eval_fn(net: nn.Layer, ds: Any, batch_size: int) -> Callable[[], float]:
    """Plain masked evaluation, the reference of the sensitivity tests: the whole network,
    eagerly, on whole batches of `ds.x` / `ds.y` (the analysis masks it)."""
    def evaluate() -> float:
        correct = total = 0.0
        with paddle.no_grad():
            for i in range(0, len(ds.x), batch_size):
                c, t = top1_metric(net(paddle.to_tensor(ds.x[i:i + batch_size])).numpy(),
                                   ds.y[i:i + batch_size])
                correct, total = correct + c, total + t
        return correct / total
    return evaluate
