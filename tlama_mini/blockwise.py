"""Blockwise computation of the memory-hungry parts of training (Blockwise Parallel Transformer,
Liu & Abbeel 2023): run the FFN, the LM head and the cross-entropy over chunks of tokens, so the big
per-token intermediates of only one chunk exist at a time.

- FFN: the hidden activations are (tokens, F), F ~ 2.7-4 x C. Each chunk runs under activation
  checkpointing (Chen et al. 2016), so the forward keeps only the chunk's input and the backward
  recomputes one chunk's hidden activations at a time.
- LM head + loss: the logits are (tokens, V), and V (32k-128k) dwarfs C. `blockwise_lm_head_loss`
  computes one chunk's logits, its log-sum-exp and its loss, keeps only the lse (one number per
  token), and in the backward recomputes that chunk's logits to form dlogits = softmax - onehot
  (the "fused linear cross-entropy" idea). The full (tokens, V) matrix never exists.
The results equal the unchunked computation (tested), only the peak memory changes.
Legend: B batch, T sequence, N = B * T tokens, n tokens in one chunk, C d_model, V vocab_size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .moe import MoE, load_balancing_loss, route


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size ({chunk_size!r}) must be a positive integer")


def blockwise_ffn(ffn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Apply a per-token `ffn` (module or function, (n, C) -> (n, C)) to x (..., C) in chunks of
    `chunk_size` tokens, each under activation checkpointing when gradients are needed.

    For an `MoE` the routing is per token, so the outputs are exact; its `aux_loss` (a statistic of
    the whole batch) is recomputed from the router on all tokens, so it equals the unchunked one.
    """
    _check_chunk(chunk_size)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # (N, C)
    is_moe = isinstance(ffn, MoE)

    def run(chunk: torch.Tensor) -> torch.Tensor:
        if not is_moe:
            return ffn(chunk)  # (n, C)
        kept = ffn.aux_loss
        try:
            return ffn(chunk)  # (n, C)
        finally:  # a chunk's aux loss (also in the backward's recompute, which may stop early) is not the batch's
            ffn.aux_loss = kept

    # `ffn` may close over parameters we cannot see, so checkpoint whenever autograd is recording
    grad = torch.is_grad_enabled()
    outs = [checkpoint(run, c, use_reentrant=False) if grad else run(c)
            for c in xf.split(chunk_size, dim=0)]  # each (n, C)
    if is_moe:
        _, experts, probs = route(ffn.gate(xf), ffn.k, ffn.norm_topk_prob)  # (N, k), (N, E)
        ffn.aux_loss = load_balancing_loss(probs, experts)
    return torch.cat(outs, dim=0).reshape(shape)  # (..., C)


def blockwise_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                            ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the targets != ignore_index, computed `chunk_size` tokens at a time
    (in float32, each chunk checkpointed so its softmax is not kept). logits (..., V), targets (...).
    Equals F.cross_entropy(logits.float().view(-1, V), targets.view(-1), ignore_index=...)."""
    _check_chunk(chunk_size)
    V = logits.shape[-1]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must agree "
                         "in every dimension but the last")
    lf, tf = logits.reshape(-1, V), targets.reshape(-1)  # (N, V), (N,)

    def chunk_sum(lc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lc.float(), tc, ignore_index=ignore_index, reduction="sum")

    total = lf.new_zeros((), dtype=torch.float32)
    for lc, tc in zip(lf.split(chunk_size), tf.split(chunk_size)):
        total = total + (checkpoint(chunk_sum, lc, tc, use_reentrant=False)
                         if torch.is_grad_enabled() and lc.requires_grad else chunk_sum(lc, tc))
    return total / (tf != ignore_index).sum()  # 0 / 0 = nan when every target is ignored, like F.cross_entropy


class _LMHeadLoss(torch.autograd.Function):
    """Sum of the cross-entropy of h @ weight^T, chunk by chunk; saves h, weight, targets and the
    per-token lse (N,), never the logits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index                             # (N,)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_size):
            e = min(s + chunk_size, h.shape[0])
            logits = (h[s:e] @ weight.T).float()                    # (n, V): one chunk only
            lse[s:e] = torch.logsumexp(logits, dim=-1)              # (n,)
            picked = logits.gather(1, safe[s:e, None]).squeeze(1)   # (n,) logit of the target
            total += ((lse[s:e] - picked) * valid[s:e]).sum()       # -log softmax[target]
        ctx.save_for_backward(h, weight, safe, valid, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        h, weight, safe, valid, lse = ctx.saved_tensors
        dh = torch.empty_like(h)                                    # (N, C)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, C)
        for s in range(0, h.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, h.shape[0])
            logits = (h[s:e] @ weight.T).float()                    # (n, V) recomputed
            dlogits = torch.exp(logits - lse[s:e, None])            # softmax, (n, V)
            dlogits[torch.arange(e - s, device=h.device), safe[s:e]] -= 1.0  # softmax - onehot
            dlogits *= (valid[s:e] * grad_total)[:, None]           # ignored tokens get no gradient
            dlogits = dlogits.to(h.dtype)
            dh[s:e] = dlogits @ weight                              # (n, C)
            if ctx.needs_input_grad[1]:  # skipped for a frozen LM head
                dw += (dlogits.T @ h[s:e]).float()                  # (V, C)
        return dh, (dw.to(weight.dtype) if ctx.needs_input_grad[1] else None), None, None, None


def blockwise_lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                           ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss of the LM head without the full logits: h (B, T, C) final hidden states,
    weight (V, C), targets (B, T). Equals F.cross_entropy((h @ weight.T).float().view(-1, V),
    targets.view(-1), ignore_index=ignore_index), in value and gradients."""
    _check_chunk(chunk_size)
    if h.shape[:-1] != targets.shape or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"h {tuple(h.shape)}, weight {tuple(weight.shape)} and targets {tuple(targets.shape)} "
                         "do not fit: expected h (..., C), weight (V, C), targets (...)")
    hf, tf = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
    counted = tf[tf != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}) (vocab_size) or ignore_index "
                         f"({ignore_index}); got ids from {int(counted.min())} to {int(counted.max())}")
    total = _LMHeadLoss.apply(hf, weight, tf, chunk_size, ignore_index)
    return total / (tf != ignore_index).sum()  # mean over counted tokens (nan if none, like F.cross_entropy)
