"""Example registrations that make PaddleClas 2.6's attention layers prunable, user-side code as
docs/transformers.md describes it (the package holds nothing PaddleClas-specific).

PaddleClas's attention forwards reshape q, k and v with `C // self.num_heads` and merge heads
with `C`, C being the input's width: neither a pruned head count nor a pruned width can follow.
Each forward below computes the same with the head size read from the qkv weight and heads
merged with `num_heads * head_dim`; `AttentionPruning(forward=...)` installs it on every
instance when a network is traced, once checked to leave the network's output unchanged.

    import sys; sys.path.insert(0, "/path/to/PaddleClas")
    from paddleclas_forwards import register
    register()                      # then FilterPruner(net, shape) prunes heads and widths

`benchmarks/transformer_coverage.py --paddleclas PATH --forwards` uses it.
"""
from __future__ import annotations

import importlib
from typing import List

import paddle
import paddle.nn.functional as F

from prune_callbacks import register_layer_type
from prune_callbacks.layers.registry import AttentionPruning


def vit_attention_forward(self, x):
    """`ppcls.arch.backbone.model_zoo.vision_transformer.Attention` (ViT, DeiT)."""
    n = x.shape[1]
    head_dim = self.qkv.weight.shape[1] // 3 // self.num_heads
    qkv = self.qkv(x).reshape((-1, n, 3, self.num_heads, head_dim)).transpose((2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = F.softmax(q.matmul(k.transpose((0, 1, 3, 2))) * self.scale, axis=-1)
    x = self.attn_drop(attn).matmul(v).transpose((0, 2, 1, 3))
    return self.proj_drop(self.proj(x.reshape((-1, n, self.num_heads * head_dim))))


def swin_window_attention_forward(self, x, mask=None):
    """`ppcls.arch.backbone.legendary_models.swin_transformer.WindowAttention` (its unfused
    path; the relative position bias is always taken from the table, never from the buffer
    its `eval()` caches, which would keep the heads it had when cached)."""
    b, n = x.shape[0], x.shape[1]
    head_dim = self.qkv.weight.shape[1] // 3 // self.num_heads
    qkv = self.qkv(x).reshape([b, n, 3, self.num_heads, head_dim]).transpose((2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = paddle.mm(q * self.scale, k.transpose([0, 1, 3, 2]))
    bias = paddle.index_select(self.relative_position_bias_table,
                               self.relative_position_index.reshape([-1]))
    attn = attn + bias.reshape([n, n, -1]).transpose([2, 0, 1]).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.reshape([b // nw, nw, self.num_heads, n, n]) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.reshape([b, self.num_heads, n, n])
    attn = self.attn_drop(self.softmax(attn))
    x = paddle.mm(attn, v).transpose([0, 2, 1, 3])
    return self.proj_drop(self.proj(x.reshape([b, n, self.num_heads * head_dim])))


FORWARDS = {
    "ppcls.arch.backbone.model_zoo.vision_transformer:Attention": vit_attention_forward,
    "ppcls.arch.backbone.legendary_models.swin_transformer:WindowAttention":
        swin_window_attention_forward,
}


def register() -> List[str]:
    """Register every forward above whose PaddleClas module imports; returns what was."""
    done = []
    for where, fn in FORWARDS.items():
        module, cls = where.split(":")
        try:
            layer_type = getattr(importlib.import_module(module), cls)
        except Exception:  # a PaddleClas without it: skip
            continue
        register_layer_type(layer_type, AttentionPruning(forward=fn))
        done.append(where)
    return done
