"""Muon: momentum, orthogonalized by Newton-Schulz (K. Jordan et al., 2024), for the hidden matrices.

For a weight matrix W (out, in) with gradient G, Muon keeps a momentum buffer M = mu M + G and steps
along the *orthogonalized* direction O = U V^T of the (Nesterov) momentum U S V^T: every singular value
set to 1. Rare directions in the gradient get the same step size as the dominant ones, which makes a
step count for more than an AdamW step of the same cost. O is approximated without an SVD by five
iterations of a quintic polynomial p(x) = a x + b x^3 + c x^5 applied to the singular values:

    X <- G / ||G||_F                  (all singular values now <= 1)
    X <- a X + (b A + c A^2) X,  A = X X^T        (five times)

The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) push the singular values in (0, 1] into roughly
[0.7, 1.2] within five steps (all but the very smallest), which is close enough to 1 for training. The step is scaled by sqrt(max(1, out / in)).

Muon is only for 2-D weights inside the blocks. Embeddings, the LM head and vectors (norm gains) are
updated by AdamW within the same optimizer (`param_groups` with "muon": False), as in the reference
recipe. Each group's learning rate is `lr_ratio` times the schedule's: Muon's is larger (5x in the
trainer's CPU preset, 10x by default), AdamW's 1x.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .device import fast_bf16

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by `steps` Newton-Schulz iterations computed in `dtype`
    (bfloat16 is accurate enough: the iteration only needs singular values near 1). g is a matrix
    (r, c) or a stack of matrices (..., r, c), each orthogonalized on its own."""
    if g.dim() < 2:
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: A = X X^T is the smaller Gram matrix
        x = x.mT
    x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)).to(dtype)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the param groups marked "muon": True (2-D weights only), AdamW for the others. The
    arguments are every group's defaults; a group may override any of them."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"need lr >= 0 ({lr}), 0 <= momentum < 1 ({momentum}), ns_steps >= 1 ({ns_steps})")
        self.ns_dtype = ns_dtype  # None: bfloat16 where bf16 matmuls are fast (fast_bf16), else float32
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False, lr_ratio=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D weights only; put vectors, embeddings and the LM head "
                                 "in a group with muon=False (AdamW)")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)  # decoupled weight decay, as in AdamW
                if not group["muon"]:
                    self._adamw(p, state, group)
                    continue
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                wide = update if p.shape[0] <= p.shape[1] else update.T  # (r, c) with r <= c
                by_shape.setdefault(tuple(wide.shape), []).append((p, wide))
            for pairs in by_shape.values():  # one batched Newton-Schulz per shape (w1 and w2.T share one)
                dtype = self.ns_dtype or (torch.bfloat16 if fast_bf16(pairs[0][0].device) else torch.float32)
                ortho = orthogonalize(torch.stack([w for _, w in pairs]), group["ns_steps"], dtype=dtype)
                for (p, _), o in zip(pairs, ortho):
                    scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                    p.add_(o if p.shape[0] <= p.shape[1] else o.T, alpha=-lr * scale)
        return loss

    @staticmethod
    def _adamw(p: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def muon_param_groups(model: nn.Module, weight_decay: float, muon_lr_ratio: float) -> list[dict]:
    """Groups for `Muon`: the 2-D weights of the blocks (`model.layers`) with Muon; embeddings and the
    LM head (with weight decay) and every vector (without) with AdamW."""
    hidden = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in hidden], "muon": True, "lr_ratio": muon_lr_ratio,
             "weight_decay": 0.0},
            {"params": [p for p in params if id(p) not in hidden and p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in hidden and p.dim() < 2], "weight_decay": 0.0}]
