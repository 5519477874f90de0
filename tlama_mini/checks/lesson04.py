"""Checks for lesson 04 (attention). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with tlama_mini, and names the mistake when it can.

Legend: B batch, T queries, S keys, H heads, D head_dim, C d_model = H * D.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from ..attention import Attention, naive_attention
from ..config import TlamaConfig
from ..masks import causal_mask
from .common import ExerciseFailed, attributes_stubs, call, compare as _compare, fail, passed

__all__ = ["check_causal_mask", "check_masked_softmax", "check_scaled_dot_product_attention", "check_split_heads",
           "check_merge_heads", "check_multi_head_attention"]

_INVERTED = ("the mask is inverted: masked_fill(m, value) writes where m is True, and True means *may attend*; "
             "fill the forbidden positions, scores.masked_fill(~mask, float('-inf'))")
_VIEW_AFTER_TRANSPOSE = ("after transpose(1, 2) the tensor is not contiguous in memory, so .view cannot merge H and "
                         "D: use .reshape (or .contiguous().view)")
_NAN_ROW = ("a query whose keys are all masked gets NaN (0/0); with a causal mask every query sees itself, "
            "so check which positions you fill with -inf (True = may attend)")
_HELPERS = ("multi_head_attention calls your split_heads, scaled_dot_product_attention and merge_heads: "
            "make their checks pass first, the bug may be in one of them")


def _call(name: str, fn: Callable, *args, hint: str = ""):
    """common.call, with this lesson's words for the .view-after-transpose crash."""
    try:
        return call(name, fn, *args, hint=hint)
    except ExerciseFailed as e:
        if "view size is not compatible" in str(e):
            raise ExerciseFailed(str(e).split("\n  hint:")[0] + f"\n  hint: {_VIEW_AFTER_TRANSPOSE}") from None
        raise


@attributes_stubs
def check_causal_mask(fn) -> None:
    """fn(T) -> (T, T) bool mask, True where query i may attend to key j (j <= i)."""
    name = "causal_mask"
    sizes = (random.randint(3, 9), 1)
    for T in sizes:
        expected = causal_mask(T)
        out = _call(name, fn, T)
        if isinstance(out, torch.Tensor) and out.dtype != torch.bool:
            fail(name, f"returned a {out.dtype} tensor; this project's masks are boolean (True = may attend)",
                 "create it as bool, torch.ones(T, T, dtype=torch.bool).tril(), or compare positions: k <= q")
        ones = torch.ones(T, T, dtype=torch.bool)
        mistakes = {  # booleans compared as 0/1 numbers
            "the mask is the upper triangle: query i would see the *future* keys j >= i (use tril, not triu)":
                lambda: ones.triu().float(),
            "the diagonal is excluded: a query must be allowed to attend to its own position (j <= i, not j < i)":
                lambda: ones.tril(-1).float(),
            "the mask is inverted: True must mean *may attend* (the past and the diagonal)":
                lambda: (~ones.tril()).float(),
        }
        _compare(f"{name}({T})", out.float() if isinstance(out, torch.Tensor) else out, expected.float(),
                 mistakes=mistakes, hint="rows are queries i, columns keys j; True where j <= i")
    passed(name, f"T={sizes[0]} and T=1")


def _reference_masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # NaN on fully masked rows
    return probs.nan_to_num(0.0)  # a query that may see nothing gets zero weights, not NaN


@attributes_stubs
def check_masked_softmax(fn) -> None:
    """fn(scores, mask) -> probabilities over the last dim; masked entries 0; fully masked rows all 0.
    The mask has the scores' shape, then (second call) a (T, S) mask broadcast over a batch of scores."""
    name = "masked_softmax"
    T, S = random.randint(4, 8), random.randint(4, 8)
    scores = torch.randn(2, T, S) * 3
    mask = torch.rand(2, T, S) > 0.4
    mask[:, 0] = False  # a fully masked row (e.g. padding): the case that produces NaN
    mask[:, 1] = True   # an unmasked row
    mistakes = {
        "a fully masked row became uniform (1/S each): filling with a large finite number (-1e9) instead of -inf "
        "makes every entry equal; such a row must be all zeros":
            lambda: torch.where(mask.any(-1, keepdim=True), _reference_masked_softmax(scores, mask), 1.0 / S),
        "the mask is applied after the softmax: the remaining weights no longer sum to 1 (fill the scores with "
        "-inf *before* the softmax)": lambda: torch.softmax(scores, -1) * mask,
        "the mask is ignored": lambda: torch.softmax(scores, -1),
        _INVERTED: lambda: torch.softmax(scores.masked_fill(mask, float("-inf")), -1),
        "the softmax is over the wrong dimension: each row (one query's weights over the keys, the last dim) must "
        "sum to 1, use dim=-1": lambda: torch.softmax(scores.masked_fill(~mask, float("-inf")), -2),
    }
    nan_hint = ("the fully masked row is exp(-inf)/sum(exp(-inf)) = 0/0 = NaN; set such rows to 0, e.g. "
                "torch.where(mask.any(-1, keepdim=True), probs, 0.0) or probs.masked_fill(~mask, 0.0)")
    hint = "masked entries must be exactly 0, and every row with at least one True must sum to 1"
    out = _call(name, fn, scores.clone(), mask)
    diff = _compare(name, out, _reference_masked_softmax(scores, mask), mistakes=mistakes, hint=hint,
                    nan_hint=nan_hint)
    mask2d = mask[0]  # (T, S), broadcast over the batch of scores, as in attention
    out = _call(name + " with a (T, S) mask", fn, scores.clone(), mask2d,
                hint="the mask may be broadcastable to the scores instead of the same shape; "
                     "masked_fill and torch.where broadcast by themselves")
    _compare(name + " with a (T, S) mask", out, _reference_masked_softmax(scores, mask2d.expand_as(scores)),
             mistakes={}, hint=hint, nan_hint=nan_hint)
    passed(name, f"max abs diff {diff:.1e}, including a fully masked row")


@attributes_stubs
def check_scaled_dot_product_attention(fn) -> None:
    """fn(q, k, v, mask) with q (B, H, T, D), k/v (B, H, S, D), mask (T, S) bool (True = attend) or None."""
    name = "scaled_dot_product_attention"
    B, H, T, D = 2, 3, int(torch.randint(4, 9, ())), 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask = causal_mask(T)
    expected = naive_attention(q, k, v, mask)
    scores = q @ k.transpose(-2, -1)  # (B, H, T, S), unscaled

    def softmax_then_mask():  # masking after the softmax: rows no longer sum to 1
        return torch.softmax(scores / math.sqrt(D), -1).masked_fill(~mask, 0.0) @ v

    mistakes = {
        "the scores are not divided by sqrt(head_dim)": lambda: naive_attention(q * math.sqrt(D), k, v, mask),
        "the scores are divided by head_dim instead of sqrt(head_dim)":
            lambda: naive_attention(q / math.sqrt(D), k, v, mask),
        "the mask is applied after the softmax (mask the scores with -inf *before* softmax)": softmax_then_mask,
        "the mask is ignored": lambda: naive_attention(q, k, v, None),
        _INVERTED: lambda: naive_attention(q, k, v, ~mask),
        "softmax over the wrong dimension (use dim=-1, over the keys: each query's weights sum to 1)":
            lambda: torch.softmax((scores / math.sqrt(D)).masked_fill(~mask, float("-inf")), -2).nan_to_num() @ v,
    }
    out = _call(name, fn, q, k, v, mask)
    diff = _compare(name, out, expected, mistakes=mistakes,
                    hint="scores = q @ k.transpose(-2, -1) / sqrt(D): (B, H, T, S); mask, softmax(dim=-1), then @ v",
                    nan_hint=_NAN_ROW)
    out = _call(name + " (mask=None)", fn, q, k, v, None,
                hint="mask=None means no masking: only call masked_fill when mask is not None")
    _compare(name + " (mask=None)", out, naive_attention(q, k, v, None), mistakes={},
             hint="with mask=None every query attends to every key")
    passed(name, f"max abs diff {diff:.1e} on random inputs with T={T}")


@attributes_stubs
def check_split_heads(fn) -> None:
    """fn(x, n_heads) with x (B, T, C) -> (B, H, T, D), D = C // H."""
    name = "split_heads"
    B, T, H, D = 2, random.choice([3, 5, 6, 7]), random.choice([2, 4]), 8  # T != H: the shapes tell T and H apart
    x = torch.randn(B, T, H * D)
    expected = x.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    mistakes = {
        "wrong reshape order: x.view(B, H, T, D) cuts the *sequence* into heads; view it as (B, T, H, D) "
        "first (each token's C features are its heads), then transpose(1, 2)": lambda: x.reshape(B, H, T, D),
        "the head features are interleaved: view as (B, T, D, H) mixes the heads' features; use (B, T, H, D)":
            lambda: x.view(B, T, D, H).permute(0, 3, 1, 2),
        "the result is (B, T, H, D): the heads are split but not moved in front of the sequence; "
        "add .transpose(1, 2) to get (B, H, T, D)": lambda: x.view(B, T, H, D),
    }
    out = _call(name, fn, x.clone(), H)
    diff = _compare(name, out, expected, mistakes=mistakes,
                    hint="out[:, h, t] must be x[:, t, h*D:(h+1)*D]: view(B, T, H, D), then transpose(1, 2)")
    passed(name, f"max abs diff {diff:.1e}, x {tuple(x.shape)} -> {tuple(expected.shape)}")


@attributes_stubs
def check_merge_heads(fn) -> None:
    """fn(x) with x (B, H, T, D) -> (B, T, C), C = H * D: the inverse of split_heads."""
    name = "merge_heads"
    B, H, T, D = 2, random.choice([2, 4]), random.choice([3, 5, 6, 7]), 8
    x = torch.randn(B, H, T, D)
    expected = x.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
    mistakes = {
        "wrong reshape order: x.reshape(B, T, C) without transposing first mixes positions and heads; "
        "transpose(1, 2) to (B, T, H, D), then reshape": lambda: x.reshape(B, T, H * D),
        "each token's features are ordered (D, H) instead of (H, D): transpose(1, 2) to (B, T, H, D), "
        "not permute to (B, T, D, H)": lambda: x.permute(0, 2, 3, 1).reshape(B, T, H * D),
        "the heads are not merged: the result is (B, T, H, D); reshape it to (B, T, H * D)":
            lambda: x.transpose(1, 2),
    }
    out = _call(name, fn, x.clone())
    diff = _compare(name, out, expected, mistakes=mistakes,
                    hint="merge_heads must undo split_heads: transpose(1, 2) back to (B, T, H, D), then "
                         "reshape(B, T, H * D)")
    passed(name, f"max abs diff {diff:.1e}, x {tuple(x.shape)} -> {tuple(expected.shape)}")


@attributes_stubs
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

    def mha(wrong_split=False, wrong_merge=False, scale: float = 1.0, wo: bool = True, transpose_w: bool = True,
            m: torch.Tensor | None = mask):
        f = (lambda w: w.T) if transpose_w else (lambda w: w)
        q, k, v = (split(x @ f(w), wrong_split) for w in (Wq, Wk, Wv))
        out = merge(naive_attention(q * scale, k, v, m), wrong_merge)
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
        "the mask is ignored": lambda: mha(m=None),
        _INVERTED: lambda: mha(m=~mask),
    }
    out = _call(name, fn, x.clone(), Wq, Wk, Wv, Wo, H, mask, hint=_HELPERS)
    diff = _compare(name, out, expected, mistakes=mistakes, hint=_HELPERS, nan_hint=_NAN_ROW + "; " + _HELPERS)
    with torch.no_grad():
        no_mask = layer(x, 0, None, None, kv_cache=False)
    out = _call(name + " (mask=None)", fn, x.clone(), Wq, Wk, Wv, Wo, H, None,
                hint="mask=None means no masking: pass it on to scaled_dot_product_attention, which must accept None")
    _compare(name + " (mask=None)", out, no_mask, mistakes={}, hint=_HELPERS)
    passed(name, f"max abs diff {diff:.1e} against tlama_mini.Attention with T={T}, H={H}, D={D}")
