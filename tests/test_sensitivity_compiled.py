"""The compiled sensitivity path: the network exported once to Paddle Inference with
oneDNN, a keep vector as input. Its losses must be exactly those of plainly evaluating the masked
network, it must serve every group it can, and fall back (same numbers) for a group, or a
network, it cannot serve."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.vision import models

from prune_callbacks import EvalData, FilterPruner
from prune_callbacks.sensitivity import compiled as compiled_mod
from prune_callbacks.sensitivity.compiled import CompiledEval

from pruning_checks import masked_eval_fn

RATIOS = (0.3, 0.6, 0.9)


class Spy:
    """Records what the compiled path did during one analysis."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.built: List[Any] = []
        self.served: Dict[str, int] = {}
        build, outputs = CompiledEval.build.__func__, CompiledEval.outputs

        def spy_build(cls: type, *args: Any, **kw: Any) -> Any:
            out = build(cls, *args, **kw)
            self.built.append(out)
            return out

        def spy_outputs(inner: CompiledEval, drop: Any, verify: bool) -> Any:
            out = outputs(inner, drop, verify)
            if out is not None:
                key = next(iter(drop))
                self.served[key] = self.served.get(key, 0) + 1
            return out

        mp.setattr(CompiledEval, "build", classmethod(spy_build))
        mp.setattr(CompiledEval, "outputs", spy_outputs)

    @property
    def compiled(self) -> Any:
        return self.built[0] if self.built else None


def analyse_both(net: nn.Layer, ds: Any, shape: List[int], mp: pytest.MonkeyPatch,
                 **kw: Any) -> tuple:
    pruner = FilterPruner(net, shape)
    spy = Spy(mp)
    fast = pruner.sensitivity(EvalData(ds, batch_size=16, workers=2, **kw), ratios=RATIOS)
    mp.undo()
    plain = pruner.sensitivity(masked_eval_fn(net, ds, 16), ratios=RATIOS)
    return pruner, spy, fast, plain


@pytest.mark.parametrize("name,kwargs", [
    ("mobilenet_v1", {"scale": 0.25}),
    ("mobilenet_v2", {"scale": 0.25}),
    ("resnet18", {}),
])
def test_compiled_path_serves_every_group_with_the_plain_masked_losses(
        name: str, kwargs: Dict, make_labelled: Any) -> None:
    paddle.seed(0)
    net = getattr(models, name)(num_classes=10, **kwargs)
    ds = make_labelled(net, 40, [3, 16, 16], noise=0.2)
    mp = pytest.MonkeyPatch()
    pruner, spy, fast, plain = analyse_both(net, ds, [1, 3, 16, 16], mp)
    assert spy.compiled is not None and spy.compiled.delta is not None
    assert {g.name for g in pruner.prunable_groups} == spy.compiled.groups
    assert sum(spy.served.values()) == len(RATIOS) * len(pruner.prunable_groups)
    assert fast.baseline == plain.baseline
    assert fast.losses == plain.losses
    assert any(l != 0 for pts in fast.losses.values() for l in pts.values())
    assert not any(layer._forward_pre_hooks for layer in net.sublayers(include_self=True))


def test_every_doubtful_sample_is_recomputed_eagerly(make_labelled: Any) -> None:
    """With a margin that doubts every sample, every row is recomputed eagerly: same losses."""
    paddle.seed(2)
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    ds = make_labelled(net, 24, [3, 16, 16], noise=0.2)
    mp = pytest.MonkeyPatch()
    mp.setattr(compiled_mod, "REL_MARGIN", 10.0)
    pruner, spy, fast, plain = analyse_both(net, ds, [1, 3, 16, 16], mp)
    points = len(RATIOS) * len(pruner.prunable_groups)
    assert spy.compiled.recomputed == points * len(ds.x)
    assert fast.losses == plain.losses


def test_a_group_whose_compiled_outputs_disagree_is_evaluated_eagerly(make_labelled: Any) -> None:
    """A program that ignored the mask would disagree with eager masking on the first point's
    check block: the group then runs eagerly, with the same numbers."""
    paddle.seed(3)
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    ds = make_labelled(net, 24, [3, 16, 16], noise=0.2)
    mp = pytest.MonkeyPatch()
    mp.setattr(CompiledEval, "keep_vector", lambda self, drop: np.ones(self.size, "float32"))
    pruner, spy, fast, plain = analyse_both(net, ds, [1, 3, 16, 16], mp)
    assert spy.compiled is not None
    assert len(spy.served) < len(pruner.prunable_groups)  # the checks caught the ignored masks
    assert fast.losses == plain.losses


class ChannelShare(nn.Layer):
    """conv -> GroupNorm (statistics mix channels: not channel-separable) -> conv -> BN -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2D(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2D(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = nn.functional.relu(self.bn(self.c2(nn.functional.relu(self.gn(self.c1(x))))))
        return self.fc(paddle.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_a_group_through_a_mixing_norm_is_evaluated_eagerly(make_labelled: Any) -> None:
    paddle.seed(4)
    net = ChannelShare()
    net.eval()
    ds = make_labelled(net, 32, [3, 8, 8], noise=0.2)
    mp = pytest.MonkeyPatch()
    pruner, spy, fast, plain = analyse_both(net, ds, [1, 3, 8, 8], mp)
    names = {g.name for g in pruner.prunable_groups}
    assert "c1" in names and "c2" in names
    assert spy.compiled.groups == {"c2"}  # c1's channels pass the GroupNorm
    assert fast.losses == plain.losses


def test_a_network_that_cannot_be_compiled_falls_back_to_the_same_numbers(
        make_labelled: Any) -> None:
    """Any failure to export or load the program (a Paddle build without Paddle Inference or
    oneDNN, an op the exporter rejects) leaves the eager path: same numbers, no hook left."""
    paddle.seed(5)
    net = models.resnet18(num_classes=10)
    ds = make_labelled(net, 24, [3, 16, 16], noise=0.2)
    mp = pytest.MonkeyPatch()

    def no_inference(*args: Any) -> Any:
        raise RuntimeError("this Paddle build has no oneDNN")

    mp.setattr(compiled_mod, "_predictor", no_inference)
    _, spy, fast, plain = analyse_both(net, ds, [1, 3, 16, 16], mp)
    assert spy.built == [None]
    assert fast.losses == plain.losses
    assert not any(layer._forward_pre_hooks for layer in net.sublayers(include_self=True))


def test_engine_eager_never_compiles_and_a_bad_engine_is_named(make_labelled: Any) -> None:
    paddle.seed(6)
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    ds = make_labelled(net, 16, [3, 16, 16], noise=0.2)
    mp = pytest.MonkeyPatch()
    _, spy, fast, plain = analyse_both(net, ds, [1, 3, 16, 16], mp, engine="eager")
    assert spy.built == []
    assert fast.losses == plain.losses
    with pytest.raises(ValueError, match="engine must be one of auto, eager, got 'fast'"):
        EvalData(ds, engine="fast")
