"""The lesson 07 (mixture of experts) checks accept a correct solution and reject each typical mistake by name
on every draw: every wrong solution runs through its check over many seeds."""
import random

import pytest
import torch
import torch.nn.functional as F

from tlama_mini.checks.common import expect_failure_on_every_draw
from tlama_mini.checks.lesson07 import check_load_balancing_loss, check_moe_forward, check_router_topk

SEEDS = range(30)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def fails_with(check, fn, *words):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed."""
    expect_failure_on_every_draw(check, fn, *words, seeds=SEEDS)


# --- correct implementations, written from the formulas (not from tlama_mini)
def router_topk(logits, k):
    top, idx = logits.topk(k, dim=-1)
    return torch.softmax(top, dim=-1), idx  # = top-k of the softmax, renormalised


def load_balancing_loss(probs, experts):
    E = probs.shape[-1]
    f = torch.zeros(E).index_add_(0, experts.flatten(), torch.ones(experts.numel())) / experts.numel()
    return E * (f * probs.mean(0)).sum()


def moe_forward(x, gate, experts, k):
    weights, idx = router_topk(gate(x), k)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(idx == e)
        if token.numel():
            y[token] += weights[token, slot, None] * expert(x[token])
    return y


def load_balancing_loss_bincount(probs, experts):
    E = probs.shape[-1]
    f = torch.bincount(experts.flatten(), minlength=E).float() / experts.numel()
    return E * (f * probs.mean(0)).sum()


def test_correct_solutions_pass_on_every_draw(capsys):
    for seed in SEEDS:
        random.seed(seed)
        torch.manual_seed(seed)
        check_router_topk(router_topk)
        check_load_balancing_loss(load_balancing_loss)
        check_load_balancing_loss(load_balancing_loss_bincount)
        check_moe_forward(moe_forward)
    assert capsys.readouterr().out.count("✓") == 4 * len(SEEDS)




def test_router_topk_mistakes():
    fails_with(check_router_topk, lambda l, k: torch.softmax(l, -1).topk(k, -1), "not renormalised")
    fails_with(check_router_topk, lambda l, k: l.topk(k, -1), "raw logits")
    fails_with(check_router_topk, lambda l, k: router_topk(-l, k), "lowest")
    fails_with(check_router_topk, lambda l, k: tuple(t.flip(-1) for t in router_topk(l, k)), "wrong order")

    def second_softmax(logits, k):  # renormalises the kept probabilities with another softmax
        top, idx = torch.softmax(logits, -1).topk(k, -1)
        return torch.softmax(top, -1), idx

    fails_with(check_router_topk, second_softmax, "second softmax", "divide them by their sum")

    def softmax_over_tokens(logits, k):
        top, idx = torch.softmax(logits, 0).topk(k, -1)
        return top / top.sum(-1, keepdim=True), idx

    fails_with(check_router_topk, softmax_over_tokens, "wrong dimension (tokens, dim 0)")
    fails_with(check_router_topk, lambda l, k: router_topk(l, 2), "experts per token, expected k =")
    fails_with(check_router_topk, lambda l, k: router_topk(l, k)[::-1], "indices have dtype")
    fails_with(check_router_topk, lambda l, k: torch.softmax(l, -1).topk(k, 0), "indices have shape")

    def renormalised_over_tokens(logits, k):
        top, idx = torch.softmax(logits, -1).topk(k, -1)
        return top / top.sum(0, keepdim=True), idx

    fails_with(check_router_topk, renormalised_over_tokens, "values differ")

    def sums_a_list(logits, k):  # a crash inside the learner's code: sum over a tensor needs dim, not a list index
        top, idx = torch.softmax(logits, -1).topk(k, -1)
        return top / top.sum(-1, keepdims=[True]), idx

    fails_with(check_router_topk, sums_a_list, "crashed with TypeError", "probs.topk(k, dim=-1)")


def test_load_balancing_loss_mistakes():
    fails_with(check_load_balancing_loss, lambda p, e: load_balancing_loss(p, e) / p.shape[-1], "factor E")
    fails_with(check_load_balancing_loss, lambda p, e: load_balancing_loss(p.detach(), e), "differentiabl")

    def chosen_only(p, e):
        E = p.shape[-1]
        f = torch.bincount(e.flatten(), minlength=E).float() / e.numel()
        P = (p * torch.zeros_like(p).scatter(1, e, 1.0)).mean(0)
        return E * (f * P).sum()

    fails_with(check_load_balancing_loss, chosen_only, "chosen experts")
    fails_with(check_load_balancing_loss, lambda p, e: load_balancing_loss(p, e).reshape(1), "0-dim")

    def per_token(p, e):
        return load_balancing_loss(p, e) * e.shape[1]

    fails_with(check_load_balancing_loss, per_token, "N * k")

    def counts_without_minlength(p, e):  # right whenever every expert is chosen; the check starves one in every draw
        f = torch.bincount(e.flatten()).float() / e.numel()
        return p.shape[-1] * (f * p.mean(0)).sum()

    def one_hot_without_num_classes(p, e):
        return p.shape[-1] * (F.one_hot(e.flatten()).float().mean(0) * p.mean(0)).sum()

    fails_with(check_load_balancing_loss, counts_without_minlength, "crashed", "minlength=E")
    fails_with(check_load_balancing_loss, one_hot_without_num_classes, "crashed", "num_classes=E")
    fails_with(check_load_balancing_loss, lambda p, e: load_balancing_loss(p, e).item(), "Python float", "no .item()")

    def f_twice(p, e):
        f = torch.bincount(e.flatten(), minlength=p.shape[-1]).float() / e.numel()
        return p.shape[-1] * (f * f).sum()

    def P_twice(p, e):
        P = p.mean(0)
        return p.shape[-1] * (P * P).sum()

    fails_with(check_load_balancing_loss, f_twice, "f_e is used twice")
    fails_with(check_load_balancing_loss, P_twice, "P_e is used twice")
    fails_with(check_load_balancing_loss, lambda p, e: load_balancing_loss(p, e) * p.shape[0], "sums the probabilities")


def test_moe_forward_mistakes():
    def unweighted(x, gate, experts, k):
        _, idx = router_topk(gate(x), k)
        y = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            token = torch.where(idx == e)[0]
            y[token] += expert(x[token])  # forgot the router weight
        return y

    fails_with(check_moe_forward, unweighted, "not weighted")

    def not_renormalised(x, gate, experts, k):
        w, idx = torch.softmax(gate(x), -1).topk(k, -1)
        y = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(k):
                y[n] += w[n, j] * experts[int(idx[n, j])](x[n:n + 1])[0]
        return y

    fails_with(check_moe_forward, not_renormalised, "not renormalised")
    fails_with(check_moe_forward, lambda x, gate, experts, k: moe_forward(x, gate, experts, 1), "top-1")

    def mix(x, gate, experts, k, *, logits=lambda z: z, combine="add", weight="slot"):
        weights, idx = router_topk(logits(gate(x)), k)
        y = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            token, slot = torch.where(idx == e)
            if not token.numel():
                continue
            w = weights[token, slot, None] if weight == "slot" else weights[token]  # the latter (n, k): no slot
            out = w * expert(x[token])
            if combine == "add":
                y.index_add_(0, token, out)
            else:
                y[token] = out
        return y

    fails_with(check_moe_forward, lambda *a: mix(*a, weight="token"), "crashed with RuntimeError",
               "weights[token, slot]")
    fails_with(check_moe_forward, lambda *a: mix(*a, combine="overwrite"), "overwrites the row")
    fails_with(check_moe_forward, lambda *a: mix(*a, logits=lambda z: torch.softmax(z, -1)), "softmax is applied twice")

    def dense(x, gate, experts, k):  # every expert mixed with its full-softmax probability
        probs = torch.softmax(gate(x), -1)
        return sum(probs[:, e, None] * expert(x) for e, expert in enumerate(experts))

    fails_with(check_moe_forward, dense, "dense mixture")


def test_a_stub_called_by_moe_forward_is_named():
    """moe_forward is right but calls a router_topk that is still the stub: the check says router_topk is the
    unfinished one (another exercise), not that moe_forward is not implemented."""
    def router_topk(logits, k):  # the untouched exercise 1
        raise NotImplementedError

    def moe_forward(x, gate, experts, k):  # a finished exercise 3 that reuses exercise 1, as invited
        weights, idx = router_topk(gate(x), k)
        return torch.zeros_like(x)

    with pytest.raises(NotImplementedError, match=r"calls router_topk\(\), another exercise of this lesson, "
                                                  r"which is not implemented yet"):
        check_moe_forward(moe_forward)

    def stub(x, gate, experts, k):  # its own stub is still reported as plainly not implemented
        raise NotImplementedError

    with pytest.raises(NotImplementedError) as info:
        check_moe_forward(stub)
    assert str(info.value) == ""
