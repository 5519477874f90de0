"""Checks for lesson 12 (the Blockwise Parallel Transformer). Each check_<name>(fn) calls the
learner's fn on fresh random inputs, compares with tlama_mini (`bpt.gptj_rotary`,
`blockwise.blockwise_compute_ffn`, `blockwise.blockwise_cross_entropy`) and names the mistake when
it can.

Legend: B batch, T sequence length, H heads, D head_dim, R rotary_dim, C width, F FFN inner size,
V vocabulary.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..blockwise import blockwise_cross_entropy
from ..bpt import gptj_rotary as tlama_gptj_rotary
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_gptj_rotary", "check_chunked_ffn", "check_masked_cross_entropy"]


# ----------------------------------------------------------------------------------------------- gptj_rotary
def _halves(x: torch.Tensor, pos: torch.Tensor, R: int) -> torch.Tensor:
    """The NeoX / Llama pairing (i, i + R/2) on the first R features: a wrong answer here."""
    inv = 1.0 / 10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    ang = pos.float()[..., None] * inv                                   # (B, T, R/2)
    sin, cos = ang.sin()[:, :, None], ang.cos()[:, :, None]              # (B, T, 1, R/2)
    a, b = x[..., :R // 2], x[..., R // 2:R]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., R:]], dim=-1)


@attributes_stubs
def check_gptj_rotary(fn: Callable[..., torch.Tensor]) -> None:
    """fn(x (B, T, H, D), position_ids (B, T), rotary_dim R) -> (B, T, H, D): GPT-J's rotary on the
    interleaved pairs (2i, 2i+1) of the first R features, angle position * 10000^(-2i/R); the other
    D - R features unchanged."""
    name = "gptj_rotary"
    for _ in range(3):
        B, T, H = random.randint(1, 3), random.randint(3, 9), random.randint(1, 3)
        D = random.choice([8, 12, 16])
        R = random.choice([r for r in range(2, D, 2) if r != D // 2 or D == 8])  # R < D: a part passes through
        x = torch.randn(B, T, H, D)
        pos = torch.arange(T)[None].repeat(B, 1) + torch.randint(3, 50, (B, 1))  # offset, per row
        x_copy = x.clone()
        out = call(name, fn, x, pos, R, hint="x[..., :R:2] and x[..., 1:R:2] are the two members of each pair")
        expected = tlama_gptj_rotary(x, pos, R)
        if not torch.equal(x, x_copy):
            fail(name, "x was modified in place; return a new tensor", "build the result with torch.cat / stack")
        zero_pos = torch.arange(T)[None].repeat(B, 1)
        mistakes = {
            "the halves (i, i + R/2) are paired, as in Llama / GPT-NeoX; GPT-J pairs neighbours (2i, 2i+1)":
                lambda: _halves(x, pos, R),
            "all D features are rotated; only the first rotary_dim are, the rest pass through":
                lambda: tlama_gptj_rotary(x, pos, None),
            "the frequencies use head_dim: the angle is pos * 10000^(-2i / rotary_dim)":
                lambda: torch.cat([tlama_gptj_rotary(x, pos, D)[..., :R], x[..., R:]], dim=-1),
            "the rotation goes the wrong way (sin has the wrong sign): (x0, x1) -> "
            "(x0 cos - x1 sin, x1 cos + x0 sin)": lambda: tlama_gptj_rotary(x, -pos, R),
            "position_ids are ignored: use the given positions (here they start after an offset), not 0..T-1":
                lambda: tlama_gptj_rotary(x, zero_pos, R),
        }
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[:3] == x.shape[:3] and out.shape[-1] == R:
            fail(name, f"returned only the {R} rotated features; append the other {D - R} unchanged",
                 "torch.cat([rotated, x[..., R:]], dim=-1)")
        for mistake, make in mistakes.items():
            if isinstance(out, torch.Tensor) and out.shape == expected.shape and \
                    not torch.allclose(out, expected, atol=1e-5) and torch.allclose(out, make(), atol=1e-5):
                fail(name, f"the output matches a known mistake: {mistake}")
        diff = check_tensor(name, out, expected, hint="rotate (x[2i], x[2i+1]) by pos * 10000^(-2i/R), "
                            "for i < R/2")
    passed(name, f"max abs diff {diff:.1e}, partial rotary with offsets, against tlama_mini.bpt.gptj_rotary")


# ------------------------------------------------------------------------------------------------ chunked_ffn
@attributes_stubs
def check_chunked_ffn(fn: Callable[..., torch.Tensor]) -> None:
    """fn(ffn, x (B, T, C), chunk_size) -> ffn(x) (B, T, C), computed chunk_size positions at a
    time, each chunk under torch.utils.checkpoint.checkpoint, so the forward keeps no (.., F) hidden
    activation; equal to ffn(x) in value and gradients."""
    name = "chunked_ffn"
    B, C, F_ = random.randint(1, 3), random.choice([6, 10]), random.choice([24, 28])
    chunk = random.randint(3, 6)
    T = chunk * random.randint(2, 4) + random.randint(1, chunk - 1)  # a shorter last chunk
    ffn = torch.nn.Sequential(torch.nn.Linear(C, F_), torch.nn.GELU(), torch.nn.Linear(F_, C))
    x = torch.randn(B, T, C, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = call(name, fn, ffn, x, chunk, hint="for each chunk x[:, i:i + chunk_size]: checkpoint(ffn, chunk, "
                   "use_reentrant=False); then torch.cat(..., dim=1)")
    expected = ffn(x)
    mistakes = {"the last, shorter chunk is dropped: range(0, T, chunk_size) covers it":
                lambda: expected[:, :T // chunk * chunk]}
    if isinstance(out, torch.Tensor) and out.shape != expected.shape:
        for mistake, make in mistakes.items():
            if out.shape == make().shape:
                fail(name, f"the output matches a known mistake: {mistake}")
        if out.shape == (T, B, C) or out.shape == (B * T, C):
            fail(name, f"wrong shape {tuple(out.shape)}: concatenate the chunks along the sequence, dim=1")
    diff = check_tensor(name, out, expected, hint="chunks of positions (dim 1), concatenated along dim 1")
    if not out.requires_grad:
        fail(name, "the output has no gradient (was a chunk run under torch.no_grad or detached?)",
             "checkpoint keeps the graph: it only recomputes the chunk in the backward")
    hidden = [s for s in saved if len(s) and s[-1] == F_]
    if hidden:
        fail(name, f"the forward kept {len(hidden)} hidden activation(s) of the FFN, e.g. {tuple(hidden[0])}: "
             "the chunks are not checkpointed", "out_chunk = torch.utils.checkpoint.checkpoint(ffn, chunk, "
             "use_reentrant=False)")
    params = [x, *ffn.parameters()]
    dy = torch.randn_like(expected)
    for got, ref in zip(torch.autograd.grad(out, params, dy), torch.autograd.grad(expected, params, dy)):
        check_tensor(name + " (gradient)", got, ref, atol=1e-5)
    passed(name, f"max abs diff {diff:.1e} with T={T}, chunk_size={chunk}; no hidden (.., {F_}) activation kept "
           "by the forward; gradients match")


# ----------------------------------------------------------------------------------------- masked_cross_entropy
def _valid_with_uneven_chunks(N: int, chunk: int) -> torch.Tensor:
    """0/1 mask (N,) whose chunks hold different numbers of valid tokens (at least one each)."""
    while True:
        valid = (torch.rand(N) < 0.6).float()
        counts = [int(c.sum()) for c in valid.split(chunk)]
        if min(counts) > 0 and len(set(c / len(v) for c, v in zip(counts, valid.split(chunk)))) > 1 \
                and 0 < valid.sum() < N:
            return valid


@attributes_stubs
def check_masked_cross_entropy(fn: Callable[..., tuple]) -> None:
    """fn(logits (N, V), tokens (N,), valid (N,) 0/1 float, chunk_size) -> (loss, accuracy): the mean
    cross-entropy and argmax accuracy over the valid tokens, computed chunk_size rows at a time."""
    name = "masked_cross_entropy"
    V, chunk = random.randint(10, 30), random.randint(3, 6)
    N = chunk * random.randint(3, 5) + random.randint(1, chunk - 1)
    logits = (torch.randn(N, V) * 2).requires_grad_()
    tokens = torch.randint(0, V, (N,))
    tokens[::3] = logits.detach()[::3].argmax(-1)     # some right predictions, so accuracy is not ~0
    valid = _valid_with_uneven_chunks(N, chunk)
    masked = int((valid == 0).nonzero()[0])
    tokens[masked] = logits.detach()[masked].argmax()  # a right prediction on a masked token: counting it shows
    out = call(name, fn, logits, tokens, valid, chunk, hint="per chunk: nll = logsumexp(z) - z[token]; "
               "sum nll * valid and (argmax == token) * valid, divide by valid.sum() at the end")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(name, f"returned {type(out).__name__}, expected a tuple (loss, accuracy)", "return loss, accuracy")
    loss, acc = out
    ref_loss, ref_acc = blockwise_cross_entropy(logits, tokens, valid, chunk_size=chunk)
    per = F.cross_entropy(logits.detach(), tokens, reduction="none")
    right = (logits.detach().argmax(-1) == tokens).float()
    means = [(p * v).sum() / v.sum() for p, v in zip(per.split(chunk), valid.split(chunk))]
    loss_mistakes = {
        "the mean of the chunk means (what seed 002's JAX code computes): chunks hold different numbers of "
        "valid tokens, so divide the total by the number of valid tokens": torch.stack(means).mean(),
        "valid is ignored: padded / masked tokens count in the mean": per.mean(),
        "the sum over valid tokens is divided by all N tokens, not by the number of valid ones":
            (per * valid).sum() / N,
        "the sum, not the mean": (per * valid).sum(),
    }
    diff = check_tensor(name + " (loss)", loss, ref_loss.detach(), rtol=1e-5, mistakes=loss_mistakes,
                        hint="(nll * valid).sum() / valid.sum()")
    acc_mistakes = {
        "the accuracy counts masked tokens too: weight (argmax == token) by valid": right.mean(),
        "the accuracy is a count of correct tokens, not a fraction: divide by valid.sum()": (right * valid).sum(),
        "the accuracy is divided by all N tokens, not by the number of valid ones": (right * valid).sum() / N,
    }
    if not isinstance(acc, torch.Tensor):
        acc = torch.tensor(float(acc)) if isinstance(acc, (int, float)) else acc
    check_tensor(name + " (accuracy)", acc, ref_acc, mistakes=acc_mistakes, hint="((argmax == token) * valid)"
                 ".sum() / valid.sum()")
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        fail(name, "the loss has no gradient (was it detached, or built with .item()?)")
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref_loss, logits)
    check_tensor(name + " (gradient)", g, g_ref, atol=1e-6)
    passed(name, f"loss diff {diff:.1e} with N={N}, V={V}, chunk_size={chunk}, {int(valid.sum())} valid tokens "
           "spread unevenly over the chunks; accuracy and gradient match")
