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
    (a, aux_a), (b, aux_b) = moe(x), moe_loop(moe, x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux_a, aux_b)
    ga = torch.autograd.grad(a.square().sum() + aux_a, [x, moe.w1, moe.w2, moe.w3, moe.gate.weight])
    gb = torch.autograd.grad(b.square().sum() + aux_b, [x, moe.w1, moe.w2, moe.w3, moe.gate.weight])
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
    y, aux = moe(x)
    torch.testing.assert_close(y, ffn(x), atol=1e-6, rtol=1e-5)
    assert aux.item() == pytest.approx(1.0)  # one expert takes every token: E * f * P = 1 * 1 * 1


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
    seen = []  # (MoE layer, its input) in this forward
    hooks = [l.ffn.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0])))
             for l in model.layers if isinstance(l.ffn, MoE)]
    logits, loss = model(x, targets=x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    plain = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), x.view(-1))
    aux = 0.0  # recomputed from each MoE layer's input with the router alone
    for moe, h in seen:
        _, experts, probs = moe.route(h.reshape(-1, cfg.d_model))
        aux = aux + load_balancing_loss(probs, experts)
    torch.testing.assert_close(loss, plain + cfg.moe_aux_loss_coef * aux)
    loss.backward()
    assert model.layers[1].ffn.gate.weight.grad is not None


def test_block_returns_aux_only_when_asked():
    cfg = TlamaConfig.from_preset("moe-tiny", n_layers=2, moe_layer_interval=2)
    model = Transformer(cfg)
    dense, moe_block = model.layers
    h = torch.randn(2, 5, cfg.d_model)
    freqs = model.freq_cis[:5]
    out = moe_block(h, 0, freqs, None, False, is_causal=True)
    out2, aux = moe_block(h, 0, freqs, None, False, is_causal=True, return_aux=True)
    assert isinstance(out, torch.Tensor) and torch.equal(out, out2) and aux.ndim == 0
    assert dense(h, 0, freqs, None, False, is_causal=True, return_aux=True)[1] is None


def test_swiglu_function_formula_module_and_stacked_experts():
    from tlama_mini.ffn import swiglu
    from tlama_mini.lora import apply_lora
    C, Fh, E = 12, 20, 3
    x = torch.randn(2, 5, C, dtype=torch.float64)
    w1, w3, w2 = torch.randn(Fh, C, dtype=torch.float64), torch.randn(Fh, C, dtype=torch.float64), \
        torch.randn(C, Fh, dtype=torch.float64)
    formula = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T  # w1 gate, w3 up, w2 down
    torch.testing.assert_close(swiglu(x, w1, w2, w3), formula)
    ffn = FeedForward(C, Fh, use_parallel=False, exact=True).double()
    with torch.no_grad():
        ffn.w1.weight.copy_(w1), ffn.w2.weight.copy_(w2), ffn.w3.weight.copy_(w3)
    assert torch.equal(ffn(x), swiglu(x, w1, w2, w3))
    # stacked expert weights (E, F, C) / (E, C, F) with x (E, n, C): expert e on row e
    W1, W3, W2 = (torch.randn(E, *s, dtype=torch.float64) for s in ((Fh, C), (Fh, C), (C, Fh)))
    xs = torch.randn(E, 4, C, dtype=torch.float64)
    stacked = swiglu(xs, W1, W2, W3)
    for e in range(E):
        torch.testing.assert_close(stacked[e], swiglu(xs[e], W1[e], W2[e], W3[e]))
    # modules instead of weights: FeedForward still sees a LoRA adapter on its linears
    apply_lora(ffn, ("w1", "w2", "w3"), r=2, alpha=4.0)
    with torch.no_grad():
        for m in (ffn.w1, ffn.w2, ffn.w3):
            m.lora_B.normal_()
    merged = (ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)
    torch.testing.assert_close(ffn(x), swiglu(x, *merged))
    assert not torch.allclose(ffn(x), formula)
    with pytest.raises(ValueError, match="does not fit"):
        swiglu(x, w1.T, w2, w3)
