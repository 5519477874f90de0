"""Fused projections for inference: one matrix product where the model has several on the same input.

Attention multiplies its input by Wq, Wk and Wv, and the SwiGLU FFN by w1 (gate) and w3 (up). At batch 1
each product is a matrix-vector product that streams its weight once; fusing turns SmolLM2's 211 products
per token (7 per block, 30 blocks, and the LM head) into 121, each paying its call and thread start-up
once. (Profiled after fusion on a 2-core CPU, the products are still 78% of a decode step: ~35 ms per
token, reading 513 MiB of fp32 weights; the fusion saves overhead, not bandwidth.) `fuse_projections(model)` moves each group's weights into one matrix (Wq, Wk, Wv; w1, w3),
stored transposed (`stack_linears`), and makes the original parameters *views* of its blocks: names,
values, shapes and the state_dict are unchanged, no memory is added, and training (which updates each
parameter in place) keeps them fused. `fused_weight` then finds the stacked matrix from the
parameters themselves, so inference runs one product per group and splits the result:

    x @ [Wq; Wk; Wv]^T = [x Wq^T, x Wk^T, x Wv^T]          (B, T, C) -> (B, T, (H + 2K) D)

Anything that breaks the layout (moving the model to another device or dtype, which copies each
parameter separately; LoRA wrapping a linear; tensor-parallel shards) makes `fused_weight` return None
and the layers use their separate products again: the fusion is an optimisation, never a requirement.
Products are only fused without autograd (generation, `torch.no_grad`), where nothing needs the
separate weights' graphs.
Legend: C d_model, H heads, K kv heads, D head_dim, F FFN hidden size.
"""
from __future__ import annotations

import torch
from torch import nn


def _plain(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


def fused_weight(*linears: nn.Module) -> torch.Tensor | None:
    """The (sum of out_features, in_features) weight that applies these bias-free nn.Linear layers at
    once, when `stack_linears` stored them as column blocks of one matrix; otherwise None. It is a view,
    transposed in memory like each of them (strides (1, sum of out_features))."""
    if not all(_plain(m) for m in linears):
        return None
    first = linears[0].weight
    C = first.shape[1]
    total = sum(m.weight.shape[0] for m in linears)
    storage = first.untyped_storage().data_ptr()
    at = first.data_ptr()
    for m in linears:
        w = m.weight
        if (w.data_ptr() != at or w.shape[1] != C or w.stride() != (1, total) or w.dtype != first.dtype
                or w.untyped_storage().data_ptr() != storage):
            return None
        at += w.shape[0] * w.element_size()  # the next block starts where this one's columns end
    return first.as_strided((total, C), (1, total))  # (sum out, in), no copy


def stack_linears(*linears: nn.Module) -> bool:
    """Store the weights of these bias-free nn.Linear layers (same in_features, device, dtype) as the
    column blocks of one new (in_features, sum of out_features) matrix; each layer's weight becomes a
    Parameter viewing its block, transposed: the same values and shape, strides (1, sum of out).
    Returns False (and changes nothing) when they are not plain nn.Linear layers.

    Why transposed: a batch-1 product x W^T reads W once, and on CPU (MKL) it streams W about 1.25x
    faster when W^T is the contiguous one (measured; the LM head is kept that way too, see model.py)."""
    if not all(_plain(m) for m in linears):
        return False
    ws = [m.weight for m in linears]
    if len({(w.shape[1], w.device, w.dtype) for w in ws}) != 1:
        return False
    with torch.no_grad():
        stacked = torch.cat([w.detach() for w in ws]).t().contiguous()  # (in, sum out)
    start = 0
    for m, w in zip(linears, ws):
        n = w.shape[0]
        m.weight = nn.Parameter(stacked[:, start:start + n].t(), requires_grad=w.requires_grad)  # (n, in)
        start += n
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse Wq/Wk/Wv of every attention layer and w1/w3 of every dense FFN of a `Transformer`, and
    store Wo and w2 transposed too (see the module docstring). Returns how many layers' weights were
    restored this way. Values, shapes and state_dict are unchanged."""
    def linears(m: nn.Module, *names: str) -> bool:  # an Attention (Wq Wk Wv Wo) or a dense FeedForward (w1 w2 w3)
        return all(isinstance(getattr(m, n, None), nn.Linear) for n in names)
    n = 0
    for m in model.modules():  # by their linears' names, so this module imports neither layer
        if linears(m, "Wq", "Wk", "Wv", "Wo"):
            n += stack_linears(m.Wq, m.Wk, m.Wv) + stack_linears(m.Wo)
        elif linears(m, "w1", "w2", "w3"):
            n += stack_linears(m.w1, m.w3) + stack_linears(m.w2)
    return n
