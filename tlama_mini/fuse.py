"""Fused projections for inference: one matrix product where the model has several on the same input.

Attention multiplies its input by Wq, Wk and Wv, and the SwiGLU FFN by w1 (gate) and w3 (up). At batch 1
each product is a matrix-vector product that streams its weight once; fusing turns SmolLM2's 211 products
per token (7 per block, 30 blocks, and the LM head) into 121, each paying its call once: the fusion saves
overhead, not bandwidth (every token still reads all 513 MiB of fp32 weights). `linear` is the other half:
it spreads each one-row product over the CPU's threads (see there).

`fuse_projections(model)` moves each group's weights into one matrix (Wq, Wk, Wv; w1, w3), stored
transposed (`stack_linears`), and makes the original parameters *views* of its blocks: names,
values, shapes and the state_dict are unchanged, no memory is added, and training (which updates each
parameter in place) keeps them fused. `fused_weight` then finds the stacked matrix from the
parameters themselves, so inference runs one product per group and splits the result:

    x @ [Wq; Wk; Wv]^T = [x Wq^T, x Wk^T, x Wv^T]          (B, T, C) -> (B, T, (H + 2K) D)

Anything that breaks the layout (moving the model to another device or dtype, which copies each
parameter separately; LoRA wrapping a linear; tensor-parallel shards) makes `fused_weight` return None
and the layers use their separate products again: the fusion is an optimisation, never a requirement.
Products are only fused without autograd (generation, `torch.no_grad`), where nothing needs the
separate weights' graphs.
Legend: C d_model, H heads, K kv heads, D head_dim, F FFN hidden size.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _plain(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _plain_weight(m: nn.Module) -> torch.Tensor | None:
    """The weight of a plain bias-free nn.Linear, else None. Read from the parameter dict directly:
    this runs several times per layer at every decoding step, where each attribute lookup counts."""
    if type(m) is not nn.Linear:
        return None
    params = m._parameters
    return params["weight"] if params["bias"] is None else None


def fused_weight(*linears: nn.Module) -> torch.Tensor | None:
    """The (sum of out_features, in_features) weight that applies these bias-free nn.Linear layers at
    once, when `stack_linears` stored them as column blocks of one matrix; otherwise None. It is a view,
    transposed in memory like each of them (strides (1, sum of out_features))."""
    ws = []
    for m in linears:
        w = _plain_weight(m)
        if w is None:
            return None
        ws.append(w)
    first = ws[0]
    C, dtype, storage = first.shape[1], first.dtype, first.untyped_storage().data_ptr()
    total = sum(w.shape[0] for w in ws)
    at = first.data_ptr()
    for w in ws:
        if (w.data_ptr() != at or w.stride() != (1, total) or w.shape[1] != C or w.dtype != dtype
                or w.untyped_storage().data_ptr() != storage):
            return None
        at += w.shape[0] * w.element_size()  # the next block starts where this one's columns end
    return first.as_strided((total, C), (1, total))  # (sum out, in), no copy


# Partial products are rounded to the output's dtype before they are added: harmless in float32 (~1e-7),
# not in bfloat16 or float16 (8 or 11 bits), where F.linear's single rounding is kept (for both routes,
# so a half-precision model takes one path whatever its layout).
_SPLIT_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=256)
def _slices(threads: int, n: int) -> int:
    """How many parts `linear` cuts a dimension of length n into: the most, up to one per thread, that
    divide n evenly (576 with 7 threads: 6)."""
    return next(p for p in range(min(threads, n), 0, -1) if n % p == 0)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T, as F.linear(x, w) (no bias): x (..., in), w (out, in) -> (..., out). For inference.

    One row on a CPU with several threads (batch-1 decoding) takes another route to the same products.
    On the 2-core CPU measured here MKL's matrix-vector product gains little or nothing from the second
    thread: the weight streams from memory at about one core's speed. So the weight is cut into P
    parts (one per thread, P dividing the cut dimension), each part a view, nothing copied, and one
    `torch.bmm` multiplies x by every part, each on its own thread:

    - w stored as nn.Linear keeps it, (out, in) row-major: P blocks of rows, each a contiguous block of
      memory; their outputs are P consecutive pieces of the result, nothing to add:

        x w^T = [x w[rows of block 1]^T, ..., x w[rows of block P]^T]        (P, 1, out/P) -> (1, out)

    - w stored transposed (w^T contiguous: `stack_linears`, the LM head): P slices of the reduction, each
      a contiguous block of w^T's rows; the P partial rows are added:

        x w^T = sum over p of x[p-th slice] (w^T)[p-th slice of rows]        (P, 1, out) -> (1, out)

    Measured with 2 threads (benchmarks/bench_matvec.py, RESULTS.md), the 121 products of a SmolLM2
    decoding step, stored transposed: 22.4 ms instead of F.linear's 29.7 (22.4 instead of 16.9 GiB/s;
    a plain read of the same bytes: 29.4 GiB/s). Round-off: the sum of slices adds in another order
    than MKL (about 1e-6 of the largest output); a block of rows computes each output as F.linear does,
    up to the kernel's order. Anything else (several rows, gradients, other devices, half precision,
    other layouts) is F.linear."""
    K = x.shape[-1]
    if (x.numel() != K or x.device.type != "cpu" or x.dtype not in _SPLIT_DTYPES or w.dim() != 2
            or w.shape[1] != K or torch.is_grad_enabled()):
        return F.linear(x, w)
    N, threads = w.shape[0], torch.get_num_threads()
    if w.stride() == (K, 1) and (P := _slices(threads, N)) > 1:  # row-major: blocks of output rows
        out = torch.bmm(x.reshape(1, 1, K).expand(P, 1, K), w.view(P, N // P, K).transpose(1, 2))  # (P, 1, N/P)
        return out.view(*x.shape[:-1], N)
    if w.stride() == (1, N) and (P := _slices(threads, K)) > 1:  # transposed: slices of the reduction
        # (P, 1, K/P) @ (P, K/P, N) -> (P, 1, N) partial products; w^T's rows cut into P views
        parts = torch.bmm(x.reshape(P, 1, K // P), w.as_strided((P, K // P, N), (K // P * N, N, 1)))
        return parts.sum(0).view(*x.shape[:-1], N)
    return F.linear(x, w)


def project(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for a layer of the model; a plain bias-free nn.Linear goes through `linear` when no
    gradients are recorded (a LoRA-wrapped or tensor-parallel layer is always called as itself)."""
    w = None if torch.is_grad_enabled() else _plain_weight(m)
    return m(x) if w is None else linear(x, w)


def stack_linears(*linears: nn.Module) -> bool:
    """Store the weights of these bias-free nn.Linear layers (same in_features, device, dtype) as the
    column blocks of one new (in_features, sum of out_features) matrix; each layer's weight becomes a
    Parameter viewing its block, transposed: the same values and shape, strides (1, sum of out).
    Returns False (and changes nothing) when they are not plain nn.Linear layers.

    Why transposed: a batch-1 product x W^T reads W once, and on CPU (MKL) it streams W about 1.25x
    faster when W^T is the contiguous one (measured; the LM head is kept that way too, see model.py)."""
    if not all(_plain(m) for m in linears):
        return False
    ws = [m.weight for m in linears]
    if len({(w.shape[1], w.device, w.dtype) for w in ws}) != 1:
        return False
    with torch.no_grad():
        stacked = torch.cat([w.detach() for w in ws]).t().contiguous()  # (in, sum out)
    start = 0
    for m, w in zip(linears, ws):
        n = w.shape[0]
        m.weight = nn.Parameter(stacked[:, start:start + n].t(), requires_grad=w.requires_grad)  # (n, in)
        start += n
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse Wq/Wk/Wv of every attention layer and w1/w3 of every dense FFN of a `Transformer`, and
    store Wo and w2 transposed too (see the module docstring). Returns how many layers' weights were
    restored this way. Values, shapes and state_dict are unchanged."""
    def linears(m: nn.Module, *names: str) -> bool:  # an Attention (Wq Wk Wv Wo) or a dense FeedForward (w1 w2 w3)
        return all(isinstance(getattr(m, n, None), nn.Linear) for n in names)
    n = 0
    for m in model.modules():  # by their linears' names, so this module imports neither layer
        if linears(m, "Wq", "Wk", "Wv", "Wo"):
            n += stack_linears(m.Wq, m.Wk, m.Wv) + stack_linears(m.Wo)
        elif linears(m, "w1", "w2", "w3"):
            n += stack_linears(m.w1, m.w3) + stack_linears(m.w2)
    return n
