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

Lesson 08 writes this loop plainly, one line per formula (`online_softmax_update` is its step), over
small square tiles. The functions below compute the same numbers (tested equal in tests/test_flash.py)
with fewer, larger operations, since in PyTorch every operation is one pass over its tensors, one
Python dispatch and, with several threads, one parallel region whose threads must all arrive:
- a block of block_q queries meets its keys in strips of up to block_k keys at once (default 128 x
  2048 for 8 heads on a CPU, 8 MiB of scores), not in small square tiles: a causal 8k sequence takes
  160 strips instead of 528 tiles of 256 x 256, and 10x fewer kernels in all (measured in
  benchmarks/RESULTS.md). The online softmax runs across the strips of one query block; a block whose
  visible keys fit in one strip (all of them up to 2k) needs none;
- all heads of a strip in one batched matmul. GQA: the R = H / K query heads that share a kv head are
  laid out as rows of that kv head, row t * R + r = (position t, head r), so a strip is one
  (B * K, bq * R, bk) matmul and the keys are never copied R times;
- every matmul writes a contiguous tensor, one of a few scratch buffers reused by every strip (into a
  strided slice, ATen's CPU matmul falls back to one call per head), then one copy or add into place;
- q is multiplied by the scale once, and by log2(e): exp2 of scores in base 2 gives the same
  probabilities, and torch's exp2 is 1.6x faster than its exp on this CPU; a column of ones appended to
  v makes p @ [v, 1] return l (the row sums) with acc, in the same matmul;
- in the backward, [q, -lse] @ [k, 1]^T = scale q k^T - lse and [dO, -Dsum] @ [v, 1]^T = dP - Dsum (all
  times log2(e) where exp2 follows), so the two subtractions ride along in the matmuls; the rest is in
  place (exp2_, mul_, add_);
- causal: keys in a block's future are never computed; only the square at the diagonal is masked, with
  one precomputed (bq, bq) triangle;
- block sizes from `default_blocks` (measured in benchmarks/RESULTS.md).

Causal masking is bottom-right aligned, as in `attention.attention`: query i sits at absolute
position S - T + i (decoding with a KV cache) and sees keys 0..S-T+i.
Everything is accumulated in float32 (float64 inputs stay float64, for gradcheck).
Legend: B batch, H query heads, K kv heads, R = n_rep = H / K, T queries, S keys, D head_dim,
bq query block rows, bk key strip width, N = B * K, D1 = D + 1.
"""
from __future__ import annotations

import math

import torch

LOG2E, LN2 = 1 / math.log(2), math.log(2)  # exp(x) = exp2(x * LOG2E); torch's exp2 is faster than its exp


def online_softmax_update(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of scores into the running softmax state (lesson 08's step, written plainly).

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


def default_blocks(n_heads: int, T: int, S: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(block_q, block_k) for `n_heads` = B * H heads of T queries and S keys.

    A query block of block_q rows is multiplied with up to block_k keys at once: a strip of
    n_heads * block_q * block_k scores, one batched matmul and a handful of elementwise passes. Each
    operation is one parallel region and one Python dispatch, so wider strips mean fewer of them
    (with 2 threads on a busy machine every region waits for its second thread); each pass over a
    strip that outgrows the caches goes to memory, which bounds the width. On a CPU the strip is
    about 8 MiB of float32 (block_q 128, block_k 2048 for 8 heads), on a GPU 128 MiB (fewer kernel
    launches); measured in benchmarks/RESULTS.md. Sizes are powers of two, block_q between 16 and
    128 (1024 on a GPU), block_k at least block_q, neither longer than the sequence.
    """
    gpu = torch.device(device).type != "cpu"
    budget = (128 if gpu else 8) * 2**20 // 4                  # floats in one strip of scores
    bq = 1024 if gpu else 128
    while bq > 16 and n_heads * bq * bq > budget:
        bq //= 2
    bk = bq
    while n_heads * bq * bk * 2 <= budget and bk < max(S, 1):
        bk *= 2
    return min(bq, max(T, 1)), min(bk, max(S, 1))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention expects q (B, H, T, D) and k, v (B, K, S, D) of equal shape; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[2] == 0:
        raise ValueError("flash_attention needs at least one key (S = 0): every query's softmax would be empty")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"causal attention with fewer keys ({k.shape[2]}) than queries ({q.shape[2]}) leaves the "
                         "first queries with no key to attend to; pass causal=False or all S >= T keys")


def _blocks(q: torch.Tensor, k: torch.Tensor, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    auto_q, auto_k = default_blocks(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.device)
    block_q, block_k = block_q or auto_q, block_k or auto_k
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    return block_q, block_k


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """(B, H, T, *F) -> (N, T * R, *F): the R query heads of each kv head become rows t * R + r."""
    B, H, T, *F = x.shape
    return x.reshape(B, K, H // K, T, *F).transpose(2, 3).reshape(B * K, T * (H // K), *F)


def _unrows(x: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    """Inverse of `_rows`: (N, T * R, *F) -> (B, H, T, *F)."""
    K = x.shape[0] // B
    return x.reshape(B, K, T, H // K, *x.shape[2:]).transpose(2, 3).reshape(B, H, T, *x.shape[2:])


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D + 1) with a last column of ones."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _plan(T: int, S: int, bq: int, bk: int, causal: bool):
    """Yield (i0, i1, chunks) per query block i0..i1: the key chunks (j0, j1) it attends to, at most bk
    wide, ending where its last query's visible keys end (causal: S - T + i1; whole future tiles are
    never computed). The chunk holding the diagonal comes first and reaches down to key S - T + i0, so
    every query sees a key in its first chunk and the running max is finite from the start."""
    offset = S - T                                              # absolute position of query 0
    for i0 in range(0, T, bq):
        i1 = min(i0 + bq, T)
        end = min(S, offset + i1) if causal else S
        chunks, j1 = [], end
        while j1 > 0:
            j0 = max(0, j1 - bk)
            if causal and not chunks:
                j0 = max(0, min(j0, offset + i0))
            chunks.append((j0, j1))
            j1 = j0
        yield i0, i1, chunks


def _mask_future_(s: torch.Tensor, i0: int, i1: int, j0: int, j1: int, offset: int, R: int,
                  future: torch.Tensor) -> None:
    """Set to -inf, in place, the scores of queries i0..i1 for keys j0..j1 that lie in a query's future
    (key > offset + query). s (N, (i1 - i0) * R, j1 - j0). Only a square at the diagonal can hold such
    keys: columns from offset + i0 + 1 on, rows of queries before offset + i < j1 - 1. future (bq, bq) is
    True above the diagonal (key c > query r, both counted from offset + i0 and i0)."""
    c0 = max(j0, offset + i0 + 1)                               # the first key in some query's future
    n = min(i1, j1 - 1 - offset) - i0                           # queries with a future key here
    if c0 < j1 and n > 0:
        rows = s.view(s.shape[0], i1 - i0, R, j1 - j0)[:, :n, :, c0 - j0:]    # (N, n, R, j1 - c0)
        rows.masked_fill_(future[:n, None, c0 - offset - i0: j1 - offset - i0], float("-inf"))


def _future(bq: int, causal: bool, device: torch.device) -> torch.Tensor | None:
    return torch.ones(bq, bq, dtype=torch.bool, device=device).triu(1) if causal else None   # (bq, bq)


def _scratch(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous `shape` view at the start of the flat buffer `buf`. Every strip reuses the same few
    buffers (matmuls write into them with out=), so the allocator sees a few blocks per call instead of
    a new size per strip, which fragmented the heap and raised the resident peak by up to 2.5x."""
    return buf[: math.prod(shape)].view(shape)


@torch.no_grad()
def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
                  block_q: int | None = None, block_k: int | None = None, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward pass (no autograd). q (B, H, T, D), k, v (B, K, S, D) ->
    (out (B, H, T, D) in q's dtype, lse (B, H, T) in float32/float64). Block sizes: `default_blocks`."""
    _check(q, k, v, causal)
    bq, bk = _blocks(q, k, block_q, block_k)
    B, H, T, D = q.shape
    K, S, R = k.shape[1], k.shape[2], H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset, dt = S - T, _acc_dtype(q)
    qs = _rows(q.to(dt) * (scale * LOG2E), K)                # (N, T*R, D) scaled once: s2 = qs @ k^T
    kt = k.to(dt).reshape(B * K, S, D).transpose(1, 2)       # (N, D, S)
    v1 = _with_ones(v.to(dt)).reshape(B * K, S, D + 1)       # (N, S, D1): p @ v1 = [acc, l]
    future, N, width = _future(bq, causal, q.device), B * K, min(S, max(bq, bk))    # width: the widest strip
    acc = torch.empty(N, T * R, D + 1, dtype=dt, device=q.device)     # (N, T*R, D1) [acc, l] per row
    mx = torch.empty(N, T * R, dtype=dt, device=q.device)             # (N, T*R) running max, base 2
    s_buf = q.new_empty(N * bq * R * width, dtype=dt)                 # one strip of scores
    acc_buf = q.new_empty(N * bq * R * (D + 1), dtype=dt)             # one query block's [acc, l]
    for i0, i1, chunks in _plan(T, S, bq, bk, causal):
        rows, n = slice(i0 * R, i1 * R), (i1 - i0) * R
        qi, m = qs[:, rows], mx[:, rows]                     # (N, bq*R, D), (N, bq*R) a view: updated in place
        for c, (j0, j1) in enumerate(chunks):
            s = torch.bmm(qi, kt[:, :, j0:j1], out=_scratch(s_buf, N, n, j1 - j0))   # (N, bq*R, bk) scores*log2e
            if causal:
                _mask_future_(s, i0, i1, j0, j1, offset, R, future)
            if c == 0:                                       # first chunk: no running state yet
                torch.amax(s, dim=-1, out=m)
                acc_l = torch.bmm(s.sub_(m[..., None]).exp2_(), v1[:, j0:j1],
                                  out=_scratch(acc_buf, N, n, D + 1))            # (N, bq*R, D1)
            else:                                            # online softmax: rescale, add this chunk
                m_new = torch.maximum(m, s.amax(dim=-1))
                acc_l.mul_(torch.exp2(m - m_new)[..., None]).baddbmm_(s.sub_(m_new[..., None]).exp2_(),
                                                                       v1[:, j0:j1])
                m.copy_(m_new)
        acc[:, rows] = acc_l
    out = acc[..., :D] / acc[..., D:]                        # (N, T*R, D)
    lse = acc[..., D].log().add_(mx, alpha=LN2)              # (N, T*R) natural log
    return _unrows(out, B, H, T).to(q.dtype), _unrows(lse, B, H, T)


@torch.no_grad()
def flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool = True, *, block_q: int | None = None,
                   block_k: int | None = None, scale: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled backward pass: recompute P strip by strip from lse. Returns dq (B, H, T, D) and
    dk, dv (B, K, S, D), in the dtypes of q, k, v."""
    bq, bk = _blocks(q, k, block_q, block_k)
    B, H, T, D = q.shape
    K, S, R = k.shape[1], k.shape[2], H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset, dt = S - T, _acc_dtype(q)
    dsum = (dout.to(dt) * out.to(dt)).sum(dim=-1, keepdim=True)                     # (B, H, T, 1) rowsum(dO*O)
    q1 = _rows(torch.cat([q.to(dt) * (scale * LOG2E), lse.to(dt)[..., None] * -LOG2E], dim=-1), K)
    # (N, T*R, D1) [q*scale, -lse] * log2(e), so that exp2 of q1 @ k1^T is P
    do1 = _rows(torch.cat([dout.to(dt), -dsum], dim=-1), K)                          # (N, T*R, D1) [dO, -Dsum]
    k1 = _with_ones(k.to(dt)).reshape(B * K, S, D + 1)                               # (N, S, D1)
    v1t = _with_ones(v.to(dt)).reshape(B * K, S, D + 1).transpose(1, 2)             # (N, D1, S)
    k1t = k1.transpose(1, 2)                                                         # (N, D1, S)
    dq = torch.empty(B * K, T * R, D, dtype=dt, device=q.device)                     # (N, T*R, D) / scale
    dk = torch.zeros(B * K, S, D, dtype=dt, device=q.device)                         # (N, S, D)
    dv = torch.zeros_like(dk)                                                        # (N, S, D)
    future, N, width = _future(bq, causal, q.device), B * K, min(S, max(bq, bk))
    p_buf, ds_buf = (q.new_empty(N * bq * R * width, dtype=dt) for _ in range(2))   # one strip each
    part_buf = q.new_empty(N * width * D, dtype=dt)                                  # one strip's dK or dV
    dq_buf = q.new_empty(N * bq * R * D, dtype=dt)                                   # one query block's dQ
    for i0, i1, chunks in _plan(T, S, bq, bk, causal):
        rows, n = slice(i0 * R, i1 * R), (i1 - i0) * R
        qi, doi = q1[:, rows], do1[:, rows]                                          # (N, bq*R, D1)
        for c, (j0, j1) in enumerate(chunks):
            w = j1 - j0
            p = torch.bmm(qi, k1t[:, :, j0:j1], out=_scratch(p_buf, N, n, w))        # (N, bq*R, bk) s - lse
            if causal:
                _mask_future_(p, i0, i1, j0, j1, offset, R, future)
            p.exp2_()                                                                # P, in place
            # matmuls write contiguous tensors (one batched call; into a strided slice ATen would
            # run one matmul per head), then one add into the slice
            dv[:, j0:j1].add_(torch.bmm(p.transpose(1, 2), doi[..., :D], out=_scratch(part_buf, N, w, D)))
            ds = torch.bmm(doi, v1t[:, :, j0:j1], out=_scratch(ds_buf, N, n, w)).mul_(p)   # P*(dP-Dsum)
            if c == 0:                                                               # (N, bq*R, D) dS K
                dqi = torch.bmm(ds, k1[:, j0:j1, :D], out=_scratch(dq_buf, N, n, D))
            else:
                dqi.baddbmm_(ds, k1[:, j0:j1, :D])
            dk[:, j0:j1].add_(torch.bmm(ds.transpose(1, 2), qi[..., :D], out=_scratch(part_buf, N, w, D)))
        dq[:, rows] = dqi                                                            # dS^T q*scale*log2e above
    dq = _unrows(dq.mul_(scale), B, H, T)                                            # (B, H, T, D)
    dk = dk.mul_(LN2).reshape(B, K, S, D)                                            # (B, K, S, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.reshape(B, K, S, D).to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """autograd wrapper: saves q, k, v, out and lse (never the (T, S) matrix)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, block_q: int | None,
                block_k: int | None, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
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
                    block_size: int | None = None, block_q: int | None = None, block_k: int | None = None,
                    scale: float | None = None, return_lse: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention computed tile by tile, with gradients.

    q (B, H, T, D); k, v (B, K, S, D), H a multiple of K. causal: bottom-right aligned (query i
    sees keys 0..S-T+i). block_q / block_k default to block_size, and block_size (None) to
    `default_blocks` for the device and lengths. scale defaults to 1/sqrt(D).
    Returns out (B, H, T, D), or (out, lse (B, H, T)) with return_lse=True.
    """
    block_q, block_k = block_q or block_size, block_k or block_size
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"block sizes must be positive integers or None, got {name}={value!r}")
    out, lse = FlashAttention.apply(q, k, v, causal, block_q, block_k, scale)
    return (out, lse) if return_lse else out
