"""Mixture of experts (Shazeer et al., 2017; Switch Transformer, Fedus et al., 2021; Mixtral, 2024).

A router scores every token against E experts (each a SwiGLU MLP); each token goes through its
top-k experts only, and their outputs are mixed with the router's weights. Parameters grow with E,
compute per token only with k. An optional shared expert sees every token (DeepSeek-MoE, Llama 4).
Two routers: "softmax" (Mixtral: softmax over experts, top-k, weights scale the expert *outputs*)
and "sigmoid" (Llama 4: top-k of the raw logits, sigmoid of those, and the weight scales each
expert's *input*, expert(w * x), which differs from w * expert(x) because SwiGLU is not linear).

Two implementations share the same weights and are tested equal:
- `moe_loop`: for each expert, pick its tokens and run them (the readable reference);
- `MoE.forward`: sort the token->expert assignments by expert, pad each expert's group to the
  largest group and run all experts at once with batched matmuls (no Python loop over experts).

Load balancing (Switch Transformer eq. 4): aux = E * sum_e f_e * P_e, where f_e is the fraction of
assignments that went to expert e and P_e the mean router probability of e. It is 1 when the load
is perfectly even and grows as the router collapses onto few experts.
Legend: N tokens (B * T flattened), C d_model, E experts, k experts per token, F expert hidden size.
"""
from __future__ import annotations

import torch
from torch import nn

from .ffn import FeedForward, swiglu


def route(router_logits: torch.Tensor, k: int, norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> (weights (N, k), experts (N, k), probs (N, E)). Softmax in float32."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    weights, experts = torch.topk(probs, k, dim=-1)        # (N, k) each
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def route_sigmoid(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama 4's router: router_logits (N, E) -> (weights (N, k) = sigmoid of the top-k logits, experts (N, k),
    probs (N, E) = softmax of the logits, used only for the load-balancing loss)."""
    top, experts = torch.topk(router_logits, k, dim=-1)  # (N, k) each
    weights = torch.sigmoid(top.float())
    return weights, experts, torch.softmax(router_logits.float(), dim=-1)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """probs (N, E), experts (N, k) -> scalar E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
    E = probs.shape[-1]
    counts = torch.bincount(experts.flatten(), minlength=E).to(probs.dtype)  # (E,)
    f = counts / experts.numel()   # fraction of assignments per expert
    P = probs.mean(dim=0)          # mean router probability per expert
    return E * (f * P).sum()


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. forward(x) returns (y, aux_loss): the output and the
    load-balancing loss of that call (a scalar tensor in the autograd graph) for the model to add.
    The module keeps no state between calls."""

    def __init__(self, d_model: int, hidden_dim: int, n_experts: int, k: int, *,
                 shared_expert: bool = False, norm_topk_prob: bool = True, router: str = "softmax") -> None:
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"experts per token k ({k}) must be between 1 and n_experts ({n_experts})")
        if router not in ("softmax", "sigmoid"):
            raise ValueError(f"router ({router!r}) must be 'softmax' or 'sigmoid'")
        self.n_experts, self.k, self.norm_topk_prob, self.router = n_experts, k, norm_topk_prob, router
        self.gate = nn.Linear(d_model, n_experts, bias=False)                  # router
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, d_model))   # (E, F, C) gate
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden_dim))   # (E, C, F) down
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, d_model))   # (E, F, C) up
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=0.02)
        self.shared = (FeedForward(d_model, hidden_dim, use_parallel=False, exact=True)
                       if shared_expert else None)

    def route(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (N, C) -> (weights (N, k), experts (N, k), probs (N, E)) with this layer's router."""
        if self.router == "sigmoid":
            return route_sigmoid(self.gate(xf), self.k)
        return route(self.gate(xf), self.k, self.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., C) -> (y (..., C), aux_loss scalar), batched over experts."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, C)
        weights, experts, probs = self.route(xf)
        scale_input = self.router == "sigmoid"
        aux_loss = load_balancing_loss(probs, experts)
        flat_expert = experts.flatten()                  # (N k,)
        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.n_experts)   # (E,)
        starts = torch.cumsum(counts, 0) - counts                       # (E,)
        sorted_expert = flat_expert[order]
        slot = torch.arange(order.numel(), device=x.device) - starts[sorted_expert]  # rank within group
        capacity = int(counts.max())
        token = order // self.k                          # which token each sorted assignment belongs to
        w = weights.flatten()[order].to(x.dtype)         # (N k,) router weight of each assignment
        grouped = xf.new_zeros(self.n_experts, capacity, shape[-1])  # (E, cap, C), zero padded
        grouped[sorted_expert, slot] = xf[token] * w[:, None] if scale_input else xf[token]
        out = swiglu(grouped, self.w1, self.w2, self.w3)  # (E, cap, C), every expert in one batched matmul
        picked = out[sorted_expert, slot] if scale_input else out[sorted_expert, slot] * w[:, None]  # (N k, C)
        y = torch.zeros_like(xf).index_add_(0, token, picked)  # (N, C)
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.reshape(shape), aux_loss


def moe_loop(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MoE forward with the same weights: a plain loop over experts.
    x (..., C) -> (y (..., C), aux_loss scalar), as `MoE.forward`."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # (N, C)
    weights, experts, probs = moe.route(xf)
    y = torch.zeros_like(xf)
    for e in range(moe.n_experts):
        token, which = torch.where(experts == e)  # tokens routed to e, and in which of their k slots
        if token.numel():
            w = weights[token, which, None].to(x.dtype)  # (n_e, 1)
            if moe.router == "sigmoid":  # Llama 4 scales the input of the expert
                y.index_add_(0, token, swiglu(xf[token] * w, moe.w1[e], moe.w2[e], moe.w3[e]))
            else:
                y.index_add_(0, token, swiglu(xf[token], moe.w1[e], moe.w2[e], moe.w3[e]) * w)
    if moe.shared is not None:
        y = y + moe.shared(xf)
    return y.reshape(shape), load_balancing_loss(probs, experts)
