"""Checks for lesson 11 (the PaLM parallel block and LoRA). Each check_<name>(fn) calls the learner's fn
on fresh random inputs, compares with tlama_mini (`palm.ParallelTransformerBlock`'s fused projection,
`rope.xpos_scale`, `lora.LoRALinear`) and names the mistake when it can.

Legend: B batch, T sequence length, H query heads, D head_dim, F feed-forward inner size,
I in_features, O out_features, r LoRA rank.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch

from ..lora import LoRALinear
from ..palm import ParallelTransformerBlock
from ..rope import xpos_scale as tlama_xpos_scale
from .common import check_tensor, fail, passed

__all__ = ["check_fused_split", "check_xpos_scale", "check_lora_forward", "check_lora_merge"]


def _tensors(name: str, out: object, n: int) -> tuple[torch.Tensor, ...]:
    if not isinstance(out, (tuple, list)) or len(out) != n or not all(isinstance(t, torch.Tensor) for t in out):
        fail(name, f"returned {type(out).__name__}, expected a tuple of {n} tensors", "did you forget a `return`?")
    return tuple(out)


# ---------------------------------------------------------------------------------------------- fused_split
def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, width) of each part of a split."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes))


def check_fused_split(fn: Callable[..., tuple]) -> None:
    """fn(fused, heads, dim_head, ff_inner) -> (q (B, H, T, D), k (B, T, D), v (B, T, D), ff (B, T, 2F)):
    the output of PaLM's one fused projection, cut in the block's order q | k | v | ff."""
    name = "fused_split"
    B, T, H, D = random.randint(1, 3), random.randint(3, 9), random.choice([2, 3, 4]), random.choice([4, 6, 8])
    dim = H * D
    block = ParallelTransformerBlock(dim, dim_head=D, heads=H, ff_mult=random.choice([2, 4]))
    F2 = block.fused_dims[-1]
    fused = torch.randn(B, T, sum(block.fused_dims))
    original = fused.clone()
    q, k, v, ff = fused.split(block.fused_dims, dim=-1)  # the block's own split
    want = (q.view(B, T, H, D).transpose(1, 2), k, v, ff)
    out = _tensors(name, fn(fused, H, D, F2 // 2), 4)
    if not torch.equal(fused, original):
        fail(name, "the input tensor was changed", "slice and reshape into new tensors; do not write into `fused`")
    labels = ("q", "k", "v", "ff")
    for label, got, expected in zip(labels, out, want):
        if got.shape != expected.shape:
            hint = {"q": "q is (B, H, T, D): view the first H * D features as (B, T, H, D), then move the heads "
                         "before the time axis",
                    "k": "k and v are one shared head each (multi-query attention): D features, (B, T, D)",
                    "v": "k and v are one shared head each (multi-query attention): D features, (B, T, D)",
                    "ff": "the feed-forward part is 2 * ff_inner wide: SwiGLU's value and gate halves"}[label]
            fail(name, f"{label} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}", hint)
    sections = dict(zip(labels, fused.split(block.fused_dims, dim=-1)))
    for label, got, expected in zip(labels, out, want):
        if torch.allclose(got, expected):
            continue
        if label == "q" and torch.allclose(got, sections["q"].view(B, T, D, H).permute(0, 3, 1, 2)):
            fail(name, "q's features are split as (D, H): feature j of head h must be column h * D + j",
                 "view(B, T, H, D), not view(B, T, D, H)")
        if label == "q" and torch.allclose(got, sections["q"].reshape(B, H, T, D)):
            fail(name, "q was reshaped straight to (B, H, T, D), which mixes time steps and heads",
                 "view(B, T, H, D) first, then .transpose(1, 2)")
        flat = got.transpose(1, 2).reshape(B, T, -1) if label == "q" else got  # back to (B, T, width)
        width, start = flat.shape[-1], dict(zip(labels, _spans(block.fused_dims)))[label][0]
        for off in range(fused.shape[-1] - width + 1):
            if off != start and torch.allclose(flat, fused[..., off:off + width]):
                fail(name, f"{label} was cut from features {off}..{off + width - 1} of the fused output, but "
                     f"{label} is features {start}..{start + width - 1}: the parts are taken in another order",
                     "the fused order is q (H * D) | k (D) | v (D) | ff (2 * ff_inner)")
        fail(name, f"{label} differs from the reference", "split at H * D, D, D, 2 * ff_inner, in that order")
    passed(name, f"B={B}, T={T}, H={H}, D={D}, ff_inner={F2 // 2}")


# ---------------------------------------------------------------------------------------------- xpos_scale
def check_xpos_scale(fn: Callable[[int, int, int], torch.Tensor]) -> None:
    """fn(seq_len, dim_head, scale_base) -> (T, D/2): zeta_i ** ((t - T // 2) / scale_base), with
    zeta_i = (2i / D + 0.4) / 1.4 (the factor queries are multiplied by; keys are divided)."""
    name = "xpos_scale"
    T, D, base = random.randint(6, 40), random.choice([8, 16, 32]), random.choice([8, 16, 512])
    want = tlama_xpos_scale(D, -(T // 2), T, base)[:, ::2]  # (T, D/2): one factor per rotated pair
    out = fn(T, D, base)
    i = torch.arange(0, D, 2, dtype=torch.float32)
    t = torch.arange(T, dtype=torch.float32)[:, None]

    def powered(zeta, power):
        return zeta[None, :] ** power

    centred = (t - T // 2) / base
    mistakes = {
        "positions are not centred: the power is t / scale_base; xPos (as PaLM writes it) uses "
        "(t - T // 2) / scale_base, so the factors stay near 1 at every length":
            powered((i / D + 0.4) / 1.4, t / base),
        "the power is not divided by scale_base: the decay is far too fast":
            powered((i / D + 0.4) / 1.4, t - T // 2),
        "this is the keys' factor (1 / scale): queries get zeta ** (+power)":
            powered((i / D + 0.4) / 1.4, -centred),
        "zeta uses i / D for i = 0, 1, ...; pair i covers features 2i and 2i + 1: zeta_i = (2i / D + 0.4) / 1.4":
            powered((i / 2 / D + 0.4) / 1.4, centred),
        "zeta is missing the offset gamma = 0.4: zeta_i = (2i / D + 0.4) / (1 + 0.4), so that even the "
        "first pair decays (2i / D alone is 0 there)": powered(i / D, centred),
        "zeta is not divided by 1.4 (1 + gamma): it must stay below 1": powered(i / D + 0.4, centred),
    }
    if isinstance(out, torch.Tensor) and out.shape == (T, D):
        fail(name, f"shape {(T, D)}: one factor per feature; return one per rotated pair, (T, D/2) = {(T, D // 2)}",
             "zeta has D/2 entries: torch.arange(0, D, 2)")
    check_tensor(name, out, want, atol=1e-6, rtol=1e-5, mistakes=mistakes,
                 hint="scale[t, i] = ((2i / D + 0.4) / 1.4) ** ((t - T // 2) / scale_base)")
    passed(name, f"T={T}, D={D}, scale_base={base}")


# ---------------------------------------------------------------------------------------------- lora
def _lora_case() -> tuple[LoRALinear, float]:
    I, O, r = random.randint(5, 12), random.randint(13, 20), random.randint(2, 4)  # O != I: transposes show
    alpha = random.choice([6.0, 8.0, 16.0])  # never r: alpha / r, r / alpha and 1 all differ
    layer = LoRALinear(torch.nn.Linear(I, O, bias=False), r=r, alpha=alpha)
    torch.nn.init.normal_(layer.lora_B)  # B starts at zero; a trained adapter has B != 0
    return layer, alpha


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """fn(x (..., I), W (O, I), A (r, I), B (O, r), alpha) -> x W^T + (alpha / r) (x A^T) B^T (..., O)."""
    name = "lora_forward"
    layer, alpha = _lora_case()
    W, A, B = (t.detach() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    r = A.shape[0]
    x = torch.randn(2, random.randint(2, 5), W.shape[1])
    args = [t.clone() for t in (x, W, A, B)]
    with torch.no_grad():
        want = layer(x)
    out = fn(*args, alpha)
    if not all(torch.equal(a, b) for a, b in zip(args, (x, W, A, B))):
        fail(name, "an input tensor was changed", "compute a new tensor; do not write into x, W, A or B")
    base, update = x @ W.T, (x @ A.T) @ B.T
    check_tensor(name, out, want, mistakes={
        "the low-rank update is not scaled: multiply it by alpha / r": base + update,
        "the update is scaled by alpha; the scale is alpha / r": base + alpha * update,
        "the update is scaled by r / alpha; the scale is alpha / r": base + (r / alpha) * update,
        "only the low-rank update is returned: add the frozen layer's output x W^T": (alpha / r) * update,
        "the low-rank update is missing: this is only the frozen layer's x W^T": base,
        "the frozen layer's output x W^T is added twice": 2 * base + (alpha / r) * update,
    }, hint="y = x @ W.T + (alpha / r) * (x @ A.T) @ B.T")
    passed(name, f"I={W.shape[1]}, O={W.shape[0]}, r={r}, alpha={alpha:g}")


def check_lora_merge(fn: Callable[..., torch.Tensor]) -> None:
    """fn(W (O, I), A (r, I), B (O, r), alpha) -> the merged weight W + (alpha / r) B A (O, I), a new
    tensor (W unchanged), so that x @ merged.T equals the adapted layer's output."""
    name = "lora_merge"
    layer, alpha = _lora_case()
    W, A, B = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    r = A.shape[0]
    want = layer.weight.detach()
    W_in = W.clone()
    out = fn(W_in, A.clone(), B.clone(), alpha)
    if not torch.equal(W_in, W):
        fail(name, "W was changed in place (W += ... or W.add_): the frozen base weight must stay as it is",
             "return W + scale * (B @ A), a new tensor")
    if isinstance(out, torch.Tensor) and out.shape == want.T.shape and out.shape != want.shape:
        fail(name, f"shape {tuple(out.shape)}: this is the merged weight transposed; nn.Linear stores (O, I)",
             "W is (O, I), B @ A is (O, r) @ (r, I) = (O, I)")
    check_tensor(name, out, want, mistakes={
        "the update is not scaled: W + (alpha / r) * B @ A": W + B @ A,
        "the update is scaled by alpha; the scale is alpha / r": W + alpha * (B @ A),
        "the update is scaled by r / alpha; the scale is alpha / r": W + (r / alpha) * (B @ A),
        "only the update is returned: add W": (alpha / r) * (B @ A),
    }, hint="merged = W + (alpha / r) * (B @ A)")
    x = torch.randn(3, W.shape[1])
    with torch.no_grad():
        diff = (x @ out.T - layer(x)).abs().max().item()
    passed(name, f"x @ merged.T equals the adapted layer within {diff:.1e}")
