"""fuse.py: Wq/Wk/Wv and w1/w3 stored as row blocks of one matrix give the same logits, the same
state_dict and the same training as separate weights, and anything that breaks the layout falls back."""
import pytest
import torch
import torch.nn.functional as F

from tlama_mini import TlamaConfig, Transformer, generate
from tlama_mini.fuse import fuse_projections, fused_weight
from tlama_mini.sample import load_for_inference


def _pair(**kw):
    torch.manual_seed(0)
    c = TlamaConfig.from_preset("tiny", n_heads=4, n_kv_heads=2, max_seq_len=64, **kw)
    plain = Transformer(c).eval()
    fused = Transformer(c).eval()
    fused.load_state_dict(plain.state_dict())
    assert fuse_projections(fused) == 4 * c.n_layers
    return plain, fused


def test_fused_weights_are_views_with_the_same_values_and_state_dict():
    plain, fused = _pair()
    a = fused.layers[0].attention
    w = fused_weight(a.Wq, a.Wk, a.Wv)
    assert w is not None and w.data_ptr() == a.Wq.weight.data_ptr()
    torch.testing.assert_close(w, torch.cat([a.Wq.weight, a.Wk.weight, a.Wv.weight]), rtol=0, atol=0)
    assert fused_weight(plain.layers[0].attention.Wq, plain.layers[0].attention.Wk,
                        plain.layers[0].attention.Wv) is None  # separate tensors: not fused
    sd, ref = fused.state_dict(), plain.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


def test_fused_inference_equals_separate_products_prefill_decode_and_generate():
    plain, fused = _pair()
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], plain(x)[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(fused, x, 10, temperature=0), generate(plain, x, 10, temperature=0))
    with torch.no_grad():
        for m in (fused, plain):
            m(x[:, :9], 0, kv_cache=True)
        torch.testing.assert_close(fused(x[:, 9:10], 9)[0], plain(x[:, 9:10], 9)[0], atol=1e-5, rtol=1e-5)
        fused.reset_cache(), plain.reset_cache()


def test_training_a_fused_model_equals_training_the_plain_one():
    plain, fused = _pair()
    x = torch.randint(0, 256, (2, 12))
    for m in (plain, fused):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(3):
            loss = m(x, targets=x)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (n, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=n)
    a = fused.layers[1].attention  # still one matrix, updated in place
    assert fused_weight(a.Wq, a.Wk, a.Wv) is not None
    torch.testing.assert_close(fused_weight(a.Wq, a.Wk, a.Wv)[:a.Wq.weight.shape[0]], a.Wq.weight, rtol=0, atol=0)


@pytest.mark.parametrize("breaker", ["dtype", "lora"])
def test_a_broken_layout_falls_back_to_separate_products(breaker):
    plain, fused = _pair()
    x = torch.randint(0, 256, (1, 7))
    if breaker == "dtype":  # .to() copies every parameter on its own
        fused, plain = fused.to(torch.float64), plain.to(torch.float64)
        a = fused.layers[0].attention
        assert fused_weight(a.Wq, a.Wk, a.Wv) is None
    else:
        from tlama_mini.lora import apply_lora
        for m in (fused, plain):
            torch.manual_seed(1)
            apply_lora(m, ["Wq", "Wv"], 4, 8.0)
            for n, p in m.named_parameters():
                if "lora_b" in n.lower():
                    torch.nn.init.normal_(p)  # make the adapters matter
        a = fused.layers[0].attention
        assert fused_weight(a.Wq, a.Wk, a.Wv) is None
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x)[0], plain.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_a_fused_model_saves_and_loads_as_a_checkpoint(tmp_path):
    from tlama_mini import checkpoint as ckpt
    plain, fused = _pair()
    ckpt.save_checkpoint(tmp_path / "ckpt", fused, {}, {"model": fused.config.to_dict(), "step": 0})
    loaded, _, _ = load_for_inference(tmp_path)
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_linear_splits_one_row_across_threads_and_equals_float64(threads, monkeypatch):
    """fuse.linear, one float32 row on the CPU: a row-major weight -> one torch.bmm over P blocks of output
    rows (P the largest divisor of out_features up to the threads); a transposed one -> over P slices of
    the reduction (P dividing in_features). Equal to the float64 product as closely as F.linear is.
    Anything else: F.linear itself."""
    from tlama_mini.fuse import linear
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: bmm_calls.append(a.shape[0]) or real_bmm(a, b))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)

    def most(n):  # the largest divisor of n up to the threads: (7, 6) transposed with 4 threads -> 3
        return max(p for p in range(1, threads + 1) if n % p == 0)
    try:
        g = torch.Generator().manual_seed(threads)
        for N, K in [(960, 576), (49, 1536), (7, 6), (5, 7), (12, 5)]:
            rows = torch.randn(N, K, generator=g) * 3
            x = torch.randn(1, 1, K, generator=g)
            exact = (x.double() @ rows.double().t()).float()
            for w, P in ((rows, most(N)), (rows.t().contiguous().t(), most(K))):  # row-major; transposed (1, N)
                bmm_calls.clear()
                with torch.no_grad():
                    y, ref = linear(x, w), F.linear(x, w)
                assert bmm_calls == ([P] if P > 1 else []), (N, K, w.stride())
                assert y.shape == ref.shape
                assert (y - exact).abs().max() <= 4 * (ref - exact).abs().max() + 1e-5, (N, K, w.stride())
                with torch.no_grad():  # several rows, or bfloat16: F.linear itself
                    assert torch.equal(linear(x.expand(2, 1, K), w), F.linear(x.expand(2, 1, K), w))
                    xb, wb = x.bfloat16(), w.bfloat16() if w.is_contiguous() else w.t().bfloat16().contiguous().t()
                    assert torch.equal(linear(xb, wb), F.linear(xb, wb))
                assert torch.equal(linear(x, w), F.linear(x, w))  # gradients on: F.linear
                assert len(bmm_calls) == (P > 1), "only the float32 row without gradients takes a split route"
            with torch.no_grad():  # neither layout (every other column): F.linear
                wide = torch.randn(N, 2 * K, generator=g)[:, ::2]
                assert torch.equal(linear(x, wide), F.linear(x, wide))
    finally:
        torch.set_num_threads(old)
