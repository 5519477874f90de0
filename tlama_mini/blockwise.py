"""Blockwise computation of the memory-hungry parts of training (Blockwise Parallel Transformer,
Liu & Abbeel 2023; seed 002's API): run the FFN, the LM head and the cross-entropy over chunks of
tokens, so the big per-token intermediates of only one chunk exist at a time.

- FFN: the hidden activations are (tokens, F), F ~ 2.7-4 x C. Each chunk runs under activation
  checkpointing (Chen et al. 2016), so the forward keeps only the chunk's input and the backward
  recomputes one chunk's hidden activations at a time (`blockwise_ffn`, `blockwise_compute_ffn`).
- LM head + loss: the logits are (tokens, V), and V (32k-128k) dwarfs C. `blockwise_lm_head_loss`
  computes one chunk's logits, its log-sum-exp and its loss, keeps only the lse (one number per
  token), and in the backward recomputes that chunk's logits to form dlogits = softmax - onehot
  (the "fused linear cross-entropy" idea); `Blockwise_LM_Head.loss` does the same with autograd and
  checkpointing. The full (tokens, V) matrix never exists.
- Attention over (query chunk, key chunk) tiles: `blockwise_compute_attn` (blockwise_attn.py).
- The seed's block, `BlockwiseParallel`, and a small GPT built from it, `BlockwiseLM` (bpt.py).
`policy` / `prevent_cse` are JAX's activation-checkpointing knobs, mapped to PyTorch in remat.py.
The results equal the unchunked computation (tested), only the peak memory changes.
Legend: B batch, T sequence, N = B * T tokens, n tokens in one chunk, C d_model, V vocab_size.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blockwise_attn import blockwise_compute_attn
from .moe import MoE, load_balancing_loss
from .remat import check_policy, remat

__all__ = ["BlockwiseLM", "BlockwiseParallel", "Blockwise_LM_Head", "blockwise_compute_attn",
           "blockwise_compute_ffn", "blockwise_cross_entropy", "blockwise_ffn", "blockwise_lm_head_loss"]


def __getattr__(name: str):
    # the block lives in bpt.py, which imports this module: import it on first use, not at import time
    if name in ("BlockwiseParallel", "BlockwiseLM"):
        from . import bpt
        return getattr(bpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size ({chunk_size!r}) must be a positive integer")


def blockwise_ffn(ffn: Callable[[torch.Tensor], torch.Tensor] | MoE, x: torch.Tensor,
                  chunk_size: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Apply a per-token `ffn` (module or function, (n, C) -> (n, C)) to x (..., C) in chunks of
    `chunk_size` tokens, each under activation checkpointing when gradients are needed. Returns what
    ffn(x) returns, with the same values: y (..., C), or (y, aux_loss) for an `MoE`.

    For an `MoE` the routing is per token, so the outputs are exact; the aux loss is a statistic of
    the whole batch (not a sum over chunks), so it is computed from the router on all tokens.
    """
    _check_chunk(chunk_size)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # (N, C)
    is_moe = isinstance(ffn, MoE)

    def run(chunk: torch.Tensor) -> torch.Tensor:
        return ffn(chunk)[0] if is_moe else ffn(chunk)  # (n, C); a chunk's aux loss is not the batch's

    # `ffn` may close over parameters we cannot see, so checkpoint whenever autograd is recording
    grad = torch.is_grad_enabled()
    outs = [checkpoint(run, c, use_reentrant=False) if grad else run(c)
            for c in xf.split(chunk_size, dim=0)]  # each (n, C)
    y = torch.cat(outs, dim=0).reshape(shape)  # (..., C)
    if is_moe:
        _, experts, probs = ffn.route(xf)  # (N, k), (N, E)
        return y, load_balancing_loss(probs, experts)
    return y


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


def blockwise_compute_ffn(cell: Callable, inputs: torch.Tensor, chunk_size: int, deterministic: bool = True,
                          policy: str = "nothing_saveable", prevent_cse: bool = True) -> torch.Tensor:
    """Seed 002's chunked FFN: `cell` applied to inputs (B, T, C) chunk_size positions at a time,
    each chunk under activation checkpointing by `policy`. `cell(x, deterministic)` as the seed's
    Flax cells, or `cell(x)` for a one-argument callable (an nn.Linear / nn.Sequential). Any T works:
    the last chunk may be shorter (the seed needs T to be a multiple of chunk_size)."""
    _check_chunk(chunk_size)
    if inputs.ndim != 3:
        raise ValueError(f"inputs must be (batch, seq_len, features), got shape {tuple(inputs.shape)}")
    try:
        params = inspect.signature(cell.forward if isinstance(cell, nn.Module) else cell).parameters
        two_args = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params.values())
    except (TypeError, ValueError):  # builtins without a signature take one argument
        two_args = False
    fn = remat((lambda x: cell(x, deterministic)) if two_args else cell, policy, prevent_cse)
    return torch.cat([fn(c) for c in inputs.split(chunk_size, dim=1)], dim=1)  # (B, T, C_out)


def _ce_chunk(logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(sum of -log p(token), number of correct argmax predictions) over the valid rows of one
    chunk: logits (n, V), tokens (n,), valid (n,) float. Returns a (2,) float32 tensor."""
    lf = logits.float()                                               # (n, V)
    nll = torch.logsumexp(lf, dim=-1) - lf.gather(1, tokens[:, None]).squeeze(1)  # (n,)
    correct = (lf.argmax(dim=-1) == tokens).float()                   # (n,)
    return torch.stack([(nll * valid).sum(), (correct * valid).sum()])  # (2,)


def _flatten_targets(shape: torch.Size, tokens: torch.Tensor, valid: torch.Tensor | None,
                     vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check tokens (...) / valid (...) against the leading dims `shape`; return flat tokens (N,)
    with invalid positions set to 0 (they may hold any id, e.g. -100) and valid (N,) float32."""
    if tokens.shape != shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match the leading dimensions {tuple(shape)} "
                         "of the logits / hidden states")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if valid is not None and valid.shape != shape:
        raise ValueError(f"valid {tuple(valid.shape)} must have the tokens' shape {tuple(shape)}")
    vf = (torch.ones(shape, device=tokens.device) if valid is None else valid).reshape(-1).float()  # (N,)
    tf = tokens.reshape(-1).long()                                     # (N,)
    counted = tf[vf > 0]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab_size):
        raise ValueError(f"valid tokens must be in [0, {vocab_size}) (vocab_size); got ids from "
                         f"{int(counted.min())} to {int(counted.max())}")
    return torch.where(vf > 0, tf, torch.zeros_like(tf)), vf


def _mean_over_valid(sums: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the seed's floor: nothing valid gives loss 0 and accuracy 0 (and zero gradients), not 0 / 0
    n = valid.sum().clamp_min(1e-10)
    return sums[0] / n, sums[1].detach() / n


def blockwise_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None,
                            chunk_size: int | None = None, policy: str | None = None,
                            prevent_cse: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy): the mean cross-entropy and argmax accuracy over the valid tokens, computed
    chunk_size tokens at a time (in float32, each chunk checkpointed by `policy`, default
    "nothing_saveable", so no chunk's softmax is kept). logits (..., V), tokens (...), valid (...)
    0/1 or bool (None: all valid). loss equals F.cross_entropy over the valid tokens.
    Unlike the seed, which averages per-chunk means (not the token mean when chunks hold different
    numbers of valid tokens), this divides the total by the number of valid tokens."""
    if chunk_size is not None:
        _check_chunk(chunk_size)
    policy = check_policy(policy, prevent_cse)
    V = logits.shape[-1]
    tf, vf = _flatten_targets(logits.shape[:-1], tokens, valid, V)  # (N,), (N,)
    lf = logits.reshape(-1, V)                                       # (N, V)
    n = chunk_size or max(lf.shape[0], 1)
    fn = remat(_ce_chunk, policy) if lf.requires_grad else _ce_chunk
    sums = sum(fn(lc, tc, vc) for lc, tc, vc in zip(lf.split(n), tf.split(n), vf.split(n)))  # (2,)
    return _mean_over_valid(sums, vf)


class Blockwise_LM_Head(nn.Module):  # noqa: N801 (the seed's name)
    """Seed 002's LM head: a linear layer with bias, hidden (..., C) -> logits (..., V), applied
    chunk_size tokens at a time under activation checkpointing. `loss` gives (loss, accuracy)
    without ever holding the (tokens, V) logits. Parameters are kept in float32 and used in `dtype`.
    hidden_size: C; None infers it on the first call (nn.LazyLinear), as the seed's Flax Dense does."""

    def __init__(self, vocab_size: int, chunk_size: int, policy: str = "nothing_saveable",
                 dtype: torch.dtype = torch.float32, prevent_cse: bool = True, *,
                 hidden_size: int | None = None) -> None:
        super().__init__()
        _check_chunk(chunk_size)
        self.vocab_size, self.chunk_size, self.dtype = vocab_size, chunk_size, dtype
        self.policy, self.prevent_cse = check_policy(policy, prevent_cse), prevent_cse
        self.linear = nn.LazyLinear(vocab_size) if hidden_size is None else nn.Linear(hidden_size, vocab_size)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.linear.weight.to(self.dtype), self.linear.bias.to(self.dtype))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (B, T, C) -> logits (B, T, V) in `dtype`."""
        if isinstance(self.linear, nn.LazyLinear) and self.linear.has_uninitialized_params():
            self.linear(inputs[..., :1, :])                            # materialise (V, C) once
        fn = remat(self._logits, self.policy, self.prevent_cse)
        return torch.cat([fn(c) for c in inputs.split(self.chunk_size, dim=-2)], dim=-2)  # (B, T, V)

    def loss(self, inputs: torch.Tensor, tokens: torch.Tensor,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of the logits of inputs (..., C) against tokens (...), chunk by chunk:
        each chunk's logits exist only inside its checkpoint, so the peak holds one chunk's."""
        if isinstance(self.linear, nn.LazyLinear) and self.linear.has_uninitialized_params():
            self.linear(inputs.reshape(-1, inputs.shape[-1])[:1])
        tf, vf = _flatten_targets(inputs.shape[:-1], tokens, valid, self.vocab_size)  # (N,), (N,)
        hf = inputs.reshape(-1, inputs.shape[-1])                                     # (N, C)
        fn = remat(lambda h, t, v: _ce_chunk(self._logits(h), t, v), self.policy, self.prevent_cse)
        n = self.chunk_size
        sums = sum(fn(hc, tc, vc) for hc, tc, vc in zip(hf.split(n), tf.split(n), vf.split(n)))  # (2,)
        return _mean_over_valid(sums, vf)
