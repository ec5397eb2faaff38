"""Sparse training, a data-driven criterion and distillation in one fit on 2 CPU ranks (gloo)."""
from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks import DistillCallback, FilterPruneCallback, SparsityCallback
from prune_callbacks.training import distributed as pdist
from test_distributed import _BNNet, _Data, _trainable


def _worker(out_dir: str) -> None:
    dist.init_parallel_env()
    paddle.seed(1)
    net = _BNNet()
    model = paddle.Model(net, [InputSpec([None, 3, 8, 8], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(0.05, parameters=net.parameters()),
                  nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    try:  # each rank sees other samples: only summed statistics give one plan on both
        model.fit(_Data(), epochs=3, batch_size=8, verbose=0, shuffle=False, callbacks=[
            SparsityCallback(kind="group", strength=1e-3, growing=1e-3),
            FilterPruneCallback(flops=0.4, at_epoch=1, criterion="taylor", strategy="uniform"),
            DistillCallback(alpha=0.5)])
    except pdist.RankMismatchError as e:
        with open(os.path.join(out_dir, f"error{pdist.rank()}.txt"), "w") as f:
            f.write(str(e))
        return
    np.save(os.path.join(out_dir, f"weights{pdist.rank()}.npy"), _trainable(net))
    np.save(os.path.join(out_dir, f"shape{pdist.rank()}.npy"), np.array(net.c1.weight.shape))


@pytest.mark.xdist_group("distributed")  # spawned ranks share the machine's ports
def test_sparsity_taylor_and_distillation_on_two_ranks(tmp_path):
    dist.spawn(_worker, args=(str(tmp_path),), nprocs=2, backend="gloo")
    assert not list(tmp_path.glob("error*.txt")), (tmp_path / "error0.txt").read_text()
    w0, w1 = np.load(tmp_path / "weights0.npy"), np.load(tmp_path / "weights1.npy")
    np.testing.assert_array_equal(w0, w1)  # one plan, gradients (with the penalty) in sync
    assert np.load(tmp_path / "shape0.npy")[0] < 16  # pruned
