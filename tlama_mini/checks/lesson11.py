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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..lora import LoRALinear
from ..palm import ParallelTransformerBlock
from ..rope import xpos_scale as tlama_xpos_scale
from .common import call, check_tensor, fail, passed

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
    B, H, D = random.randint(1, 3), random.choice([2, 3, 4]), random.choice([4, 6, 8])
    T = random.choice([t for t in range(3, 10) if t != H])  # T != H: a q left as (B, T, H, D) has the wrong shape
    dim = H * D
    block = ParallelTransformerBlock(dim, dim_head=D, heads=H, ff_mult=random.choice([2, 4]))
    F2 = block.fused_dims[-1]
    fused = torch.randn(B, T, sum(block.fused_dims))
    original = fused.clone()
    q, k, v, ff = fused.split(block.fused_dims, dim=-1)  # the block's own split
    want = (q.view(B, T, H, D).transpose(1, 2), k, v, ff)
    out = _tensors(name, call(name, fn, fused, H, D, F2 // 2,
                              hint=f"the four parts are H * D = {H * D}, D = {D}, D = {D} and 2 * ff_inner = {F2} "
                                   f"features wide, in that order: together fused.shape[-1] = {fused.shape[-1]}"), 4)
    if not torch.equal(fused, original):
        fail(name, "the input tensor was changed", "slice and reshape into new tensors; do not write into `fused`")
    labels = ("q", "k", "v", "ff")
    for label, got, expected in zip(labels, out, want):
        if got.shape != expected.shape:
            if label == "q" and got.shape == (B, T, H, D):
                fail(name, f"q has shape {tuple(got.shape)} = (B, T, H, D): the heads were not moved before the "
                     "time axis", "view(B, T, H, D), then .transpose(1, 2) to (B, H, T, D)")
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
        if label == "q" and torch.allclose(got, sections["q"].reshape(B, H, T, D)):  # T != H: not the right q
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
def _check_xpos_once(name: str, fn: Callable[[int, int, int], torch.Tensor], T: int, D: int, base: int) -> None:
    want = tlama_xpos_scale(D, -(T // 2), T, base)[:, ::2]  # (T, D/2): one factor per rotated pair
    out = call(name, fn, T, D, base, hint="scale[t, i] = ((2i / D + 0.4) / 1.4) ** ((t - T // 2) / scale_base) "
                                          "for t in range(T) and i in range(D // 2)")
    i = torch.arange(0, D, 2, dtype=torch.float32)
    t = torch.arange(T, dtype=torch.float32)[:, None]
    zeta = (i / D + 0.4) / 1.4

    def powered(z, power):
        return z[None, :] ** power

    centred = (t - T // 2) / base
    mistakes = {
        "positions are not centred: the power is t / scale_base; xPos (as PaLM writes it) uses "
        "(t - T // 2) / scale_base, so the factors stay near 1 at every length": powered(zeta, t / base),
        f"positions are centred on T / 2 = {T / 2:g} (true division); the centre is the whole position "
        f"T // 2 = {T // 2}": powered(zeta, (t - T / 2) / base),
        "positions are shifted by one: the power is (t - T // 2 + 1) / scale_base, as with (T - 1) // 2 as the "
        "centre or positions counted from 1; t runs 0 .. T - 1 and the centre is T // 2":
            powered(zeta, (t - T // 2 + 1) / base),
        "the power was floor-divided by scale_base (//): use true division, the power is fractional":
            powered(zeta, torch.div(t - T // 2, base, rounding_mode="floor")),
        "the power is not divided by scale_base: the decay is far too fast": powered(zeta, t - T // 2),
        "this is the keys' factor (1 / scale): queries get zeta ** (+power)": powered(zeta, -centred),
        "zeta uses i / D for i = 0, 1, ...; pair i covers features 2i and 2i + 1: zeta_i = (2i / D + 0.4) / 1.4":
            powered((i / 2 / D + 0.4) / 1.4, centred),
        "zeta is missing the offset gamma = 0.4: zeta_i = (2i / D + 0.4) / (1 + 0.4), so that even the "
        "first pair decays (2i / D alone is 0 there)": powered(i / D, centred),
        "zeta is not divided by 1.4 (1 + gamma): it must stay below 1": powered(i / D + 0.4, centred),
    }
    if isinstance(out, torch.Tensor) and out.shape == (T, D):
        fail(name, f"shape {(T, D)}: one factor per feature; return one per rotated pair, (T, D/2) = {(T, D // 2)}",
             "zeta has D/2 entries: torch.arange(0, D, 2)")
    if isinstance(out, torch.Tensor) and out.shape == (D // 2, T):  # T != D // 2 in every draw
        fail(name, f"shape {(D // 2, T)} = (D/2, T): the result is transposed; rows are positions, (T, D/2)",
             "zeta[None, :] ** power[:, None] is (T, D/2)")
    check_tensor(name, out, want, atol=1e-6, rtol=1e-5, mistakes=mistakes,
                 hint="scale[t, i] = ((2i / D + 0.4) / 1.4) ** ((t - T // 2) / scale_base)")


def check_xpos_scale(fn: Callable[[int, int, int], torch.Tensor]) -> None:
    """fn(seq_len, dim_head, scale_base) -> (T, D/2): zeta_i ** ((t - T // 2) / scale_base), with
    zeta_i = (2i / D + 0.4) / 1.4 (the factor queries are multiplied by; keys are divided).
    Two calls, an odd length and an even one: T / 2 differs from T // 2 only when T is odd, and (T - 1) // 2
    only when T is even."""
    name = "xpos_scale"
    D = random.choice([8, 16, 32])
    lengths = [random.choice([t for t in range(first, 41, 2) if t != D // 2]) for first in (7, 6)]
    bases = [random.choice([8, 16, 512]), random.choice([10, 24, 100])]  # the lesson's 512, and others
    for T, base in zip(lengths, bases):
        _check_xpos_once(name, fn, T, D, base)
    passed(name, f"T={lengths[0]} and {lengths[1]}, D={D}, scale_base={bases[0]} and {bases[1]}")


# ---------------------------------------------------------------------------------------------- lora
def _lora_case() -> tuple[LoRALinear, float]:
    """A layer whose sizes and alpha keep every scale a mistake could use apart: alpha / r, 1, alpha, r / alpha,
    alpha / O and alpha / I (the rank read from another dimension) and alpha // r all differ."""
    while True:
        I, O, r = random.randint(5, 12), random.randint(13, 20), random.randint(2, 4)  # O != I: transposes show
        alpha = float(random.choice([5, 6, 7, 8, 10, 12, 16]))
        scales = [alpha / r, 1.0, alpha, r / alpha, alpha / O, alpha / I, alpha // r]
        if all(abs(a - b) > 1e-3 for j, a in enumerate(scales) for b in scales[:j]):
            break
    layer = LoRALinear(torch.nn.Linear(I, O, bias=False), r=r, alpha=alpha)
    torch.nn.init.normal_(layer.lora_B)  # B starts at zero; a trained adapter has B != 0
    return layer, alpha


def _scale_mistakes(r: int, alpha: float, O: int, I: int, with_scale: Callable[[float], torch.Tensor],
                    what: str) -> dict[str, torch.Tensor]:
    return {
        f"the {what} is not scaled: multiply it by alpha / r": with_scale(1.0),
        f"the {what} is scaled by alpha; the scale is alpha / r": with_scale(alpha),
        f"the {what} is scaled by r / alpha; the scale is alpha / r": with_scale(r / alpha),
        f"the rank r was read from the wrong dimension (B.shape[0] = O = {O}): r = A.shape[0], A is (r, I)":
            with_scale(alpha / O),
        f"the rank r was read from the wrong dimension (A.shape[1] = I = {I}): r = A.shape[0], A is (r, I)":
            with_scale(alpha / I),
        "the scale alpha // r was floor-divided: use alpha / r": with_scale(alpha // r),
    }


class _BigMatrices(TorchDispatchMode):
    """Watches every tensor the ops inside produce and keeps those of shape (O, I) or (I, O) (ignoring sizes of 1)
    that are not the frozen weight W itself (W.T is a view of W, not a new matrix)."""

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.W, self.found = W, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        O, I = self.W.shape
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            dims = tuple(s for s in t.shape if s != 1)
            if dims in ((O, I), (I, O)):
                m = t.detach().reshape(dims)
                if not torch.equal(m, self.W if dims == (O, I) else self.W.T):
                    self.found.append(func)
        return out


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """fn(x (..., I), W (O, I), A (r, I), B (O, r), alpha) -> x W^T + (alpha / r) (x A^T) B^T (..., O), with two
    thin matmuls: no (O, I) matrix (the update B A, or W plus it) may be built."""
    name = "lora_forward"
    layer, alpha = _lora_case()
    W, A, B = (t.detach() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    r, (O, I) = A.shape[0], W.shape
    n = random.choice([n for n in range(2, 6) if not {n, 2 * n} & {O, I}])  # no (n, O) or (2n, O) is (I, O)
    x = torch.randn(2, n, I)  # a leading shape of two dimensions
    args = [t.clone() for t in (x, W, A, B)]
    with torch.no_grad():
        want = layer(x)
    watch = _BigMatrices(W)
    with watch:
        out = call(name, fn, *args, alpha, hint="x is (..., I), W (O, I), A (r, I), B (O, r): x @ W.T is (..., O), "
                   "x @ A.T is (..., r), and (x @ A.T) @ B.T is (..., O); x may have any number of leading dimensions")
    if not all(torch.equal(a, b) for a, b in zip(args, (x, W, A, B))):
        fail(name, "an input tensor was changed", "compute a new tensor; do not write into x, W, A or B")
    base, update = x @ W.T, (x @ A.T) @ B.T
    mistakes = _scale_mistakes(r, alpha, O, I, lambda s: base + s * update, "low-rank update")
    mistakes |= {
        "only the low-rank update is returned: add the frozen layer's output x W^T": (alpha / r) * update,
        "the low-rank update is missing: this is only the frozen layer's x W^T": base,
        "the frozen layer's output x W^T is added twice": 2 * base + (alpha / r) * update,
    }
    check_tensor(name, out, want, mistakes=mistakes, hint="y = x @ W.T + (alpha / r) * (x @ A.T) @ B.T")
    if watch.found:
        fail(name, f"the values are right, but an {(O, I)} = (O, I) matrix was built (by {watch.found[0]}): the "
             "update B A, or W plus it. The exercise asks for two thin matmuls that never hold O * I numbers",
             "(x @ A.T) is (..., r); then @ B.T gives (..., O). Add it to x @ W.T")
    passed(name, f"I={I}, O={O}, r={r}, alpha={alpha:g}, no (O, I) matrix built")


def check_lora_merge(fn: Callable[..., torch.Tensor]) -> None:
    """fn(W (O, I), A (r, I), B (O, r), alpha) -> the merged weight W + (alpha / r) B A (O, I), a new
    tensor (W unchanged), so that x @ merged.T equals the adapted layer's output."""
    name = "lora_merge"
    layer, alpha = _lora_case()
    W, A, B = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    r, (O, I) = A.shape[0], W.shape
    want = layer.weight.detach()
    W_in = W.clone()
    out = call(name, fn, W_in, A.clone(), B.clone(), alpha,
               hint="W is (O, I), A (r, I), B (O, r): B @ A is (O, r) @ (r, I) = (O, I), the shape of W")
    if not torch.equal(W_in, W):
        fail(name, "W was changed in place (W += ... or W.add_): the frozen base weight must stay as it is",
             "return W + scale * (B @ A), a new tensor")
    if isinstance(out, torch.Tensor) and out.shape == want.T.shape and out.shape != want.shape:
        fail(name, f"shape {tuple(out.shape)}: this is the merged weight transposed; nn.Linear stores (O, I)",
             "W is (O, I), B @ A is (O, r) @ (r, I) = (O, I)")
    mistakes = _scale_mistakes(r, alpha, O, I, lambda s: W + s * (B @ A), "update")
    mistakes |= {
        "only the update is returned: add W": (alpha / r) * (B @ A),
        "the update is missing: this is W itself": W,
    }
    check_tensor(name, out, want, mistakes=mistakes, hint="merged = W + (alpha / r) * (B @ A)")
    x = torch.randn(3, I)
    with torch.no_grad():
        diff = (x @ out.T - layer(x)).abs().max().item()
    passed(name, f"x @ merged.T equals the adapted layer within {diff:.1e}")
