"""Detector and OCR patterns, each on a minimal plain-paddle network: element-wise
clean-up ops, a tensor-dependent `if` and a `while`, a head shared across pyramid levels,
DeformConv2D, a training forward that needs targets, and a train-only head fed from targets.

Each traces as given, prunes to what masking gives, trains a step, and has the FLOPs the pruner
predicted (`count_flops`).
"""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest
from paddle.vision.ops import DeformConv2D

from prune_callbacks import FilterPruneCallback, FilterPruner, SensitivityCallback, count_flops
from pruning_checks import check_pruned, randomise, rel_err, run

SHAPE = [1, 3, 8, 8]


def _groups(pruner):
    return {g.name: g for g in pruner.groups}


# ---------------------------------------------------------------------------------------------
# Element-wise ops
# ---------------------------------------------------------------------------------------------


class CleanUp(nn.Layer):
    """Feature-map clean-up as PP-OCRv4 does it: where/isnan/isinf, comparisons, logical ops,
    clip, sign, cast."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 8, 3, padding=1)
        self.c2 = nn.Conv2D(8, 8, 3, padding=1)
        self.c3 = nn.Conv2D(8, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        bad = paddle.logical_or(paddle.isnan(y), paddle.isinf(y))
        y = paddle.where(bad, paddle.zeros_like(y), y)
        y = paddle.clip(y, -3.0, 3.0) * (y > 0).astype("float32")
        z = self.c2(y)
        z = z * paddle.sign(z) + paddle.logical_not(z < -1.0).astype("float32")
        z = paddle.where(paddle.greater_equal(z, y), z, y)  # couples c1's and c2's channels
        return self.c3(z)


def test_elementwise_cleanup_ops_pass_channels_through():
    paddle.seed(0)
    net = CleanUp()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*left unpruned")  # every op is understood
        groups = _groups(FilterPruner(net, SHAPE))
    assert groups["c1"].prunable, groups["c1"].reason
    assert ("c2.weight", 0) in groups["c1"].members  # `where(z >= y, z, y)` ties c2 to c1
    check_pruned(net, SHAPE, expect_groups=["c1"])


# ---------------------------------------------------------------------------------------------
# Control flow
# ---------------------------------------------------------------------------------------------


class Branchy(nn.Layer):
    """Convs under a tensor-dependent `if` (both branches), and in a `while` body."""

    def __init__(self, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.a = nn.Conv2D(8, 8, 1)
        self.b = nn.Conv2D(8, 8, 3, padding=1)
        self.loop = nn.Conv2D(8, 8, 1)
        self.head = nn.Conv2D(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        if x.mean() > 0:
            z = self.a(y)
        else:
            z = self.b(y) * 2.0
            if self.flip:  # this branch changes what each channel means
                z = paddle.flip(z, axis=[1])
        i = paddle.zeros([1], "int64")
        while i < 2:
            z = F.relu(self.loop(z)) + z
            i = i + 1
        return self.head(z)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
def test_convs_under_if_and_while_are_traced_and_counted(sign):
    paddle.seed(0)
    net = Branchy()
    pruner = FilterPruner(net, SHAPE)
    groups = _groups(pruner)
    stem = groups["stem"]
    assert stem.prunable, stem.reason
    # both branches' convs read the stem; what they yield, the loop carries: one group
    assert {("a.weight", 1), ("b.weight", 1)} <= set(stem.members)
    out = groups["a"]
    assert out.prunable, out.reason
    assert {("a.weight", 0), ("b.weight", 0), ("loop.weight", 0), ("loop.weight", 1),
            ("head.weight", 1)} <= set(out.members)
    # FLOPs count the branch that runs (zeros: mean 0, the else branch) and every iteration
    assert pruner.flops() == count_flops(net, SHAPE)
    full = 8 * 3 * 9 * 64 + 8 * 8 * 9 * 64 + 2 * (8 * 8 * 64) + 4 * 8 * 64  # loop body twice
    assert pruner.flops() == full
    # pruned equals masked whichever branch the data takes
    randomise(net)
    x = paddle.abs(paddle.randn(SHAPE)) * sign
    assert _prunes_as_masked(pruner, net, {"stem": 0.5, "a": 0.5}, x) < full


def test_a_branch_that_changes_channel_meaning_keeps_the_group_whole_and_counted():
    paddle.seed(0)
    net = Branchy(flip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = FilterPruner(net, SHAPE)
    groups = _groups(pruner)
    assert not groups["a"].prunable and "pd_op.flip" in groups["a"].reason
    assert groups["stem"].prunable
    assert pruner.flops() == count_flops(net, SHAPE)
    check_pruned(net, SHAPE, ratios={"stem": 0.5})


# ---------------------------------------------------------------------------------------------
# A head shared across pyramid levels
# ---------------------------------------------------------------------------------------------


class Scale(nn.Layer):
    """FCOS's learnable scale, one per level."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = self.create_parameter([1], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return x * self.scale


class SharedTower(nn.Layer):
    """Two levels, each with its own lateral conv, then one tower applied to both (FCOS: with
    GroupNorm, and a learnable scale per level)."""

    def __init__(self, group_norm: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 8, 3, padding=1)
        self.c2 = nn.Conv2D(8, 8, 3, stride=2, padding=1)
        self.lat1 = nn.Conv2D(8, 6, 1)
        self.lat2 = nn.Conv2D(8, 6, 1)
        norm = nn.GroupNorm(3, 6) if group_norm else nn.BatchNorm2D(6)
        self.tower = nn.Sequential(nn.Conv2D(6, 6, 3, padding=1), norm, nn.ReLU())
        self.cls = nn.Conv2D(6, 3, 1)
        self.scales = nn.LayerList([Scale(), Scale()])

    def forward(self, x):
        f1 = F.relu(self.c1(x))
        f2 = F.relu(self.c2(f1))
        return [s(self.cls(self.tower(lat)))
                for s, lat in zip(self.scales, (self.lat1(f1), self.lat2(f2)))]


@pytest.mark.parametrize("group_norm", [False, True], ids=["bn", "gn"])
def test_a_tower_shared_across_levels_ties_their_channels(group_norm):
    paddle.seed(0)
    net = SharedTower(group_norm)
    groups = _groups(FilterPruner(net, SHAPE))
    lat = groups["lat1"]
    assert lat.prunable, lat.reason
    assert {("lat1.weight", 0), ("lat2.weight", 0), ("tower.0.weight", 1)} <= set(lat.members)
    tower = groups["tower.0"]
    assert tower.prunable and ("cls.weight", 1) in tower.members
    out = check_pruned(net, SHAPE, expect_groups=["lat1", "tower.0"])
    out_ch = net.tower[0].weight.shape[0]
    assert net.tower[0].weight.shape[1] == 3 and out_ch < 6  # sliced once, for every level
    if group_norm:  # whole norm groups of 2 channels go
        assert net.tower[1]._num_groups * 2 == out_ch == net.tower[1].weight.shape[0]
    assert {"lat1", "tower.0"} <= {g.name for g in out["plan"].groups}


# ---------------------------------------------------------------------------------------------
# Deformable convolution
# ---------------------------------------------------------------------------------------------


class Deform(nn.Layer):
    def __init__(self, deformable_groups: int = 1, groups: int = 1, modulated: bool = True) -> None:
        super().__init__()
        dg = deformable_groups
        self.modulated = modulated  # DCN v2 (a mask) or v1
        self.c1 = nn.Conv2D(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2D(8)
        self.offset = nn.Conv2D(8, 2 * dg * 9, 3, padding=1)
        self.mask = nn.Conv2D(8, dg * 9, 3, padding=1)
        self.dcn = DeformConv2D(8, 6, 3, padding=1, deformable_groups=dg, groups=groups)
        self.out = nn.Conv2D(6, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        z = self.dcn(y, self.offset(y), F.sigmoid(self.mask(y)) if self.modulated else None)
        return self.out(F.relu(z))


@pytest.mark.parametrize("dg, groups, modulated", [(1, 1, True), (2, 1, True), (1, 2, True),
                                                   (1, 1, False)])
def test_deformable_conv_prunes_its_input_and_output_channels(dg, groups, modulated):
    paddle.seed(0)
    net = Deform(dg, groups, modulated)
    by_name = _groups(FilterPruner(net, SHAPE))
    for offset in ("offset", "mask") if modulated else ("offset",):
        assert not by_name[offset].prunable and "deformable conv" in by_name[offset].reason
    check_pruned(net, SHAPE, expect_groups=["c1", "dcn"])
    assert net.offset.weight.shape[0] == 2 * dg * 9 and net.mask.weight.shape[0] == dg * 9
    assert net.dcn._in_channels == 4 and net.dcn._out_channels == net.dcn.weight.shape[0] < 6
    assert net.dcn._out_channels % dg == 0


# ---------------------------------------------------------------------------------------------
# Training forwards that need targets
# ---------------------------------------------------------------------------------------------


class LossInside(nn.Layer):
    """A detector-style forward: in training it computes its loss from targets, with an extra
    head that runs only then; `aux_from_targets` feeds that head from the targets too (an OCR
    recogniser's training-only decoder)."""

    def __init__(self, aux_from_targets: bool = False) -> None:
        super().__init__()
        self.aux_from_targets = aux_from_targets
        self.stem = nn.Conv2D(3, 6, 3, padding=1)
        self.body = nn.Conv2D(6, 8, 3, padding=1)
        self.head = nn.Conv2D(8, 4, 1)
        self.aux = nn.Conv2D(8, 4, 3, padding=1)  # only in training
        self.embed = nn.Conv2D(4, 8, 1)  # only in training, reads the targets

    def forward(self, x, targets=None):
        f = F.relu(self.body(F.relu(self.stem(x))))
        out = self.head(f)
        if self.training:
            g = f + self.embed(targets) if self.aux_from_targets else f
            aux = self.aux(g)
            return ((out - targets) ** 2).mean() + ((aux - targets) ** 2).mean()
        return out


def _prunes_as_masked(pruner, net, ratios, x, output=0):
    """Prune `ratios`: output `output` on `x` equals the masked network's, and the counted FLOPs
    equal the predicted ones (returned)."""
    with pruner.mask(ratios):
        masked = run(net, x)
    predicted = pruner.flops(ratios)
    pruner.prune(ratios)
    assert rel_err(run(net, x)[output], masked[output]) <= 1e-4
    assert count_flops(net, SHAPE) == predicted
    return predicted


def _batch(n=2):
    return paddle.randn([n, 3, 8, 8]), paddle.randn([n, 4, 8, 8])


def test_without_training_inputs_groups_feeding_train_only_layers_are_held_with_a_warning():
    paddle.seed(0)
    net = LossInside()
    with pytest.warns(UserWarning, match=r"cannot be traced.*aux.*train_inputs="):
        pruner = FilterPruner(net, SHAPE)
    by_name = _groups(pruner)
    assert not by_name["body"].prunable
    assert "layers the eval forward never runs (aux, embed)" in by_name["body"].reason
    assert by_name["stem"].prunable  # 6 channels: no train-only layer reads that width
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be traced")  # once per network
        FilterPruner(net, SHAPE)
    pruner.prune({"stem": 0.5})
    net.train()
    loss = net(*_batch())
    loss.backward()  # the first training step runs


@pytest.mark.parametrize("aux_from_targets", [False, True], ids=["loss-head", "head-on-targets"])
@pytest.mark.parametrize("as_callable", [False, True], ids=["batch", "callable"])
def test_training_graph_from_training_inputs(aux_from_targets, as_callable):
    paddle.seed(0)
    net = LossInside(aux_from_targets)
    randomise(net)
    batch = _batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be traced")  # traced: nothing held
        pruner = FilterPruner(net, SHAPE, train_inputs=(lambda: batch) if as_callable else batch)
    body = _groups(pruner)["body"]
    assert body.prunable, body.reason
    assert ("aux.weight", 1) in body.members
    if aux_from_targets:
        assert ("embed.weight", 0) in body.members
    ratios = {"body": 0.5, "stem": 0.5}
    x = paddle.randn(SHAPE)
    with pruner.mask(ratios):
        masked_eval = run(net, x)
        masked_loss = _train_loss(net, batch)
    predicted = pruner.flops(ratios)
    pruner.prune(ratios)
    assert rel_err(run(net, x)[0], masked_eval[0]) <= 1e-4
    assert abs(_train_loss(net, batch) - masked_loss) <= 1e-4 * abs(masked_loss)
    assert count_flops(net, SHAPE) == predicted
    assert net.aux.weight.shape[1] == 4
    net.train()
    opt = paddle.optimizer.SGD(learning_rate=0.01, parameters=net.parameters())
    net(*batch).backward()
    opt.step()


def _train_loss(net, batch):
    net.train()
    with paddle.no_grad():
        loss = float(net(*batch))
    net.eval()
    return loss


def test_training_inputs_that_do_not_fit_name_them():
    net = LossInside()
    with pytest.raises(TypeError, match="training inputs given"):
        FilterPruner(net, SHAPE, train_inputs=(paddle.randn([2, 3, 8, 8]), paddle.randn([2, 5])))
    with pytest.raises(TypeError, match="holds no tensor"):
        FilterPruner(net, SHAPE, train_inputs=(None,))


class _Images(paddle.io.Dataset):
    def __init__(self, n: int = 8) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 3, 8, 8)).astype("float32")
        self.t = rng.normal(size=(n, 4, 8, 8)).astype("float32")

    def __getitem__(self, i):
        return self.x[i], self.t[i]

    def __len__(self):
        return len(self.x)


def test_prune_callback_traces_the_training_graph_fit_really_runs():
    """The loss is computed inside the network from targets (`paddle.Model` inputs): the
    callback captures what fit calls the network with and traces the training graph from it,
    so the train-only head's input channels prune too."""
    paddle.seed(0)
    net = LossInside(aux_from_targets=True)
    spec = paddle.static.InputSpec
    model = paddle.Model(net, inputs=[spec([None, 3, 8, 8], "float32", "x"),
                                      spec([None, 4, 8, 8], "float32", "t")])
    model.prepare(paddle.optimizer.SGD(learning_rate=0.01, parameters=net.parameters()),
                  loss=lambda loss: loss)
    def close(out, y):  # a metric over the eval output: share of values within 1 of target
        return float((np.abs(out - y) < 1.0).sum()), y.size

    sens = SensitivityCallback(_Images(), at_epoch=0, metric=close, input_shape=SHAPE,
                               ratios=(0.5,))
    cb = FilterPruneCallback(flops=0.3, at_epoch=0, input_shape=SHAPE)  # uniform: every group
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be traced")  # inputs were captured
        model.fit(_Images(), epochs=2, batch_size=4, verbose=0, callbacks=[sens, cb])
    assert "body" in sens.result.curves()  # analysed on the training graph's groups too
    (plan,) = cb.plans
    assert "body" in [g.name for g in plan.groups]
    assert net.aux.weight.shape[1] == net.body.weight.shape[0] < 8
    assert net.embed.weight.shape[0] == net.body.weight.shape[0]


def test_callback_checks_a_detector_on_its_first_training_call_before_any_step():
    """A training forward that needs targets is checked on what fit passes, before the first
    step changes a weight: a bad skip name still stops fit before training."""
    paddle.seed(0)
    net = LossInside()
    spec = paddle.static.InputSpec
    model = paddle.Model(net, inputs=[spec([None, 3, 8, 8], "float32", "x"),
                                      spec([None, 4, 8, 8], "float32", "t")])
    model.prepare(paddle.optimizer.SGD(learning_rate=0.1, parameters=net.parameters()),
                  loss=lambda loss: loss)
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    cb = FilterPruneCallback(flops=0.3, at_epoch=0, input_shape=SHAPE, skip=["bodyy"])
    with pytest.raises(ValueError, match="unknown group 'bodyy'.*did you mean 'body'"):
        model.fit(_Images(), epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)


class DictTargets(nn.Layer):
    """Targets in a dict beside plain numbers, as PaddleDetection passes them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2D(3, 8, 3, padding=1)
        self.head, self.aux = nn.Conv2D(8, 4, 1), nn.Conv2D(8, 4, 1)

    def forward(self, x, inputs=None):
        f = F.relu(self.body(x))
        out = self.head(f)
        if self.training:
            t = inputs["gt"]
            return ((out - t) ** 2).mean() + inputs["weight"] * ((self.aux(f) - t) ** 2).mean()
        return out


def test_training_inputs_nested_in_dicts():
    net = DictTargets()
    batch = (paddle.randn([2, 3, 8, 8]), {"gt": paddle.randn([2, 4, 8, 8]), "weight": 0.5})
    body = _groups(FilterPruner(net, SHAPE, train_inputs=batch))["body"]
    assert body.prunable and ("aux.weight", 1) in body.members


class QuerySelect(nn.Layer):
    """RT-DETR-style query selection: score every position, keep the top k tokens (gather_nd and
    take_along_axis), decode them; argmax picks each position's best class."""

    def __init__(self, take: str) -> None:
        super().__init__()
        self.take = take
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.score = nn.Linear(8, 3)
        self.decode = nn.Linear(8, 4)

    def forward(self, x):
        tokens = F.relu(self.conv(x)).flatten(2).transpose([0, 2, 1])  # [N, HW, C]
        scores = self.score(tokens)
        best = paddle.argmax(scores, axis=-1, keepdim=True).astype("float32")
        _, idx = paddle.topk(scores.max(-1), k=5, axis=1)  # [N, 5]
        if self.take == "gather_nd":
            batch = paddle.arange(x.shape[0]).unsqueeze(1).expand_as(idx)
            picked = paddle.gather_nd(tokens, paddle.stack([batch, idx], axis=-1))
        elif self.take == "take_along_axis":
            picked = paddle.take_along_axis(tokens, idx.unsqueeze(-1), 1)  # broadcast over C
        else:  # indices as wide as the channels, the width written into the code
            picked = paddle.take_along_axis(tokens, idx.unsqueeze(-1).expand([-1, -1, 8]), 1)
        return self.decode(picked), best


@pytest.mark.parametrize("take", ["gather_nd", "take_along_axis"])
def test_query_selection_keeps_token_channels(take):
    paddle.seed(0)
    net = QuerySelect(take)
    conv = _groups(FilterPruner(net, SHAPE))["conv"]
    assert conv.prunable, conv.reason
    assert {("score.weight", 0), ("decode.weight", 0)} <= set(conv.members)
    check_pruned(net, SHAPE, ratios={"conv": 0.5}, modes=(False,))


def test_query_selection_with_a_channel_width_written_into_the_code_stays_whole():
    paddle.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = _groups(FilterPruner(QuerySelect("literal"), SHAPE))["conv"]
    assert not conv.prunable
    assert "take_along_axis indices sizes written into the code" in conv.reason


# ---------------------------------------------------------------------------------------------
# Forwards paddle.jit.to_static cannot convert: eager-only post-processing and label assignment
# ---------------------------------------------------------------------------------------------


class NumpyAssigner(nn.Layer):
    """Label assignment written for eager mode (numpy), as detectors' assigners often are."""

    def forward(self, scores, gt, feat):
        ranked = np.sort(scores.numpy(), axis=2)  # fails under to_static: no numpy there
        cells = feat.shape[2] * feat.shape[3]  # reads only the feature map's size (anchors)
        return gt * float(ranked[:, :, -1].mean()) * (cells / cells)


class NumpyPost(nn.Layer):
    """Post-processing written for eager mode (a detector's NMS)."""

    def forward(self, scores):
        s = scores.numpy()
        return paddle.to_tensor(np.sort(s.reshape(s.shape[0], -1), axis=1)[:, -5:])


class EagerOnlyDetector(nn.Layer):
    """Backbone and a two-level head; `proj` (a fixed 1x1 conv) runs once per level in eval and
    once on both levels concatenated in training, as PP-YOLOE+'s DFL projection does. The
    post-processing is the network's own method (`post_in_net`) or a sublayer's."""

    def __init__(self, post_in_net: bool = True, eval_only: bool = False) -> None:
        super().__init__()
        self.post_in_net = post_in_net
        self.eval_only = nn.Conv2D(8, 4, 1) if eval_only else None  # runs in eval only
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.body = nn.Conv2D(8, 8, 3, stride=2, padding=1)
        self.cls = nn.LayerList([nn.Conv2D(8, 4, 1), nn.Conv2D(8, 4, 1)])
        self.proj = nn.Conv2D(4, 1, 1)
        self.assigner = NumpyAssigner()
        self.post = NumpyPost()

    def forward(self, x, gt=None):
        f1 = F.relu(self.stem(x))
        f2 = F.relu(self.body(f1))
        levels = [c(f).flatten(2) for c, f in zip(self.cls, (f1, f2))]  # [N, 4, HW]
        if self.training:
            out = paddle.concat(levels, axis=2).unsqueeze(-1)  # [N, 4, L, 1]
            target = self.assigner(out, gt, f2)
            return ((self.proj(out) - target) ** 2).mean()
        if self.eval_only is not None:
            levels[0] = levels[0] + self.eval_only(F.relu(self.stem(x))).flatten(2)
        scores = paddle.concat([self.proj(v.unsqueeze(-1)) for v in levels], axis=2)
        if self.post_in_net:
            s = scores.numpy()
            return paddle.to_tensor(np.sort(s.reshape(s.shape[0], -1), axis=1)[:, -5:]), scores
        return self.post(scores), scores


def _det_batch(n=2):
    return paddle.randn([n, 3, 8, 8]), paddle.randn([n, 1, 80, 1])


def test_an_eval_forward_that_does_not_convert_is_traced_from_the_training_program():
    paddle.seed(0)
    net = EagerOnlyDetector(post_in_net=True)
    randomise(net)
    batch = _det_batch()
    pruner = FilterPruner(net, SHAPE, train_inputs=batch)
    by_name = _groups(pruner)
    assert by_name["stem"].prunable, by_name["stem"].reason
    # the assigner reads body's output for its size only (a probe shows it): body prunes
    assert by_name["body"].prunable, by_name["body"].reason
    # what the assigner reads the values of (the head's output) is left whole, naming it
    assert not by_name["cls.0"].prunable
    assert "assigner" in by_name["cls.0"].reason and "to_static" in by_name["cls.0"].reason
    assert pruner.flops() == count_flops(net, SHAPE)  # proj: weighed by what eval spends
    predicted = _prunes_as_masked(pruner, net, {"stem": 0.5, "body": 0.5}, paddle.randn(SHAPE), 1)
    assert predicted < count_flops(EagerOnlyDetector(), SHAPE)
    net.train()
    net(*batch).backward()


def test_without_training_inputs_a_sublayer_that_does_not_convert_is_stubbed():
    paddle.seed(0)
    net = EagerOnlyDetector(post_in_net=False)
    randomise(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training forward needs targets: held, warned
        pruner = FilterPruner(net, SHAPE)
    assert _groups(pruner)["stem"].prunable
    # the post-processing reads the scores: left out of the trace, they stay whole, named
    proj = _groups(pruner)["proj"]
    assert not proj.prunable and "post" in proj.reason and "to_static" in proj.reason
    assert pruner.flops() == count_flops(net, SHAPE)
    _prunes_as_masked(pruner, net, {"stem": 0.5}, paddle.randn(SHAPE), 1)
    net.train()
    net(*_det_batch()).backward()


def test_a_network_whose_own_forward_does_not_convert_names_the_fix():
    with pytest.raises(TypeError, match="cannot trace the eval forward.*pass train_inputs="):
        FilterPruner(EagerOnlyDetector(post_in_net=True), SHAPE)


def test_layers_only_the_unconvertible_eval_forward_runs_hold_what_they_may_read():
    paddle.seed(0)
    net = EagerOnlyDetector(post_in_net=True, eval_only=True)
    with pytest.warns(UserWarning, match=r"eval forward.*does not convert.*eval_only"):
        pruner = FilterPruner(net, SHAPE, train_inputs=_det_batch())
    stem = _groups(pruner)["stem"]
    assert not stem.prunable and "layers only the eval forward runs (eval_only)" in stem.reason


class DropBlockNet(nn.Layer):
    """A training-only random mask drawn with the feature map's shape (PP-YOLO's DropBlock):
    to_static writes that shape into the program as a literal. `literal` writes the channel
    count into the code instead."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.c1 = nn.Conv2D(3, 8, 3, padding=1)
        self.c2 = nn.Conv2D(8, 8, 3, padding=1)
        self.head = nn.Conv2D(8, 4, 1)

    def forward(self, x, targets=None):
        f = F.relu(self.c1(x))
        if self.training:
            shape = [f.shape[0], 8, f.shape[2], f.shape[3]] if self.literal else f.shape
            f = f * (paddle.rand(shape) > 0.1).astype("float32")
        out = self.head(F.relu(self.c2(f)))
        if self.training:
            return ((out - targets) ** 2).mean()
        return out


@pytest.mark.parametrize("literal", [False, True], ids=["shape-of-input", "literal"])
def test_a_training_only_mask_shaped_like_its_input_is_verified_by_a_training_run(literal):
    paddle.seed(0)
    net = DropBlockNet(literal)
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = FilterPruner(net, SHAPE, train_inputs=batch)
    c1 = _groups(pruner)["c1"]
    if literal:
        assert not c1.prunable and "sizes written into the code" in c1.reason
        return
    assert c1.prunable, c1.reason
    _prunes_as_masked(pruner, net, {"c1": 0.5}, paddle.randn(SHAPE))
    net.train()
    net(*batch).backward()


def _pruner(net, shape, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FilterPruner(net, shape, **kwargs)

class _ThresholdNMS(nn.Layer):
    """Eager-only post-processing that keeps scores over a threshold (as multiclass NMS does):
    on the probe's input it keeps nothing, so its result is the same whatever the scores."""

    def forward(self, scores):
        s = scores.numpy()
        n, c, h, w = np.nonzero(s > 0.3)
        out = np.stack([c, s[n, c, h, w]], 1).astype("float32") if len(c) else \
            np.zeros((0, 2), "float32")
        return paddle.to_tensor(out)


class _ThresholdDetector(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.cls = nn.Conv2D(8, 4, 1, bias_attr=paddle.ParamAttr(
            initializer=nn.initializer.Constant(-4.6)))  # sigmoid 0.01: nothing passes at first
        self.nms = _ThresholdNMS()

    def forward(self, x):
        return self.nms(F.sigmoid(self.cls(F.relu(self.stem(x)))))


def test_a_stub_whose_result_shows_no_dependence_frees_nothing():
    """The class scores reach an NMS that returned nothing on the probe: that it also returns
    nothing with one class fewer proves nothing, so the classes stay whole (pruning them would
    change which boxes come out)."""
    paddle.seed(0)
    groups = {g.name: g for g in _pruner(_ThresholdDetector(), [1, 3, 8, 8]).groups}
    assert not groups["cls"].prunable and "nms" in groups["cls"].reason
    assert groups["stem"].prunable


class _TopK(nn.Layer):
    def forward(self, scores, k=5):
        s = scores.numpy()
        return paddle.to_tensor(np.sort(s.reshape(s.shape[0], -1), axis=1)[:, -k:])


class _TopKDetector(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.cls = nn.Conv2D(8, 4, 1)
        self.post = _TopK()

    def forward(self, x):
        s = self.cls(F.relu(self.stem(x)))
        return self.post(s), s


def _top3(self, scores):  # a user's per-instance configuration of the post-processing
    return _TopK.forward(self, scores, k=3)


def test_stubbing_restores_a_forward_set_on_the_instance():
    import types
    net = _TopKDetector()
    net.post.forward = types.MethodType(_top3, net.post)
    x = paddle.randn([1, 3, 8, 8])
    assert net(x)[0].shape == [1, 3]
    _pruner(net, [1, 3, 8, 8])  # stubs post.forward while it traces
    assert "forward" in net.post.__dict__ and net(x)[0].shape == [1, 3]


def test_a_train_inputs_callable_is_called_once():
    """A loader's `lambda: next(iter(loader))` draws a new batch at every call (here with a
    different number of padded boxes): the program, the stubs' eager run and the trials must
    all see the same one."""
    calls = []
    rng = np.random.default_rng(0)

    def next_batch():
        calls.append(int(rng.integers(1, 6)))
        return paddle.randn([2, 3, 8, 8]), paddle.randn([2, 1, 80, 1])

    paddle.seed(0)
    _pruner(EagerOnlyDetector(), [1, 3, 8, 8], train_inputs=next_batch)
    assert len(calls) == 1


class _EagerEvalAuxHead(nn.Layer):
    """The eval forward does not convert (numpy in the network's own forward), so only the
    training program is traced; `aux` runs in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2D(3, 8, 3, padding=1)
        self.head = nn.Conv2D(8, 4, 1)
        self.aux = nn.Conv2D(8, 4, 3, padding=1)

    def forward(self, x, t=None):
        f = F.relu(self.body(x))
        out = self.head(f)
        if self.training:
            return ((out - t) ** 2).mean() + ((self.aux(f) - t) ** 2).mean()
        s = out.numpy()
        return paddle.to_tensor(np.sort(s.reshape(s.shape[0], -1), axis=1)[:, -5:]), out


def test_training_flops_when_only_the_training_program_is_traced():
    pruner = _pruner(_EagerEvalAuxHead(), [1, 3, 8, 8],
                     train_inputs=(paddle.randn([2, 3, 8, 8]), paddle.randn([2, 4, 8, 8])))
    hw = 8 * 8
    assert pruner.graph.flops() == (8 * 3 * 9 + 4 * 8) * hw  # eval: body, head
    assert pruner.graph.flops(training=True) == (8 * 3 * 9 + 4 * 8 + 4 * 8 * 9) * hw  # + aux


def test_a_fit_that_failed_before_training_leaves_no_check_behind():
    """The first fit fails in another callback's on_train_begin, after the pruning callback
    (skip naming a group that does not exist) armed its check for the first training step; the
    next fit, with a corrected callback, must not run that stale check."""
    class Broken(paddle.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise RuntimeError("another callback fails before the first step")

    paddle.seed(0)
    net = LossInside()
    spec = paddle.static.InputSpec
    model = paddle.Model(net, inputs=[spec([None, 3, 8, 8], "float32", "x"),
                                      spec([None, 4, 8, 8], "float32", "t")])
    model.prepare(paddle.optimizer.SGD(learning_rate=0.01, parameters=net.parameters()),
                  loss=lambda loss: loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="another callback fails"):
            model.fit(_Images(), epochs=1, batch_size=4, verbose=0, callbacks=[
                FilterPruneCallback(flops=0.3, at_epoch=0, input_shape=[1, 3, 8, 8],
                                    skip=["bodyy"]), Broken()])
        prune = FilterPruneCallback(flops=0.3, at_epoch=0, input_shape=[1, 3, 8, 8])
        model.fit(_Images(), epochs=1, batch_size=4, verbose=0, callbacks=[prune])
    assert len(prune.plans) == 1
