"""Vision transformers: FLOPs of folded windows, tokens on axis 1, attention heads as pruning
units (issue 20). Networks: tests/transformer_nets.py (plain paddle, PaddleClas-shaped)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import paddle
import pytest

from prune_callbacks import FilterPruner, count_flops
from pruning_checks import check_pruned, randomise, rel_err, run
from transformer_nets import TinySwin, TinyViT


def _pruner(net, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FilterPruner(net, shape)


def _vit_macs(tokens: int, dim: int, hidden: int, depth: int, patches: int, patch: int,
              classes: int = 10) -> int:
    """Hand count: patch conv, per block qkv + proj + fc1 + fc2 over every token, head."""
    conv = 3 * dim * patch * patch * patches
    block = tokens * (dim * 3 * dim + dim * dim + dim * hidden + hidden * dim)
    return conv + depth * block + dim * classes


@pytest.mark.parametrize("batch", [1, 3])
def test_flops_count_folded_windows(batch):
    """Swin folds its 4 windows of 16 tokens into axis 0: all 64 tokens are counted, per sample
    whatever the batch, and predicted equals counted."""
    net = TinySwin()  # 16x16, patch 2: 8x8 = 64 tokens, windows 4x4, dim 32, MLP 64, 2 blocks
    expected = _vit_macs(tokens=64, dim=32, hidden=64, depth=2, patches=64, patch=2)
    shape = [batch, 3, 16, 16]
    assert count_flops(net, shape) == expected == 1073472
    assert _pruner(net, shape).flops() == expected


def test_flops_vit_block_by_hand():
    net = TinyViT(distilled=True)  # 8x8, patch 4: 4 patches + class + distillation tokens
    expected = _vit_macs(tokens=6, dim=32, hidden=64, depth=2, patches=4, patch=4) + 32 * 10
    assert count_flops(net, [2, 3, 8, 8]) == expected
    assert _pruner(net, [2, 3, 8, 8]).flops() == expected


@pytest.mark.parametrize("make,shape", [(lambda: TinyViT(), [1, 3, 8, 8]),
                                        (lambda: TinyViT(distilled=True), [1, 3, 8, 8]),
                                        (lambda: TinySwin(), [1, 3, 16, 16])])
def test_heads_and_hidden_widths_are_groups(make, shape):
    """Class/distillation tokens, token slicing and window reshapes no longer block the channel
    axis: every attention's heads (4 units, not 96 channels) and every MLP prune."""
    groups = {g.name: g for g in _pruner(make(), shape).groups}
    for b in range(2):
        heads = groups[f"blocks.{b}.attn.qkv"]
        assert heads.prunable and heads.channels == 4, heads
        assert groups[f"blocks.{b}.fc1"].prunable


def test_paddleclas_sizes_leave_heads_whole_with_a_reason():
    """PaddleClas writes `C // self.num_heads` with C the input's width: a pruned head count
    cannot follow, the heads trial says so, and the MLPs still prune."""
    groups = {g.name: g for g in _pruner(TinyViT(paddleclas=True), [1, 3, 8, 8]).groups}
    heads = groups["blocks.0.attn.qkv"]
    assert not heads.prunable and "attention heads" in heads.reason and "num_heads" in \
        heads.reason
    assert groups["blocks.0.fc1"].prunable


@pytest.mark.parametrize("make,shape", [(lambda: TinyViT(distilled=True), [2, 3, 8, 8]),
                                        (lambda: TinySwin(), [2, 3, 16, 16])])
def test_pruned_heads_equal_masked_heads(make, shape, tmp_path):
    """Half the heads of every attention (and half the MLP widths): pruned equals masked in eval
    and train mode (DropPath seeded alike), `num_heads` follows, the relative position bias
    table loses the heads' columns, FLOPs predicted equal counted, and the network exports."""
    net = make()
    heads = [f"blocks.{b}.attn.qkv" for b in range(2)]
    ratios = {n: 0.5 for n in heads + ["blocks.0.fc1", "blocks.1.fc1"]}
    check_pruned(net, shape, ratios)
    for blk in net.blocks:
        assert blk.attn.num_heads == 2
        assert blk.attn.qkv.weight.shape == [32, 3 * 2 * 8]
        assert blk.attn.proj.weight.shape == [16, 32]
        table = getattr(blk.attn, "relative_position_bias_table", None)
        if table is not None:
            assert table.shape[1] == 2
    net.eval()
    path = os.path.join(tmp_path, "vit")
    paddle.jit.save(net, path, input_spec=[paddle.static.InputSpec([None] + shape[1:],
                                                                   "float32")])
    loaded = paddle.jit.load(path)
    x = paddle.randn(shape)
    assert rel_err(loaded(x).numpy(), net(x).numpy()) < 1e-5


def test_head_importance_sums_the_heads_rows():
    """A head's score is the criterion over its rows of q, k and v (its slices of the fused
    qkv): zeroing one head's rows makes it the least important."""
    net = TinyViT()
    pruner = _pruner(net, [1, 3, 8, 8])
    w = net.blocks[0].attn.qkv.weight
    arr = w.numpy()
    cols = np.arange(96).reshape(3, 4, 8)[:, 2].ravel()  # head 2 in q, k and v
    arr[:, cols] = 0
    w.set_value(arr)
    scores = pruner.importance("blocks.0.attn.qkv")
    assert scores.shape == (4,) and int(np.argmin(scores)) == 2
    kept = pruner.select({"blocks.0.attn.qkv": 0.25})[pruner.group_index("blocks.0.attn.qkv")]
    assert 2 not in kept.tolist() and len(kept) == 3
