"""The lesson 14 (Triton kernels) checks accept correct kernels and reject each typical mistake by name on every
draw: every wrong solution runs through its check over several seeds (the checks draw fresh sizes, scales and
data on each call). The kernels run under Triton's CPU interpreter where there is no GPU."""
import random

import pytest

pytest.importorskip("triton", reason="lesson 14 needs triton: pip install triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tlama_mini.checks.common import expect_failure_on_every_draw  # noqa: E402
from tlama_mini.checks.lesson14 import check_attn_fwd_kernel, check_causal_key_end, check_softmax_kernel  # noqa: E402

KERNEL_SEEDS = range(12)  # each draw launches a kernel in the interpreter; the probe behind issue 22 ran 30
SEEDS = range(30)
pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny tensors: see conftest.one_thread
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),  # the wrong kernels'
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]  # exp overflow, NaN


def fails_with(check, fn, *words, seeds=KERNEL_SEEDS):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed."""
    expect_failure_on_every_draw(check, fn, *words, seeds=seeds)


# --- a correct kernel each, with typical mistakes switched on by constexpr flags
@triton.jit
def softmax(X, Y, n_cols, xs, ys, BLOCK: tl.constexpr, PAD_ZERO: tl.constexpr = False, NO_MAX: tl.constexpr = False,
            NO_STRIDE: tl.constexpr = False, NO_Y_STRIDE: tl.constexpr = False, NO_STORE_MASK: tl.constexpr = False,
            NO_DIVIDE: tl.constexpr = False, NO_LOAD_MASK: tl.constexpr = False, SWAP_STRIDES: tl.constexpr = False,
            NO_STORE: tl.constexpr = False, MASK_LE: tl.constexpr = False):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    lstride = ys if SWAP_STRIDES else xs
    sstride = xs if SWAP_STRIDES else ys
    start = r * n_cols if NO_STRIDE else r * lstride
    if NO_LOAD_MASK:
        row = tl.load(X + start + cols)
    elif PAD_ZERO:
        row = tl.load(X + start + cols, mask=mask, other=0.0)
    else:
        row = tl.load(X + start + cols, mask=mask, other=-float("inf"))
    if NO_MAX:
        e = tl.exp(row)
    else:
        e = tl.exp(row - tl.max(row, axis=0))
    out = e if NO_DIVIDE else e / tl.sum(e, axis=0)
    ystart = r * n_cols if NO_Y_STRIDE else r * sstride
    if not NO_STORE:
        if NO_STORE_MASK:
            tl.store(Y + ystart + cols, out)
        elif MASK_LE:
            tl.store(Y + ystart + cols, out, mask=cols <= n_cols)
        else:
            tl.store(Y + ystart + cols, out, mask=mask)


@triton.jit
def attn(Q, K, V, O, T, S, sm_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         NO_RESCALE: tl.constexpr = False, ONLY_ACC: tl.constexpr = False, ONLY_L: tl.constexpr = False,
         NO_KEY_MASK: tl.constexpr = False, NO_LOAD_MASK: tl.constexpr = False, NO_SCALE: tl.constexpr = False,
         OWN_SCALE: tl.constexpr = False, NO_DIVIDE: tl.constexpr = False, LOOP_QUERIES: tl.constexpr = False,
         NO_ROW_MASK: tl.constexpr = False, OLD_M: tl.constexpr = False, SKIP_PARTIAL: tl.constexpr = False,
         AXIS0: tl.constexpr = False, KEYS_BM: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + dd[None, :], mask=rows[:, None] < T, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    end = S
    if SKIP_PARTIAL:
        end = (S // BLOCK_N) * BLOCK_N
    for start in range(0, end, BLOCK_N):
        if KEYS_BM:
            keys = start + tl.arange(0, BLOCK_M)
        else:
            keys = start + tl.arange(0, BLOCK_N)
        if NO_LOAD_MASK:
            k = tl.load(K + keys[:, None] * D + dd[None, :])
            v = tl.load(V + keys[:, None] * D + dd[None, :])
        else:
            k = tl.load(K + keys[:, None] * D + dd[None, :], mask=keys[:, None] < S, other=0.0)
            v = tl.load(V + keys[:, None] * D + dd[None, :], mask=keys[:, None] < S, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if OWN_SCALE:
            s = s * 0.25
        elif not NO_SCALE:
            s = s * sm_scale
        if not NO_KEY_MASK:
            s = tl.where(keys[None, :] < S, s, float("-inf"))
        if AXIS0:
            m_new = tl.maximum(m, tl.max(s, 0))
        else:
            m_new = tl.maximum(m, tl.max(s, 1))
        if OLD_M:
            p = tl.exp(s - m[:, None])
        else:
            p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        if NO_RESCALE:
            alpha = alpha * 0 + 1
        if ONLY_ACC:
            l = l + tl.sum(p, 1)
        else:
            l = l * alpha + tl.sum(p, 1)
        if ONLY_L:
            acc = acc + tl.dot(p, v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    if NO_DIVIDE:
        out = acc
    else:
        out = acc / l[:, None]
    last = BLOCK_M if LOOP_QUERIES else T
    if NO_ROW_MASK:
        tl.store(O + rows[:, None] * D + dd[None, :], out)
    else:
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


def test_correct_kernels_pass_on_every_draw():
    for seed in KERNEL_SEEDS:
        random.seed(seed)
        torch.manual_seed(seed)
        check_softmax_kernel(softmax)
        check_attn_fwd_kernel(attn)
    check_causal_key_end(causal_key_end)
    check_causal_key_end(causal_key_end_exact)


@pytest.mark.parametrize("flags, words", [
    (dict(PAD_ZERO=True), ["loaded as 0, not -inf"]),
    (dict(NO_MAX=True), ["overflows", "subtract the row max"]),
    (dict(NO_STRIDE=True), ["X's rows were found with n_cols, not x_row_stride"]),
    (dict(NO_Y_STRIDE=True), ["Y's rows were placed n_cols apart, not y_row_stride"]),
    (dict(NO_STRIDE=True, NO_Y_STRIDE=True), ["X's rows were found with n_cols", "Y's rows were placed n_cols"]),
    (dict(SWAP_STRIDES=True), ["strides are swapped"]),
    (dict(NO_STORE_MASK=True), ["wrote past the end of a row"]),
    (dict(MASK_LE=True), ["wrote past the end of a row"]),
    (dict(NO_LOAD_MASK=True), ["the load is not masked"]),
    (dict(NO_DIVIDE=True), ["without dividing by the row sum"]),
    (dict(NO_STORE=True), ["Y was never written"]),
])
def test_softmax_mistakes_are_named(flags, words):
    fails_with(check_softmax_kernel, With(softmax, **flags), *words)


def test_softmax_not_a_kernel():
    fails_with(check_softmax_kernel, lambda *a: None, "not a Triton kernel")


@pytest.mark.parametrize("flags, words", [
    (dict(NO_RESCALE=True), ["acc and l are not rescaled"]),
    (dict(ONLY_ACC=True), ["l is not rescaled", "(acc is)"]),
    (dict(ONLY_L=True), ["acc is not rescaled", "(l is)"]),
    (dict(NO_KEY_MASK=True), ["keys past S"]),
    (dict(NO_KEY_MASK=True, NO_LOAD_MASK=True), ["keys past S"]),
    (dict(SKIP_PARTIAL=True), ["partial tile of keys is skipped"]),
    (dict(NO_SCALE=True), ["not multiplied by sm_scale"]),
    (dict(OWN_SCALE=True), ["1 / sqrt(D)", "not by the sm_scale argument"]),
    (dict(NO_DIVIDE=True), ["not divided by l"]),
    (dict(LOOP_QUERIES=True), ["were never written"]),
    (dict(NO_ROW_MASK=True), ["wrote rows past T"]),
    (dict(OLD_M=True), ["NaN or inf", "m starts at -inf"]),
    (dict(AXIS0=True), ["the kernel failed", "axis 1"]),
    (dict(KEYS_BM=True), ["key tile is BLOCK_M", "tl.arange(0, BLOCK_N)"]),
])
def test_attention_mistakes_are_named(flags, words):
    fails_with(check_attn_fwd_kernel, With(attn, **flags), *words)


def test_causal_bound_mistakes_are_named():
    def crashes(m, bm, T, S):
        return [0, S][m + 2]

    for fn, words in [
        (lambda m, bm, T, S: min(S, (m + 1) * bm), ["top-left aligned"]),
        (lambda m, bm, T, S: min(S, (m + 1) * bm + S - T - 1), ["not one past it"]),
        (lambda m, bm, T, S: (m + 1) * bm + S - T, ["min(S, ...)"]),
        (lambda m, bm, T, S: min(S, m * bm + S - T + 1), ["first row's bound"]),
        (lambda m, bm, T, S: min(S, (m + 1) * bm + T - S), ["wrong sign", "add S - T, not T - S"]),
        (lambda m, bm, T, S: max(0, causal_key_end(m, bm, T, S) - 5), ["too small"]),
        (lambda m, bm, T, S: S, ["too large"]),
        (lambda m, bm, T, S: causal_key_end(m, bm, T, S) / 1, ["returned float, expected an int"]),
        (lambda m, bm, T, S: None, ["expected an int"]),
        (crashes, ["crashed with IndexError"]),
    ]:
        fails_with(check_causal_key_end, fn, *words, seeds=SEEDS[:1])  # no random draws: one run is all of them
