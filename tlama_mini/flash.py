"""Flash-style tiled attention in plain PyTorch: the same numbers as `naive_attention`, without ever
holding the (T, S) score matrix (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023).

Forward: walk over tiles of queries; for each, walk over tiles of keys and keep three running
quantities per query row (Milakov & Gimelshein 2018, "online softmax"):
    m    the largest score seen so far,
    l    the sum of exp(score - m) so far,
    acc  the sum of exp(score - m) * v so far.
When a new tile raises the max from m to m', the old sums are rescaled by exp(m - m'), so at the end
out = acc / l is the exact softmax average. Only out and the log-sum-exp lse = m + log(l) are kept.

Backward (FlashAttention-2, Algorithm 2): recompute each tile's probabilities from the saved lse,
P = exp(scale * q k^T - lse), and accumulate
    dV += P^T dO,   dP = dO V^T,   Dsum = rowsum(dO * O),   dS = P * (dP - Dsum),
    dQ += scale * dS K,   dK += scale * dS^T Q.
Memory is O(T + S) per head plus one tile, instead of O(T * S).

Causal masking is bottom-right aligned, as in `attention.attention`: query i sits at absolute
position S - T + i (decoding with a KV cache) and sees keys 0..S-T+i. Key tiles that lie entirely
in a query tile's future are skipped, which halves the work for T == S.
GQA: query head h uses kv head h // n_rep. Queries are viewed as (B, K, n_rep, T, D) and keys as
(B, K, 1, S, D), so matmuls broadcast over the group instead of copying the keys n_rep times.
Everything is accumulated in float32 (float64 inputs stay float64, for gradcheck).
Legend: B batch, H query heads, K kv heads, R = n_rep = H / K, T queries, S keys, D head_dim,
bq / bk query / key tile sizes.
"""
from __future__ import annotations

import math

import torch


def online_softmax_update(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of scores into the running softmax state.

    m, l (..., bq); acc (..., bq, D); scores (..., bq, bk), already scaled, -inf where masked;
    v (..., bk, D). Returns the new (m, l, acc). A row whose scores are all -inf so far keeps
    m = -inf, l = 0, acc = 0 (no NaN).
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))                # (..., bq)
    # rows with no visible key yet: subtract 0 instead of -inf so exp(-inf - 0) = 0, not NaN
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)                                # (..., bq) rescales the old sums
    p = torch.exp(scores - m_safe[..., None])                    # (..., bq, bk)
    l_new = alpha * l + p.sum(dim=-1)                            # (..., bq)
    acc_new = alpha[..., None] * acc + p @ v.to(p.dtype)         # (..., bq, D)
    return m_new, l_new, acc_new


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tile_mask(i0: int, i1: int, j0: int, j1: int, offset: int, device: torch.device) -> torch.Tensor:
    """Causal mask of one tile, True = may attend: query i (absolute position offset + i) sees key j
    when j <= offset + i. (bq, bk)."""
    qpos = torch.arange(i0, i1, device=device)[:, None] + offset  # (bq, 1)
    kpos = torch.arange(j0, j1, device=device)[None, :]           # (1, bk)
    return kpos <= qpos                                           # (bq, bk)


def _key_end(i1: int, S: int, offset: int, causal: bool) -> int:
    """One past the last key any query in rows [.., i1) may see: tiles from here on are skipped."""
    return min(S, offset + i1) if causal else S


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention expects q (B, H, T, D) and k, v (B, K, S, D) of equal shape; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"causal attention with fewer keys ({k.shape[2]}) than queries ({q.shape[2]}) leaves the "
                         "first queries with no key to attend to; pass causal=False or all S >= T keys")


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
                  block_q: int = 64, block_k: int = 64, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward pass (no autograd). q (B, H, T, D), k, v (B, K, S, D) ->
    (out (B, H, T, D) in q's dtype, lse (B, H, T) in float32/float64)."""
    _check(q, k, v, causal)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset = S - T  # absolute position of query 0
    dt = _acc_dtype(q)
    qg = q.reshape(B, K, H // K, T, D)             # (B, K, R, T, D): group the query heads by kv head
    kg, vg = k[:, :, None], v[:, :, None]          # (B, K, 1, S, D)
    out = torch.empty(B, K, H // K, T, D, dtype=q.dtype, device=q.device)  # (B, K, R, T, D)
    lse = torch.empty(B, K, H // K, T, dtype=dt, device=q.device)           # (B, K, R, T)
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        qi = qg[..., i0:i1, :].to(dt)                                    # (B, K, R, bq, D)
        m = torch.full(qi.shape[:-1], float("-inf"), dtype=dt, device=q.device)  # (B, K, R, bq)
        l = torch.zeros_like(m)                                          # (B, K, R, bq)
        acc = torch.zeros_like(qi)                                       # (B, K, R, bq, D)
        for j0 in range(0, _key_end(i1, S, offset, causal), block_k):
            j1 = min(j0 + block_k, S)
            s = (qi @ kg[..., j0:j1, :].to(dt).transpose(-2, -1)) * scale  # (B, K, R, bq, bk)
            if causal and j1 - 1 > offset + i0:  # the tile crosses the diagonal: mask its future part
                s = s.masked_fill(~_tile_mask(i0, i1, j0, j1, offset, q.device), float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, s, vg[..., j0:j1, :])
        out[..., i0:i1, :] = (acc / l[..., None]).to(q.dtype)            # (B, K, R, bq, D)
        lse[..., i0:i1] = m + torch.log(l)                               # (B, K, R, bq)
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)


def flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool = True, *, block_q: int = 64, block_k: int = 64,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled backward pass: recompute P tile by tile from lse. Returns dq (B, H, T, D) and
    dk, dv (B, K, S, D), in the dtypes of q, k, v."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    R = H // K
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset = S - T
    dt = _acc_dtype(q)
    qg, dog = q.reshape(B, K, R, T, D).to(dt), dout.reshape(B, K, R, T, D).to(dt)  # (B, K, R, T, D)
    lse_g = lse.reshape(B, K, R, T).to(dt)                                         # (B, K, R, T)
    Dsum = (dog * out.reshape(B, K, R, T, D).to(dt)).sum(dim=-1)                   # (B, K, R, T) rowsum(dO * O)
    dq = torch.zeros_like(qg)                                                      # (B, K, R, T, D)
    dk = torch.zeros(B, K, S, D, dtype=dt, device=q.device)                        # (B, K, S, D)
    dv = torch.zeros_like(dk)                                                      # (B, K, S, D)
    # FlashAttention-2 order: the outer loop over key tiles owns dK_j and dV_j
    for j0 in range(0, S, block_k):
        j1 = min(j0 + block_k, S)
        kj = k[:, :, None, j0:j1].to(dt)                                           # (B, K, 1, bk, D)
        vj = v[:, :, None, j0:j1].to(dt)                                           # (B, K, 1, bk, D)
        # first query that sees key j0: offset + i >= j0
        first = max(0, j0 - offset) // block_q * block_q if causal else 0
        for i0 in range(first, T, block_q):
            i1 = min(i0 + block_q, T)
            s = (qg[..., i0:i1, :] @ kj.transpose(-2, -1)) * scale                 # (B, K, R, bq, bk)
            if causal and j1 - 1 > offset + i0:
                s = s.masked_fill(~_tile_mask(i0, i1, j0, j1, offset, q.device), float("-inf"))
            p = torch.exp(s - lse_g[..., i0:i1, None])                             # (B, K, R, bq, bk)
            do_i = dog[..., i0:i1, :]                                              # (B, K, R, bq, D)
            dv[:, :, j0:j1] += (p.transpose(-2, -1) @ do_i).sum(dim=2)             # (B, K, bk, D), summed over R
            dp = do_i @ vj.transpose(-2, -1)                                       # (B, K, R, bq, bk)
            ds = p * (dp - Dsum[..., i0:i1, None])                                 # (B, K, R, bq, bk)
            dq[..., i0:i1, :] += (ds @ kj) * scale                                 # (B, K, R, bq, D)
            dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ qg[..., i0:i1, :]).sum(dim=2) * scale  # (B, K, bk, D)
    return dq.reshape(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """autograd wrapper: saves q, k, v, out and lse (never the (T, S) matrix)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, block_q: int,
                block_k: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = flash_forward(q, k, v, causal, block_q=block_q, block_k=block_k, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (causal, block_q, block_k, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        causal, block_q, block_k, scale = ctx.config
        dq, dk, dv = flash_backward(dout, q, k, v, out, lse, causal, block_q=block_q, block_k=block_k,
                                    scale=scale)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
                    block_size: int = 64, block_q: int | None = None, block_k: int | None = None,
                    scale: float | None = None, return_lse: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention computed tile by tile, with gradients.

    q (B, H, T, D); k, v (B, K, S, D), H a multiple of K. causal: bottom-right aligned (query i
    sees keys 0..S-T+i). block_q / block_k default to block_size. scale defaults to 1/sqrt(D).
    Returns out (B, H, T, D), or (out, lse (B, H, T)) with return_lse=True.
    """
    block_q, block_k = block_q or block_size, block_k or block_size
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    out, lse = FlashAttention.apply(q, k, v, causal, block_q, block_k, scale)
    return (out, lse) if return_lse else out
