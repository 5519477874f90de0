"""Checks for lesson 14 (kernel fusion with Triton). The learner writes Triton kernels; each check
launches them on fresh random inputs (under Triton's CPU interpreter when there is no GPU), compares
with torch and names the mistake when it can. `causal_key_end` is plain Python.

Legend: R rows, N columns, T queries, S keys, D head_dim, BLOCK_M / BLOCK_N query / key tile sizes.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from ..triton_flash import load_kernels
from .common import check_tensor, fail, passed

load_kernels()  # turns the interpreter on where there is no GPU, before triton is imported
import triton  # noqa: E402

__all__ = ["check_softmax_kernel", "check_attn_fwd_kernel", "check_causal_key_end"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _launch(name: str, kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """kernel[grid](*args, **meta), with a stub's NotImplementedError passed on as such (the interpreter
    wraps errors raised inside a kernel) and other failures reported with the kernel's message."""
    if not hasattr(kernel, "__getitem__"):
        fail(name, f"{name} is a {type(kernel).__name__}, not a Triton kernel", "decorate it with @triton.jit")
    try:
        kernel[grid](*args, **meta)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001: a learner's kernel can fail in many ways
        cause = err.__cause__ or err
        if isinstance(cause, NotImplementedError) or "NotImplementedError" in str(err):
            raise NotImplementedError from None
        fail(name, f"the kernel failed: {type(cause).__name__}: {str(cause)[:300]}",
             "shapes of blocks must be powers of two (tl.arange(0, BLOCK)); mask loads and stores past the end")


# ---------------------------------------------------------------------------------------------- softmax
def _softmax_reference_mistakes(x: torch.Tensor, n: int, block: int) -> dict[str, torch.Tensor]:
    exp_pad = block - n  # masked loads that read 0 instead of -inf add exp(0 - max) for every padded lane
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return {
        "the padded lanes were loaded as 0, not -inf, so each adds exp(0 - max) to the sum: load with "
        "other=-float('inf')": e / (e.sum(-1, keepdim=True) + exp_pad * torch.exp(-x.amax(-1, keepdim=True))),
        "each row is divided by the sum over the whole tensor, not over its own row": e / e.sum(),
        "exp(x - max) was returned without dividing by the row sum": e,
    }


def check_softmax_kernel(kernel) -> None:
    """kernel[(R,)](X, Y, n_cols, x_row_stride, y_row_stride, BLOCK=...): row r of Y = softmax(row r of X),
    one program per row, BLOCK the next power of two >= n_cols."""
    name = "softmax_kernel"
    device = _device()
    R, N = random.randint(3, 6), random.choice([7, 19, 33, 50])
    block = triton.next_power_of_2(N)
    for case in ("moderate", "large"):
        big = torch.randn(R + 1, N + 5, device=device) * 2 - 4  # one spare row: a kernel reading past the end
        if case == "large":                                      # finds numbers, not a crash
            big[:, random.randrange(N)] = 95.0                   # exp(95) overflows float32: subtract the max
        x = big[:R, :N]                                          # rows N + 5 apart in memory: strides matter
        original = x.clone()
        buf = torch.full((R * (N + 3) + block,), 123.0, device=device)  # spare room after the output, too
        y = buf[:R * (N + 3)].view(R, N + 3)                     # 3 extra columns per row that must stay 123
        _launch(name, kernel, (R,), x, y, N, x.stride(0), y.stride(0), BLOCK=block)
        if not torch.equal(x, original):
            fail(name, "the input X was changed", "store into Y only")
        if not (torch.all(y[:, N:] == 123.0) and torch.all(buf[R * (N + 3):] == 123.0)):
            fail(name, "the kernel wrote past the end of a row (columns >= n_cols)", "tl.store(..., mask=cols < n_cols)")
        out = y[:, :N]
        if torch.isnan(out).any() or torch.isinf(out).any():
            fail(name, "NaN or inf in the output" + (": exp(x) overflows for x > 88 (float32); subtract the row max "
                 "first: exp(x - max) / sum(exp(x - max)) is the same softmax and never overflows" if case == "large"
                 else ""), "load the padded lanes as -inf and subtract the row max")
        contiguous = big.reshape(-1)[:R * N].view(R, N)  # what a kernel that ignores the row stride reads
        mistakes = _softmax_reference_mistakes(x, N, block)
        mistakes["the rows were found with n_cols instead of the row stride (rows are x_row_stride elements "
                 "apart)"] = torch.softmax(contiguous, dim=-1)
        check_tensor(name, out, torch.softmax(x, dim=-1), atol=1e-6, rtol=1e-5, mistakes=mistakes,
                     hint="row = tl.load(X + r * x_row_stride + cols, mask=cols < n_cols, other=-inf); "
                          "e = tl.exp(row - tl.max(row, 0)); store e / tl.sum(e, 0)")
    passed(name, f"{R} rows of {N} (BLOCK={block}), moderate values and values up to 95")


# ---------------------------------------------------------------------------------------------- attention
def _tiled_mistake(q, k, v, scale, block_n, *, rescale=True, mask=True, use_scale=True):
    """The online softmax over key tiles with one typical mistake switched on, in torch (float64)."""
    T, S = q.shape[0], k.shape[0]
    s_all = q @ k.T * (scale if use_scale else 1.0)
    m = torch.full((T,), float("-inf"), dtype=q.dtype)
    l, acc = torch.zeros(T, dtype=q.dtype), torch.zeros_like(q)
    for j0 in range(0, S, block_n):
        s = s_all[:, j0:j0 + block_n]
        vj = v[j0:j0 + block_n]
        if not mask and s.shape[1] < block_n:  # keys past S read as zeros: scores 0, values 0
            pad = block_n - s.shape[1]
            s = torch.cat([s, torch.zeros(T, pad, dtype=q.dtype)], 1)
            vj = torch.cat([vj, torch.zeros(pad, v.shape[1], dtype=v.dtype)], 0)
        m_new = torch.maximum(m, s.amax(1))
        p = torch.exp(s - m_new[:, None])
        alpha = torch.exp(m - m_new) if rescale else torch.ones_like(m)
        l, acc, m = l * alpha + p.sum(1), acc * alpha[:, None] + p @ vj, m_new
    return acc / l[:, None]


def check_attn_fwd_kernel(kernel) -> None:
    """kernel[(cdiv(T, BLOCK_M),)](Q, K, V, O, T, S, sm_scale, D=..., BLOCK_M=..., BLOCK_N=...): one head,
    q (T, D), k and v (S, D), o (T, D), contiguous; O = softmax(Q K^T * sm_scale) V, not causal."""
    name = "attn_fwd_kernel"
    device = _device()
    D, bm, bn = 16, 16, 16
    T, S = random.randint(17, 40), random.randint(17, 45)
    while S % bn == 0:
        S += 1
    scale = 1 / math.sqrt(D)
    g = torch.Generator().manual_seed(random.randint(0, 2**31))
    # spare rows after every tensor: a kernel that reads or writes past the end gets numbers, not a crash
    q, k, v = ((torch.randn(n + 32, D, generator=g) * 2).to(device)[:n] for n in (T, S, S))
    o_buf = torch.full((T + bm, D), float("nan"), device=device)
    o = o_buf[:T]
    _launch(name, kernel, (triton.cdiv(T, bm),), q, k, v, o, T, S, scale, D=D, BLOCK_M=bm, BLOCK_N=bn)
    if not torch.isnan(o_buf[T:]).all():
        fail(name, "the kernel wrote rows past T", "store with mask=rows[:, None] < T")
    if torch.isnan(o).all(dim=1).any():
        fail(name, f"rows {torch.isnan(o).all(dim=1).nonzero().flatten().tolist()[:5]} were never written",
             "each program stores BLOCK_M rows: rows = pid * BLOCK_M + tl.arange(0, BLOCK_M), mask rows < T")
    qd, kd, vd = (t.double().cpu() for t in (q, k, v))
    want = torch.softmax(qd @ kd.T * scale, -1) @ vd
    tol = 1e-2 if device.type == "cuda" else 1e-4  # on a GPU tl.dot multiplies float32 in TF32
    check_tensor(name, o.double().cpu(), want, atol=tol, rtol=tol, mistakes={
        "acc and l are not rescaled by exp(m_old - m_new) when a tile raises the row max":
            _tiled_mistake(qd, kd, vd, scale, bn, rescale=False),
        "keys past S (the last, partial tile) are not masked: they count as scores of 0; set their scores "
        "to -inf": _tiled_mistake(qd, kd, vd, scale, bn, mask=False),
        "the scores are not multiplied by sm_scale": _tiled_mistake(qd, kd, vd, scale, bn, use_scale=False),
        "the output is not divided by l, the row sums": _tiled_mistake(qd, kd, vd, scale, bn)
        * (torch.exp(qd @ kd.T * scale - (qd @ kd.T * scale).amax(1, keepdim=True)).sum(1, keepdim=True)),
    }, hint="per key tile: s = dot(q, trans(k)) * sm_scale (-inf past S); m_new = max(m, max(s)); "
            "p = exp(s - m_new); alpha = exp(m - m_new); l = l * alpha + sum(p); acc = acc * alpha + dot(p, v)")
    passed(name, f"T={T}, S={S} (not a tile multiple), D={D}, tiles {bm}x{bn}")


# ---------------------------------------------------------------------------------------------- causal bound
def check_causal_key_end(fn: Callable[[int, int, int, int], int]) -> None:
    """fn(start_m, BLOCK_M, T, S) -> one past the last key that any query of block start_m may see under
    bottom-right causal masking (query i sees keys j <= i + S - T): key tiles from there on are skipped."""
    name = "causal_key_end"
    cases = [(m, bm, T, S) for bm in (16, 32) for T, S in ((64, 64), (40, 100), (1, 37), (50, 50), (33, 70))
             for m in range(math.ceil(T / bm))]
    for m, bm, T, S in cases:
        got = fn(m, bm, T, S)
        if not isinstance(got, int) and not (isinstance(got, torch.Tensor) and got.numel() == 1):
            fail(name, f"returned {type(got).__name__}, expected an int", "did you forget a `return`?")
        got = int(got)
        last_row = min((m + 1) * bm, T) - 1
        want = min(S, last_row + S - T + 1)
        if got == want or (got == min(S, (m + 1) * bm + S - T) and got >= want):  # rows past T see nothing new
            continue
        label = f"{name}(start_m={m}, BLOCK_M={bm}, T={T}, S={S}) = {got}, expected {want}"
        if got == min(S, (m + 1) * bm):
            fail(name, f"{label}: the diagonal is top-left aligned; with T < S query i sits at position "
                 "i + S - T (the last T of the S positions), so add S - T", "bottom-right: j <= i + S - T")
        if got == min(S, last_row + S - T) or got == min(S, (m + 1) * bm + S - T - 1):
            fail(name, f"{label}: this is the last visible key, not one past it (a range end is exclusive)")
        if got == (m + 1) * bm + S - T and got > S:
            fail(name, f"{label}: the bound is past the last key; take min(S, ...)")
        if got == min(S, m * bm + S - T + 1) or got == min(S, m * bm + S - T):
            fail(name, f"{label}: this is the first row's bound; the block's last row sees the most keys")
        if got < want:
            fail(name, f"{label}: too small: keys that some query may see would be skipped (wrong outputs)")
        fail(name, f"{label}: too large: tiles that every query masks out would be computed (right outputs, "
             "wasted work)")
    passed(name, f"{len(cases)} blocks, T <= S")
