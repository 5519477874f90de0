"""Checks for lesson 05 (GQA / MQA). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with `tlama_mini.attention`, and names the mistake when it can.

Legend: B batch, T queries, S keys, H query heads, K kv heads, n_rep = H / K, D head_dim.
"""
from __future__ import annotations

import math
import random

import torch

from ..attention import attention, naive_attention
from ..attention import repeat_kv as ref_repeat_kv
from ..masks import causal_mask
from .common import attributes_stubs, call, check_tensor, compare, fail, passed

__all__ = ["check_repeat_kv", "check_gqa_attention", "check_kv_cache_bytes", "check_llama3_kv_cache_gib"]


def _tiled(kv: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """The classic wrong order: kv.repeat(...) tiles the heads, so head h gets kv head h % K."""
    reps = [1] * kv.ndim
    reps[dim] = n_rep
    return kv.repeat(*reps)


@attributes_stubs
def check_repeat_kv(fn) -> None:
    """fn(kv, n_rep) with kv (B, S, K, D) -> (B, S, K * n_rep, D); output head h is kv head h // n_rep."""
    name = "repeat_kv"
    B, S, K, D = 2, random.randint(3, 6), random.choice([2, 3]), 4
    n_rep = random.choice([2, 4])
    kv = torch.randn(B, S, K, D)
    expected = ref_repeat_kv(kv, n_rep)  # (B, S, K * n_rep, D)
    mistakes = {
        f"the heads are tiled (kv.repeat): output head h uses kv head h % K, but query head h belongs to the "
        f"group of kv head h // n_rep (here head 1 must use kv head {1 // n_rep}, not {1 % K}); use "
        "repeat_interleave(n_rep, dim=2), or expand a new axis after K and reshape": _tiled(kv, n_rep, 2),
    }
    diff = check_tensor(name, fn(kv.clone(), n_rep), expected, atol=0, rtol=0, mistakes=mistakes,
                        hint="kv is (B, S, K, D): the heads are dim 2")
    check_tensor(name + " (n_rep=1)", fn(kv.clone(), 1), kv, atol=0, rtol=0)
    passed(name, f"max abs diff {diff:.1e}, kv {tuple(kv.shape)} with n_rep={n_rep} -> {tuple(expected.shape)}")


_HEADS = "here k and v are (B, K, S, D): the heads are dim 1, not dim 2 as in repeat_kv"
_ATTENTION = ("scores = q @ k.transpose(-2, -1) / sqrt(D) with each query head's kv head; fill the scores with "
              "-inf where mask is False (True = may attend), before the softmax over the keys (dim=-1); then @ v")


def _kv_head_of(out: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> list[int | None] | None:
    """For each query head h of the learner's output: the kv head j with out[:, h] = attention(q_h, k_j, v_j)
    (None where none fits); None when out is not a tensor of q's shape."""
    if not isinstance(out, torch.Tensor) or out.shape != q.shape:
        return None
    heads = []
    for h in range(q.shape[1]):
        fits = [j for j in range(k.shape[1]) if torch.allclose(
            out[:, h].detach().float(), naive_attention(q[:, h:h + 1], k[:, j:j + 1], v[:, j:j + 1], mask)[:, 0],
            atol=1e-5, rtol=1e-4)]
        heads.append(fits[0] if fits else None)
    return heads


@attributes_stubs
def check_gqa_attention(fn) -> None:
    """fn(q, k, v, mask) with q (B, H, T, D), k/v (B, K, S, D), mask (T, S) bool or None -> (B, H, T, D)."""
    name = "gqa_attention"
    B, K, n_rep, T, D = 2, 2, random.choice([2, 3]), random.randint(3, 7), 8
    H = K * n_rep
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    mask = causal_mask(T)
    expected = attention(q, k, v, mask, backend="naive")  # (B, H, T, D)
    k_rep, v_rep = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)  # (B, H, S, D), the right copies
    out = call(name, fn, q, k, v, mask, hint=_HEADS)
    heads = _kv_head_of(out, q, k, v, mask)
    want = [h // n_rep for h in range(H)]
    if heads is not None and None not in heads and heads != want:  # right attention, wrong kv head per query head
        if heads == [h % K for h in range(H)]:
            fail(name, "the kv heads are tiled (repeat) instead of interleaved (repeat_interleave): query head h "
                 f"must use kv head h // n_rep (here {want}), not h % K ({heads})", _HEADS)
        fail(name, f"query heads 0..{H - 1} used kv heads {heads}; expected h // n_rep = {want}", _HEADS)
    mistakes = {
        "the scores are not divided by sqrt(head_dim)": lambda: attention(q * math.sqrt(D), k, v, mask, backend="naive"),
        "the scores are divided by head_dim instead of sqrt(head_dim)":
            lambda: attention(q / math.sqrt(D), k, v, mask, backend="naive"),
        "the mask is ignored": lambda: attention(q, k, v, None, backend="naive"),
        "the mask is applied after the softmax (fill the scores with -inf *before* the softmax)":
            lambda: (torch.softmax(q @ k_rep.transpose(-2, -1) / math.sqrt(D), -1) * mask) @ v_rep,
        "the mask is inverted: masked_fill(m, value) writes where m is True, and True means *may attend*; fill "
        "the forbidden positions, scores.masked_fill(~mask, float('-inf'))": lambda: naive_attention(q, k_rep, v_rep, ~mask),
        "softmax over the wrong dimension (use dim=-1, over the keys: each query's weights sum to 1)":
            lambda: torch.softmax((q @ k_rep.transpose(-2, -1) / math.sqrt(D)).masked_fill(~mask, float("-inf")),
                                  -2).nan_to_num() @ v_rep,
    }
    shape_wrong = not isinstance(out, torch.Tensor) or out.shape != expected.shape
    diff = compare(name, out, expected, mistakes=mistakes, hint=_HEADS if shape_wrong else _ATTENTION,
                   nan_hint="a query whose keys are all masked gets NaN (0/0); with a causal mask every query sees "
                            "itself, so check which positions you fill with -inf (True = may attend)")
    mha = call(name + " (MHA: K = H)", fn, q, q.clone(), v_rep, None, hint=_HEADS)
    compare(name + " (MHA: K = H)", mha, naive_attention(q, q, v_rep), mistakes={},
            hint="with K = H (n_rep = 1) every query head has its own kv head; mask=None means no masking")
    passed(name, f"max abs diff {diff:.1e} with H={H}, K={K}, T={T}")


@attributes_stubs
def check_kv_cache_bytes(fn) -> None:
    """fn(n_layers, n_kv_heads, head_dim, seq_len, batch, dtype_bytes) -> int: bytes of the K and V caches."""
    name = "kv_cache_bytes"
    cases = [(32, 32, 128, 4096, 1, 2), (80, 8, 128, 8192, 4, 2), (32, 1, 64, 2048, 8, 4), (2, 4, 16, 128, 3, 1)]
    cases.append((random.randint(1, 96), random.choice([1, 2, 4, 8, 16]), random.choice([64, 128, 256]),
                  random.randint(1, 32768), random.randint(1, 16), random.choice([1, 2, 4])))
    outs = []
    for args in cases:
        out = fn(*args)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            out = out.item()
        if isinstance(out, bool) or not isinstance(out, int | float):
            fail(name, f"kv_cache_bytes{args} returned {type(out).__name__}, expected a number of bytes",
                 "did you forget a `return`?")
        outs.append(out)
    right = [2 * L * K * D * S * B * nb for L, K, D, S, B, nb in cases]
    if all(o == r for o, r in zip(outs, right)):
        passed(name, f"{len(cases)} shapes, e.g. Llama-2-7B at 4096 tokens in bf16: {right[0] / 2**30:g} GiB")
        return
    # which wrong formula explains *every* answer?
    mistakes = {
        "half the right answer: you forgot the factor 2 (a key AND a value are cached for every layer, "
        "head and position)": [r / 2 for r in right],
        "that is GiB (2**30 bytes); return the number of bytes": [r / 2**30 for r in right],
        "that is GB (1e9 bytes); return the number of bytes": [r / 1e9 for r in right],
        "that is MiB (2**20 bytes); return the number of bytes": [r / 2**20 for r in right],
        "the element size dtype_bytes is missing (that counts numbers, not bytes)":
            [r / c[-1] for r, c in zip(right, cases)],
        "that is one layer; every layer has its own cache (multiply by n_layers)":
            [r / c[0] for r, c in zip(right, cases)],
        "the batch size is missing: every sequence of the batch has its own cache":
            [r / c[4] for r, c in zip(right, cases)],
    }
    for mistake, values in mistakes.items():
        if all(math.isclose(o, v, rel_tol=1e-9) for o, v in zip(outs, values)):
            i = next(i for i, (o, r) in enumerate(zip(outs, right)) if o != r)
            fail(name, f"kv_cache_bytes{cases[i]} = {outs[i]:,}: {mistake}")
    i = next(i for i, (o, r) in enumerate(zip(outs, right)) if o != r)
    fail(name, f"kv_cache_bytes{cases[i]} = {outs[i]:,}, expected {right[i]:,} = 2 * n_layers * n_kv_heads * "
               "head_dim * seq_len * batch * dtype_bytes")

@attributes_stubs
def check_llama3_kv_cache_gib(fn) -> None:
    """fn() -> (gqa_gib, mha_gib): Llama 3 8B's KV cache (32 layers, head_dim 128) for 16 sequences of 8192
    tokens in bf16, in GiB, with its 8 kv heads and with MHA's 32."""
    name = "llama3_kv_cache_gib"
    out = fn()
    if not isinstance(out, tuple | list) or len(out) != 2:
        fail(name, f"returned {type(out).__name__}, expected a pair (gqa_gib, mha_gib)", "return gqa_gib, mha_gib")
    got = [float(o) if isinstance(o, int | float | torch.Tensor) and not isinstance(o, bool) else None for o in out]
    if None in got:
        fail(name, f"returned {out!r}, expected two numbers (GiB)")

    def gib(K: int = 8, nbytes: int = 2, batch: int = 16, unit: float = 2**30, kv: int = 2) -> float:
        return kv * 32 * K * 128 * 8192 * batch * nbytes / unit

    right = (gib(), gib(32))
    if all(math.isclose(g, r, rel_tol=1e-3) for g, r in zip(got, right)):
        passed(name, f"{right[0]:g} GiB with GQA, {right[1]:g} GiB with MHA: 8 kv heads instead of 32 save "
               f"{right[1] - right[0]:g} GiB, 4x less, and the model's weights are 15 GiB in bf16")
        return
    mistakes = {
        "the two sizes are swapped: return (with 8 kv heads, with 32)": (right[1], right[0]),
        "both sizes use 8 kv heads: with MHA every one of the 32 query heads has its own kv head": (right[0],) * 2,
        "both sizes use 32 kv heads: Llama 3 8B itself has 8": (right[1],) * 2,
        "these are GB (1e9 bytes), not GiB (2**30 bytes)": (gib(unit=1e9), gib(32, unit=1e9)),
        "these are bytes: divide by 2**30 for GiB": (gib(unit=1), gib(32, unit=1)),
        "these are MiB (2**20 bytes): divide by 2**30 for GiB": (gib(unit=2**20), gib(32, unit=2**20)),
        "that is one sequence: the batch has 16": (gib(batch=1), gib(32, batch=1)),
        "that is float32 (4 bytes); bf16 has 2 bytes per number": (gib(nbytes=4), gib(32, nbytes=4)),
        "the factor 2 is missing (a key and a value per position)": (gib(kv=1), gib(32, kv=1)),
    }
    for mistake, values in mistakes.items():
        if all(math.isclose(g, w, rel_tol=1e-3) for g, w in zip(got, values)):
            fail(name, f"returned ({got[0]:g}, {got[1]:g}): {mistake}")
    fail(name, f"returned ({got[0]:g}, {got[1]:g}), expected ({right[0]:g}, {right[1]:g}) GiB",
         "kv_cache_bytes(32, n_kv_heads, 128, 8192, 16, 2) / 2**30, with n_kv_heads = 8, then 32")
