"""MoE: batched = loop reference (outputs and gradients), one expert with top-1 = dense SwiGLU,
the load-balancing loss, and the model adding it to the LM loss."""
import pytest
import torch

from tlama_mini import FeedForward, MoE, TlamaConfig, Transformer, load_balancing_loss, moe_loop
from tlama_mini.moe import route


@pytest.mark.parametrize("E, k, shared", [(4, 2, False), (8, 1, False), (5, 3, True), (4, 4, False)])
def test_batched_equals_loop(E, k, shared):
    moe = MoE(16, 24, E, k, shared_expert=shared)
    x = torch.randn(3, 7, 16, requires_grad=True)
    a, b = moe(x), moe_loop(moe, x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), [x, moe.w1, moe.w2, moe.w3, moe.gate.weight])
    gb = torch.autograd.grad(b.square().sum(), [x, moe.w1, moe.w2, moe.w3, moe.gate.weight])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_one_expert_top1_is_dense_swiglu():
    ffn = FeedForward(16, 40, use_parallel=False, exact=True)
    moe = MoE(16, 40, 1, 1)
    with torch.no_grad():
        moe.w1[0].copy_(ffn.w1.weight)
        moe.w2[0].copy_(ffn.w2.weight)
        moe.w3[0].copy_(ffn.w3.weight)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-6, rtol=1e-5)


def test_route_renormalises_top_k():
    logits = torch.randn(10, 6)
    w, e, p = route(logits, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    top = torch.softmax(logits, -1).topk(2, -1)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))
    assert torch.equal(e, top.indices)
    w_raw, _, _ = route(logits, 2, norm_topk_prob=False)
    torch.testing.assert_close(w_raw, top.values)


def test_load_balancing_loss_is_one_when_balanced_and_grows_when_collapsed():
    E, N = 4, 8
    probs = torch.full((N, E), 1.0 / E)
    experts = torch.arange(N).remainder(E)[:, None]
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(N, 1, dtype=torch.long)).item() == pytest.approx(E)


def test_model_adds_aux_loss_and_interleaves_layers():
    cfg = TlamaConfig.from_preset("moe-tiny", n_layers=4, moe_layer_interval=2)
    model = Transformer(cfg)
    assert [type(l.ffn).__name__ for l in model.layers] == ["FeedForward", "MoE", "FeedForward", "MoE"]
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    logits, loss = model(x, targets=x)
    plain = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), x.view(-1))
    aux = sum(l.ffn.aux_loss for l in model.layers if isinstance(l.ffn, MoE))
    torch.testing.assert_close(loss, plain + cfg.moe_aux_loss_coef * aux)
    loss.backward()
    assert model.layers[1].ffn.gate.weight.grad is not None
