"""Checks for lesson 06 (the transformer block: RMSNorm, SwiGLU, pre-norm residual block, the
SwiGLU hidden-size rule). Each check_<name>(fn) calls the learner's fn on fresh random inputs,
compares with `tlama_mini`, and names the mistake when it can.

Legend: B batch, T sequence, C d_model, F hidden size of the feed-forward network.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config import TlamaConfig, ffn_hidden_size
from ..ffn import FeedForward
from ..model import TransformerBlock
from ..norm import RMSNorm, rms_norm
from ..rope import compute_freqs_cis
from .common import attributes_stubs, check_tensor, fail, passed

__all__ = ["check_rms_norm", "check_swiglu", "check_block_forward", "check_ffn_hidden_size"]


def _call(name: str, fn: Callable[..., Any], *args: Any, hint: str = "") -> Any:
    """Run the learner's fn; turn a shape error inside it into a diagnosis instead of a traceback."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except (RuntimeError, IndexError) as e:  # mismatched matmul / broadcast shapes, a dim that does not exist
        fail(name, f"it crashed with {type(e).__name__}: {str(e).splitlines()[0]}", hint)


@attributes_stubs
def check_rms_norm(fn) -> None:
    """fn(x, weight, eps) with x (..., C), weight (C,) -> (..., C): x / sqrt(mean(x**2 over C) + eps) * weight."""
    name = "rms_norm"
    B, T, C = 2, random.randint(3, 7), 16  # T != C so a mean over the wrong dim does not go unnoticed
    # A small input scale and a large eps make "eps outside the sqrt" and "eps ignored" visible.
    x = torch.randn(B, T, C) * 0.5
    weight = 1.0 + 0.5 * torch.randn(C)
    eps = random.uniform(0.05, 0.2)
    ref = RMSNorm(C, eps)
    with torch.no_grad():
        ref.weight.copy_(weight)
        expected = ref(x)  # (B, T, C)
    ms = x.pow(2).mean(-1, keepdim=True)  # (B, T, 1)
    mistakes = {
        "the mean is subtracted: that is LayerNorm. RMSNorm keeps the mean and only divides by the root "
        "mean square": lambda: F.layer_norm(x, (C,), weight, None, eps),
        "it divides by the standard deviation (x.std / x.var subtract the mean inside); RMSNorm uses "
        "sqrt(mean(x**2))": lambda: x / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps) * weight,
        "it divides by the (unbiased) standard deviation, which subtracts the mean inside; RMSNorm uses "
        "sqrt(mean(x**2))": lambda: x / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight,
        "eps is added outside the square root: use sqrt(mean(x**2) + eps), as Zhang & Sennrich and Llama do":
            lambda: x / (ms.sqrt() + eps) * weight,
        "eps is ignored": lambda: x / ms.sqrt() * weight,
        "it divides by the mean square, not by its square root": lambda: x / (ms + eps) * weight,
        "it divides by the L2 norm sqrt(sum(x**2)), not the root *mean* square: average over the C features "
        "(x.pow(2).mean(-1, keepdim=True)), so the result does not shrink as C grows":
            lambda: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight,
        "the learnable scale `weight` is not applied": lambda: x * torch.rsqrt(ms + eps),
        "the mean square is taken over the wrong dimension: normalise each vector over its features, the "
        "last dim (mean(-1, keepdim=True))": lambda: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * weight,
        "the mean square is over the batch dimension (dim 0), not the features (the last dim)":
            lambda: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * weight,
        "the mean square is over all elements: take it per vector, over the last dim only (keepdim=True)":
            lambda: x * torch.rsqrt(x.pow(2).mean() + eps) * weight,
    }
    hint = "x is (..., C): reduce over the last dim with keepdim=True, mean(dim=-1, keepdim=True)"
    diff = check_tensor(name, _call(name, fn, x.clone(), weight.clone(), eps, hint=hint), expected, mistakes=mistakes)
    x2 = torch.randn(5, C)  # a 2-D input: the function must work for any number of leading dims
    hint2 = "use dim=-1, not a fixed dim=2, so that (N, C) inputs work too"
    check_tensor(name + " (2-D input)", _call(name + " (2-D input)", fn, x2, weight, 1e-6, hint=hint2),
                 rms_norm(x2, weight, 1e-6), hint=hint2)
    passed(name, f"max abs diff {diff:.1e} on x {tuple(x.shape)} with eps={eps:.3f}")


def _linear_weights(C: int, Fh: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w1, w2, w3 in nn.Linear layout, scaled so activations stay O(1)."""
    return (torch.randn(Fh, C) / math.sqrt(C), torch.randn(C, Fh) / math.sqrt(Fh), torch.randn(Fh, C) / math.sqrt(C))


@attributes_stubs
def check_swiglu(fn) -> None:
    """fn(x, w1, w2, w3) with x (..., C), w1/w3 (F, C), w2 (C, F) (nn.Linear layout) -> (..., C):
    w2(silu(w1 x) * w3 x)."""
    name = "swiglu"
    B, T, C, Fh = 2, random.randint(3, 6), 8, 24  # F != C so an untransposed weight fails loudly
    x = torch.randn(B, T, C)
    w1, w2, w3 = _linear_weights(C, Fh)
    ref = FeedForward(C, Fh, use_parallel=False, exact=True)
    with torch.no_grad():
        ref.w1.weight.copy_(w1)
        ref.w2.weight.copy_(w2)
        ref.w3.weight.copy_(w3)
        expected = ref(x)  # (B, T, C)
    a, b = x @ w1.T, x @ w3.T  # gate and up projections, (B, T, F)
    mistakes = {
        "the gate and up projections are swapped: the SiLU goes on w1 x (the gate), then multiplies w3 x (up)":
            lambda: (F.silu(b) * a) @ w2.T,
        "GELU is used instead of SiLU (that is GEGLU, another GLU variant)": lambda: (F.gelu(a) * b) @ w2.T,
        "ReLU is used instead of SiLU (that is ReGLU)": lambda: (F.relu(a) * b) @ w2.T,
        "sigmoid(w1 x) is used instead of silu(w1 x) = w1 x * sigmoid(w1 x) (that is the original GLU)":
            lambda: (torch.sigmoid(a) * b) @ w2.T,
        "the gate has no activation (a bilinear layer): apply SiLU to w1 x": lambda: (a * b) @ w2.T,
        "the up projection w3 is missing: SwiGLU multiplies silu(w1 x) by w3 x": lambda: F.silu(a) @ w2.T,
        "the down projection w2 is applied before the product": lambda: (F.silu(a) @ w2.T) * (b @ w2.T),
        "the SiLU is applied after the product, silu(w1 x * w3 x): it belongs on the gate alone, "
        "silu(w1 x) * w3 x": lambda: F.silu(a * b) @ w2.T,
    }
    hint = "the weights are in nn.Linear layout (out_features, in_features): compute x @ w1.T, or F.linear(x, w1)"
    diff = check_tensor(name, _call(name, fn, x, w1, w2, w3, hint=hint), expected, mistakes=mistakes)
    passed(name, f"max abs diff {diff:.1e} on x {tuple(x.shape)} with C={C}, F={Fh}")


def _block() -> tuple[TransformerBlock, torch.Tensor]:
    cfg = TlamaConfig.from_preset("tiny", d_model=32, n_heads=4, n_kv_heads=2, use_parallel=False, kv_cache=False)
    block = TransformerBlock(0, cfg).eval()
    with torch.no_grad():  # distinct norm weights, so using the wrong norm is visible
        block.attention_norm.weight.copy_(1.0 + 0.5 * torch.randn(cfg.d_model))
        block.ffn_norm.weight.copy_(1.0 + 0.5 * torch.randn(cfg.d_model))
    return block, compute_freqs_cis(cfg.head_dim, cfg.max_seq_len)


@attributes_stubs
def check_block_forward(fn) -> None:
    """fn(x, attention, ffn, attention_norm, ffn_norm) with x (B, T, C) and four callables
    (B, T, C) -> (B, T, C) -> (B, T, C): the pre-norm block h = x + attention(attention_norm(x)),
    out = h + ffn(ffn_norm(h))."""
    name = "block_forward"
    block, freqs = _block()
    B, T, C = 2, random.randint(3, 8), block.config.d_model
    x = torch.randn(B, T, C)
    fc = freqs[:T]

    def attn(h: torch.Tensor) -> torch.Tensor:
        return block.attention(h, 0, fc, None, False, is_causal=True)

    ffn, an, fn_ = block.ffn, block.attention_norm, block.ffn_norm
    with torch.no_grad():
        expected = block(x, 0, fc, None, False, is_causal=True)  # (B, T, C)

        def pre(n1, n2, res1=True, res2=True, ffn_reads_x=False):
            h = (x if res1 else 0) + attn(n1(x))
            src = x if ffn_reads_x else h
            return (h if res2 else 0) + ffn(n2(src))

        def post():
            h = an(x + attn(x))
            return fn_(h + ffn(h))

        mistakes = {
            "this is a post-norm block (norm after the residual add, as in the 2017 Transformer): pre-norm "
            "normalises the *input* of each sublayer and leaves the residual stream untouched": post,
            "the attention residual is missing: h = x + attention(attention_norm(x))": lambda: pre(an, fn_, res1=False),
            "the feed-forward residual is missing: out = h + ffn(ffn_norm(h))": lambda: pre(an, fn_, res2=False),
            "the second residual adds x instead of h, which drops the attention output: out = h + ffn(ffn_norm(h))":
                lambda: x + ffn(fn_(x + attn(an(x)))),
            "both residual connections are missing": lambda: pre(an, fn_, False, False),
            "the FFN reads x instead of h (that is PaLM's parallel block): the FFN must see the stream after "
            "attention has written to it": lambda: pre(an, fn_, ffn_reads_x=True),
            "the two norms are swapped: attention_norm goes before attention, ffn_norm before the FFN":
                lambda: pre(fn_, an),
            "attention_norm is used for both sublayers: the FFN has its own ffn_norm": lambda: pre(an, an),
            "the norms are skipped": lambda: pre(lambda z: z, lambda z: z),
            "the residual adds the normalised input: add the raw x (and h), only the sublayer's input is "
            "normalised": lambda: (lambda h: fn_(h) + ffn(fn_(h)))(an(x) + attn(an(x))),
        }
        out = _call(name, fn, x.clone(), attn, ffn, an, fn_)
    diff = check_tensor(name, out, expected, mistakes=mistakes)
    passed(name, f"max abs diff {diff:.1e} against tlama_mini.TransformerBlock on x {tuple(x.shape)}")


def _rule(hidden_dim: int, multiple_of: int, mult: float | None, *, two_thirds: bool = True, trunc: bool = True,
          use_mult: bool = True, rounding: str = "up", mult_after: bool = False) -> float:
    """The sizing rule with one step changed, to recognise a learner's mistake."""
    h: float = 2 * hidden_dim / 3 if two_thirds else hidden_dim
    if trunc:
        h = int(h)
    if mult is not None and use_mult and not mult_after:
        h = mult * h
        if trunc:
            h = int(h)
    q = h / multiple_of
    r = {"up": math.ceil(q), "down": math.floor(q), "nearest": round(q), "none": q,
         "next": math.floor(q) + 1}[rounding] * multiple_of
    if mult is not None and use_mult and mult_after:
        r = int(mult * r)
    return r


@attributes_stubs
def check_ffn_hidden_size(fn) -> None:
    """fn(hidden_dim, multiple_of, ffn_dim_multiplier) -> int: Llama's SwiGLU hidden size."""
    name = "ffn_hidden_size"
    cases = [(4 * 4096, 256, None),     # Llama 2 7B: 11008
             (4 * 5120, 256, None),     # Llama 2 13B: 13824
             (4 * 8192, 4096, 1.3),     # Llama 2 70B / Llama 3 70B: 28672
             (4 * 4096, 1024, 1.3),     # Llama 3 8B: 14336
             (4 * 64, 16, None),        # tlama_mini's "tiny" preset: 176
             (385, 256, None),          # 2*385/3 = 256.67: Llama truncates to 256 first, so 256 (not 512)
             (384, 256, None),          # 2*384/3 = 256 exactly: already a multiple, so 256
             (300, 64, 1.5)]
    cases.append((random.randint(16, 20000), random.choice([8, 16, 64, 256]), random.choice([None, 1.3, 1.5, 0.8])))
    expected = [ffn_hidden_size(*c) for c in cases]
    outs = []
    for c in cases:
        out = fn(*c)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            out = out.item()
        if isinstance(out, float) and out.is_integer():
            fail(name, f"returned the float {out} for {c}", "return an int: it is a layer width")
        if not isinstance(out, int) or isinstance(out, bool):
            fail(name, f"returned {type(out).__name__} {out!r} for {c}, expected an int")
        outs.append(out)
    if outs == expected:
        passed(name, f"{len(cases)} cases, e.g. Llama 2 7B {cases[0]} -> {outs[0]}, Llama 3 8B {cases[3]} -> {outs[3]}")
        return
    mistakes = {
        "the 2/3 factor is missing: SwiGLU has three matrices, so Llama uses 2/3 of 4 * d_model to keep the "
        "parameter count of a two-matrix MLP": dict(two_thirds=False),
        "it rounds down: round *up* to a multiple of multiple_of (math.ceil)": dict(rounding="down"),
        "it rounds to the nearest multiple: round *up* (math.ceil)": dict(rounding="nearest"),
        "it does not round to a multiple of multiple_of": dict(rounding="none"),
        "it always goes up to the *next* multiple, (h // multiple_of + 1) * multiple_of, even when h already is "
        "one (2 * 384 / 3 = 256 with multiple_of=256 must stay 256): use math.ceil(h / multiple_of) * multiple_of":
            dict(rounding="next"),
        "ffn_dim_multiplier is ignored": dict(use_mult=False),
        "ffn_dim_multiplier is applied after rounding: apply it to int(2 * hidden_dim / 3), then round up":
            dict(mult_after=True),
        "the intermediate sizes are not truncated to int: Llama computes int(2 * hidden_dim / 3) (and "
        "int(multiplier * hidden)) before rounding up, which matters when 2 * hidden_dim / 3 is just above a "
        "multiple (hidden_dim=385, multiple_of=256 -> 256)": dict(trunc=False),
    }
    for mistake, kw in mistakes.items():
        if all(o == _rule(*c, **kw) for o, c in zip(outs, cases)):
            fail(name, f"the output matches a known mistake: {mistake}")
    bad = [(c, o, e) for c, o, e in zip(cases, outs, expected) if o != e]
    c, o, e = bad[0]
    fail(name, f"{len(bad)} of {len(cases)} cases are wrong; e.g. fn{c} = {o}, expected {e}")
