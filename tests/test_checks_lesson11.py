"""The lesson 11 (PaLM parallel block, LoRA) checks accept correct solutions written in several styles and
reject typical mistakes by name."""
import pytest
import torch

from tlama_mini.checks.common import expect_failure as fails_with
from tlama_mini.checks.lesson11 import check_fused_split, check_lora_forward, check_lora_merge, check_xpos_scale


# --- correct implementations, written from the definitions
def fused_split(fused, heads, dim_head, ff_inner, *, order="qkvff", q_layout="hd", reshape=False):
    sizes = {"q": heads * dim_head, "k": dim_head, "v": dim_head, "ff": 2 * ff_inner}
    names = {"qkvff": ("q", "k", "v", "ff"), "kqvff": ("k", "q", "v", "ff")}[order]
    parts = dict(zip(names, fused.split([sizes[n] for n in names], dim=-1)))
    B, T, _ = fused.shape
    q = parts["q"]
    if reshape:
        q = q.reshape(B, heads, T, dim_head)
    elif q_layout == "hd":
        q = q.view(B, T, heads, dim_head).transpose(1, 2)
    else:
        q = q.view(B, T, dim_head, heads).permute(0, 3, 1, 2)
    return q, parts["k"], parts["v"], parts["ff"]


def fused_split_indexing(fused, heads, dim_head, ff_inner):
    a, b = heads * dim_head, heads * dim_head + dim_head
    q = torch.stack([fused[..., h * dim_head:(h + 1) * dim_head] for h in range(heads)], dim=1)
    return q, fused[..., a:b], fused[..., b:b + dim_head], fused[..., b + dim_head:]


def xpos_scale(seq_len, dim_head, scale_base, *, centre=True, divide=True, sign=1, pair=2, gamma=0.4, norm=True):
    zeta = (pair * torch.arange(dim_head // 2) / dim_head + gamma) / ((1 + gamma) if norm else 1)
    t = torch.arange(seq_len, dtype=torch.float32) - (seq_len // 2 if centre else 0)
    return zeta[None, :] ** (sign * t[:, None] / (scale_base if divide else 1))


def xpos_scale_loops(seq_len, dim_head, scale_base):
    return torch.tensor([[((2 * i / dim_head + 0.4) / 1.4) ** ((t - seq_len // 2) / scale_base)
                          for i in range(dim_head // 2)] for t in range(seq_len)])


def lora_forward(x, W, A, B, alpha, *, scale="ok"):
    r = A.shape[0]
    s = {"ok": alpha / r, "none": 1.0, "alpha": alpha, "inverse": r / alpha}[scale]
    return x @ W.T + s * (x @ A.T) @ B.T


def lora_forward_merged(x, W, A, B, alpha):
    return torch.nn.functional.linear(x, W + alpha / A.shape[0] * B @ A)


def lora_merge(W, A, B, alpha, *, scale=True, in_place=False, transpose=False):
    update = (alpha / A.shape[0] if scale else 1.0) * (B @ A)
    if in_place:
        return W.add_(update)
    return (W + update).T if transpose else W + update


@pytest.mark.parametrize("fn", [fused_split, fused_split_indexing])
def test_correct_styles_pass(fn):
    for _ in range(5):
        check_fused_split(fn)
        check_xpos_scale(xpos_scale)
        check_xpos_scale(xpos_scale_loops)
        check_lora_forward(lora_forward)
        check_lora_forward(lora_forward_merged)
        check_lora_merge(lora_merge)


def test_fused_split_mistakes_are_named():
    def swaps_k_and_v(f, h, d, F):
        q, k, v, ff = fused_split(f, h, d, F)
        return q, v, k, ff

    def writes_into_input(f, h, d, F):
        out = fused_split(f.clone(), h, d, F)
        f.zero_()
        return out

    for _ in range(3):
        fails_with(check_fused_split, lambda *a: fused_split(*a, order="kqvff"), "q was cut from features", "is features 0..")
        fails_with(check_fused_split, lambda *a: fused_split(*a, q_layout="dh"), "split as (D, H)")
        fails_with(check_fused_split, lambda *a: fused_split(*a, reshape=True), "mixes time steps and heads")
        fails_with(check_fused_split, lambda f, h, d, F: (*fused_split(f, h, d, F)[:3], f[..., -F:]), "2 * ff_inner")
        fails_with(check_fused_split, swaps_k_and_v, "k was cut from features", "another order")
        fails_with(check_fused_split, writes_into_input, "input tensor was changed")
    fails_with(check_fused_split, lambda f, h, d, F: None, "expected a tuple of 4 tensors")


def test_xpos_mistakes_are_named():
    for _ in range(3):
        fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, centre=False), "not centred")
        fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, divide=False), "not divided by scale_base")
        fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, sign=-1), "keys' factor")
        fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, pair=1), "pair i covers features 2i")
        fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, gamma=0.0), "missing the offset gamma")
        fails_with(check_xpos_scale, lambda *a: xpos_scale(*a, norm=False), "not divided by 1.4")
        fails_with(check_xpos_scale, lambda T, D, b: xpos_scale(T, D, b).repeat_interleave(2, -1), "one per rotated pair")


def test_lora_mistakes_are_named():
    for _ in range(3):
        fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="none"), "not scaled")
        fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="alpha"), "scaled by alpha;")
        fails_with(check_lora_forward, lambda *a: lora_forward(*a, scale="inverse"), "r / alpha")
        fails_with(check_lora_forward, lambda x, W, A, B, al: al / A.shape[0] * (x @ A.T) @ B.T, "only the low-rank")
        fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W.T, "the low-rank update is missing")
        fails_with(check_lora_forward, lambda x, W, A, B, al: x @ W.T + (x @ A.T) @ B.T / al, "values differ")
        fails_with(check_lora_merge, lambda *a: lora_merge(*a, scale=False), "not scaled")
        fails_with(check_lora_merge, lambda *a: lora_merge(*a, in_place=True), "changed in place")
        fails_with(check_lora_merge, lambda *a: lora_merge(*a, transpose=True), "merged weight transposed")
        fails_with(check_lora_merge, lambda W, A, B, al: W + al * B @ A, "scaled by alpha;")
    fails_with(check_lora_forward, lambda *a: None, "expected a torch.Tensor")
