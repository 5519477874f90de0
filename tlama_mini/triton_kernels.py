"""The Triton kernels of `triton_flash.py` (imported only when triton is installed; the interpreter is
chosen when this module is imported, see `triton_flash.load_kernels`).

One program of `flash_fwd` owns BLOCK_M query rows of one (batch, head): it walks over the key blocks
that those rows may see, keeping the online-softmax state (m, l, acc) in registers, and writes the
output and the log-sum-exp once. Scores use base 2: s2 = q.k * scale * log2(e), so exp2(s2 - m2) is
exp(q.k * scale - m) and lse2 = m2 + log2(l) (the kernels only ever use lse in that form).

Backward (FlashAttention-2): `flash_bwd_dkdv` owns BLOCK_N keys of one kv head and loops over every
query head of its group and the query blocks that see those keys, so GQA needs no atomics;
`flash_bwd_dq` owns BLOCK_M queries and loops over the keys, like the forward. Both recompute
P = exp2(s2 - lse2) from the saved lse2 instead of storing it.
Causal masking is bottom-right aligned: query i sees keys j <= i + S - T.
Legend: T queries, S keys, D head_dim (padded to BLOCK_D, a power of two), G = H / K query heads per
kv head. Pointers are strided (B, heads, length, D) tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST: compute in float32 (Triton's CPU interpreter
    multiplies bfloat16 blocks wrongly, so bf16 runs there in float32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def flash_fwd(Q, K, V, O, LSE, sm_scale, T, S, D,
              sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
              H: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // G                                             # the kv head of this query head
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)        # (BLOCK_M,) query indices
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :],
                mask=(rows[:, None] < T) & (dd[None, :] < D), other=0.0)          # (BLOCK_M, BLOCK_D)
    k_base, v_base = K + b * skb + kh * skh, V + b * svb + kh * svh
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    hi = S
    if CAUSAL:  # keys after the last row's position are never seen: skip their blocks
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M + S - T)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + cols
        kv_mask = (keys[:, None] < S) & (dd[None, :] < D)
        k = tl.load(k_base + keys[:, None] * sks + dd[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + keys[:, None] * svs + dd[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale                         # (BLOCK_M, BLOCK_N)
        visible = keys[None, :] < S
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + S - T)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + dd[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < T) & (dd[None, :] < D))
    lse2 = tl.where(l > 0, m + tl.math.log2(tl.where(l > 0, l, 1.0)), float("inf"))  # inf: P = 0 there
    tl.store(LSE + bh * T + rows, lse2, mask=rows < T)


@triton.jit
def flash_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, T, S, D,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdot,
                   H: tl.constexpr, KH: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_n, bkh = tl.program_id(0), tl.program_id(1)
    b, kh = bkh // KH, bkh % KH
    keys = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    kv_mask = (keys[:, None] < S) & (dd[None, :] < D)
    k = tl.load(K + b * skb + kh * skh + keys[:, None] * sks + dd[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kh * svh + keys[:, None] * svs + dd[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = 0
    if CAUSAL:  # queries before the first key's position never see these keys
        lo = tl.maximum(0, start_n * BLOCK_N - (S - T)) // BLOCK_M * BLOCK_M
    for g in range(G):                                      # every query head that reads this kv head
        h = kh * G + g
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_mask = (rows[:, None] < T) & (dd[None, :] < D)
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + dd[None, :], mask=q_mask, other=0.0)
            lse2 = tl.load(LSE + (b * H + h) * T + rows, mask=rows < T, other=float("inf"))
            delta = tl.load(DELTA + (b * H + h) * T + rows, mask=rows < T, other=0.0)
            s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale                    # (BLOCK_M, BLOCK_N)
            visible = keys[None, :] < S
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + S - T)
            p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)               # (BLOCK_N, BLOCK_D)
            dp = _dot(do, tl.trans(v), UPCAST, PRECISION)                             # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    base = bkh * S * D  # dk, dv: contiguous (B, K, S, D)
    tl.store(DK + base + keys[:, None] * D + dd[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + keys[:, None] * D + dd[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def flash_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, T, S, D,
                 sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdot,
                 H: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < T) & (dd[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + dd[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M + S - T)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (keys[:, None] < S) & (dd[None, :] < D)
        k = tl.load(K + b * skb + kh * skh + keys[:, None] * sks + dd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + kh * svh + keys[:, None] * svs + dd[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        visible = keys[None, :] < S
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + S - T)
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    tl.store(DQ + bh * T * D + rows[:, None] * D + dd[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
