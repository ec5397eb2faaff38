"""Small vision transformers in plain paddle, shaped like PaddleClas's ViT/DeiT and Swin blocks:
class (and distillation) tokens, fused qkv, LayerScale, DropPath, window attention with a
relative position bias. Used by the tests and benchmarks/zoo_coverage.py."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


class DropPath(nn.Layer):
    """Stochastic depth as PaddleClas writes it (one keep decision per sample)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        shape = (paddle.shape(x)[0],) + (1,) * (x.ndim - 1)
        mask = paddle.floor(keep + paddle.rand(shape, dtype=x.dtype))
        return x.divide(paddle.to_tensor(keep, dtype=x.dtype)) * mask


class Attention(nn.Layer):
    """ViT attention: fused qkv reshaped to [B, N, 3, heads, head_dim]. `paddleclas=True`
    writes the sizes as PaddleClas does (`C // num_heads` and `C` from the input's width), so
    the head count cannot follow a pruned one; else as timm does (`self.head_dim`)."""

    def __init__(self, dim: int, num_heads: int, paddleclas: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.paddleclas = paddleclas
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, C = x.shape[1:]
        if self.paddleclas:
            qkv = self.qkv(x).reshape((-1, N, 3, self.num_heads, C // self.num_heads))
            qkv = qkv.transpose((2, 0, 3, 1, 4))
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = F.softmax((q @ k.transpose((0, 1, 3, 2))) * self.scale, axis=-1)
            return self.proj((attn @ v).transpose((0, 2, 1, 3)).reshape((-1, N, C)))
        qkv = self.qkv(x).reshape((-1, N, 3, self.num_heads, self.head_dim))
        qkv = qkv.transpose((2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.softmax((q @ k.transpose((0, 1, 3, 2))) * self.scale, axis=-1)
        x = (attn @ v).transpose((0, 2, 1, 3)).reshape((-1, N, self.num_heads * self.head_dim))
        return self.proj(x)


class Block(nn.Layer):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2, layer_scale: bool = True,
                 drop_path: float = 0.1, paddleclas: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, paddleclas)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)
        self.drop_path = DropPath(drop_path)
        self.gamma1 = self.create_parameter([dim], default_initializer=nn.initializer.Constant(0.5)) \
            if layer_scale else None
        self.gamma2 = self.create_parameter([dim], default_initializer=nn.initializer.Constant(0.5)) \
            if layer_scale else None

    def forward(self, x):
        a = self.attn(self.norm1(x))
        m = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        if self.gamma1 is not None:
            a, m = a * self.gamma1, m * self.gamma2
        x = x + self.drop_path(a)
        return x + self.drop_path(m)


class TinyViT(nn.Layer):
    """ViT/DeiT: patch embedding conv, class token (and a distillation token), position
    embedding, blocks, final LayerNorm, head on the class token."""

    def __init__(self, img: int = 8, patch: int = 4, in_ch: int = 3, dim: int = 32,
                 depth: int = 2, num_heads: int = 4, num_classes: int = 10,
                 distilled: bool = False, paddleclas: bool = False,
                 drop_path: float = 0.1, reads_width: bool = False) -> None:
        super().__init__()
        # ints equal to the width, as PaddleClas keeps them; `reads_width`: the forward reads
        # one (`reshape` of the patches with `self.embed_dim`), so it must follow a pruned width
        self.num_features = self.embed_dim = dim
        self.reads_width = reads_width
        self.patch_embed = nn.Conv2D(in_ch, dim, patch, stride=patch)
        n_tok = (img // patch) ** 2 + (2 if distilled else 1)
        self.cls_token = self.create_parameter([1, 1, dim],
                                               default_initializer=nn.initializer.Normal(std=0.02))
        self.dist_token = self.create_parameter(
            [1, 1, dim], default_initializer=nn.initializer.Normal(std=0.02)) if distilled else None
        self.pos_embed = self.create_parameter([1, n_tok, dim],
                                               default_initializer=nn.initializer.Normal(std=0.02))
        self.blocks = nn.LayerList([Block(dim, num_heads, drop_path=drop_path,
                                          paddleclas=paddleclas) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        if self.reads_width:
            x = x.reshape((-1, x.shape[1], self.embed_dim))
        B = paddle.shape(x)[0]
        tokens = [self.cls_token.expand((B, -1, -1))]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand((B, -1, -1)))
        x = paddle.concat(tokens + [x], axis=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])


def window_partition(x, w: int):
    B, H, W, C = x.shape
    x = x.reshape((-1, H // w, w, W // w, w, C)).transpose((0, 1, 3, 2, 4, 5))
    return x.reshape((-1, w * w, C))


def window_reverse(windows, w: int, H: int, W: int):
    C = windows.shape[-1]
    x = windows.reshape((-1, H // w, W // w, w, w, C)).transpose((0, 1, 3, 2, 4, 5))
    return x.reshape((-1, H, W, C))


class WindowAttention(nn.Layer):
    """Swin window attention: fused qkv, relative position bias indexed from a table."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.head_dim = dim // num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = self.create_parameter(
            [(2 * window - 1) ** 2, num_heads], default_initializer=nn.initializer.Normal(std=0.02))
        coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
        flat = coords.reshape(2, -1)
        rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + window - 1
        index = rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]
        self.register_buffer("relative_position_index",
                             paddle.to_tensor(index.reshape(-1).astype("int64")))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        N = x.shape[1]
        qkv = self.qkv(x).reshape((-1, N, 3, self.num_heads, self.head_dim))
        qkv = qkv.transpose((2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose((0, 1, 3, 2))
        bias = paddle.index_select(self.relative_position_bias_table,
                                   self.relative_position_index, axis=0)
        bias = bias.reshape((N, N, -1)).transpose((2, 0, 1))
        attn = attn + bias.unsqueeze(0)
        if mask is not None:  # [windows, N, N], windows of every sample folded into axis 0
            nw = mask.shape[0]
            attn = attn.reshape((-1, nw, self.num_heads, N, N)) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape((-1, self.num_heads, N, N))
        attn = F.softmax(attn, axis=-1)
        x = (attn @ v).transpose((0, 2, 1, 3)).reshape((-1, N, self.num_heads * self.head_dim))
        return self.proj(x)


def shifted_window_mask(res: int, window: int, shift: int):
    """Swin's attention mask of a shifted window, built in the forward as PaddleClas does:
    a constant image of region numbers written with `set_value`, partitioned into windows."""
    img = paddle.zeros((1, res, res, 1))
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for h in cuts:
        for w in cuts:
            img[:, h, w, :] = count
            count += 1
    win = window_partition(img, window).reshape((-1, window * window))
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return paddle.where(diff != 0, paddle.full(diff.shape, -100.0), paddle.zeros(diff.shape))


class SwinBlock(nn.Layer):
    def __init__(self, dim: int, res: int, window: int, num_heads: int, shift: int = 0,
                 paddleclas_ops: bool = False) -> None:
        super().__init__()
        self.res, self.window, self.shift = res, window, shift
        self.paddleclas_ops = paddleclas_ops
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.dwconv = nn.Conv2D(dim * 2, dim * 2, 3, padding=1, groups=dim * 2) \
            if paddleclas_ops else None
        self.fc2 = nn.Linear(dim * 2, dim)
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        H = W = self.res
        B, L, C = x.shape
        h = self.norm1(x).reshape((-1, H, W, C))
        if self.shift:
            h = paddle.roll(h, shifts=(-self.shift, -self.shift), axis=(1, 2))
        mask = shifted_window_mask(H, self.window, self.shift) \
            if self.shift and self.paddleclas_ops else None
        h = window_reverse(self.attn(window_partition(h, self.window), mask), self.window, H, W)
        if self.shift:
            h = paddle.roll(h, shifts=(self.shift, self.shift), axis=(1, 2))
        x = x + self.drop_path(h.reshape((-1, H * W, C)))
        m = F.gelu(self.fc1(self.norm2(x)))
        if self.dwconv is not None:  # PVT's MLP: tokens to an image and back, C written in
            hidden = m.shape[-1]
            m = self.dwconv(m.transpose((0, 2, 1)).reshape((-1, hidden, H, W)))
            m = m.flatten(2).transpose((0, 2, 1))
        return x + self.drop_path(self.fc2(m))


class PatchMerging(nn.Layer):
    """Swin's downsampling as PaddleClas writes it: four strided slices of the token image,
    concatenated on the channel axis, reshaped with `4 * C`, LayerNorm, linear reduction."""

    def __init__(self, dim: int, res: int) -> None:
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias_attr=False)

    def forward(self, x):
        B, L, C = x.shape
        x = x.reshape([-1, self.res, self.res, C])
        parts = [x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :],
                 x[:, 1::2, 1::2, :]]
        x = paddle.concat(parts, -1).reshape([-1, (self.res // 2) ** 2, 4 * C])
        return self.reduction(self.norm(x))


class TinySwin(nn.Layer):
    """Swin-style: patch embedding + LayerNorm, two window blocks (the second shifted),
    mean pooling, head. `paddleclas_ops`: the shifted window's mask built in the forward,
    a PVT-style depth-wise conv in each MLP, and a patch merging before the head."""

    def __init__(self, img: int = 16, patch: int = 2, in_ch: int = 3, dim: int = 32,
                 window: int = 4, num_heads: int = 4, num_classes: int = 10,
                 paddleclas_ops: bool = False) -> None:
        super().__init__()
        res = img // patch
        self.patch_embed = nn.Conv2D(in_ch, dim, patch, stride=patch)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.LayerList([
            SwinBlock(dim, res, window, num_heads, 0, paddleclas_ops),
            SwinBlock(dim, res, window, num_heads, window // 2, paddleclas_ops)])
        self.merge = PatchMerging(dim, res) if paddleclas_ops else None
        out = 2 * dim if paddleclas_ops else dim
        self.norm = nn.LayerNorm(out)
        self.head = nn.Linear(out, num_classes)

    def forward(self, x):
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose((0, 2, 1)))
        for blk in self.blocks:
            x = blk(x)
        if self.merge is not None:
            x = self.merge(x)
        return self.head(self.norm(x).mean(1))


class MHAViT(nn.Layer):
    """Tokens through `paddle.nn.MultiHeadAttention` (separate q, k, v and out projections)."""

    def __init__(self, dim: int = 32, num_heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2D(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiHeadAttention(dim, num_heads)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        h = self.norm(x)
        x = x + self.attn(h, h, h)
        return self.head(x.mean(1))


class TalkingAttention(nn.Layer):
    """Attention whose head count is called `h`, with a learnable per-head temperature (or
    none, `temperature=False`): without a per-head parameter of its own, `h` needs
    `register_layer_type(TalkingAttention, AttentionPruning("h"))`."""

    def __init__(self, dim: int = 32, h: int = 4, temperature: bool = True) -> None:
        super().__init__()
        self.h, self.d = h, dim // h
        self.temperature = self.create_parameter(
            [1, h, 1, 1], default_initializer=nn.initializer.Constant(1.0)) if temperature \
            else None
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n = x.shape[1]
        q, k, v = self.qkv(x).reshape((-1, n, 3, self.h, self.d)).transpose((2, 0, 3, 1, 4))
        attn = q @ k.transpose((0, 1, 3, 2))
        if self.temperature is not None:
            attn = attn * self.temperature
        attn = F.softmax(attn, axis=-1)
        return self.proj((attn @ v).transpose((0, 2, 1, 3)).reshape((-1, n, self.h * self.d)))


class TalkingViT(nn.Layer):
    def __init__(self, temperature: bool = True) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2D(3, 32, 4, stride=4)
        self.attn = TalkingAttention(temperature=temperature)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        return self.head((x + self.attn(x)).mean(1))


class RunTimeBatchHead(nn.Layer):
    """A classifier on `reshape([paddle.shape(y)[0], -1])`: the batch axis is a run-time size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.reshape([paddle.shape(y)[0], -1]))


class FirstHeadOnly(nn.Layer):
    """Attention whose output keeps head 0 only (`out[:, 0]`): an index along the heads axis."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2D(3, dim, 4, stride=4)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim // num_heads, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        n = x.shape[1]
        qkv = self.qkv(x).reshape((-1, n, 3, self.num_heads, self.head_dim))
        qkv = qkv.transpose((2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.softmax(q @ k.transpose((0, 1, 3, 2)), axis=-1) @ v
        return self.proj(out[:, 0].mean(1))


def sized_attention_forward(self, x):
    """What a user registers for PaddleClas-style attention (`Attention(paddleclas=True)`, whose
    forward reshapes with `C // self.num_heads`): the same computation with the head size read
    from the qkv weight and heads merged with `num_heads * head_dim`. Passed as
    `AttentionPruning(forward=sized_attention_forward)`."""
    n = x.shape[1]
    head_dim = self.qkv.weight.shape[1] // 3 // self.num_heads
    qkv = self.qkv(x).reshape((-1, n, 3, self.num_heads, head_dim)).transpose((2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = F.softmax((q @ k.transpose((0, 1, 3, 2))) * self.scale, axis=-1)
    x = (attn @ v).transpose((0, 2, 1, 3)).reshape((-1, n, self.num_heads * head_dim))
    return self.proj(x)
