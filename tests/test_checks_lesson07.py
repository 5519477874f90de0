"""The lesson 07 (mixture of experts) checks accept a correct solution and reject typical mistakes by name."""
import pytest
import torch

from tlama_mini.checks.common import ExerciseFailed
from tlama_mini.checks.lesson07 import check_load_balancing_loss, check_moe_forward, check_router_topk
from tlama_mini.checks.common import expect_failure as fails_with


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


def test_correct_solutions_pass(capsys):
    for _ in range(3):
        check_router_topk(router_topk)
        check_load_balancing_loss(load_balancing_loss)
        check_moe_forward(moe_forward)
    assert capsys.readouterr().out.count("✓") == 9




def test_router_topk_mistakes():
    fails_with(check_router_topk, lambda l, k: torch.softmax(l, -1).topk(k, -1), "not renormalised")
    fails_with(check_router_topk, lambda l, k: l.topk(k, -1), "raw logits")
    fails_with(check_router_topk, lambda l, k: router_topk(-l, k), "lowest")
    fails_with(check_router_topk, lambda l, k: tuple(t.flip(-1) for t in router_topk(l, k)), "wrong order")

    def second_softmax(logits, k):  # renormalises the kept probabilities with another softmax
        top, idx = torch.softmax(logits, -1).topk(k, -1)
        return torch.softmax(top, -1), idx

    fails_with(check_router_topk, second_softmax, "second softmax", "divide them by their sum")


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
