"""RMSNorm (Zhang & Sennrich, 2019): LayerNorm without the mean subtraction and without a bias.

    y = x / sqrt(mean(x**2) + eps) * weight

It is cheaper than LayerNorm and works as well in practice, so Llama, Qwen and Mistral use it.
Legend: `...` any leading dims, `C` the normalised dimension.
"""
from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, without a learned scale (Llama 4's QK-norm), computed in
    float32 and returned in x's dtype. (..., C) -> (..., C)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learnable scale `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim ({dim}) must be positive")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (C,)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), without the scale. Shape is unchanged."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C). Normalises in float32 for stability, then returns x's dtype."""
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm expects last dim {self.weight.shape[0]}, got input of shape {tuple(x.shape)}")
        return self._norm(x.float()).type_as(x) * self.weight
