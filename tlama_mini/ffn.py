"""SwiGLU feed-forward network (Shazeer, 2020, "GLU Variants Improve Transformer"), as in Llama:

    FFN(x) = w2( silu(w1 x) * w3 x )      w1: gate, w3: up, w2: down

`swiglu` is the formula, written once; `FeedForward` only holds w1 w2 w3, and `moe.MoE` /
`moe.moe_loop` call `swiglu` with their experts' stacked weights.
Legend: `...` leading dims (B, T), E experts, C d_model, F hidden size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ffn_hidden_size
from .fuse import project
from .parallel import column_linear, row_linear


Projection = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _project(x: torch.Tensor, w: Projection) -> torch.Tensor:
    """x (..., in) times a weight in nn.Linear layout, (out, in) or stacked (E, out, in) matched
    with x (E, n, in); or a module that applies one (nn.Linear, LoRALinear, a tensor-parallel linear)."""
    if isinstance(w, torch.Tensor):
        if w.ndim < 2 or x.shape[-1] != w.shape[-1]:
            raise ValueError(f"swiglu: a weight of shape {tuple(w.shape)} does not fit an input of shape "
                             f"{tuple(x.shape)}; weights are (out, in) or stacked (E, out, in), in = x.shape[-1]")
        return x @ w.mT  # (..., out); bit-identical to F.linear for a 2-D weight
    return project(w, x)  # w(x); a plain nn.Linear during inference through fuse.linear (one row: all threads)


def swiglu(x: torch.Tensor, w1: Projection, w2: Projection, w3: Projection) -> torch.Tensor:
    """SwiGLU as a pure function: w2( silu(w1 x) * w3 x ), w1 the gate, w3 up, w2 down.

    x (..., C); w1, w3 (F, C) and w2 (C, F) in nn.Linear layout -> (..., C). With stacked expert
    weights w1, w3 (E, F, C) and w2 (E, C, F), x is (E, n, C): expert e's weights on row e.
    Each weight may also be a module that applies it, so `FeedForward` keeps working when LoRA
    wraps its linears or tensor parallelism shards them."""
    return _project(F.silu(_project(x, w1)) * _project(x, w3), w2)  # (..., F) inside


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
        """(..., C) -> (..., C). The linears are passed as modules, not weights: LoRA may wrap them
        (lora.apply_lora) and tensor parallelism shards them (parallel.py)."""
        return swiglu(x, self.w1, self.w2, self.w3)
