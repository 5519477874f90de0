"""The lesson 11 (PaLM parallel block, LoRA) checks accept correct solutions written in several styles and
reject each typical mistake by name on every draw: every wrong solution runs through its check over many seeds
(the checks draw fresh sizes and constants on each call)."""
import random

import pytest
import torch

from tlama_mini.checks.common import expect_failure_on_every_draw
from tlama_mini.checks.lesson11 import check_fused_split, check_lora_forward, check_lora_merge, check_xpos_scale

SEEDS = range(30)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def fails_with(check, fn, *words):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed."""
    expect_failure_on_every_draw(check, fn, *words, seeds=SEEDS)


# --- correct implementations, written from the definitions
def fused_split(fused, heads, dim_head, ff_inner, *, order="qkvff", q_layout="hd", sizes=None):
    widths = {"q": heads * dim_head, "k": dim_head, "v": dim_head, "ff": 2 * ff_inner}
    names = {"qkvff": ("q", "k", "v", "ff"), "kqvff": ("k", "q", "v", "ff")}[order]
    parts = dict(zip(names, fused.split(sizes or [widths[n] for n in names], dim=-1)))
    B, T, _ = fused.shape
    q = parts["q"]
    q = {"hd": lambda: q.view(B, T, heads, dim_head).transpose(1, 2),
         "dh": lambda: q.view(B, T, dim_head, heads).permute(0, 3, 1, 2),
         "reshape": lambda: q.reshape(B, heads, T, dim_head),
         "no_transpose": lambda: q.view(B, T, heads, dim_head)}[q_layout]()
    return q, parts["k"], parts["v"], parts["ff"]


def fused_split_indexing(fused, heads, dim_head, ff_inner):
    a, b = heads * dim_head, heads * dim_head + dim_head
    q = torch.stack([fused[..., h * dim_head:(h + 1) * dim_head] for h in range(heads)], dim=1)
    return q, fused[..., a:b], fused[..., b:b + dim_head], fused[..., b + dim_head:]


def xpos_scale(seq_len, dim_head, scale_base, *, centre="floor", divide=True, floor_divide=False, sign=1, pair=2,
               gamma=0.4, norm=True, first=0):
    zeta = (pair * torch.arange(dim_head // 2) / dim_head + gamma) / ((1 + gamma) if norm else 1)
    c = {"floor": seq_len // 2, "true": seq_len / 2, "none": 0, "minus_one": (seq_len - 1) // 2}[centre]
    t = torch.arange(first, seq_len + first, dtype=torch.float32) - c
    power = (t // scale_base if floor_divide else t / scale_base) if divide else t
    return zeta[None, :] ** (sign * power[:, None])


def xpos_scale_loops(seq_len, dim_head, scale_base):
    return torch.tensor([[((2 * i / dim_head + 0.4) / 1.4) ** ((t - seq_len // 2) / scale_base)
                          for i in range(dim_head // 2)] for t in range(seq_len)])


def xpos_scale_float64(seq_len, dim_head, scale_base):
    zeta = (torch.arange(0, dim_head, 2, dtype=torch.float64) / dim_head + 0.4) / 1.4
    return torch.pow(zeta, ((torch.arange(seq_len) - seq_len // 2) / scale_base)[:, None].double())


def lora_forward(x, W, A, B, alpha, *, r_from="A0", scale="ok"):
    r = {"A0": A.shape[0], "B0": B.shape[0], "A1": A.shape[1]}[r_from]
    s = {"ok": alpha / r, "none": 1.0, "alpha": alpha, "inverse": r / alpha, "floor": alpha // r}[scale]
    return x @ W.T + s * (x @ A.T) @ B.T


def lora_forward_linear(x, W, A, B, alpha):
    F = torch.nn.functional
    return F.linear(x, W) + alpha / A.shape[0] * F.linear(F.linear(x, A), B)


def lora_forward_einsum(x, W, A, B, alpha):
    low = torch.einsum("...i,ri->...r", x, A)
    return torch.einsum("...i,oi->...o", x, W) + alpha / A.shape[0] * torch.einsum("...r,or->...o", low, B)


def lora_merge(W, A, B, alpha, *, r_from="A0", scale="ok", in_place=False, transpose=False):
    r = {"A0": A.shape[0], "B0": B.shape[0], "A1": A.shape[1]}[r_from]
    update = {"ok": alpha / r, "none": 1.0, "alpha": alpha, "inverse": r / alpha}[scale] * (B @ A)
    if in_place:
        return W.add_(update)
    return (W + update).T if transpose else W + update


def lora_merge_addmm(W, A, B, alpha):
    return torch.addmm(W, B, A, alpha=alpha / A.shape[0])


@pytest.mark.parametrize("check, fns", [
    (check_fused_split, [fused_split, fused_split_indexing]),
    (check_xpos_scale, [xpos_scale, xpos_scale_loops, xpos_scale_float64]),
    (check_lora_forward, [lora_forward, lora_forward_linear, lora_forward_einsum]),
    (check_lora_merge, [lora_merge, lora_merge_addmm]),
])
def test_correct_styles_pass_on_every_draw(check, fns):
    for seed in SEEDS:
        random.seed(seed)
        torch.manual_seed(seed)
        for fn in fns:
            check(fn)


def test_fused_split_mistakes_are_named():
    def swaps_k_and_v(f, h, d, F):
        q, k, v, ff = fused_split(f, h, d, F)
        return q, v, k, ff

    def writes_into_input(f, h, d, F):
        out = fused_split(f.clone(), h, d, F)
        f.zero_()
        return out

    fails_with(check_fused_split, lambda *a: fused_split(*a, order="kqvff"), "q was cut from features",
               "is features 0..")
    fails_with(check_fused_split, lambda *a: fused_split(*a, q_layout="dh"), "split as (D, H)")
    fails_with(check_fused_split, lambda *a: fused_split(*a, q_layout="reshape"), "mixes time steps and heads")
    fails_with(check_fused_split, lambda *a: fused_split(*a, q_layout="no_transpose"), "heads were not moved")
    fails_with(check_fused_split, lambda f, h, d, F: (*fused_split(f, h, d, F)[:3], f[..., -F:]), "2 * ff_inner")
    fails_with(check_fused_split, lambda f, h, d, F: fused_split(f, h, d, F, sizes=[h * d, d, d, F]),  # a crash
               "crashed with RuntimeError", "2 * ff_inner")
    fails_with(check_fused_split, swaps_k_and_v, "k was cut from features", "another order")
    fails_with(check_fused_split, lambda *a: (lambda q, k, v, ff: (q, k, k, ff))(*fused_split(*a)), "v was cut from")
    fails_with(check_fused_split, writes_into_input, "input tensor was changed")
    fails_with(check_fused_split, lambda f, h, d, F: None, "expected a tuple of 4 tensors")


def test_xpos_mistakes_are_named():
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, centre="none"), "not centred")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, centre="true"), "centred on T / 2")  # odd T only
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, centre="minus_one"), "shifted by one")  # even T only
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, first=1), "shifted by one")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, divide=False), "not divided by scale_base")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, floor_divide=True), "floor-divided")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, sign=-1), "keys' factor")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, pair=1), "pair i covers features 2i")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, gamma=0.0), "missing the offset gamma")
    fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, norm=False), "not divided by 1.4")
    fails_with(check_xpos_scale, lambda T, D, b: xpos_scale(T, D, b).repeat_interleave(2, -1), "one per rotated pair")
    fails_with(check_xpos_scale, lambda T, D, b: xpos_scale(T, D, b).T, "transposed")
    fails_with(check_xpos_scale, lambda T, D, b: torch.ones(T, D // 2)[:, :, None] @ torch.ones(2, 2), "crashed")
    fails_with(check_xpos_scale, lambda *a: None, "expected a torch.Tensor")


def test_lora_forward_mistakes_are_named():
    F = torch.nn.functional
    fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="none"), "not scaled")
    fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="alpha"), "scaled by alpha;")
    fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="inverse"), "r / alpha")
    fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="floor"), "floor-divided")
    fails_with(check_lora_forward, lambda *a: lora_forward(*a, r_from="B0"), "wrong dimension (B.shape[0]")
    fails_with(check_lora_forward, lambda *a: lora_forward(*a, r_from="A1"), "wrong dimension (A.shape[1]")
    fails_with(check_lora_forward, lambda x, W, A, B, al: al / A.shape[0] * (x @ A.T) @ B.T, "only the low-rank")
    fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W.T, "the low-rank update is missing")
    fails_with(check_lora_forward, lambda x, W, A, B, al: 2 * x @ W.T + al / A.shape[0] * (x @ A.T) @ B.T, "twice")
    fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W.T + (x @ A.T) @ B.T / al, "values differ")
    # the rule: never build the (O, I) update (values right, rule broken)
    fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W.T + x @ (al / A.shape[0] * B @ A).T,
               "values are right", "(O, I) matrix was built")
    fails_with(check_lora_forward, lambda x, W, A, B, al: F.linear(x, W + al / A.shape[0] * B @ A),
               "(O, I) matrix was built")
    fails_with(check_lora_forward, lambda x, W, A, B, al: x @ (W.T + al / A.shape[0] * A.T @ B.T),
               "(O, I) matrix was built")
    # crashes become diagnoses
    fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W.T + al / A.shape[0] * (x @ B.T) @ A.T,
               "crashed with RuntimeError", "x @ A.T is (..., r)")
    fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W + al / A.shape[0] * (x @ A.T) @ B.T,
               "crashed", "x @ W.T is (..., O)")
    fails_with(check_lora_forward, lambda x, W, A, B, al: torch.einsum("bi,oi->bo", x, W), "crashed", "leading")

    def changes_x(x, W, A, B, al):
        x -= 0
        x.mul_(1.5)
        return lora_forward(x / 1.5, W, A, B, al)
    fails_with(check_lora_forward, changes_x, "an input tensor was changed")
    fails_with(check_lora_forward, lambda *a: None, "expected a torch.Tensor")


def test_lora_merge_mistakes_are_named():
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, scale="none"), "not scaled")
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, scale="alpha"), "scaled by alpha;")
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, scale="inverse"), "r / alpha")
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, r_from="B0"), "wrong dimension (B.shape[0]")
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, r_from="A1"), "wrong dimension (A.shape[1]")
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, in_place=True), "changed in place")
    fails_with(check_lora_merge, lambda *a: lora_merge(*a, transpose=True), "merged weight transposed")
    fails_with(check_lora_merge, lambda W, A, B, al: al / A.shape[0] * (B @ A), "only the update")
    fails_with(check_lora_merge, lambda W, A, B, al: W.clone(), "this is W itself")
    fails_with(check_lora_merge, lambda W, A, B, al: W + al / A.shape[0] * (A @ B), "crashed", "B @ A is (O, r)")
    fails_with(check_lora_merge, lambda W, A, B, al: W + al / A.shape[0] * (B @ A).T, "crashed", "the shape of W")
    fails_with(check_lora_merge, lambda *a: None, "expected a torch.Tensor")


def test_every_draw_helper_names_the_seed_a_wrong_answer_passes_on():
    def check_odd_only(fn):  # a check that, like the old xPos check, sees the mistake only on some draws
        if random.randrange(2) and fn() != 1:
            from tlama_mini.checks.common import fail
            fail("toy", "not one")

    with pytest.raises(AssertionError, match=r"seed \d+: .*accepted a wrong implementation"):
        expect_failure_on_every_draw(check_odd_only, lambda: 2, "not one", seeds=range(10))
    expect_failure_on_every_draw(check_odd_only, lambda: 2, "not one", seeds=[s for s in range(10)
                                 if (random.seed(s), random.randrange(2))[1]])
