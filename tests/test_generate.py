"""Generation: greedy = an argmax loop written here, seeded sampling is reproducible, the top-k /
top-p filters equal naive versions, stop tokens end rows."""
import pytest
import torch

from tlama_mini import (
    TlamaConfig,
    Transformer,
    generate,
    generate_stream,
    top_k_filter,
    top_p_filter,
)
from tlama_mini.sample import load_for_inference


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(TlamaConfig.from_preset("tiny", max_seq_len=40)).eval()


def test_greedy_equals_argmax_loop(model):
    prompt = torch.randint(0, 256, (2, 5))
    seq = prompt
    with torch.no_grad():
        for _ in range(10):  # the slowest, most obvious way: rerun everything, take the argmax
            seq = torch.cat([seq, model(seq, kv_cache=False)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(model, prompt, 10, temperature=0), seq)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    prompt = torch.randint(0, 256, (1, 4))
    a = generate(model, prompt, 15, temperature=1.0, top_k=20, top_p=0.9, seed=1)
    b = generate(model, prompt, 15, temperature=1.0, top_k=20, top_p=0.9, seed=1)
    c = generate(model, prompt, 15, temperature=1.0, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 19)
    assert model.training is False


def test_stream_yields_the_same_tokens(model):
    prompt = torch.randint(0, 256, (1, 4))
    streamed = torch.stack(list(generate_stream(model, prompt, 8, temperature=0)), 1)
    assert torch.equal(generate(model, prompt, 8, temperature=0)[:, 4:], streamed)


def test_stop_token_ends_each_row(model):
    prompt = torch.randint(0, 256, (2, 4))
    free = generate(model, prompt, 12, temperature=0)
    stop = int(free[0, 6])  # the 3rd generated token of row 0
    out = generate(model, prompt, 12, temperature=0, stop_token=stop)
    row0 = out[0, 4:].tolist()
    assert row0[:row0.index(stop) + 1] == free[0, 4:4 + row0.index(stop) + 1].tolist()
    assert all(t == stop for t in row0[row0.index(stop):])  # padded with the stop token after it
    assert out.shape[1] <= free.shape[1]


def _with_eos(model, eos):
    """The same weights under a config whose eos_token_id is `eos` (a model "trained" to stop there)."""
    m = Transformer(model.config.replace(eos_token_id=eos)).eval()
    m.load_state_dict(model.state_dict())
    return m


def test_default_stops_at_the_configs_eos_token_id(model):
    prompt = torch.randint(0, 256, (1, 4))
    free = generate(model, prompt, 12, temperature=0)  # the tiny preset has no eos_token_id: never stops
    assert model.config.eos_token_id is None and free.shape == (1, 16)
    eos = int(free[0, 7])  # the 4th generated token
    first = free[0, 4:].tolist().index(eos)
    m = _with_eos(model, eos)
    out = generate(m, prompt, 12, temperature=0)
    assert out[0].tolist() == free[0, :4 + first + 1].tolist()  # identical up to and including eos, then ends
    assert torch.equal(generate(m, prompt, 12, temperature=0, stop_token=None), free)  # None: never stop
    gen = free[0, 4:].tolist()
    other = next(t for t in gen if t != eos)  # (a random model repeats itself: pick an id that differs)
    out = generate(m, prompt, 12, temperature=0, stop_token=other)  # an explicit id replaces the config's
    assert out[0].tolist() == free[0, :4 + gen.index(other) + 1].tolist()


def test_batch_rows_stop_at_any_of_several_ids_and_pad_with_their_own(model):
    torch.manual_seed(3)
    prompt = torch.randint(0, 256, (3, 5))
    free = generate(model, prompt, 14, temperature=0)[:, 5:]
    stops = (int(free[0, 2]), int(free[1, 6]), int(free[2, 4]))  # each row holds one: rows end at different steps
    out = generate(_with_eos(model, stops), prompt, 14, temperature=0)[:, 5:]
    ends = []
    for row, ref in zip(out.tolist(), free.tolist()):
        k = next(i for i, t in enumerate(ref) if t in stops)  # this row's first stop token
        ends.append(k)
        assert row[:k + 1] == ref[:k + 1]
        assert all(t == ref[k] for t in row[k:])  # then padded with the stop token this row produced
    assert len(set(ends)) > 1 and out.shape[1] == max(ends) + 1 < 14  # ends when the last row has stopped
    streamed = torch.stack(list(generate_stream(_with_eos(model, stops), prompt, 14, temperature=0)), 1)
    assert torch.equal(streamed[:, :out.shape[1]], out) and streamed.shape == out.shape


def test_eos_token_id_is_validated_and_survives_json():
    import json
    c = TlamaConfig.from_preset("tiny", eos_token_id=[3, 7])  # a list (from JSON) becomes a tuple
    assert c.eos_token_id == (3, 7)
    assert TlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad in (256, -1, (1, 300), True, "2"):
        with pytest.raises(ValueError, match="eos_token_id"):
            TlamaConfig.from_preset("tiny", eos_token_id=bad)


def test_stop_token_argument_errors(model):
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="'eos'"):
        generate(model, prompt, 2, stop_token="eot")
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        generate(model, prompt, 2, stop_token=256)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        generate(model, prompt, 2, stop_token=[])


def test_top_k_filter_keeps_k_largest():
    logits = torch.randn(3, 50)
    out = top_k_filter(logits, 5)
    for row, orig in zip(out, logits):
        kept = torch.isfinite(row).nonzero().flatten()
        assert sorted(kept.tolist()) == sorted(orig.topk(5).indices.tolist())
        torch.testing.assert_close(row[kept], orig[kept])


def test_top_p_filter_equals_a_naive_nucleus():
    logits = torch.randn(4, 30)
    for p in (0.1, 0.5, 0.9, 1.0):
        out = top_p_filter(logits, p)
        for row, orig in zip(out, logits):
            probs = torch.softmax(orig, -1)
            order = probs.argsort(descending=True).tolist()
            keep, total = [], 0.0
            for i in order:  # take tokens in order of probability until the mass reaches p
                keep.append(i)
                total += probs[i].item()
                if total >= p:
                    break
            assert sorted(torch.isfinite(row).nonzero().flatten().tolist()) == sorted(keep)


def test_sampling_argument_errors(model):
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 2, top_k=0)


# --- the KV cache is sized to the request (issue 21: a (max_batch_size, max_seq_len) cache for a real
# model is gigabytes), and a plain forward allocates none ---

def _cache_shapes(model):
    return {tuple(l.attention.cache_k.shape) if l.attention.cache_k is not None else None for l in model.layers}


def test_plain_forward_allocates_no_cache():
    m = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=64, max_batch_size=16)).eval()
    with torch.no_grad():
        m(torch.randint(0, 256, (3, 10)))
    assert _cache_shapes(m) == {None}


def test_generate_allocates_prompt_plus_new_tokens_and_frees_it():
    m = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=64, max_batch_size=16)).eval()
    seen = []
    layer0 = m.layers[0].attention
    hook = layer0.register_forward_hook(lambda mod, args, out: seen.append(tuple(mod.cache_k.shape)))
    prompt = torch.randint(0, 256, (3, 7))
    out = generate(m, prompt, 5, temperature=0)
    hook.remove()
    K, D = m.config.kv_heads, m.config.head_dim
    assert set(seen) == {(3, 7 + 5, K, D)}  # allocated once, never (16, 64, K, D), never regrown
    assert _cache_shapes(m) == {None}  # freed when generation ends
    assert out.shape == (3, 12)


def test_explicit_prefill_cache_grows_on_decode_and_equals_uncached():
    m = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=64, max_batch_size=16)).eval()
    x = torch.randint(0, 256, (2, 20))
    K, D = m.config.kv_heads, m.config.head_dim
    with torch.no_grad():
        full = m(x, kv_cache=False)[0]
        steps = [m(x[:, :6], 0, kv_cache=True)[0]]
        assert _cache_shapes(m) == {(2, 6, K, D)}  # exactly the prompt
        steps += [m(x[:, p:p + 1], p)[0] for p in range(6, 20)]  # decode: the cache doubles as needed
        assert _cache_shapes(m) == {(2, 24, K, D)}  # 6 -> 12 -> 24, never max_seq_len (64)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    m.reset_cache()
    assert _cache_shapes(m) == {None}


def test_decode_without_a_filled_cache_is_refused():
    m = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=64)).eval()
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        m(x, 0)  # a plain forward: fills nothing
        with pytest.raises(ValueError, match=r"would leave a gap.*kv_cache=True"):
            m(x[:, :1], 8)


def test_setup_cache_checks_the_limits():
    m = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=64, max_batch_size=4)).eval()
    with pytest.raises(ValueError, match=r"batch size 5 exceeds the KV cache's max_batch_size \(4\)"):
        m.setup_cache(5, 10)
    with pytest.raises(ValueError, match=r"65 positions > max_seq_len \(64\)"):
        m.setup_cache(1, 65)
    m.setup_cache(2, 10)
    assert _cache_shapes(m) == {(2, 10, m.config.kv_heads, m.config.head_dim)}


def test_eos_token_id_is_saved_and_loaded_with_a_checkpoint(model, tmp_path):
    from tlama_mini import checkpoint as ckpt
    m = _with_eos(model, (5, 9))
    ckpt.save_checkpoint(tmp_path / "ckpt", m, {}, {"model": m.config.to_dict(), "step": 0})
    loaded, _, _ = load_for_inference(tmp_path)
    assert loaded.config.eos_token_id == (5, 9) and loaded.config == m.config


def test_a_model_trains_after_generating():
    """generate runs under torch.inference_mode: what the model caches during it (RoPE angles) must still
    serve a training step, which saves tensors for backward."""
    m = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=40))
    assert not m._freq_cis  # nothing cached yet: generate builds it
    generate(m, torch.randint(0, 256, (1, 4)), 3, temperature=0)
    m.train()
    x = torch.randint(0, 256, (2, 8))
    m(x, targets=x)[1].backward()
    assert m.layers[0].attention.Wq.weight.grad is not None
