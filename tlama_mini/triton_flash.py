"""FlashAttention as fused Triton kernels: lesson 08's tiled algorithm, with each tile's matmuls,
mask, online softmax and rescaling done in one kernel, in registers, instead of many PyTorch ops that
each read and write memory (Dao et al. 2022; FlashAttention-2, Dao 2023; the kernels are in
`triton_kernels.py`).

    out = triton_flash_attention(q, k, v, causal=True)     # q (B, H, T, D), k, v (B, K, S, D) -> (B, H, T, D)

- Differentiable: the forward saves only the output and the log-sum-exp; the backward recomputes the
  probabilities tile by tile (FlashAttention-2's order: one kernel for dK and dV, one for dQ).
- GQA without copying kv heads: query head h reads kv head h // (H / K).
- Causal masking bottom-right aligned (query i sees keys 0..S-T+i), as everywhere in tlama_mini; any
  lengths (tiles past the end are masked); float32, bfloat16 and float16 inputs (float32 accumulation;
  float32 inputs use exact float32 matmuls, not TF32).
- In the model: `TlamaConfig(attn_backend="triton")`.

Where it runs: on CUDA tensors, compiled for the GPU. On a machine without CUDA, Triton's interpreter
runs the same kernels on CPU tensors with numpy (slow: keep sizes small). The switch,
TRITON_INTERPRET=1, must be set before triton is first imported (triton builds its own library
functions then); `load_kernels` sets it when there is no CUDA and triton is not imported yet, and
otherwise says what to do. Under the interpreter bfloat16 tiles are multiplied in float32, because
the interpreter's bf16 matmul is wrong (checked on triton 3.9: errors of 1e10).
Legend: B batch, H query heads, K kv heads, T queries, S keys, D head_dim.
"""
from __future__ import annotations

import math
import os
import sys
from types import ModuleType

import torch

from .flash import _check

INSTALL = "pip install triton  (Linux; on a machine without a GPU it runs under TRITON_INTERPRET=1)"
_KERNELS: ModuleType | None = None


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_kernels() -> ModuleType:
    """Import `triton_kernels` (once), with the interpreter on when there is no CUDA. Raises an
    ImportError that says how to install triton when it is missing."""
    global _KERNELS
    if _KERNELS is None:
        if not torch.cuda.is_available() and not interpreted():
            if "triton" in sys.modules:  # its own jit functions were built for a GPU: the interpreter cannot run them
                raise RuntimeError("no CUDA GPU, and triton was imported before TRITON_INTERPRET=1 was set, so its "
                                   "kernels cannot run on the CPU: set os.environ['TRITON_INTERPRET'] = '1' before "
                                   "anything imports triton (or run with TRITON_INTERPRET=1 in the environment)")
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            from . import triton_kernels
        except ImportError as err:
            raise ImportError(f"the triton attention backend needs the triton package ({err}): {INSTALL}") from None
        _KERNELS = triton_kernels
    return _KERNELS


def _config(q: torch.Tensor, block_m: int | None, block_n: int | None) -> dict:
    cuda = q.is_cuda
    if not cuda and not interpreted():
        raise RuntimeError("triton_flash_attention got CPU tensors but Triton's interpreter is off: set "
                           "TRITON_INTERPRET=1 before tlama_mini loads the kernels, or use CUDA tensors")
    if cuda and interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 is set but the tensors are on CUDA: the interpreter runs on CPU "
                           "tensors; unset TRITON_INTERPRET to compile the kernels for the GPU")
    block = 64 if cuda else 16
    bm, bn = block_m or block, block_n or block
    if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot's minimum), got {bm} and {bn}")
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": max(16, 1 << (q.shape[-1] - 1).bit_length()),
            "UPCAST": (not cuda) and q.dtype == torch.bfloat16,
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _strides(*tensors: torch.Tensor) -> list[int]:
    """(batch, head, position) strides of each (B, heads, length, D) tensor; D must be contiguous."""
    return [s for t in tensors for s in t.stride()[:3]]


def triton_forward(q, k, v, causal: bool, scale: float, block_m=None, block_n=None):
    """(out (B, H, T, D), lse2 (B, H, T) float32: the log-sum-exp in base 2 of the scaled scores)."""
    kern = load_kernels()
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = _config(q, block_m, block_n)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    grid = (math.ceil(T / cfg["BLOCK_M"]), B * H)
    kern.flash_fwd[grid](q, k, v, out, lse, scale, T, S, D, *_strides(q, k, v, out),
                         H=H, G=H // K, CAUSAL=causal, **cfg)
    return out, lse


def triton_backward(dout, q, k, v, out, lse, causal: bool, scale: float, block_m=None, block_n=None):
    """(dq, dk, dv) in the inputs' dtypes."""
    kern = load_kernels()
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    cfg = _config(q, block_m, block_n)
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, T): rowsum(dO * O)
    dq = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, K, S, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, K, S, D, dtype=v.dtype, device=v.device)
    strides = _strides(q, k, v, dout)
    kern.flash_bwd_dkdv[(math.ceil(S / cfg["BLOCK_N"]), B * K)](
        q, k, v, dout, lse, delta, dk, dv, scale, T, S, D, *strides, H=H, KH=K, G=H // K, CAUSAL=causal, **cfg)
    kern.flash_bwd_dq[(math.ceil(T / cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, scale, T, S, D, *strides, H=H, G=H // K, CAUSAL=causal, **cfg)
    return dq, dk, dv


class TritonFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_m, block_n):
        out, lse = triton_forward(q, k, v, causal, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (causal, scale, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_backward(dout, q, k, v, out, lse, *ctx.config)
        return dq, dk, dv, None, None, None, None


def triton_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
                           scale: float | None = None, block_m: int | None = None,
                           block_n: int | None = None) -> torch.Tensor:
    """Exact softmax attention by fused Triton kernels, with gradients. q (B, H, T, D); k, v (B, K, S, D),
    H a multiple of K; causal (default True, as `flash.flash_attention`) bottom-right aligned; scale defaults to 1/sqrt(D); block_m / block_n
    (query / key tile sizes, powers of two >= 16) default to 64 on CUDA and 16 under the interpreter.
    Returns (B, H, T, D) in q's dtype."""
    _check(q, k, v, causal)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype among float32, bfloat16, float16; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return TritonFlashAttention.apply(q, k, v, causal, scale, block_m, block_n)
