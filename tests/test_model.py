"""The whole model: cached decode = uncached forward for every attention variant, bad input gets a
clear error, training leaves the cache alone, optimizer groups, LR schedule, dtype casts."""
import pytest
import torch

from tlama_mini import TlamaConfig, Transformer, generate
from tlama_mini.training import get_lr_scheduler

VARIANTS = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "sliding_window": dict(sliding_window=5),
    "chunked_nope": dict(attention_chunk_size=4, nope_layer_interval=2),
    "moe_shared": dict(n_experts=4, n_experts_per_tok=2, moe_shared_expert=True),
    "parallel_block": dict(parallel_block=True),
    "tied_scaled_rope": dict(tie_embeddings=True, rope_scaling=dict(factor=4.0, original_max_seq_len=16)),
    "naive_backend": dict(attn_backend="naive"),
    "xpos": dict(xpos_scale_base=64),
}


def _model(**overrides):
    torch.manual_seed(0)
    return Transformer(TlamaConfig.from_preset("tiny", max_seq_len=48, **overrides)).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decode_equals_uncached_forward(variant):
    model = _model(**VARIANTS[variant])
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full, _ = model(tokens, kv_cache=False)               # (B, T, V) without the cache
        starts = [0, 8, 11] + list(range(14, 20))             # prefill 8, two chunks of 3, then 1 token each
        ends = starts[1:] + [20]
        cached = torch.cat([model(tokens[:, s:e], s, kv_cache=True)[0] for s, e in zip(starts, ends)], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    greedy_cached = generate(model, tokens[:, :6], 12, temperature=0)
    greedy_plain = generate(model, tokens[:, :6], 12, temperature=0, use_cache=False)
    assert torch.equal(greedy_cached, greedy_plain)


@pytest.mark.parametrize("variant", ["gqa", "moe_shared", "tied_scaled_rope"])
def test_last_only_is_the_last_row_of_the_full_logits(variant):
    model = _model(**VARIANTS[variant])
    tokens = torch.randint(0, 256, (3, 17))
    with torch.no_grad():
        full, _ = model(tokens, kv_cache=False)
        last, _ = model(tokens, kv_cache=False, last_only=True)
        assert last.shape == (3, 1, 256)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-5)
        model(tokens[:, :9], 0, kv_cache=True)  # cached: the rest of the prompt, then its last row only
        torch.testing.assert_close(model(tokens[:, 9:], 9, last_only=True)[0], full[:, -1:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pass targets or last_only, not both"):
        model(tokens, targets=tokens, last_only=True)


def test_sliding_window_as_wide_as_context_equals_causal():
    a, b = _model(), _model(sliding_window=48)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(a(x, kv_cache=False)[0], b(x, kv_cache=False)[0], atol=1e-6, rtol=1e-5)


def test_loss_is_next_token_cross_entropy():
    model = _model()
    x, y = torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (2, 10))
    logits, loss = model(x, targets=y)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 256), y.view(-1))
    torch.testing.assert_close(loss, ref)
    assert model(x)[1] is None


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.tensor([[1, 256]])), r"token ids must be in \[0, 256\).*from 1 to 256"),
    (lambda m: m(torch.tensor([[-1, 2]])), r"token ids must be in \[0, 256\)"),
    (lambda m: m(torch.zeros(1, 49, dtype=torch.long)), r"exceed max_seq_len \(48\).*at most 48 tokens"),
    (lambda m: m(torch.zeros(1, 4, dtype=torch.long), 46), r"positions 46..49 exceed max_seq_len \(48\)"),
    (lambda m: m(torch.zeros(9, 4, dtype=torch.long), kv_cache=True), r"batch size 9 exceeds max_batch_size \(8\)"),
    (lambda m: m(torch.zeros(4, dtype=torch.long)), r"tokens must be \(batch, seq_len\)"),
    (lambda m: m(torch.zeros(1, 4)), r"tokens must be integer ids"),
    (lambda m: generate(m, torch.zeros(1, 40, dtype=torch.long), 10), r"prompt length \(40\) \+ max_new_tokens \(10\)"),
])
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(_model())


def test_kv_cache_overflow_in_attention_is_reported():
    model = _model()
    att = model.layers[0].attention
    with pytest.raises(ValueError, match=r"KV-cache overflow: start_pos \(45\) \+ seq_len \(4\) = 49 > max_seq_len \(48\)"):
        att.cache.update(45, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16))


def test_large_batch_without_cache_is_fine_in_eval_and_training():
    model = _model()
    x = torch.randint(0, 256, (12, 6))
    assert model(x, kv_cache=False)[0].shape == (12, 6, 256)
    assert model(x, targets=x)[1] is not None  # loss evaluation never uses the cache
    model.train()
    model(x, targets=x)[1].backward()
    assert all(l.attention.cache_k is None for l in model.layers)


def test_configure_optimizers_groups_and_any_device_type():
    model = _model()
    opt = model.configure_optimizers(0.1, 1e-3, device_type="cuda", master_process=False)  # params are on CPU
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 256, (2, 8))
    model.train()
    model(x, targets=x)[1].backward()
    opt.step()


def test_lr_schedule_warmup_cosine_floor():
    lr = get_lr_scheduler(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 200))
    with pytest.raises(ValueError, match="min_lr"):
        get_lr_scheduler(0.1, 1.0, 0, 10)


def test_bf16_cast_keeps_rope_exact_and_runs():
    model = _model()
    x = torch.randint(0, 256, (1, 12))
    ref = model(x, kv_cache=False)[0]
    model.to(torch.bfloat16)
    assert model.freq_cis.dtype == torch.complex64
    out = model(x, kv_cache=False)[0]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


def test_tied_embeddings_share_one_matrix():
    model = _model(tie_embeddings=True)
    assert model.output.weight is model.token_emb.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_is_stored_transposed_and_behaves_like_a_plain_linear(tie):
    """The LM head weight lives in (1, V) strides for fast batch-1 decoding on CPU; everything a user can
    see (values, shape, logits, gradients, casts, a copy into a contiguous model) is unchanged."""
    model = _model(tie_embeddings=tie)
    w = model.output.weight
    assert w.shape == (model.config.vocab_size, model.config.d_model) and w.stride() == (1, w.shape[0])
    plain = _model(tie_embeddings=tie)
    plain.load_state_dict(model.state_dict())
    plain.output.weight.data = plain.output.weight.data.contiguous()  # the usual layout, same values
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    (a, la), (b, lb) = model(x, targets=x), plain(x, targets=x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    la.backward(), lb.backward()
    torch.testing.assert_close(model.output.weight.grad, plain.output.weight.grad, rtol=0, atol=1e-5)
    assert model.output.weight.grad.stride() == w.stride()  # the grad follows the weight's layout
    model.to(torch.bfloat16)
    assert model.output.weight.stride() == (1, model.config.vocab_size)
