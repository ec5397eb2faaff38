"""A small vision transformer for the app (`conf/model/vit_tiny.yaml`): ViT/DeiT-shaped (patch
embedding conv, class token, position embedding, pre-norm blocks with fused qkv and LayerScale,
final LayerNorm, head on the class token), written so that heads and the embedding width prune:
q, k and v are reshaped with the layer's `num_heads` and `head_dim`, and sizes are read from
tensors, never from the input's width.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


class _Attention(nn.Layer):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        n = x.shape[1]
        qkv = self.qkv(x).reshape((-1, n, 3, self.num_heads, self.head_dim))
        qkv = qkv.transpose((2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.softmax((q @ k.transpose((0, 1, 3, 2))) * self.scale, axis=-1)
        out = (attn @ v).transpose((0, 2, 1, 3)).reshape((-1, n, self.num_heads * self.head_dim))
        return self.proj(out)


class _Block(nn.Layer):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, init_scale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)
        init = nn.initializer.Constant(init_scale)
        self.gamma1 = self.create_parameter([dim], default_initializer=init)
        self.gamma2 = self.create_parameter([dim], default_initializer=init)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.gamma1 * self.attn(self.norm1(x))
        return x + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Layer):
    """ViT for small images.

    Args:
        image_size: input height and width (square), a multiple of `patch_size`.
        patch_size: side of the square patches (and of the patch embedding conv's stride).
        in_channels: input channels.
        embed_dim: token width (the embedding width, prunable through LayerNorm).
        depth: number of blocks.
        num_heads: attention heads per block (each a prunable unit).
        mlp_ratio: MLP hidden width over `embed_dim`.
        num_classes: classifier outputs.
        layer_scale: initial LayerScale value.

    Raises:
        ValueError: `image_size` not a multiple of `patch_size`, or `embed_dim` not a multiple
            of `num_heads`.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: int = 2,
                 num_classes: int = 10, layer_scale: float = 0.1) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size "
                             f"{patch_size} (set data.image_size or model.patch_size)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2D(in_channels, embed_dim, patch_size, stride=patch_size)
        normal = nn.initializer.TruncatedNormal(std=0.02)
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=normal)
        self.pos_embed = self.create_parameter([1, tokens, embed_dim], default_initializer=normal)
        self.blocks = nn.LayerList([_Block(embed_dim, num_heads, mlp_ratio, layer_scale)
                                    for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.patch_embed(x).flatten(2).transpose((0, 2, 1))
        cls = self.cls_token.expand((paddle.shape(x)[0], -1, -1))
        x = paddle.concat([cls, x], axis=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit_tiny(num_classes: int = 10, image_size: int = 32, patch_size: int = 4,
             in_channels: int = 3, embed_dim: int = 64, depth: int = 4,
             num_heads: int = 4, mlp_ratio: int = 2) -> VisionTransformer:
    """The app's small ViT (conf/model/vit_tiny.yaml): patch 4, 4 blocks of 4 heads, width 64."""
    return VisionTransformer(image_size, patch_size, in_channels, embed_dim, depth, num_heads,
                             mlp_ratio, num_classes)
