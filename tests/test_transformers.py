"""Vision transformers: FLOPs of folded windows, tokens on axis 1, attention heads as pruning
units. Networks: tests/transformer_nets.py (plain paddle, PaddleClas-shaped)."""
from __future__ import annotations

import copy
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


# ---------------------------------------------------------------------------------------------
# Embedding widths through LayerNorm
# ---------------------------------------------------------------------------------------------


def _reference_vit(params, x, keep, heads=4, eps=1e-5):
    """TinyViT in numpy with the embedding channels `keep` only, every weight sliced by hand
    (patch conv filters, class token, position embedding, every LayerNorm, qkv and fc1 inputs,
    proj and fc2 outputs, LayerScales, head input): the independent reference of a pruned
    width. LayerNorm normalises over the kept channels."""
    P = {k: v.numpy().astype("float64") for k, v in params.items()}
    x = x.astype("float64")

    def ln(t, name):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + eps) * P[name + ".weight"][keep] + P[name + ".bias"][keep]

    w = P["patch_embed.weight"][keep]  # [C', 3, 4, 4]
    b, _, hgt, wid = x.shape
    p = w.shape[-1]
    patches = x.reshape(b, 3, hgt // p, p, wid // p, p).transpose(0, 2, 4, 1, 3, 5)
    t = np.einsum("bijcuv,ocuv->bijo", patches, w).reshape(b, -1, len(keep))
    t = t + P["patch_embed.bias"][keep]
    cls = np.broadcast_to(P["cls_token"][..., keep], (b, 1, len(keep)))
    t = np.concatenate([cls, t], axis=1) + P["pos_embed"][..., keep]
    for i in range(2):
        pre = f"blocks.{i}."
        h = ln(t, pre + "norm1")
        qkv = h @ P[pre + "attn.qkv.weight"][keep] + P[pre + "attn.qkv.bias"]
        n = t.shape[1]
        qkv = qkv.reshape(b, n, 3, heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        s = q @ k.transpose(0, 1, 3, 2) * (32 // heads) ** -0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(b, n, -1)
        a = a @ P[pre + "attn.proj.weight"][:, keep] + P[pre + "attn.proj.bias"][keep]
        h = ln(t, pre + "norm2")
        h = h @ P[pre + "fc1.weight"][keep] + P[pre + "fc1.bias"]
        h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
        m = h @ P[pre + "fc2.weight"][:, keep] + P[pre + "fc2.bias"][keep]
        t = t + a * P[pre + "gamma1"][keep]
        t = t + m * P[pre + "gamma2"][keep]
    t = ln(t, "norm")
    return t[:, 0] @ P["head.weight"][keep] + P["head.bias"]


@pytest.mark.parametrize("training", [False, True])
def test_pruned_width_equals_the_network_without_those_channels(training):
    """The embedding width loses 12 of 32 channels: the pruned network (eval, and train mode
    without DropPath) equals an independent numpy ViT that never had them."""
    paddle.seed(0)
    net = TinyViT(drop_path=0.0)
    randomise(net)
    original = dict(net.named_parameters())
    snapshot = {k: paddle.to_tensor(v.numpy()) for k, v in original.items()}
    pruner = _pruner(net, [1, 3, 8, 8])
    gi = pruner.group_index("patch_embed")
    assert pruner.groups[gi].prunable
    kept = pruner.select({"patch_embed": 12 / 32})[gi]
    assert len(kept) == 20
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype("float32")
    pruner.apply({gi: kept})
    assert net.blocks[0].norm1._normalized_shape == [20] and net.pos_embed.shape == [1, 5, 20]
    got = run(net, paddle.to_tensor(x), training)[0]
    want = _reference_vit(snapshot, x, kept)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("make,shape", [(lambda: TinyViT(distilled=True), [2, 3, 8, 8]),
                                        (lambda: TinySwin(), [2, 3, 16, 16])])
def test_widths_heads_and_mlps_together(make, shape, tmp_path):
    """Every group at once (embedding width, heads, MLP widths): pruned equals masked in eval
    and train mode, masks renormalising LayerNorm over the kept channels; FLOPs predicted equal
    counted; the pruned network exports."""
    net = make()
    out = check_pruned(net, shape, expect_groups=["patch_embed", "blocks.0.attn.qkv",
                                                 "blocks.1.fc1"])
    assert net.patch_embed.weight.shape[0] == 16 and net.norm.weight.shape == [16]
    assert out["plan"].flops_after < 0.5 * out["plan"].flops_before
    net.eval()
    path = os.path.join(tmp_path, "net")
    paddle.jit.save(net, path, input_spec=[paddle.static.InputSpec([None] + shape[1:],
                                                                   "float32")])
    x = paddle.randn(shape)
    assert rel_err(paddle.jit.load(path)(x).numpy(), net(x).numpy()) < 1e-5


def test_layer_norm_widths_switch_off_says_what_happens():
    groups = {g.name: g for g in _pruner_off(TinyViT(), [1, 3, 8, 8]).groups}
    g = groups["patch_embed"]
    assert not g.prunable and "layer_norm_widths=False" in g.reason
    assert groups["blocks.0.attn.qkv"].prunable


def _pruner_off(net, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FilterPruner(net, shape, layer_norm_widths=False)


class _Samples:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __len__(self):
        return len(self.x)


def test_width_sensitivity_measures_the_pruned_network():
    """The analysis of a width group (masked, LayerNorm renormalising) gives the loss of the
    physically pruned network, point for point."""
    paddle.seed(0)
    net = TinyViT()
    randomise(net)
    net.eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 3, 8, 8)).astype("float32")
    with paddle.no_grad():
        y = net(paddle.to_tensor(x)).numpy().argmax(1).astype("int64")
    y[::3] = (y[::3] + 1) % 10  # a baseline below 1
    pruner = _pruner(net, [1, 3, 8, 8])
    ratios = [0.25, 0.5]
    result = pruner.sensitivity(_Samples(x, y[:, None]), ratios=ratios, skip=[
        g.name for g in pruner.prunable_groups if g.name != "patch_embed"], batch_size=16)
    with paddle.no_grad():
        base = np.mean(net(paddle.to_tensor(x)).numpy().argmax(1) == y)
    losses = []
    for r in ratios:
        pruned = copy.deepcopy(net)
        p2 = _pruner(pruned, [1, 3, 8, 8])
        p2.prune({"patch_embed": r})
        pruned.eval()
        with paddle.no_grad():
            acc = np.mean(pruned(paddle.to_tensor(x)).numpy().argmax(1) == y)
        assert result.curves()["patch_embed"][r] == pytest.approx((base - acc) / base, abs=1e-9)
        losses.append(result.curves()["patch_embed"][r])
    assert max(losses) > 0  # the points measure something


def test_paddle_multi_head_attention_heads_and_width():
    """`paddle.nn.MultiHeadAttention` (separate q, k, v projections, `transpose_y` matmul): its
    heads are one group of 4 units across q, k, v and out projections; pruned equals masked and
    its `num_heads` follows."""
    from transformer_nets import MHAViT
    net = MHAViT()
    groups = {g.name: g for g in _pruner(net, [2, 3, 16, 16]).groups}
    heads = groups["attn.q_proj"]
    assert heads.prunable and heads.channels == 4
    assert {k for k, _ in heads.members} >= {"attn.k_proj.weight", "attn.v_proj.weight",
                                             "attn.out_proj.weight"}
    check_pruned(net, [2, 3, 16, 16], {"attn.q_proj": 0.5, "patch_embed": 0.25})
    assert net.attn.num_heads == 2 and net.attn.q_proj.weight.shape == [24, 16]


@pytest.mark.slow
def test_app_prunes_vit_tiny_heads_and_widths(tmp_path):
    """`python train.py model=vit_tiny` in miniature: the uniform strategy cuts every group,
    heads and the embedding width included, and the pruned plan says so."""
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from prune_callbacks.app import train

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "model=vit_tiny", "model.embed_dim=16", "model.depth=1", "data.image_size=8",
            "data.train_samples=64", "data.val_samples=32", "trainer.epochs_before=1",
            "trainer.epochs_after=1", "trainer.verbose=0", "prune.strategy=uniform",
            "prune.flops=0.5", "optim=adam"])
    cfg.output_dir = str(tmp_path)
    results = train(cfg)
    assert results["flops_after"] < 0.55 * results["flops_before"]
    plans = json.loads((tmp_path / "checkpoint" / "final.prune.json").read_text())["plans"]
    cut = {g["name"]: (g["channels"], len(g["kept"])) for g in plans[0]["groups"]}
    assert cut["blocks.0.attn.qkv"][0] == 4 and cut["blocks.0.attn.qkv"][1] < 4
    assert cut["patch_embed"][1] < cut["patch_embed"][0] == 16


def test_saved_pruned_vit_reloads_into_a_fresh_network(tmp_path):
    """Heads and width pruned, saved, loaded into a freshly built TinyViT: the plans re-apply
    (head counts follow there too) and the outputs match."""
    from prune_callbacks import load_pruned, save_pruned
    paddle.seed(0)
    net = TinyViT()
    pruner = _pruner(net, [1, 3, 8, 8])
    pruner.prune({"blocks.0.attn.qkv": 0.5, "patch_embed": 0.25})
    save_pruned(net, str(tmp_path / "vit"))
    fresh = TinyViT()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_pruned(fresh, str(tmp_path / "vit"))
    assert fresh.blocks[0].attn.num_heads == 2 and fresh.blocks[1].attn.num_heads == 4
    x = paddle.randn([2, 3, 8, 8])
    net.eval(), fresh.eval()
    assert rel_err(fresh(x).numpy(), net(x).numpy()) < 1e-6


def test_an_attention_layer_registers_its_head_count_name():
    """A head count called `h` is unknown (the heads stay whole; the reason names the fix);
    registered with `AttentionPruning("h")` it follows, and the layer's per-head temperature is
    sliced with the heads."""
    from prune_callbacks import register_layer_type
    from prune_callbacks.layers.registry import AttentionPruning, _HANDLERS
    from transformer_nets import TalkingAttention, TalkingViT
    shape = [2, 3, 16, 16]
    heads = {g.name: g for g in _pruner(TalkingViT(temperature=False), shape).groups}["attn.qkv"]
    assert not heads.prunable and "AttentionPruning" in heads.reason
    register_layer_type(TalkingAttention, AttentionPruning("h"))
    try:
        for temperature in (True, False):
            net = TalkingViT(temperature)
            check_pruned(net, shape, {"attn.qkv": 0.5})
            assert net.attn.h == 2
        assert net.attn.temperature is None
    finally:
        _HANDLERS.pop(TalkingAttention, None)


def test_an_int_kept_equal_to_a_per_head_parameter_is_synced_by_trial():
    """Unregistered, `h` sits next to a per-head temperature of the same layer: the trial prune
    shows the forward needs it in sync with the pruned heads, so it is kept so, and the heads
    prune (pruned equals masked)."""
    from transformer_nets import TalkingViT
    net = TalkingViT()
    check_pruned(net, [2, 3, 16, 16], {"attn.qkv": 0.5})
    assert net.attn.h == 2 and net.attn.temperature.shape == [1, 2, 1, 1]


@pytest.mark.parametrize("batch", [1, 3])
def test_run_time_batch_is_not_taken_from_a_weight(batch):
    """Filling run-time sizes from the op before the batch must not read a weight's rows as
    the rows of a linear's input."""
    from transformer_nets import RunTimeBatchHead
    net = RunTimeBatchHead()
    expected = 3 * 8 * 9 * 36 + 288 * 5
    shape = [batch, 3, 8, 8]
    assert count_flops(net, shape) == _pruner(net, shape).flops() == expected


def test_an_index_along_the_heads_axis_keeps_heads_whole():
    """`out[:, 0]` picks head 0: pruning heads would move another head there, so the heads
    stay whole with the reason; `qkv[0]` (q out of the parts axis) does not count as such."""
    from transformer_nets import FirstHeadOnly
    groups = {g.name: g for g in _pruner(FirstHeadOnly(), [1, 3, 16, 16]).groups}
    heads = groups["qkv"]
    assert not heads.prunable and "picks single heads" in heads.reason


# ---------------------------------------------------------------------------------------------
# Ints kept equal to the width; forwards registered for attention that writes sizes in
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reads_width", [False, True])
def test_width_ints_of_the_root_are_decided_by_trial(reads_width):
    """The root keeps `embed_dim`/`num_features` equal to the width next to its class token and
    position embedding (as PaddleClas does). Read by the forward or not, the width prunes:
    pruned equals masked, and the ints follow the pruned width."""
    net = TinyViT(reads_width=reads_width)
    check_pruned(net, [2, 3, 8, 8], {"patch_embed": 0.25, "blocks.0.fc1": 0.5})
    assert net.embed_dim == net.num_features == 24 == net.pos_embed.shape[-1]


def test_a_registered_forward_makes_paddleclas_attention_prunable(tmp_path):
    """PaddleClas's attention (`C // self.num_heads`, heads merged with C) keeps heads and width
    whole; registered with `AttentionPruning(forward=...)` (the same computation, sizes read
    from the weights), every head and the width prune: pruned equals masked (eval, train), a
    training step runs, the network exports, and heads-only pruning equals masking exactly."""
    from prune_callbacks import register_layer_type
    from prune_callbacks.layers.registry import AttentionPruning, _HANDLERS
    from transformer_nets import Attention, sized_attention_forward
    shape = [2, 3, 8, 8]
    groups = {g.name: g for g in _pruner(TinyViT(paddleclas=True), shape).groups}
    assert not groups["blocks.0.attn.qkv"].prunable
    assert "AttentionPruning(forward=" in groups["blocks.0.attn.qkv"].reason
    assert not groups["patch_embed"].prunable and "blocks.0.attn" in groups["patch_embed"].reason
    register_layer_type(Attention, AttentionPruning(forward=sized_attention_forward))
    try:
        net = TinyViT(paddleclas=True, distilled=True)
        check_pruned(net, shape, expect_groups=["patch_embed", "blocks.0.attn.qkv",
                                                "blocks.1.attn.qkv"])
        assert net.blocks[0].attn.num_heads == 2 and net.patch_embed.weight.shape[0] == 16
        net.eval()
        path = os.path.join(tmp_path, "vit")
        paddle.jit.save(net, path, input_spec=[paddle.static.InputSpec([None] + shape[1:],
                                                                       "float32")])
        x = paddle.randn(shape)
        assert rel_err(paddle.jit.load(path)(x).numpy(), net(x).numpy()) < 1e-5
        heads_only = TinyViT(paddleclas=True)
        check_pruned(heads_only, shape, {"blocks.0.attn.qkv": 0.5, "blocks.1.attn.qkv": 0.25},
                     rtol=1e-5)
    finally:
        _HANDLERS.pop(Attention, None)


def test_a_registered_forward_that_changes_the_output_is_not_used():
    """A registered forward is checked on the unpruned network first: one that computes
    something else is taken out again with a warning, and the layer keeps its own."""
    from prune_callbacks import register_layer_type
    from prune_callbacks.layers.registry import AttentionPruning, _HANDLERS
    from transformer_nets import Attention
    register_layer_type(Attention, AttentionPruning(forward=lambda self, x: x))
    try:
        net = TinyViT(paddleclas=True)
        with pytest.warns(UserWarning, match="registered forward of Attention is not used"):
            FilterPruner(net, [1, 3, 8, 8])
        assert "forward" not in vars(net.blocks[0].attn)
    finally:
        _HANDLERS.pop(Attention, None)


def test_swin_patch_merging_shift_mask_and_pvt_mlp_prune(tmp_path):
    """PaddleClas's Swin and PVT ops: the shifted window's mask built with `set_value` on a
    constant (no channels), strided slices of patch merging, the MLP's tokens reshaped to an
    image around a depth-wise conv (`[N, C, L] -> [N, C, H, W]`): every group prunes, heads,
    widths and the merged width included; pruned equals masked (eval, train), a training step
    runs, the network exports; FLOPs predicted equal counted (a hand count)."""
    shape = [2, 3, 16, 16]
    net = TinySwin(paddleclas_ops=True)
    tokens, dim, hidden = 64, 32, 64
    expected = (3 * dim * 4 * tokens + 2 * tokens * (4 * dim * dim + 2 * dim * hidden)
                + 2 * tokens * hidden * 9 + (tokens // 4) * 4 * dim * 2 * dim + 2 * dim * 10)
    assert count_flops(net, shape) == expected
    names = [g.name for g in _pruner(net, shape).groups]
    assert len(names) == 8, names  # input, width, 2 x (heads, MLP), merged width, output
    check_pruned(net, shape, expect_groups=["patch_embed", "blocks.0.attn.qkv",
                                            "blocks.1.attn.qkv", "blocks.0.fc1",
                                            "blocks.1.fc1", "merge.reduction"])
    assert net.merge.norm.weight.shape == [64] and net.blocks[1].dwconv.weight.shape[0] == 32
    net.eval()
    path = os.path.join(tmp_path, "swin")
    paddle.jit.save(net, path, input_spec=[paddle.static.InputSpec([None] + shape[1:],
                                                                   "float32")])
    x = paddle.randn(shape)
    assert rel_err(paddle.jit.load(path)(x).numpy(), net(x).numpy()) < 1e-5


class _SeparateQKV(paddle.nn.Layer):
    """Patch embedding, class token, one attention with separate q, k, v projections whose
    forward reads `self.num_heads` and leaves the head size to reshape (-1)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = paddle.nn.Conv2D(3, dim, 4, 4)
        self.cls_token = self.create_parameter([1, 1, dim])
        self.norm = paddle.nn.LayerNorm(dim)
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (paddle.nn.Linear(dim, dim) for _ in range(4))
        self.head = paddle.nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        x = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), x], axis=1)
        b, n, _ = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape([b, n, self.num_heads, -1]).transpose([0, 2, 1, 3])
                   for f in (self.q, self.k, self.v))
        a = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) * 0.3, -1)
        x = x + self.o((a @ v).transpose([0, 2, 1, 3]).reshape([b, n, -1]))
        return self.head(x[:, 0])


def test_a_second_prune_does_not_apply_the_first_traces_head_count():
    """Two steps on one pruner (FilterPruneCallback(steps=2)): heads 4 -> 1, then a quarter of
    every group. The second trace sees one head, whose q/k size is an ordinary group now; the
    head count the first trace tracked must not be applied to it (it would set num_heads to
    6 // 8 = 0, which reshape reads as "copy this axis": six heads of one, silently wrong)."""
    paddle.seed(0)
    net = _SeparateQKV()
    randomise(net)
    net.eval()
    shape = [2, 3, 16, 16]
    p = _pruner(net, shape)
    p.prune({"q": 0.75})
    assert net.num_heads == 1 and net.q.weight.shape == [32, 8]
    x = paddle.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ratios = {g.name: 0.25 for g in p.prunable_groups}
        assert "q" in ratios
        with p.mask(ratios):
            masked = run(net, x)[0]
        p.prune(ratios)
    assert net.num_heads == 1 and net.q.weight.shape[1] < 8
    assert rel_err(run(net, x)[0], masked) < 1e-4


def test_pruned_copies_of_a_vit_prune_like_the_network():
    """`deploy.latency.pruned_copy` (the latency table and search time such copies): the copy
    keeps the network's surgery tables, so a LayerScale and position embedding are sliced and
    the head count follows, and it equals the network pruned the same way."""
    from prune_callbacks.deploy.latency import pruned_copy
    paddle.seed(0)
    net = TinyViT(drop_path=0.0)
    randomise(net)
    net.eval()
    shape = [1, 3, 8, 8]
    p = _pruner(net, shape)
    x = paddle.randn(shape)
    for ratios in ({"blocks.0.attn.qkv": 0.5}, {"patch_embed": 0.25}):
        kept = p.select(ratios)
        copy_net = pruned_copy(p, kept)
        want = copy.deepcopy(net)
        _pruner(want, shape).prune(ratios)
        assert copy_net.blocks[0].attn.num_heads == want.blocks[0].attn.num_heads
        assert rel_err(run(copy_net, x)[0], run(want, x)[0]) < 1e-5


class _HeadsByMinusOne(paddle.nn.Layer):
    """Attention that keeps its head count as `nh` (a name the search does not know) and
    reshapes with -1 heads, so its forward never reads the count."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.nh, self.hd = heads, dim // heads
        self.qkv = paddle.nn.Linear(dim, 3 * dim)
        self.proj = paddle.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape([b, n, 3, -1, self.hd]).transpose([2, 0, 3, 1, 4])
        a = paddle.nn.functional.softmax(qkv[0] @ qkv[1].transpose([0, 1, 3, 2]), -1)
        return self.proj((a @ qkv[2]).transpose([0, 2, 1, 3]).reshape([b, n, -1]))


class _ModelWideHeadCount(paddle.nn.Layer):
    """Two such attentions under a root that keeps the model's `num_heads` (config)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.patch_embed = paddle.nn.Conv2D(3, dim, 4, 4)
        self.norms = paddle.nn.LayerList([paddle.nn.LayerNorm(dim) for _ in range(2)])
        self.attns = paddle.nn.LayerList([_HeadsByMinusOne(dim, heads) for _ in range(2)])
        self.head = paddle.nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(x.mean(1))


def test_a_head_count_shared_by_several_attentions_is_left_alone():
    """The search for each head group's count climbs to the root's `num_heads` for both
    attentions: one int cannot count two layers' heads, so neither sets it (it stays the
    model's config); the heads prune because the forwards follow (checked by the trial)."""
    paddle.seed(0)
    net = _ModelWideHeadCount()
    check_pruned(net, [2, 3, 16, 16], {"attns.0.qkv": 0.5, "attns.1.qkv": 0.25})
    assert net.num_heads == 4
    assert [a.qkv.weight.shape[1] // 3 // a.hd for a in net.attns] == [2, 3]


class _ImageSizeEqualsWidth(paddle.nn.Layer):
    """Width 32 at 32x32 input: the root keeps `img_size = 32`, which equals the width but
    counts pixels, and only a helper the trace never runs reads it."""

    def __init__(self, img_size: int = 32, dim: int = 32, patch: int = 8) -> None:
        super().__init__()
        self.img_size, self.patch = img_size, patch
        self.patch_embed = paddle.nn.Conv2D(3, dim, patch, patch)
        self.pos_embed = self.create_parameter([1, (img_size // patch) ** 2, dim])
        self.norm = paddle.nn.LayerNorm(dim)
        self.head = paddle.nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose([0, 2, 1]) + self.pos_embed
        return self.head(self.norm(t).mean(1))

    def resized_pos_embed(self, size: int):  # fine-tuning at another resolution
        g = self.img_size // self.patch
        grid = self.pos_embed.reshape([1, g, g, -1]).transpose([0, 3, 1, 2])
        return paddle.nn.functional.interpolate(grid, size=[size // self.patch] * 2)


def test_an_int_that_equals_the_width_and_an_input_size_is_not_rewritten():
    paddle.seed(0)
    net = _ImageSizeEqualsWidth()
    check_pruned(net, [1, 3, 32, 32], {"patch_embed": 0.25})
    assert net.pos_embed.shape == [1, 16, 24] and net.img_size == 32
    assert net.resized_pos_embed(64).shape == [1, 24, 8, 8]


class _TrainOnlyMerge(paddle.nn.Layer):
    """Heads merged with -1 in eval but with the input's width C in training (an attention
    path used only while training): the eval trial passes, a training run does not."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = paddle.nn.Conv2D(3, dim, 4, 4)
        self.norm = paddle.nn.LayerNorm(dim)
        self.num_heads = heads
        self.qkv = paddle.nn.Linear(dim, 3 * dim)
        self.proj = paddle.nn.Linear(dim, dim)
        self.head = paddle.nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape([b, n, 3, self.num_heads, -1])
        qkv = qkv.transpose([2, 0, 3, 1, 4])
        a = paddle.nn.functional.softmax(qkv[0] @ qkv[1].transpose([0, 1, 3, 2]), -1)
        o = (a @ qkv[2]).transpose([0, 2, 1, 3])
        o = o.reshape([b, n, c]) if self.training else o.reshape([b, n, -1])
        return self.head((x + self.proj(o)).mean(1))


def test_heads_whose_training_forward_writes_their_size_stay_whole():
    paddle.seed(0)
    pruner = _pruner(_TrainOnlyMerge(), [2, 3, 16, 16])
    g = {g.name: g for g in pruner.groups}["qkv"]
    assert pruner.graph.two_modes
    assert not g.prunable and "training forward of a copy" in g.reason
