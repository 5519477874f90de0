"""RMSNorm (Zhang & Sennrich, 2019): LayerNorm without the mean subtraction and without a bias.

    y = x / sqrt(mean(x**2) + eps) * weight

It is cheaper than LayerNorm and works as well in practice, so Llama, Qwen and Mistral use it.
Legend: `...` any leading dims, `C` the normalised dimension.
"""
from __future__ import annotations

import torch
from torch import nn


def _divide_by_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., C) / (..., 1)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, without a learned scale (Llama 4's QK-norm), computed in
    float32 and returned in x's dtype. (..., C) -> (..., C)."""
    return _divide_by_rms(x.float(), eps).type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as a pure function: x / sqrt(mean(x**2) + eps) * weight over the last dimension.
    x (..., C), weight (C,) -> (..., C). The normalisation runs in float32 (a bf16 mean of squares
    loses the small values), the result comes back in x's dtype before the scale, as in Llama."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"RMSNorm expects last dim {weight.shape[-1]} (its weight's size), got input of "
                         f"shape {tuple(x.shape)}")
    if x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled():  # inference in float32:
        # the same operations in the same order, the temporaries reused in place (fewer allocations per step)
        return torch.mul(x, torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))).mul_(weight)
    return rms_normalize(x, eps) * weight


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learnable scale `weight`.
    The module only holds `weight` and `eps`; the maths is `rms_norm`.

    eps defaults to 1e-6 (seed 001's RMSNorm and Llama 2's code), while `TlamaConfig.norm_eps`
    defaults to 1e-5 (seed 001's config examples, Llama 2's released params): every norm the model
    builds passes config.norm_eps, so the module default matters only for an RMSNorm made by hand."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim ({dim}) must be positive")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (C,)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), without the scale, in x's dtype (seed 001's method). Shape is unchanged."""
        return _divide_by_rms(x, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return rms_norm(x, self.weight, self.eps)
