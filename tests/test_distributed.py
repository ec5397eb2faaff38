"""The callbacks under paddle.distributed: 2 CPU ranks with gloo, spawned by the tests.

Each worker writes what it saw to files in a temp directory; the test (the parent) compares.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks import FilterPruneCallback, SensitivityCallback
from prune_callbacks.training import distributed as pdist

# several processes bind ports: under pytest-xdist they run on one worker, one at a time
pytestmark = pytest.mark.xdist_group("distributed")


class _Net(nn.Layer):
    """No BatchNorm: a 2-rank step then equals a 1-process step on both ranks' samples."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 16, 3, padding=1)
        self.c2 = nn.Conv2D(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = nn.functional.relu(self.c1(x))
        x = nn.functional.relu(self.c2(x))
        return self.fc(x.mean([2, 3]))


class _BNNet(_Net):
    """With BatchNorm, whose running statistics DataParallel does not synchronise."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.BatchNorm2D(16)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = nn.functional.relu(self.b1(self.c1(x)))
        x = nn.functional.relu(self.c2(x))
        return self.fc(x.mean([2, 3]))


class _Data(paddle.io.Dataset):
    def __init__(self, n: int = 64, seed: int = 0) -> None:
        rng = np.random.RandomState(seed)
        self.x = rng.randn(n, 3, 8, 8).astype("float32")
        self.y = rng.randint(0, 4, (n, 1)).astype("int64")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _fit(out_dir: str, batch_size: int, sensitivity: bool, perturb_rank: int = -1) -> nn.Layer:
    paddle.seed(1)
    net = _BNNet() if sensitivity else _Net()
    model = paddle.Model(net, [InputSpec([None, 3, 8, 8], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(0.05, parameters=net.parameters()),
                  nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    if pdist.rank() == perturb_rank:  # after prepare, which broadcasts rank 0's weights
        with paddle.no_grad():  # this rank's filter ranking, hence its plan, differs
            net.c1.weight.set_value(net.c1.weight * paddle.rand(net.c1.weight.shape))
    callbacks = []
    sens = None
    if sensitivity:
        sens = SensitivityCallback(_Data(48, seed=3), at_epoch=0, ratios=(0.25, 0.5, 0.75),
                                   path=os.path.join(out_dir, "sen.json"), batch_size=16)
        callbacks.append(sens)
    callbacks.append(FilterPruneCallback(flops=0.4, at_epoch=0, sensitivity=sens,
                                         strategy="sensitivity" if sensitivity else "uniform"))
    model.fit(_Data(), epochs=3, batch_size=batch_size, verbose=0, shuffle=False,
              callbacks=callbacks)
    if sens is not None:
        with open(os.path.join(out_dir, f"curves{pdist.rank()}.json"), "w") as f:
            json.dump({g: {str(r): l for r, l in c.items()} for g, c in sens.result.curves().items()}, f)
    model.save(os.path.join(out_dir, "final"))
    return net


def _trainable(net: nn.Layer) -> np.ndarray:
    return np.concatenate([p.numpy().ravel() for p in net.parameters() if p.trainable])


def _worker(out_dir: str, sensitivity: bool, perturb_rank: int) -> None:
    dist.init_parallel_env()
    try:
        net = _fit(out_dir, 8, sensitivity, perturb_rank)
    except pdist.RankMismatchError as e:
        with open(os.path.join(out_dir, f"error{pdist.rank()}.txt"), "w") as f:
            f.write(str(e))
        return
    np.save(os.path.join(out_dir, f"weights{pdist.rank()}.npy"), _trainable(net))


def _spawn(out_dir: str, sensitivity: bool = False, perturb_rank: int = -1) -> None:
    dist.spawn(_worker, args=(out_dir, sensitivity, perturb_rank), nprocs=2, backend="gloo")


def test_prune_in_fit_on_two_ranks_equals_one_process(tmp_path):
    """Pruned inside fit on 2 ranks (batch 8 each), then trained: both ranks hold identical
    weights, equal to one process trained on the same 16 samples per step, so gradients stayed
    synchronised through the rebuilt DataParallel wrapper and optimizer."""
    _spawn(str(tmp_path))
    w0, w1 = np.load(tmp_path / "weights0.npy"), np.load(tmp_path / "weights1.npy")
    np.testing.assert_array_equal(w0, w1)
    ref = _trainable(_fit(str(tmp_path / "single"), 16, sensitivity=False))
    assert ref.shape == w0.shape  # same plan: same pruned shapes
    np.testing.assert_allclose(w0, ref, atol=2e-5)


def test_plan_mismatch_stops_every_rank(tmp_path):
    start = time.monotonic()
    _spawn(str(tmp_path), perturb_rank=1)
    elapsed = time.monotonic() - start
    for r in (0, 1):
        msg = (tmp_path / f"error{r}.txt").read_text()
        assert "pruning plan differs between rank" in msg and "'c1'" in msg, msg
    assert not (tmp_path / "weights0.npy").exists()  # nobody trained on past the error
    assert elapsed < 120


def _analyse(path: str, drift: bool = False) -> dict:
    """Sensitivity of a fixed-seed net on fixed data (the same on every rank), as JSON-able
    curves. `drift`: this rank's BatchNorm running statistics differ (as after data-parallel
    training, which does not synchronise them)."""
    from prune_callbacks import FilterPruner
    paddle.seed(7)
    net = _BNNet()
    if drift:
        net.b1._mean.set_value(net.b1._mean + 0.5)
    pruner = FilterPruner(net, [1, 3, 8, 8])
    result = pruner.sensitivity(_Data(40, seed=5), ratios=(0.2, 0.5, 0.8), path=path,
                                batch_size=16)
    return {g: {str(r): l for r, l in c.items()} for g, c in result.curves().items()}


def _analysis_worker(out_dir: str) -> None:
    dist.init_parallel_env()
    curves = _analyse(os.path.join(out_dir, "sen.json"), drift=pdist.rank() == 1)
    with open(os.path.join(out_dir, f"curves{pdist.rank()}.json"), "w") as f:
        json.dump(curves, f)


def test_sensitivity_shared_over_two_ranks_equals_one_process(tmp_path):
    """Rank 1's BatchNorm statistics drifted: the analysis takes rank 0's, so the shared result
    is rank 0's one-process result."""
    single = _analyse(str(tmp_path / "single.json"))
    assert len(single) == 2 and all(len(c) == 3 for c in single.values())
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    dist.spawn(_analysis_worker, args=(str(shared_dir),), nprocs=2, backend="gloo")
    for r in (0, 1):  # every rank holds the whole analysis, equal to one process's
        assert json.loads((shared_dir / f"curves{r}.json").read_text()) == single
    saved = json.loads((shared_dir / "sen.json").read_text())
    assert saved["losses"] == json.loads((tmp_path / "single.json").read_text())["losses"]
    assert sorted(p.name for p in shared_dir.iterdir()) == ["curves0.json", "curves1.json",
                                                             "sen.json"]  # one file, no temp


def test_sensitivity_resumed_over_two_ranks(tmp_path):
    single = _analyse(str(tmp_path / "single.json"))
    partial = json.loads((tmp_path / "single.json").read_text())
    first = sorted(partial["losses"])[0]
    partial["losses"] = {first: {k: v for k, v in list(partial["losses"][first].items())[:2]}}
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    (shared_dir / "sen.json").write_text(json.dumps(partial))
    dist.spawn(_analysis_worker, args=(str(shared_dir),), nprocs=2, backend="gloo")
    for r in (0, 1):
        assert json.loads((shared_dir / f"curves{r}.json").read_text()) == single


def test_analyse_and_prune_inside_fit_on_two_ranks(tmp_path):
    """SensitivityCallback + FilterPruneCallback(sensitivity) in one fit under 2 ranks: the
    ranks hold the same curves and, after training on, the same weights; one analysis file and
    one checkpoint are written."""
    _spawn(str(tmp_path), sensitivity=True)
    c0, c1 = (json.loads((tmp_path / f"curves{r}.json").read_text()) for r in (0, 1))
    assert c0 == c1 and len(c0) == 2
    np.testing.assert_array_equal(np.load(tmp_path / "weights0.npy"),
                                  np.load(tmp_path / "weights1.npy"))
    saved = json.loads((tmp_path / "sen.json").read_text())
    assert {g: {str(float(r)): v for r, v in pts.items()} for g, pts in saved["losses"].items()} \
        == {g: {str(float(r)): v for r, v in pts.items()} for g, pts in c0.items()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
