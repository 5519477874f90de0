"""The lesson 14 (Triton kernels) checks accept correct kernels and reject typical mistakes by name;
the kernels run under Triton's CPU interpreter where there is no GPU."""

import pytest

pytest.importorskip("triton", reason="lesson 14 needs triton: pip install triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tlama_mini.checks.common import expect_failure as fails_with  # noqa: E402
from tlama_mini.checks.lesson14 import check_attn_fwd_kernel, check_causal_key_end, check_softmax_kernel  # noqa: E402


@triton.jit
def softmax(X, Y, n_cols, xs, ys, BLOCK: tl.constexpr, PAD_ZERO: tl.constexpr = False, NO_MAX: tl.constexpr = False,
            NO_STRIDE: tl.constexpr = False, NO_STORE_MASK: tl.constexpr = False, NO_DIVIDE: tl.constexpr = False):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    start = r * n_cols if NO_STRIDE else r * xs
    if PAD_ZERO:
        row = tl.load(X + start + cols, mask=mask, other=0.0)
    else:
        row = tl.load(X + start + cols, mask=mask, other=-float("inf"))
    if NO_MAX:
        e = tl.exp(row)
    else:
        e = tl.exp(row - tl.max(row, axis=0))
    out = e if NO_DIVIDE else e / tl.sum(e, axis=0)
    if NO_STORE_MASK:
        tl.store(Y + r * ys + cols, out)
    else:
        tl.store(Y + r * ys + cols, out, mask=mask)


@triton.jit
def attn(Q, K, V, O, T, S, sm_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         NO_RESCALE: tl.constexpr = False, NO_KEY_MASK: tl.constexpr = False, NO_SCALE: tl.constexpr = False,
         NO_DIVIDE: tl.constexpr = False, LOOP_QUERIES: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + dd[None, :], mask=rows[:, None] < T, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, S, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + keys[:, None] * D + dd[None, :], mask=keys[:, None] < S, other=0.0)
        v = tl.load(V + keys[:, None] * D + dd[None, :], mask=keys[:, None] < S, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if not NO_SCALE:
            s = s * sm_scale
        if not NO_KEY_MASK:
            s = tl.where(keys[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        if NO_RESCALE:
            alpha = alpha * 0 + 1
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    if NO_DIVIDE:
        out = acc
    else:
        out = acc / l[:, None]
    last = T if not LOOP_QUERIES else BLOCK_M  # writes only the first block
    tl.store(O + rows[:, None] * D + dd[None, :], out, mask=rows[:, None] < last)


class With:
    """kernel[grid](*args, **meta) with extra constexpr flags: a mistaken variant of a correct kernel."""

    def __init__(self, kernel, **flags):
        self.kernel, self.flags = kernel, flags

    def __getitem__(self, grid):
        return lambda *args, **meta: self.kernel[grid](*args, **meta, **self.flags)


def causal_key_end(start_m, BLOCK_M, T, S):
    return min(S, (start_m + 1) * BLOCK_M + S - T)


def causal_key_end_exact(start_m, BLOCK_M, T, S):
    last_row = min((start_m + 1) * BLOCK_M, T) - 1
    return min(S, last_row + (S - T) + 1)


def test_correct_kernels_pass():
    for _ in range(2):
        check_softmax_kernel(softmax)
        check_attn_fwd_kernel(attn)
    check_causal_key_end(causal_key_end)
    check_causal_key_end(causal_key_end_exact)


def test_softmax_mistakes_are_named():
    fails_with(check_softmax_kernel, With(softmax, PAD_ZERO=True), "loaded as 0, not -inf")
    fails_with(check_softmax_kernel, With(softmax, NO_MAX=True), "subtract the row max")
    fails_with(check_softmax_kernel, With(softmax, NO_STRIDE=True), "row stride")
    fails_with(check_softmax_kernel, With(softmax, NO_STORE_MASK=True), "wrote past the end of a row")
    fails_with(check_softmax_kernel, With(softmax, NO_DIVIDE=True), "without dividing by the row sum")
    fails_with(check_softmax_kernel, lambda *a: None, "not a Triton kernel")


def test_attention_mistakes_are_named():
    fails_with(check_attn_fwd_kernel, With(attn, NO_RESCALE=True), "not rescaled")
    fails_with(check_attn_fwd_kernel, With(attn, NO_KEY_MASK=True), "keys past S")
    fails_with(check_attn_fwd_kernel, With(attn, NO_SCALE=True), "not multiplied by sm_scale")
    fails_with(check_attn_fwd_kernel, With(attn, NO_DIVIDE=True), "not divided by l")
    fails_with(check_attn_fwd_kernel, With(attn, LOOP_QUERIES=True), "were never written")


def test_causal_bound_mistakes_are_named():
    fails_with(check_causal_key_end, lambda m, bm, T, S: min(S, (m + 1) * bm), "top-left aligned")
    fails_with(check_causal_key_end, lambda m, bm, T, S: min(S, (m + 1) * bm + S - T - 1), "not one past it")
    fails_with(check_causal_key_end, lambda m, bm, T, S: (m + 1) * bm + S - T, "min(S, ...)")
    fails_with(check_causal_key_end, lambda m, bm, T, S: min(S, m * bm + S - T + 1), "first row's bound")
    fails_with(check_causal_key_end, lambda m, bm, T, S: max(0, causal_key_end(m, bm, T, S) - 5), "too small")
    fails_with(check_causal_key_end, lambda m, bm, T, S: S, "too large")
    fails_with(check_causal_key_end, lambda m, bm, T, S: None, "expected an int")
