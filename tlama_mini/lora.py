"""LoRA finetuning (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W (O, I) is adapted by a low-rank update. The one formula of this package:

    y = x W^T + (alpha / r) (x A^T) B^T          A (r, I) random, B (O, r) zero at the start
    merged weight:  W + (alpha / r) B A          (O, I), an ordinary matrix again

B = 0 at the start, so the adapted model begins exactly equal to the base model, and only
r (I + O) numbers per matrix train. The one alpha rule: alpha = 2 r when it is not given
(`resolve_alpha`), so the scale alpha / r is 2 at every rank and a learning rate found at one rank
carries over to another (the paper fixes alpha and lets the scale fall as r grows; both are common).
`lora_delta` and `lora_delta_weight` are the formula as pure functions, `init_lora_A` the one
initialisation of A; both adapter classes below call them, so they compute the same thing:

- `LoRALinear` wraps an `nn.Linear` (W) with `lora_A` (r, I) and `lora_B` (O, r): the layout and names
  of Hugging Face PEFT. `apply_lora` puts these on a model, `merge_lora` folds them into W; the command
  line's `train --lora-rank` uses them (finetune.py).
- `LoRA(dim, dim_out)` is the update on its own, added beside a layer: seed 000's "finetune modules" of
  `palm.ParallelTransformerBlock`. It stores the same two matrices transposed, A (I, r) and B (r, O)
  (x @ A @ B), because that is palm-rlhf-pytorch's layout and its checkpoints must load (keys `A`, `B`).
  Only the storage differs: `LoRA.A` is `LoRALinear.lora_A` transposed, `LoRA.B` is `lora_B` transposed.
  One difference from that reference: it defaults to alpha = r (scale 1); here the rule above holds
  (scale 2), so pass `alpha=r` to reproduce the reference's outputs from its weights.

Legend: `...` leading dims, I in_features, O out_features, r rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ALPHA_PER_RANK = 2.0  # alpha = 2 r when not given: the scale alpha / r is 2 at every rank


def resolve_alpha(r: int, alpha: float | None = None) -> float:
    """The one alpha rule: `alpha` itself, or 2 * r when it is None. Checks both are positive."""
    if not r > 0 or int(r) != r:
        raise ValueError(f"LoRA rank r ({r}) must be a positive integer")
    alpha = DEFAULT_ALPHA_PER_RANK * r if alpha is None else float(alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha ({alpha}) must be positive (leave it out for alpha = 2 * r = {2 * r})")
    return alpha


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The update added to a layer's output: scale * (x A^T) B^T, (..., I) -> (..., O), with A (r, I)
    and B (O, r). Two thin matmuls through (..., r); the (O, I) matrix B A is never built."""
    return scale * F.linear(F.linear(x, A), B)  # (..., r) -> (..., O)


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The same update as one matrix, scale * B A (O, I), for merging into W."""
    return scale * (B @ A)


def init_lora_A(A: torch.Tensor) -> torch.Tensor:
    """Initialise A (r, I) in place as `nn.Linear` initialises a weight (uniform in +-1/sqrt(I)); the
    transposed view of palm's A (I, r) works too (the writes go through)."""
    return nn.init.kaiming_uniform_(A, a=math.sqrt(5))


class LoRA(nn.Module):
    """A low-rank update on its own, palm-rlhf-pytorch's layout: x (..., dim) -> lora_delta (..., dim_out)
    with A (dim, r) and B (r, dim_out) stored transposed (see the module docstring). B starts at zero,
    so the adapted block starts equal to the base one."""

    def __init__(self, dim: int, dim_out: int, r: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        if min(dim, dim_out) <= 0:
            raise ValueError(f"LoRA sizes must be positive: dim={dim}, dim_out={dim_out}, r={r}")
        self.alpha = resolve_alpha(r, alpha)
        self.dim, self.dim_out, self.r, self.scale = dim, dim_out, r, self.alpha / r
        self.A = nn.Parameter(torch.empty(dim, r))  # (I, r) = lora_A^T
        init_lora_A(self.A.T)
        self.B = nn.Parameter(torch.zeros(r, dim_out))  # (r, O) = lora_B^T

    @property
    def weight(self) -> torch.Tensor:
        """The update as one (dim, dim_out) matrix, the reference's `x @ weight` layout."""
        return lora_delta_weight(self.A.T, self.B.T, self.scale).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim_out)."""
        return lora_delta(x, self.A.T, self.B.T, self.scale)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: (..., I) -> (..., O)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.alpha = resolve_alpha(r, alpha)
        self.base = base.requires_grad_(False)
        self.r, self.scale = r, self.alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(init_lora_A(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype)))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + scale * B A (O, I)."""
        return self.base.weight + lora_delta_weight(self.lora_A, self.lora_B, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., I) -> (..., O)."""
        return self.base(x) + lora_delta(self.dropout(x), self.lora_A, self.lora_B, self.scale)


def apply_lora(model: nn.Module, targets: tuple[str, ...] = ("Wq", "Wk", "Wv", "Wo"), r: int = 8,
               alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """Wrap every `nn.Linear` whose attribute name is in `targets` with a LoRALinear (alpha None: 2 r)
    and freeze all other parameters. Returns the model (changed in place)."""
    alpha = resolve_alpha(r, alpha)  # before any change to the model
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
    """The trainable adapter parameters of `apply_lora`, for the optimizer."""
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
