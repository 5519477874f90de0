"""Checks for lesson 04 (attention). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with tlama_mini, and names the mistake when it can."""
from __future__ import annotations

import math

import torch

from ..attention import naive_attention
from ..masks import causal_mask
from .common import check_tensor, passed


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
