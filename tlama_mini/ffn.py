"""SwiGLU feed-forward network (Shazeer, 2020, "GLU Variants Improve Transformer"), as in Llama:

    FFN(x) = w2( silu(w1 x) * w3 x )      w1: gate, w3: up, w2: down

Legend: `...` leading dims (B, T), C d_model, F hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ffn_hidden_size
from .parallel import column_linear, row_linear


class FeedForward(nn.Module):
    """SwiGLU MLP. `hidden_dim` goes through the seed's sizing rule (2/3, multiplier, round up to
    `multiple_of`) unless `exact=True`, in which case it is the hidden size itself."""

    def __init__(self, d_model: int, hidden_dim: int, multiple_of: int = 256,
                 ffn_dim_multiplier: float | None = None, use_parallel: bool = True, *,
                 exact: bool = False) -> None:
        super().__init__()
        if d_model <= 0 or hidden_dim <= 0 or multiple_of <= 0:
            raise ValueError(f"FeedForward sizes must be positive: d_model={d_model}, "
                             f"hidden_dim={hidden_dim}, multiple_of={multiple_of}")
        hidden = hidden_dim if exact else ffn_hidden_size(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.hidden_dim = hidden
        self.w1 = column_linear(d_model, hidden, use_parallel)  # gate
        self.w2 = row_linear(hidden, d_model, use_parallel)     # down
        self.w3 = column_linear(d_model, hidden, use_parallel)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., F) inside
