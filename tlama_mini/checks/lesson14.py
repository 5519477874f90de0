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
from .common import call, check_tensor, fail, passed

load_kernels()  # turns the interpreter on where there is no GPU, before triton is imported
import triton  # noqa: E402

__all__ = ["check_softmax_kernel", "check_attn_fwd_kernel", "check_causal_key_end"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _launch(name: str, kernel, grid: tuple[int, ...], *args, hint: str = "", **meta) -> None:
    """kernel[grid](*args, **meta), with a stub's NotImplementedError passed on as such (the interpreter
    wraps errors raised inside a kernel) and other failures reported with the kernel's message."""
    if not hasattr(kernel, "__getitem__"):
        fail(name, f"{name} is a {type(kernel).__name__}, not a Triton kernel", "decorate it with @triton.jit")
    try:
        kernel[grid](*args, **meta)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 (a learner's kernel can fail in many ways)
        cause = err.__cause__ or err
        if isinstance(cause, NotImplementedError) or "NotImplementedError" in str(err):
            raise NotImplementedError from None
        fail(name, f"the kernel failed: {type(cause).__name__}: {str(cause)[:300]}",
             hint or "shapes of blocks must be powers of two (tl.arange(0, BLOCK)); mask loads and stores past the end")


# ---------------------------------------------------------------------------------------------- softmax
_UNTOUCHED = 123.0  # Y's marker: a softmax lies in [0, 1], so no kernel writes 123 by mistake


def _softmax_reference_mistakes(flat: torch.Tensor, x: torch.Tensor, x_stride: int, block: int
                                ) -> dict[str, torch.Tensor]:
    """What typical wrong kernels return for x = rows of `flat` (the whole input buffer) x_stride apart."""
    R, n = x.shape
    pad = block - n
    e = torch.exp(x - x.amax(-1, keepdim=True))
    m0 = x.amax(-1, keepdim=True).clamp(min=0.0)  # padded lanes read as 0 take part in the max, too
    e0 = torch.exp(x - m0)
    unmasked = torch.stack([flat[r * x_stride:r * x_stride + block] for r in range(R)])  # lanes past the row
    return {
        "the padded lanes were loaded as 0, not -inf, so each adds exp(0 - max) to the sum: load with "
        "other=-float('inf')": e0 / (e0.sum(-1, keepdim=True) + pad * torch.exp(-m0)),
        "the load is not masked: the lanes >= n_cols read the numbers that follow the row in memory and count "
        "in the max and the sum; load with mask=cols < n_cols, other=-float('inf')":
            torch.softmax(unmasked, dim=-1)[:, :n],
        "each row is divided by the sum over the whole tensor, not over its own row": e / e.sum(),
        "exp(x - max) was returned without dividing by the row sum": e,
    }


def _stride_mistake(buf: torch.Tensor, flat: torch.Tensor, R: int, n: int, xs: int, ys: int) -> str | None:
    """The wrong pair of row strides (the load's, the store's) whose result `buf` holds, named; None if none."""
    load_names = {n: "X's rows were found with n_cols, not x_row_stride (X's rows are x_row_stride elements apart)",
                  ys: "X's rows were found with y_row_stride, not x_row_stride"}
    store_names = {n: "Y's rows were placed n_cols apart, not y_row_stride apart",
                   xs: "Y's rows were placed x_row_stride apart, not y_row_stride apart"}
    for load in (xs, n, ys):
        for store in (ys, n, xs):
            if (load, store) == (xs, ys):
                continue
            want = torch.full_like(buf, _UNTOUCHED)
            for r in range(R):
                want[r * store:r * store + n] = torch.softmax(flat[r * load:r * load + n], dim=0)
            if torch.allclose(buf, want, atol=1e-6, rtol=1e-5):
                if (load, store) == (ys, xs):
                    return "the two row strides are swapped: X's rows are x_row_stride apart, Y's y_row_stride"
                return "; ".join(names[s] for names, s, right in ((load_names, load, xs), (store_names, store, ys))
                                 if s != right)
    return None


def check_softmax_kernel(kernel) -> None:
    """kernel[(R,)](X, Y, n_cols, x_row_stride, y_row_stride, BLOCK=...): row r of Y = softmax(row r of X),
    one program per row, BLOCK the next power of two >= n_cols. X's rows are n_cols + 5 apart and Y's
    n_cols + 3 (every stride differs from n_cols and from the other), and n_cols is never a power of two."""
    name = "softmax_kernel"
    device = _device()
    R, N = random.randint(3, 6), random.choice([7, 19, 33, 50])
    block = triton.next_power_of_2(N)
    xs, ys = N + 5, N + 3
    for case in ("moderate", "large"):
        big = torch.randn(R + 1, xs, device=device) * 2 - 4  # one spare row: a kernel reading past the end
        if case == "large":                                    # finds numbers, not a crash
            big[:, random.randrange(N)] = 95.0                 # exp(95) overflows float32: subtract the max
        x = big[:R, :N]                                        # rows N + 5 apart in memory: strides matter
        original = x.clone()
        buf = torch.full((R * ys + block,), _UNTOUCHED, device=device)  # spare room after the output, too
        y = buf[:R * ys].view(R, ys)                           # 3 extra columns per row that must stay 123
        _launch(name, kernel, (R,), x, y, N, xs, ys, BLOCK=block)
        if not torch.equal(x, original):
            fail(name, "the input X was changed", "store into Y only")
        if torch.all(y[:, :N] == _UNTOUCHED):
            fail(name, "Y was never written: its every value is still the 123 it held before the launch",
                 "tl.store(Y + r * y_row_stride + cols, result, mask=cols < n_cols)")
        flat, buf_cpu = big.reshape(-1).cpu(), buf.cpu()
        wrong_strides = _stride_mistake(buf_cpu, flat, R, N, xs, ys)  # before 'past the end': a row placed
        if wrong_strides:                                              # wrongly lands on the spare columns
            fail(name, wrong_strides, "row r of X starts at X + r * x_row_stride; row r of Y at Y + r * y_row_stride")
        if not (torch.all(y[:, N:] == _UNTOUCHED) and torch.all(buf[R * ys:] == _UNTOUCHED)):
            fail(name, "the kernel wrote past the end of a row (columns >= n_cols)", "tl.store(..., mask=cols < n_cols)")
        out = y[:, :N]
        if torch.isnan(out).any() or torch.isinf(out).any():
            fail(name, "NaN or inf in the output" + (": exp(x) overflows for x > 88 (float32); subtract the row max "
                 "first: exp(x - max) / sum(exp(x - max)) is the same softmax and never overflows" if case == "large"
                 else ""), "load the padded lanes as -inf and subtract the row max")
        check_tensor(name, out.cpu(), torch.softmax(x.cpu(), dim=-1), atol=1e-6, rtol=1e-5,
                     mistakes=_softmax_reference_mistakes(flat, x.cpu(), xs, block),
                     hint="row = tl.load(X + r * x_row_stride + cols, mask=cols < n_cols, other=-inf); "
                          "e = tl.exp(row - tl.max(row, 0)); store e / tl.sum(e, 0)")
    passed(name, f"{R} rows of {N} (BLOCK={block}), moderate values and values up to 95")


# ---------------------------------------------------------------------------------------------- attention
_UNWRITTEN = -31337.0  # O's marker: an output row averages rows of V (|v| < 20 here), so no kernel writes it by mistake


def _tiled_mistake(q, k, v, scale, block_n, *, width=None, end=None, rescale_l=True, rescale_acc=True,
                   mask=True):
    """The online softmax over key tiles with one typical mistake switched on, in torch (float64): tiles of
    `width` keys (BLOCK_N unless a kernel used BLOCK_M) start every block_n keys up to `end` (S unless the
    last, partial tile is skipped)."""
    T, S = q.shape[0], k.shape[0]
    width = width or block_n
    end = S if end is None else end
    m = torch.full((T,), float("-inf"), dtype=q.dtype)
    l, acc = torch.zeros(T, dtype=q.dtype), torch.zeros_like(q)
    for j0 in range(0, end, block_n):
        kj, vj = k[j0:j0 + width], v[j0:j0 + width]
        if not mask and kj.shape[0] < width:  # keys past S: K and V read as zeros, scores 0, values 0
            pad = width - kj.shape[0]
            kj = torch.cat([kj, torch.zeros(pad, k.shape[1], dtype=k.dtype)], 0)
            vj = torch.cat([vj, torch.zeros(pad, v.shape[1], dtype=v.dtype)], 0)
        s = q @ kj.T * scale
        m_new = torch.maximum(m, s.amax(1))
        p = torch.exp(s - m_new[:, None])
        alpha = torch.exp(m - m_new)
        l = (l * alpha if rescale_l else l) + p.sum(1)
        acc = (acc * alpha[:, None] if rescale_acc else acc) + p @ vj
        m = m_new
    return acc / l[:, None]


def _attention_case(bm: int, bn: int, D: int, scale: float, device: torch.device):
    """q (T, D), k and v (S, D) for one launch: T not a multiple of BLOCK_M (two programs or more, the last
    partial), S not a multiple of BLOCK_N (two tiles or more, the last partial), and a key in the last tile
    that raises some row's maximum, so that a kernel which does not rescale acc or l is wrong on every draw."""
    T = random.choice([t for t in range(bm + 1, 3 * bm) if t % bm])
    S = random.choice([s for s in range(33, 64) if s % bn])
    g = torch.Generator().manual_seed(random.randint(0, 2**31))
    q, k, v = (torch.randn(n, D, generator=g) * 2 for n in (T, S, S))
    i0, j0 = random.randrange(T), random.randrange(S - S % bn, S)
    target = (q[i0] @ k[:S - S % bn].T * scale).max() + 3.0  # 3 above the row's max over the earlier tiles
    k[j0] = q[i0] * target / (scale * q[i0] @ q[i0])
    # spare rows after every tensor: a kernel that reads or writes past the end gets numbers, not a crash;
    # K and V are followed by zeros, so keys past S read without a mask count as scores of 0 and values of 0
    q_buf = torch.cat([q, torch.randn(32, D, generator=g) * 2]).to(device)
    k_buf, v_buf = (torch.cat([t, torch.zeros(32, D)]).to(device) for t in (k, v))
    return T, S, q_buf[:T], k_buf[:S], v_buf[:S]


def _check_attention_once(name: str, kernel, bm: int, bn: int) -> str:
    device = _device()
    D = 16
    scale = random.choice([0.1, 0.15, 0.2, 0.3])  # never 1 / sqrt(D) = 0.25: the argument must be used
    T, S, q, k, v = _attention_case(bm, bn, D, scale, device)
    o_buf = torch.full((T + bm, D), _UNWRITTEN, device=device)
    o = o_buf[:T]
    _launch(name, kernel, (triton.cdiv(T, bm),), q, k, v, o, T, S, scale, D=D, BLOCK_M=bm, BLOCK_N=bn,
            hint=f"here BLOCK_M = {bm} query rows and BLOCK_N = {bn} keys differ: a key tile is "
                 "start + tl.arange(0, BLOCK_N), and the per-row max and sum reduce the keys' axis 1 "
                 "(tl.max(s, 1), tl.sum(p, 1)); block sizes must be powers of two")
    if not (o_buf[T:] == _UNWRITTEN).all():
        fail(name, "the kernel wrote rows past T", "store with mask=rows[:, None] < T")
    unwritten = (o == _UNWRITTEN).all(dim=1)
    if unwritten.any():
        fail(name, f"rows {unwritten.nonzero().flatten().tolist()[:5]} of {T} were never written",
             "each program stores BLOCK_M rows: rows = pid * BLOCK_M + tl.arange(0, BLOCK_M), mask rows < T")
    if not torch.isfinite(o).all():
        fail(name, "the output contains NaN or inf", "p = exp(s - m_new), with m_new = max(m, max(s)): m starts "
             "at -inf, so exp(s - m) with the old m is inf on the first tile; keys past S are -inf in s, not in m")
    qd, kd, vd = (t.double().cpu() for t in (q, k, v))
    want = torch.softmax(qd @ kd.T * scale, -1) @ vd
    tol = 1e-2 if device.type == "cuda" else 1e-4  # on a GPU tl.dot multiplies float32 in TF32
    mistakes = {  # computed only when the output is wrong
        "acc and l are not rescaled by exp(m_old - m_new) when a tile raises the row max":
            lambda: _tiled_mistake(qd, kd, vd, scale, bn, rescale_l=False, rescale_acc=False),
        "l is not rescaled by alpha = exp(m_old - m_new) when a tile raises the row max (acc is)":
            lambda: _tiled_mistake(qd, kd, vd, scale, bn, rescale_l=False),
        "acc is not rescaled by alpha = exp(m_old - m_new) when a tile raises the row max (l is)":
            lambda: _tiled_mistake(qd, kd, vd, scale, bn, rescale_acc=False),
        "keys past S (the last, partial tile) are not masked: they count as scores of 0; set their scores "
        "to -inf": lambda: _tiled_mistake(qd, kd, vd, scale, bn, mask=False),
        "the last, partial tile of keys is skipped: loop over range(0, S, BLOCK_N) and mask the keys >= S":
            lambda: _tiled_mistake(qd, kd, vd, scale, bn, end=S - S % bn),
        f"a key tile is BLOCK_M = {bm} keys wide: key tiles are start + tl.arange(0, BLOCK_N), BLOCK_N = {bn}":
            lambda: _tiled_mistake(qd, kd, vd, scale, bn, width=bm),
        "the scores are not multiplied by sm_scale": lambda: _tiled_mistake(qd, kd, vd, 1.0, bn),
        f"the scores were multiplied by 1 / sqrt(D) = {1 / math.sqrt(D):g}, not by the sm_scale argument "
        f"({scale:g} here)": lambda: _tiled_mistake(qd, kd, vd, 1 / math.sqrt(D), bn),
        "the output is not divided by l, the row sums": lambda: want
        * (torch.exp(qd @ kd.T * scale - (qd @ kd.T * scale).amax(1, keepdim=True)).sum(1, keepdim=True)),
    }
    check_tensor(name, o.double().cpu(), want, atol=tol, rtol=tol, mistakes=mistakes,
                 hint="per key tile: s = dot(q, trans(k)) * sm_scale (-inf past S); m_new = max(m, max(s)); "
                      "p = exp(s - m_new); alpha = exp(m - m_new); l = l * alpha + sum(p); "
                      "acc = acc * alpha + dot(p, v)")
    return f"T={T}, S={S}, tiles {bm}x{bn}, sm_scale={scale:g}"


def check_attn_fwd_kernel(kernel) -> None:
    """kernel[(cdiv(T, BLOCK_M),)](Q, K, V, O, T, S, sm_scale, D=..., BLOCK_M=..., BLOCK_N=...): one head,
    q (T, D), k and v (S, D), o (T, D), contiguous; O = softmax(Q K^T * sm_scale) V, not causal.
    Two launches, with tiles of 32 x 16 and 16 x 32 (BLOCK_M != BLOCK_N, so that one cannot stand for the
    other), T and S never tile multiples, and sm_scale never 1 / sqrt(D)."""
    name = "attn_fwd_kernel"
    done = [_check_attention_once(name, kernel, bm, bn) for bm, bn in ((32, 16), (16, 32))]
    passed(name, f"D=16; {'; '.join(done)}")


# ---------------------------------------------------------------------------------------------- causal bound
def check_causal_key_end(fn: Callable[[int, int, int, int], int]) -> None:
    """fn(start_m, BLOCK_M, T, S) -> one past the last key that any query of block start_m may see under
    bottom-right causal masking (query i sees keys j <= i + S - T): key tiles from there on are skipped."""
    name = "causal_key_end"
    cases = [(m, bm, T, S) for bm in (16, 32) for T, S in ((64, 64), (40, 100), (1, 37), (50, 50), (33, 70))
             for m in range(math.ceil(T / bm))]
    for m, bm, T, S in cases:
        got = call(name, fn, m, bm, T, S, hint="start_m, BLOCK_M, T and S are Python ints")
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
        if T != S and got in (min(S, (m + 1) * bm + T - S), min(S, last_row + T - S + 1)):
            fail(name, f"{label}: the offset has the wrong sign; query i sees keys j <= i + S - T (S - T >= 0 "
                 "extra keys sit before the queries), so add S - T, not T - S")
        if got == (m + 1) * bm + S - T and got > S:
            fail(name, f"{label}: the bound is past the last key; take min(S, ...)")
        if got == min(S, m * bm + S - T + 1) or got == min(S, m * bm + S - T):
            fail(name, f"{label}: this is the first row's bound; the block's last row sees the most keys")
        if got < want:
            fail(name, f"{label}: too small: keys that some query may see would be skipped (wrong outputs)")
        fail(name, f"{label}: too large: tiles that every query masks out would be computed (right outputs, "
             "wasted work)")
    passed(name, f"{len(cases)} blocks, T <= S")
