"""Checks for lesson 04 (attention). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with tlama_mini, and names the mistake when it can.

Legend: B batch, T queries, S keys, H heads, D head_dim, C d_model = H * D.
"""
from __future__ import annotations

import math
import random

import torch

from ..attention import Attention, naive_attention
from ..config import TlamaConfig
from ..masks import causal_mask
from .common import check_tensor, fail, passed

__all__ = ["check_causal_mask", "check_masked_softmax", "check_scaled_dot_product_attention", "check_split_heads",
           "check_merge_heads", "check_multi_head_attention"]


def check_causal_mask(fn) -> None:
    """fn(T) -> (T, T) bool mask, True where query i may attend to key j (j <= i)."""
    name = "causal_mask"
    sizes = (random.randint(3, 9), 1)
    for T in sizes:
        expected = causal_mask(T)
        out = fn(T)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            fail(name, f"returned a {out.dtype} tensor; this project's masks are boolean (True = may attend)",
                 "build it with torch.ones(T, T, dtype=torch.bool).tril(), or compare positions: k <= q")
        ones = torch.ones(T, T, dtype=torch.bool)
        mistakes = {
            "the mask is the upper triangle: query i would see the *future* keys j >= i (use tril, not triu)":
                ones.triu(),
            "the diagonal is excluded: a query must be allowed to attend to its own position (j <= i, not j < i)":
                ones.tril(-1),
            "the mask is inverted: True must mean *may attend* (the past and the diagonal)": ~ones.tril(),
        }
        if isinstance(out, torch.Tensor) and out.dtype != torch.bool:
            fail(name, f"returned a {out.dtype} tensor, expected torch.bool (True = may attend)")
        as_float = {k: v.float() for k, v in mistakes.items()}  # compare booleans as 0/1 numbers
        check_tensor(f"{name}({T})", out.float() if isinstance(out, torch.Tensor) else out, expected.float(),
                     mistakes=as_float)
    passed(name, f"T={sizes[0]} and T=1")


def _reference_masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # NaN on fully masked rows
    return probs.nan_to_num(0.0)  # a query that may see nothing gets zero weights, not NaN


def check_masked_softmax(fn) -> None:
    """fn(scores, mask) -> probabilities over the last dim; masked entries 0; fully masked rows all 0."""
    name = "masked_softmax"
    T, S = random.randint(4, 8), random.randint(4, 8)
    scores = torch.randn(2, T, S) * 3
    mask = torch.rand(2, T, S) > 0.4
    mask[:, 0] = False  # a fully masked row (e.g. padding): the case that produces NaN
    mask[:, 1] = True   # an unmasked row
    expected = _reference_masked_softmax(scores, mask)
    plain = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    mistakes = {
        "a fully masked row became uniform (1/S each): filling with a large finite number (-1e9) instead of -inf "
        "makes every entry equal; such a row must be all zeros":
            torch.where(mask.any(-1, keepdim=True), plain, torch.full_like(plain, 1.0 / S)),
        "the mask is applied after the softmax: the remaining weights no longer sum to 1":
            torch.softmax(scores, -1) * mask,
        "the mask is ignored": torch.softmax(scores, -1),
        "the mask is inverted (True means *may attend*)": _reference_masked_softmax(scores, ~mask),
    }
    out = fn(scores.clone(), mask)
    diff = check_tensor(name, out, expected, mistakes=mistakes,
                        hint="a fully masked row is exp(-inf)/sum(exp(-inf)) = 0/0 = NaN; replace those rows by 0 "
                             "(e.g. torch.nan_to_num(probs, 0.0), or torch.where(mask.any(-1, keepdim=True), ...))")
    passed(name, f"max abs diff {diff:.1e}, including a fully masked row")


def check_scaled_dot_product_attention(fn) -> None:
    """fn(q, k, v, mask) with q (B, H, T, D), k/v (B, H, S, D), mask (T, S) bool (True = attend) or None."""
    name = "scaled_dot_product_attention"
    B, H, T, D = 2, 3, int(torch.randint(4, 9, ())), 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask = causal_mask(T)
    expected = naive_attention(q, k, v, mask)
    scores = q @ k.transpose(-2, -1)

    def softmax_then_mask():  # masking after the softmax: rows no longer sum to 1
        p = torch.softmax(scores / math.sqrt(D), -1).masked_fill(~mask, 0.0)
        return p @ v

    mistakes = {
        "the scores are not divided by sqrt(head_dim)": lambda: naive_attention(q * math.sqrt(D), k, v, mask),
        "the mask is applied after the softmax (mask the scores with -inf *before* softmax)": softmax_then_mask,
        "the mask is ignored": lambda: naive_attention(q, k, v, None),
        "the mask is inverted (True means *may attend*)": lambda: torch.nan_to_num(naive_attention(q, k, v, ~mask)),
        "softmax over the wrong dimension (use the last one, over keys)":
            lambda: torch.softmax((scores / math.sqrt(D)).masked_fill(~mask, float("-inf")), -2).nan_to_num() @ v,
    }
    diff = check_tensor(name, fn(q, k, v, mask), expected, mistakes=mistakes)
    check_tensor(name + " (mask=None)", fn(q, k, v, None), naive_attention(q, k, v, None))
    passed(name, f"max abs diff {diff:.1e} on random inputs with T={T}")


def check_split_heads(fn) -> None:
    """fn(x, n_heads) with x (B, T, C) -> (B, H, T, D), D = C // H."""
    name = "split_heads"
    B, T, H, D = 2, random.randint(3, 7), random.choice([2, 4]), 8
    x = torch.randn(B, T, H * D)
    expected = x.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    mistakes = {
        "wrong reshape order: x.view(B, H, T, D) cuts the *sequence* into heads; view it as (B, T, H, D) "
        "first (each token's C features are its heads), then transpose(1, 2)": x.reshape(B, H, T, D),
        "the head features are interleaved: view as (B, T, D, H) mixes the heads' features; use (B, T, H, D)":
            x.view(B, T, D, H).permute(0, 3, 1, 2),
    }
    diff = check_tensor(name, fn(x.clone(), H), expected, mistakes=mistakes)
    passed(name, f"max abs diff {diff:.1e}, x {tuple(x.shape)} -> {tuple(expected.shape)}")


def check_merge_heads(fn) -> None:
    """fn(x) with x (B, H, T, D) -> (B, T, C), C = H * D: the inverse of split_heads."""
    name = "merge_heads"
    B, H, T, D = 2, random.choice([2, 4]), random.randint(3, 7), 8
    x = torch.randn(B, H, T, D)
    expected = x.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
    mistakes = {
        "wrong reshape order: x.reshape(B, T, C) without transposing first mixes positions and heads; "
        "transpose(1, 2) to (B, T, H, D), then reshape": x.reshape(B, T, H * D),
    }
    diff = check_tensor(name, fn(x.clone()), expected, mistakes=mistakes,
                        hint="after transpose the tensor is not contiguous: use .reshape (or .contiguous().view)")
    passed(name, f"max abs diff {diff:.1e}, x {tuple(x.shape)} -> {tuple(expected.shape)}")


def check_multi_head_attention(fn) -> None:
    """fn(x, Wq, Wk, Wv, Wo, n_heads, mask) with x (B, T, C), weights (C, C) in nn.Linear's (out, in)
    layout, mask (T, T) bool or None -> (B, T, C). Compared with `tlama_mini.Attention` (no RoPE)."""
    name = "multi_head_attention"
    B, T, H, D = 2, random.choice([3, 5, 6]), 4, 8
    C = H * D
    config = TlamaConfig(vocab_size=16, d_model=C, n_layers=1, n_heads=H, max_seq_len=16, max_batch_size=B,
                         kv_cache=False)
    layer = Attention(config)
    for w in (layer.Wq.weight, layer.Wk.weight, layer.Wv.weight, layer.Wo.weight):
        torch.nn.init.normal_(w, std=C ** -0.5)
    Wq, Wk, Wv, Wo = (w.detach().clone() for w in (layer.Wq.weight, layer.Wk.weight, layer.Wv.weight, layer.Wo.weight))
    x, mask = torch.randn(B, T, C), causal_mask(T)
    with torch.no_grad():
        expected = layer(x, 0, None, mask, kv_cache=False)  # (B, T, C)

    def split(t, wrong: bool = False):  # (B, T, C) -> (B, H, T, D)
        return t.reshape(B, H, T, D) if wrong else t.view(B, T, H, D).transpose(1, 2)

    def merge(t, wrong: bool = False):  # (B, H, T, D) -> (B, T, C)
        return t.reshape(B, T, C) if wrong else t.transpose(1, 2).reshape(B, T, C)

    def mha(wrong_split=False, wrong_merge=False, scale: float = 1.0, wo: bool = True, transpose_w: bool = True):
        f = (lambda w: w.T) if transpose_w else (lambda w: w)
        q, k, v = (split(x @ f(w), wrong_split) for w in (Wq, Wk, Wv))
        out = merge(naive_attention(q * scale, k, v, mask), wrong_merge)
        return out @ f(Wo) if wo else out

    mistakes = {
        "wrong reshape order: view(B, H, T, D) instead of view(B, T, H, D).transpose(1, 2) (and back)":
            lambda: mha(wrong_split=True, wrong_merge=True),
        "wrong reshape order when splitting heads: view(B, H, T, D) instead of view(B, T, H, D).transpose(1, 2)":
            lambda: mha(wrong_split=True),
        "wrong reshape order when merging heads: transpose(1, 2) back to (B, T, H, D) before reshaping to "
        "(B, T, C)": lambda: mha(wrong_merge=True),
        "the output projection Wo is missing": lambda: mha(wo=False),
        "the weights are used untransposed: nn.Linear stores (out, in), so q = x @ Wq.T":
            lambda: mha(transpose_w=False),
        "the scores are not divided by sqrt(head_dim)": lambda: mha(scale=math.sqrt(D)),
        "the scores are divided by sqrt(d_model) instead of sqrt(head_dim)": lambda: mha(scale=math.sqrt(D / C)),
        "the mask is ignored": lambda: merge(naive_attention(split(x @ Wq.T), split(x @ Wk.T), split(x @ Wv.T))) @ Wo.T,
    }
    diff = check_tensor(name, fn(x.clone(), Wq, Wk, Wv, Wo, H, mask), expected, atol=1e-5, mistakes=mistakes)
    with torch.no_grad():
        no_mask = layer(x, 0, None, None, kv_cache=False)
    check_tensor(name + " (mask=None)", fn(x.clone(), Wq, Wk, Wv, Wo, H, None), no_mask, atol=1e-5)
    passed(name, f"max abs diff {diff:.1e} against tlama_mini.Attention with T={T}, H={H}, D={D}")
