"""Checks for lesson 07 (mixture of experts: top-k routing, the load-balancing loss, a loop MoE
forward). Each check_<name>(fn) calls the learner's fn on fresh random inputs, compares with
`tlama_mini.moe`, and names the mistake when it can.

Legend: N tokens, C d_model, E experts, k experts per token, F expert hidden size.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch

from ..ffn import swiglu
from ..moe import MoE, load_balancing_loss, moe_loop, route
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_router_topk", "check_load_balancing_loss", "check_moe_forward"]


def _pair(name: str, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(name, f"returned {type(out).__name__}, expected a tuple (weights, indices)")
    return out[0], out[1]


def _check_indices(name: str, idx: Any, expected: torch.Tensor, logits: torch.Tensor, k: int) -> None:
    if not isinstance(idx, torch.Tensor):
        fail(name, f"indices: returned {type(idx).__name__}, expected a torch.Tensor")
    if idx.dim() == 2 and idx.shape[0] == expected.shape[0] and idx.shape[1] != k:
        fail(name, f"indices have shape {tuple(idx.shape)}: {idx.shape[1]} experts per token, expected k = {k}",
             "use the k passed in: probs.topk(k, dim=-1)")
    if idx.shape != expected.shape:
        fail(name, f"indices have shape {tuple(idx.shape)}, expected {tuple(expected.shape)} (N, k)",
             "take the top-k over the experts, the last dim")
    if idx.is_floating_point():
        fail(name, f"indices have dtype {idx.dtype}, expected an integer dtype (torch.long)")
    if torch.equal(idx.long(), expected):
        return
    if torch.equal(idx.long().sort(-1).values, expected.sort(-1).values):
        fail(name, "the right experts, in the wrong order: return them sorted by weight, largest first "
                   "(torch.topk does this)")
    if torch.equal(idx.long(), logits.topk(k, -1, largest=False).indices):
        fail(name, "it picks the k *lowest*-scoring experts: the router sends each token to its highest scores")
    if torch.equal(idx.long(), torch.softmax(logits, 0).topk(k, -1).indices):
        fail(name, "the experts are chosen from a softmax over the wrong dimension (tokens, dim 0): the softmax is "
             "over the experts, dim -1", "probs = torch.softmax(logits, dim=-1)")
    fail(name, "the chosen experts differ from the top-k of the router probabilities")


@attributes_stubs
def check_router_topk(fn) -> None:
    """fn(logits, k) with logits (N, E) -> (weights (N, k), indices (N, k)): the k largest router
    probabilities of each token, renormalised to sum to 1, and their expert ids, largest first."""
    name = "router_topk"
    N, E, k = random.randint(5, 12), random.choice([4, 6, 8]), random.choice([2, 3])
    logits = torch.randn(N, E) * 1.5
    weights_ref, experts_ref, probs = route(logits, k)  # (N, k), (N, k), (N, E)
    hint = ("probs = softmax(logits, dim=-1) (N, E); weights, indices = probs.topk(k, dim=-1) (N, k) each; "
            "weights / weights.sum(-1, keepdim=True)")
    w, idx = _pair(name, call(name, fn, logits.clone(), k, hint=hint))
    _check_indices(name, idx, experts_ref, logits, k)
    top_logits = logits.gather(-1, experts_ref)  # (N, k)
    wrong_dim = torch.softmax(logits, 0).gather(-1, experts_ref)
    top_probs = torch.softmax(logits, -1).gather(-1, experts_ref)  # (N, k), not renormalised
    mistakes = {
        "the k chosen probabilities are renormalised with a second softmax: softmax(p) is not p / sum(p) (it "
        "exponentiates probabilities, flattening the weights towards 1/k); divide them by their sum, or take "
        "one softmax of the top-k *logits*": torch.softmax(top_probs, -1),
        "the weights are not renormalised: divide the k chosen probabilities by their sum (Mixtral's "
        "norm_topk_prob), so every token's weights add up to 1": route(logits, k, norm_topk_prob=False)[0],
        "the weights are raw logits: turn the scores into probabilities with a softmax": top_logits,
        "the logits are divided by their sum without a softmax: exponentiate first (softmax)":
            top_logits / top_logits.sum(-1, keepdim=True),
        "the softmax is over the wrong dimension (tokens); it must be over the experts, dim -1":
            wrong_dim / wrong_dim.sum(-1, keepdim=True),
        "the softmax is over the wrong dimension (tokens) and not renormalised; use dim -1": wrong_dim,
    }
    if not isinstance(w, torch.Tensor) or w.shape != weights_ref.shape:
        fail(name, f"weights: expected a tensor of shape {tuple(weights_ref.shape)} (N, k)")
    diff = check_tensor(name + " (weights)", w.float(), weights_ref, mistakes=mistakes)
    w1, idx1 = _pair(name, call(name + " (k=1)", fn, logits.clone(), 1, hint=hint))
    _check_indices(name + " (k=1)", idx1, logits.argmax(-1, keepdim=True), logits, 1)
    check_tensor(name + " (k=1)", w1.float(), torch.ones(N, 1), hint="with k=1 the renormalised weight is always 1")
    passed(name, f"max abs diff {diff:.1e} with N={N}, E={E}, k={k}")


@attributes_stubs
def check_load_balancing_loss(fn) -> None:
    """fn(probs, experts) with probs (N, E) router probabilities and experts (N, k) chosen ids ->
    scalar E * sum_e f_e * P_e (Switch Transformer), differentiable with respect to probs."""
    name = "load_balancing_loss"
    N, E, k = random.randint(16, 40), random.choice([4, 8]), 2
    scores = torch.randn(N, E) * 1.5
    scores[:, -1] -= 10.0  # no token chooses the last expert: its count is 0, and counts must still have E entries
    probs = torch.softmax(scores, -1)                  # (N, E)
    experts = probs.topk(k, -1).indices                # (N, k)
    ref_p = probs.clone().requires_grad_()
    expected = load_balancing_loss(ref_p, experts)     # ()
    expected.backward()
    f = torch.bincount(experts.flatten(), minlength=E).float() / experts.numel()  # (E,)
    P = probs.mean(0)                                                            # (E,)
    chosen = torch.zeros(N, E).scatter(1, experts, 1.0)                          # (N, E) 1 where chosen
    mistakes = {
        "the factor E is missing (or it takes a mean over experts where the formula has a sum): with it, a "
        "perfectly balanced router scores exactly 1": expected.detach() / E,
        "P_e only counts the probabilities of the chosen experts: P_e is the mean router probability of "
        "expert e over *all* tokens (that is what makes it differentiable everywhere)":
            E * (f * (probs * chosen).mean(0)).sum(),
        "f_e divides the counts by the number of tokens N instead of the N * k assignments":
            expected.detach() * k,
        "f_e is used twice (f * f): the second factor must be the mean router probability P_e, the "
        "differentiable one": E * (f * f).sum(),
        "P_e is used twice (P * P): the first factor is the fraction f_e of assignments that went to e":
            E * (P * P).sum(),
        "P_e sums the probabilities over tokens instead of averaging them": expected.detach() * N,
    }
    p = probs.clone().requires_grad_()
    out = call(name, fn, p, experts.clone(),
               hint=f"no token chose expert {E - 1} here, so torch.bincount(experts.flatten()) alone has only "
               f"{E - 1} entries: pass minlength=E (or num_classes=E to F.one_hot) so that f has one count per expert")
    if isinstance(out, (float, int)):
        fail(name, f"returned a Python {type(out).__name__}, expected a 0-dim tensor: the loss must stay a tensor to "
             "be differentiable", "no .item() or float(...): return E * (f * P).sum()")
    if isinstance(out, torch.Tensor) and out.shape != ():
        fail(name, f"returned shape {tuple(out.shape)}, expected a scalar (0-dim) tensor",
             "sum over the experts: E * (f * P).sum()")
    diff = check_tensor(name, out, expected.detach(), mistakes=mistakes)
    if not out.requires_grad:
        fail(name, "the loss does not depend differentiably on probs: f_e comes from top-k and has no gradient, "
                   "so the gradient must flow through P_e = probs.mean(0) (no .detach(), .item() or torch.no_grad)")
    out.backward()
    check_tensor(name + " (gradient w.r.t. probs)", p.grad, ref_p.grad,
                 hint="d loss / d probs[n, e] = E * f_e / N: f must be a constant and P the mean over tokens")
    # Perfect balance: uniform probabilities and round-robin assignments give exactly 1.
    m = 3
    uniform = torch.full((m * E, E), 1.0 / E)
    rr = torch.stack([torch.arange(m * E) % E, (torch.arange(m * E) + 1) % E], -1)  # (m E, 2)
    check_tensor(name + " (perfectly balanced)", call(name + " (perfectly balanced)", fn, uniform, rr),
                 torch.tensor(1.0),
                 hint="a perfectly balanced router must give exactly 1.0")
    passed(name, f"value and gradient match (max abs diff {diff:.1e}) with N={N}, E={E}, k={k}; balanced -> 1.0")


def _expert(moe: MoE, e: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Expert e of `moe` as a function (n, C) -> (n, C): a SwiGLU with that expert's weights."""
    def expert(z: torch.Tensor) -> torch.Tensor:
        return swiglu(z, moe.w1[e], moe.w2[e], moe.w3[e])
    return expert


def _mix(x: torch.Tensor, experts: list, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * experts[idx[n, j]](x[n]) for every token n, the slow and obvious way."""
    return torch.stack([sum(weights[n, j] * experts[int(idx[n, j])](x[n:n + 1])[0] for j in range(idx.shape[1]))
                        for n in range(x.shape[0])])


def _overwrite(x: torch.Tensor, experts: list, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The mix when each expert's weighted output overwrites its tokens' rows: the last expert (by id) wins."""
    y = torch.zeros_like(x)
    for e in range(len(experts)):
        token, slot = torch.where(idx == e)
        if token.numel():
            y[token] = weights[token, slot, None] * experts[e](x[token])
    return y


@attributes_stubs
def check_moe_forward(fn) -> None:
    """fn(x, gate, experts, k) with x (N, C), gate a callable (N, C) -> (N, E) router logits, experts a
    list of E callables (n, C) -> (n, C), k experts per token -> (N, C): each token's output is the
    sum of its top-k experts' outputs weighted by the renormalised router probabilities."""
    name = "moe_forward"
    N, C, Fh, E, k = random.randint(6, 12), 8, 16, random.choice([4, 5, 6]), 2
    moe = MoE(C, Fh, E, k)
    with torch.no_grad():  # O(1) activations, and a decisive router
        moe.gate.weight.copy_(torch.randn(E, C) * 2 / math.sqrt(C))
        moe.w1.copy_(torch.randn(E, Fh, C) / math.sqrt(C))
        moe.w3.copy_(torch.randn(E, Fh, C) / math.sqrt(C))
        moe.w2.copy_(torch.randn(E, C, Fh) / math.sqrt(Fh))
    x = torch.randn(N, C)
    experts = [_expert(moe, e) for e in range(E)]
    with torch.no_grad():
        expected, _ = moe_loop(moe, x)  # (N, C), tlama_mini's loop reference (tested equal to MoE.forward)
        logits = moe.gate(x)
        w, idx, probs = route(logits, k)
        mistakes = {
            "the expert outputs are not weighted by the router weights (just summed)":
                lambda: _mix(x, experts, torch.ones_like(w), idx),
            "the expert outputs are averaged (1/k each) instead of weighted by the router":
                lambda: _mix(x, experts, torch.full_like(w, 1 / k), idx),
            "the router weights are not renormalised over the k chosen experts":
                lambda: _mix(x, experts, route(logits, k, norm_topk_prob=False)[0], idx),
            "the outputs are weighted by raw logits: use the (renormalised) softmax probabilities":
                lambda: _mix(x, experts, logits.gather(-1, idx), idx),
            "only the top-1 expert is used: mix the top k": lambda: _mix(x, experts, *route(logits, 1)[:2]),
            "every expert is mixed with the full softmax (a dense mixture): keep only the top k":
                lambda: _mix(x, experts, probs, torch.arange(E).expand(N, E)),
            "the softmax is applied twice: router_topk already turns the logits into probabilities, so give it "
            "gate(x) itself": lambda: _mix(x, experts, *route(torch.softmax(logits, -1), k)[:2]),
            "each expert's output overwrites the row (y[token] = ...) instead of adding to it, so a token keeps "
            "only its highest-numbered expert: add (y.index_add_(0, token, ...) or y[token] += ...)":
                lambda: _overwrite(x, experts, w, idx),
        }
        out = call(name, fn, x.clone(), moe.gate, experts, k,
                   hint="for expert e: token, slot = torch.where(indices == e); its weights are weights[token, slot] "
                   "(one per token, shape (n,)), so multiply with [:, None] against the expert's output (n, C), then "
                   "y.index_add_(0, token, ...)")
    diff = check_tensor(name, out, expected, mistakes=mistakes,
                        hint="y[n] = sum_j weights[n, j] * experts[indices[n, j]](x[n]), with the weights "
                             "renormalised over the top k")
    passed(name, f"max abs diff {diff:.1e} against tlama_mini.moe_loop with N={N}, E={E}, k={k}")
