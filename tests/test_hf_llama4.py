"""Llama 4 (text) in tlama_mini against transformers' `Llama4ForCausalLM`.

Tiny random models built by transformers itself (no download), fp32, every parameter redrawn so
that each part (the sigmoid router, the shared expert, QK-norm, the NoPE layers' temperature) moves
the logits visibly. Prompts of 20 tokens cross the chunk boundaries of chunked attention, and
`floor_scale` is small enough that temperature tuning acts at these lengths. Run with -s to see the
measured max abs differences.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tlama_mini import RopeScaling, TlamaConfig, Transformer, generate  # noqa: E402
from tlama_mini.attention import attn_temperature  # noqa: E402
from tlama_mini.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from tlama_mini.moe import MoE, moe_loop  # noqa: E402

TOL = 1e-4
V = 128
TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
            max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: vectors ~ 1 + 0.3 N(0, 1); matrices ~ N(0, 1/fan_in), where the fan-in of
    Llama 4's stacked experts, gate_up_proj (E, C, 2F) and down_proj (E, F, C), is their middle dimension."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            fan_in = p.shape[1] if p.ndim == 3 else p.shape[-1]
            p.copy_(1 + 0.3 * noise if p.ndim == 1 else noise / math.sqrt(fan_in))


def build_hf_text(seed: int, **overrides) -> torch.nn.Module:
    config = transformers.Llama4TextConfig(**{**TEXT, **overrides})
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(config).eval()
    randomize_(model, seed)
    return model


def tokens(seed: int, shape=(2, 20)) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CASES = {
    # MoE on layers 1 and 3 (top-1), NoPE on layer 3, chunks of 8, temperature from position 3, llama3 RoPE
    "moe-every-2nd-nope-chunked-temperature": dict(interleave_moe_layer_step=2, no_rope_layer_interval=4,
                                                  attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
                                                  rope_parameters=LLAMA3_ROPE),
    # every layer MoE (top-2), NoPE on layers 1 and 3, chunks of 5, no QK-norm, MHA, tied embeddings
    "all-moe-top2-no-qknorm-tied": dict(interleave_moe_layer_step=1, num_experts_per_tok=2, no_rope_layer_interval=2,
                                        attention_chunk_size=5, floor_scale=2, attn_scale=0.3, use_qk_norm=False,
                                        num_key_value_heads=4, tie_word_embeddings=True),
    # dense everywhere, RoPE everywhere, global attention
    "dense-global": dict(interleave_moe_layer_step=5, no_rope_layer_interval=8, attention_chunk_size=None,
                         rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_llama4_text_logits_cached_decode_and_greedy_generation_match_transformers(name, tmp_path):
    seed = 5000 + list(CASES).index(name)
    hf = build_hf_text(seed, **CASES[name])
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, max_batch_size=2).eval()
    c = ours.config
    if name.startswith("moe-every-2nd"):
        assert (c.moe_layer_interval, c.nope_layer_interval, c.attention_chunk_size, c.attn_temperature_floor,
                c.qk_l2_norm, c.moe_router, c.moe_shared_expert) == (2, 4, 8, 4, True, "sigmoid", True)
        assert c.rope_scaling == RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_seq_len=16)
        assert [isinstance(layer.ffn, MoE) for layer in ours.layers] == [False, True, False, True]
    x = tokens(seed)
    with torch.no_grad():
        ref = hf(x).logits  # (B, T, V)
        full, _ = ours(x, kv_cache=False)
        prefill = 5
        steps = [ours(x[:, :prefill], start_pos=0, kv_cache=True)[0]]
        steps += [ours(x[:, pos, None], start_pos=pos)[0] for pos in range(prefill, x.shape[1])]
        cached = torch.cat(steps, dim=1)
    d_full, d_cached = max_diff(full, ref), max_diff(cached, ref)
    print(f"\n[llama4] {name}: logits max|diff| = {d_full:.2e}, cached decode max|diff| = {d_cached:.2e} "
          f"(|logits| up to {ref.abs().max():.1f})")
    assert d_full < TOL and d_cached < TOL

    prompt = x[:, :6]
    ours_out = generate(ours, prompt, 14, temperature=0)
    hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False)
    assert torch.equal(ours_out, hf_out)


def test_each_llama4_feature_changes_the_logits(tmp_path):
    """The comparison above can fail: turning off any one of Llama 4's features in our model moves the logits."""
    hf = build_hf_text(5100, **CASES["moe-every-2nd-nope-chunked-temperature"])
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, max_batch_size=2).eval()
    x = tokens(5100)
    with torch.no_grad():
        ref = hf(x).logits
        for change in (dict(qk_l2_norm=False), dict(attn_temperature_floor=None), dict(attention_chunk_size=None),
                       dict(nope_layer_interval=None, attn_temperature_floor=None), dict(moe_router="softmax"),
                       dict(rope_scaling=None)):
            other = Transformer(ours.config.replace(**change)).eval()
            other.load_state_dict(ours.state_dict())
            d = max_diff(other(x, kv_cache=False)[0], ref)
            assert d > 100 * TOL, f"{change} left the logits within {d:.1e}"


def test_sigmoid_router_scales_the_expert_input_and_batched_equals_loop():
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=4, k=2, shared_expert=True, router="sigmoid")
    for w in (moe.w1, moe.w2, moe.w3):
        torch.nn.init.normal_(w, std=0.5)
    x = torch.randn(3, 7, 16)
    y, aux = moe(x)
    y_loop, aux_loop = moe_loop(moe, x)
    assert torch.allclose(y, y_loop, atol=1e-5) and torch.allclose(aux, aux_loop)
    # by hand for one token: sum over its top-2 experts of expert(sigmoid(logit) * x) + shared(x)
    xf = x.reshape(-1, 16)[4]
    logits = moe.gate(xf)
    top, idx = logits.topk(2)
    expect = moe.shared(xf)
    for s, e in zip(torch.sigmoid(top), idx):
        h = xf * s
        expect = expect + (torch.nn.functional.silu(h @ moe.w1[e].T) * (h @ moe.w3[e].T)) @ moe.w2[e].T
    assert torch.allclose(y.reshape(-1, 16)[4], expect, atol=1e-5)


def test_attn_temperature_is_one_before_the_floor_then_grows_like_a_log():
    pos = torch.arange(0, 40)
    t = attn_temperature(pos, floor=8, scale=0.1)
    assert torch.equal(t[:7], torch.ones(7))
    assert torch.allclose(t[7], torch.tensor(1 + 0.1 * math.log(2)))
    assert torch.allclose(t[39], torch.tensor(1 + 0.1 * math.log(6)))


ROUND_TRIP = {
    "moe-nope-chunked": dict(n_experts=4, n_experts_per_tok=1, moe_hidden_dim=48, moe_layer_interval=2,
                             moe_shared_expert=True, moe_router="sigmoid", moe_norm_topk_prob=False,
                             nope_layer_interval=4, attention_chunk_size=6, qk_l2_norm=True,
                             attn_temperature_floor=3, attn_temperature_scale=0.2,
                             rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_seq_len=16)),
    "dense-qk-l2-tied": dict(qk_l2_norm=True, tie_embeddings=True, nope_layer_interval=2),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_llama4_round_trip_through_transformers(name, tmp_path):
    config = TlamaConfig.from_preset("tiny", vocab_size=V, n_layers=4, max_seq_len=64, ffn_hidden_dim=80,
                                     **ROUND_TRIP[name])
    seed = 5200 + list(ROUND_TRIP).index(name)
    torch.manual_seed(seed)
    ours = Transformer(config).eval()
    randomize_(ours, seed)
    save_hf_checkpoint(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Llama4ForCausalLM"
    x = tokens(seed)
    with torch.no_grad():
        d = max_diff(ours(x, kv_cache=False)[0], hf(x).logits)
    print(f"\n[llama4] round trip {name}: logits max|diff| = {d:.2e}")
    assert d < TOL
    back = load_hf_checkpoint(tmp_path, max_batch_size=config.max_batch_size)
    assert back.config == config.replace(weight_init=back.config.weight_init, moe_aux_loss_coef=back.config.moe_aux_loss_coef,
                                         multiple_of=back.config.multiple_of, norm_eps=back.config.norm_eps)
    sd, back_sd = ours.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys() and all(torch.equal(sd[k], back_sd[k]) for k in sd)


@pytest.mark.parametrize("hf_changes, message", [
    (dict(moe_layers=[0, 3]), r"unsupported moe_layers \[0, 3\]"),
    (dict(no_rope_layers=[1, 0, 0, 1]), r"unsupported NoPE layers \[1, 2\]"),
    (dict(hidden_act="gelu"), "unsupported hidden_act='gelu'"),
    (dict(layer_types=["full_attention"] * 4), "unsupported layer_types"),
])
def test_unsupported_llama4_configs_are_refused_by_name(hf_changes, message, tmp_path):
    build_hf_text(5300, **CASES["moe-every-2nd-nope-chunked-temperature"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hf_changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)


def test_models_llama4_cannot_hold_are_refused_when_saving(tmp_path):
    config = TlamaConfig.from_preset("tiny", qk_l2_norm=True, n_experts=4, moe_router="softmax")
    with pytest.raises(ValueError, match="sigmoid router and shared expert"):
        save_hf_checkpoint(Transformer(config), tmp_path)
    with pytest.raises(ValueError, match="qk_norm .* and qk_l2_norm"):
        TlamaConfig.from_preset("tiny", qk_norm=True, qk_l2_norm=True)
    with pytest.raises(ValueError, match="attn_temperature_floor .* NoPE layers only"):
        TlamaConfig.from_preset("tiny", attn_temperature_floor=8)
