"""Seed 002's `blockwise_compute_attn`: exact softmax attention over (query chunk, key chunk)
tiles with the online softmax (Liu & Abbeel 2023, "Blockwise Parallel Transformer"; Rabe & Staats
2021; the same recurrence as `flash.py`), so the (T, S) score matrix never exists.

For each query chunk, walk over the key chunks and keep per query row the running max m, the
running sum l of exp(score - m) and acc = sum exp(score - m) * v; a new max rescales both by
exp(m_old - m_new); out = acc / l. Dropout (attn_pdrop) drops the normalised weights, so the
dropped tile enters acc but not l: out = sum_j keep_j / (1 - p) * exp(s_j - m) v_j / l.

Two paths, tested equal:
- general: any additive `bias` broadcastable to (B, H, T, S), dropout; each query chunk and each
  tile inside it runs under activation checkpointing (`remat.remat(policy)`), like the seed's
  `jax.checkpoint`-ed scans. Dropout masks come from one seed per tile, so a recomputation draws
  the same mask.
- fast: no bias and no dropout (plain causal or full attention) goes to `flash.flash_attention`,
  whose hand-written backward recomputes tiles from the saved log-sum-exp.
Masked keys get additive biases, not -inf (the seed's -1e9 for padding, -1e10 for the future), so
a query whose keys are all padding attends uniformly instead of returning NaN. Causal masking is
bottom-right aligned (query i sits at position S - T + i: decoding after a KV cache); key tiles
wholly in a query chunk's future are skipped (they would add exp(-1e10 - m) = 0 exactly).
`precision` (JAX's per-matmul lax.Precision): PyTorch sets float32 matmul precision globally
(`torch.set_float32_matmul_precision`), so the argument is validated and documented, and the
global setting is left alone.
Legend: B batch, T queries, S keys, H heads, D head_dim, n / m query / key chunk length.
"""
from __future__ import annotations

import torch

from .flash import flash_attention
from .remat import check_policy, remat

CAUSAL_BIAS = -1e10  # added to the scores of future keys (the seed's value)
PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def _fold(m, l, acc, s, v, keep):
    """One tile into the running state: m, l (B, H, n); acc (B, H, n, D); s (B, H, n, m) scores
    with biases added; v (B, H, m, D); keep None or the dropout multipliers (B, H, n, m)."""
    m_new = torch.maximum(m, s.amax(dim=-1))                  # (B, H, n); finite: biases are finite
    alpha = torch.exp(m - m_new)                              # (B, H, n); exp(-inf) = 0 on the first tile
    p = torch.exp(s - m_new[..., None])                       # (B, H, n, m)
    l_new = alpha * l + p.sum(dim=-1)                         # (B, H, n): undropped normaliser
    pv = p * keep if keep is not None else p                  # dropout after the softmax
    return m_new, l_new, alpha[..., None] * acc + pv @ v.to(p.dtype)  # acc (B, H, n, D)


def _tile(m, l, acc, q, k, v, bias, i0: int, j0: int, offset: int, causal: bool, pdrop: float, seed: int):
    """Scores of one (query chunk, key chunk) tile, folded into (m, l, acc)."""
    s = q @ k.transpose(-2, -1).to(q.dtype)                   # (B, H, n, m)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if causal and j0 + k.shape[2] - 1 > offset + i0:          # the tile crosses the diagonal
        qpos = torch.arange(i0, i0 + q.shape[2], device=q.device)[:, None] + offset  # (n, 1)
        kpos = torch.arange(j0, j0 + k.shape[2], device=q.device)[None, :]           # (1, m)
        s = s + torch.where(kpos > qpos, CAUSAL_BIAS, 0.0).to(s.dtype)
    keep = None
    if pdrop > 0:
        g = torch.Generator(device=q.device).manual_seed(seed)
        keep = (torch.rand(s.shape, generator=g, device=q.device) >= pdrop).to(s.dtype) / (1 - pdrop)
    return _fold(m, l, acc, s, v, keep)


def _query_chunk(q, k, v, bias, i0: int, offset: int, causal: bool, k_chunk: int, pdrop: float, seed: int,
                 policy: str, out_dtype: torch.dtype):
    """Attention of one query chunk q (B, H, n, D) over all keys, tile by tile -> (B, H, n, D)."""
    S = k.shape[2]
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)  # (B, H, n)
    l = torch.zeros_like(m)                                                       # (B, H, n)
    acc = torch.zeros(q.shape, dtype=q.dtype, device=q.device)                    # (B, H, n, D)
    tile = remat(_tile, policy)
    end = min(S, offset + i0 + q.shape[2]) if causal else S   # keys past `end` are in every row's future
    for j0 in range(0, end, k_chunk):
        j1 = min(j0 + k_chunk, S)
        b = None if bias is None else bias[..., j0:j1] if bias.shape[-1] > 1 else bias
        m, l, acc = tile(m, l, acc, q, k[:, :, j0:j1], v[:, :, j0:j1], b, i0, j0, offset, causal, pdrop,
                         seed + j0)
    return (acc / l[..., None]).to(out_dtype)                 # (B, H, n, D)


def _check_args(query, key, value, bias, attn_pdrop, query_chunk_size, key_chunk_size, precision) -> None:
    if query.ndim != 4 or key.ndim != 4 or value.shape != key.shape or query.shape[0] != key.shape[0] \
            or query.shape[2:] != key.shape[2:]:
        raise ValueError(f"blockwise_compute_attn expects query (B, T, H, D) and key, value (B, S, H, D); got "
                         f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    B, T, H, _ = query.shape
    S = key.shape[1]
    if bias is not None and (bias.ndim > 4 or any(b not in (1, n) for b, n in
                                                  zip(bias.shape[::-1], (S, T, H, B)))):
        raise ValueError(f"bias {tuple(bias.shape)} must broadcast to (B, H, T, S) = {(B, H, T, S)}")
    for name, c in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size)):
        if not isinstance(c, int) or isinstance(c, bool) or c <= 0:
            raise ValueError(f"{name} ({c!r}) must be a positive integer")
    if not 0.0 <= attn_pdrop < 1.0:
        raise ValueError(f"attn_pdrop ({attn_pdrop}) must be in [0, 1)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision ({precision!r}) must be one of {PRECISIONS}")


def blockwise_compute_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           bias: torch.Tensor | None = None, deterministic: bool = False,
                           dropout_rng: torch.Generator | None = None, attn_pdrop: float = 0.0,
                           causal_mask: bool = True, query_chunk_size: int = 128, key_chunk_size: int = 128,
                           dtype: torch.dtype = torch.float32, policy: str = "nothing_saveable",
                           precision: str | None = None, prevent_cse: bool = False) -> torch.Tensor:
    """softmax(query key^T + bias [+ causal]) value, tile by tile. query (B, T, H, D); key, value
    (B, S, H, D); bias broadcastable to (B, H, T, S). The query is NOT scaled here (scale it first,
    as the seed's block does). Scores are computed in query's dtype when it is float32/float64
    (`float32_logits`), otherwise in `dtype`; the output is (B, T, H, D) in `dtype`.
    dropout_rng: a torch.Generator for the attention dropout (None: torch's global RNG)."""
    _check_args(query, key, value, bias, attn_pdrop, query_chunk_size, key_chunk_size, precision)
    policy = check_policy(policy, prevent_cse)
    pdrop = 0.0 if deterministic else float(attn_pdrop)
    B, T, H, D = query.shape
    S = key.shape[1]
    if causal_mask and S < T:
        raise ValueError(f"causal attention needs at least as many keys ({S}) as queries ({T})")
    score_dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else dtype
    q = query.to(score_dtype).transpose(1, 2)                        # (B, H, T, D)
    k, v = key.to(score_dtype).transpose(1, 2), value.to(dtype).transpose(1, 2)  # (B, H, S, D)
    if bias is None and pdrop == 0.0:                                # fast path: flash.py's kernel
        out = flash_attention(q, k, v.to(score_dtype), causal_mask, block_q=query_chunk_size,
                              block_k=key_chunk_size, scale=1.0)     # (B, H, T, D)
        return out.transpose(1, 2).to(dtype)                         # (B, T, H, D)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))  # (B|1, H|1, T|1, S|1)
    seed = 0 if pdrop == 0.0 else int(torch.randint(0, 2**40, (), generator=dropout_rng))
    chunk = remat(_query_chunk, policy)
    outs = []
    for i0 in range(0, T, query_chunk_size):
        i1 = min(i0 + query_chunk_size, T)
        b = None if bias is None else bias[:, :, i0:i1] if bias.shape[2] > 1 else bias
        outs.append(chunk(q[:, :, i0:i1], k, v, b, i0, S - T, causal_mask, key_chunk_size, pdrop,
                          seed + i0 * (S + 1), policy, dtype))       # (B, H, n, D)
    return torch.cat(outs, dim=2).transpose(1, 2)                    # (B, T, H, D)
