"""LoRA finetuning (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W (out, in) is adapted by a low-rank update:  y = W x + (alpha / r) * B (A x),
with A (r, in) random and B (out, r) zero at the start, so the adapted model begins exactly equal
to the base model and only r * (in + out) numbers per matrix are trained. After training,
`merge_lora` folds B A into W and the model is an ordinary `Transformer` again.

`LoRA(dim, dim_out)` is the adapter on its own (an update added beside a layer: seed 000's "finetune
modules" of `palm.ParallelTransformerBlock`); `LoRALinear` wraps an `nn.Linear` with one.
`apply_lora(model)` puts adapters on the attention projections Wq Wk Wv Wo (the "finetune modules"
of seed 000) or on any linears named in `targets`, and freezes everything else.
Legend: `...` leading dims, I in_features, O out_features, r rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRA(nn.Module):
    """A low-rank update usable as a fine-tune module: x (..., dim) -> (alpha / r) * x A B (..., dim_out).
    A (dim, r) is random and B (r, dim_out) zero, so the adapted block starts equal to the base one.
    Parameter names A and B as in palm-rlhf-pytorch's LoRA."""

    def __init__(self, dim: int, dim_out: int, r: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        if min(dim, dim_out, r) <= 0:
            raise ValueError(f"LoRA sizes must be positive: dim={dim}, dim_out={dim_out}, r={r}")
        self.dim, self.dim_out, self.r = dim, dim_out, r
        self.scale = (r if alpha is None else alpha) / r
        self.A = nn.Parameter(torch.randn(dim, r) / math.sqrt(dim))
        self.B = nn.Parameter(torch.zeros(r, dim_out))

    @property
    def weight(self) -> torch.Tensor:
        """The update as one (dim, dim_out) matrix, for merging."""
        return (self.A @ self.B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A) @ self.B * self.scale


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r ({r}) must be a positive integer")
        self.base = base.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + scale * B A (O, I)."""
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., I) -> (..., O)."""
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., r) inside


def apply_lora(model: nn.Module, targets: tuple[str, ...] = ("Wq", "Wk", "Wv", "Wo"), r: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Wrap every `nn.Linear` whose attribute name is in `targets` with a LoRALinear and freeze all
    other parameters. Returns the model (changed in place)."""
    model.requires_grad_(False)
    found = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                found += 1
    if not found:
        raise ValueError(f"no nn.Linear named any of {targets} in the model; LoRA targets are attribute names "
                         "such as 'Wq', 'Wv', 'w1', 'w2', 'w3'")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.weight)
                setattr(module, name, child.base.requires_grad_(True))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, for the optimizer."""
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
