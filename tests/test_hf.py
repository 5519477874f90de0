"""tlama_mini.hf against the Hugging Face `transformers` implementations of the same architectures.

Small random models built by transformers itself (no download), fp32. Every parameter is redrawn
(norm weights too, so a wrong q_norm/k_norm permutation cannot hide behind weights of 1) with a
scale that gives O(1) attention scores and logits, so a layout error changes the logits visibly.
Run with -s to see the measured max abs differences.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tlama_mini import RopeScaling, TlamaConfig, Transformer, apply_rope, compute_freqs_cis, generate  # noqa: E402
from tlama_mini.hf import adjacent_to_hf, hf_to_adjacent, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402

TOL = 1e-4
V = 128
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: vectors (norm weights) ~ 1 + 0.3 N(0, 1), matrices ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if p.ndim == 1 else noise / math.sqrt(p.shape[-1]))


def build_hf(arch: str, seed: int, **overrides):
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    randomize_(model, seed)
    return model


def tokens(seed: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CASES = {  # name: (architecture, config overrides)
    "llama-mha": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaForCausalLM", dict(max_position_embeddings=256, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "qwen3-qknorm-gqa": ("Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3-wide-heads": ("Qwen3ForCausalLM", dict(head_dim=32)),  # head_dim != hidden / heads, as in real Qwen3
    "mixtral-moe-gqa-top2": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-sliding-window": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                          sliding_window=4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_cached_decode_and_greedy_generation_match_transformers(name, tmp_path):
    arch, overrides = CASES[name]
    seed = 1000 + list(CASES).index(name)
    hf = build_hf(arch, seed, **overrides)
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, max_batch_size=2).eval()
    if arch == "LlamaForCausalLM" and "rope_parameters" in overrides:
        assert ours.config.rope_scaling == RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_seq_len=64)
    x = tokens(seed)
    with torch.no_grad():
        ref = hf(x).logits  # (B, T, V)
        full, _ = ours(x, kv_cache=False)
        prefill = 5  # then one token at a time through our KV cache
        steps = [ours(x[:, :prefill], start_pos=0, kv_cache=True)[0]]
        steps += [ours(x[:, pos, None], start_pos=pos)[0] for pos in range(prefill, x.shape[1])]
        cached = torch.cat(steps, dim=1)
    d_full, d_cached = max_diff(full, ref), max_diff(cached, ref)
    print(f"\n[hf] {name}: logits max|diff| = {d_full:.2e}, cached decode max|diff| = {d_cached:.2e} "
          f"(|logits| up to {ref.abs().max():.1f})")
    assert d_full < TOL and d_cached < TOL

    prompt = x[:, :4]
    ours_out = generate(ours, prompt, 12, temperature=0)
    hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(ours_out, hf_out)


def test_rope_permutation_turns_rotate_half_into_adjacent_pairs():
    """HF's rotation of a head, reordered by `hf_to_adjacent`, equals our rotation of the reordered head."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, H, D = 2, 7, 3, 8
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    freqs = compute_freqs_cis(D, T)  # (T, D/2)
    angles = torch.cat([freqs.angle(), freqs.angle()], dim=-1)  # HF's cos/sin layout: (T, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, angles.cos()[None], angles.sin()[None])  # (B, H, T, D)

    def to_ours(x):  # (B, H, T, D) in HF's order -> (B, T, H, D) in ours
        return hf_to_adjacent(x.permute(3, 0, 1, 2), 1).permute(1, 3, 2, 0).contiguous()

    q_ours, k_ours = apply_rope(to_ours(q), to_ours(k), freqs)
    assert torch.allclose(q_ours, to_ours(q_hf), atol=1e-6) and torch.allclose(k_ours, to_ours(k_hf), atol=1e-6)
    w = torch.randn(H * D, 5, generator=g)
    assert torch.equal(adjacent_to_hf(hf_to_adjacent(w, H), H), w)
    assert torch.equal(hf_to_adjacent(torch.arange(4), 1), torch.tensor([0, 2, 1, 3]))  # x0, x2 | x1, x3


def test_sharded_fused_and_pickle_layouts_load_the_same_weights(tmp_path):
    hf = build_hf("MixtralForCausalLM", 2001, num_local_experts=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5 keeps Mixtral experts fused in memory: gate_up_proj (E, 2F, C), down_proj (E, C, F)
    fused = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    for name in ("fused", "bin"):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / name)
    save_file(fused, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    torch.save(fused, tmp_path / "bin" / "pytorch_model.bin")
    x = tokens(2001)
    with torch.no_grad():
        ref = hf(x).logits
        for name in ("sharded", "fused", "bin"):
            logits, _ = load_hf_checkpoint(tmp_path / name).eval()(x, kv_cache=False)
            print(f"\n[hf] mixtral from {name} checkpoint: logits max|diff| = {max_diff(logits, ref):.2e}")
            assert max_diff(logits, ref) < TOL


OUR_CONFIGS = {
    "llama-gqa-tied-rope-scaling": dict(tie_embeddings=True, rope_theta=50000.0, rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32)),
    "qwen3-qknorm": dict(qk_norm=True, n_kv_heads=1),
    "qwen3-qknorm-sliding": dict(qk_norm=True, sliding_window=3),
    "mixtral-moe": dict(n_experts=4, n_experts_per_tok=2, moe_hidden_dim=48, sliding_window=5),
}


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
def test_round_trip_through_transformers(name, tmp_path):
    config = TlamaConfig.from_preset("tiny", vocab_size=V, max_seq_len=64, ffn_hidden_dim=80,
                                     norm_eps=1e-6, **OUR_CONFIGS[name])
    seed = 3000 + list(OUR_CONFIGS).index(name)
    torch.manual_seed(seed)
    ours = Transformer(config).eval()
    randomize_(ours, seed)
    save_hf_checkpoint(ours, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not config.tie_embeddings)  # a tied head is written once

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(seed)
    with torch.no_grad():
        d = max_diff(ours(x, kv_cache=False)[0], hf(x).logits)
    print(f"\n[hf] round trip {name} ({type(hf).__name__}): logits max|diff| = {d:.2e}")
    assert d < TOL

    back = load_hf_checkpoint(tmp_path, max_batch_size=config.max_batch_size)
    keep = ("d_model", "n_layers", "n_heads", "kv_heads", "norm_eps", "rope_theta", "rope_scaling",
            "qk_norm", "sliding_window", "n_experts", "n_experts_per_tok", "tie_embeddings", "max_seq_len")
    assert {k: getattr(back.config, k) for k in keep} == {k: getattr(config, k) for k in keep}
    hidden = (lambda c: c.moe_hidden_dim or c.ffn_dim) if config.n_experts else (lambda c: c.ffn_dim)
    assert hidden(back.config) == hidden(config)
    ours_sd, back_sd = ours.state_dict(), back.state_dict()
    assert ours_sd.keys() == back_sd.keys()
    assert all(torch.equal(ours_sd[k], back_sd[k]) for k in ours_sd)
    assert (back.output.weight is back.token_emb.weight) == config.tie_embeddings


# --- bad input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf("LlamaForCausalLM", 4000).save_pretrained(path)
    return path


@pytest.fixture
def ckpt(llama_dir, tmp_path):
    """A fresh copy of a valid Llama checkpoint to damage."""
    return shutil.copytree(llama_dir, tmp_path / "ckpt")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory_config_or_weights(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_hf_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(ckpt)


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "rope_type 'yarn'"),
])
def test_unsupported_config_is_named(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(ckpt)


def test_shape_mismatch_names_tensor_and_shapes(ckpt):
    edit_config(ckpt, intermediate_size=80)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\), "
                                         r"but config.json implies \(80, 64\)"):
        load_hf_checkpoint(ckpt)


def test_missing_and_unexpected_tensors_are_listed(ckpt):
    from safetensors.torch import load_file
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_bias"] = torch.zeros(64)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*"
                                         r"unexpected \['model.layers.0.self_attn.q_bias'\]"):
        load_hf_checkpoint(ckpt)


def test_truncated_safetensors_and_escaping_index_are_refused(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    index = {"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="points outside"):
        load_hf_checkpoint(ckpt)


class Payload:
    """Unpickling this object calls os.makedirs(marker): a harmless stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_malicious_pickle_is_refused_without_running_code(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, ckpt / "pytorch_model.bin")
    probe = tmp_path / "probe_marker"  # prove the payload is live: a plain unpickle does run it
    torch.save({"x": Payload(probe)}, tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert probe.exists()
    with pytest.raises(ValueError, match="refused to load .*pytorch_model.bin"):
        load_hf_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("changes, message", [
    # NoPE layers and chunked attention are saved as Llama 4 (tests/test_hf_llama4.py), which refuses these:
    (dict(nope_layer_interval=2, qk_norm=True), "Llama 4 checkpoint: qk_norm with weights"),
    (dict(attention_chunk_size=8, xpos_scale_base=512), "Llama 4 checkpoint: xPos"),
    (dict(parallel_block=True), "parallel block"),
    (dict(n_experts=4, moe_shared_expert=True), "shared expert"),
    (dict(n_experts=4, moe_layer_interval=2), "moe_layer_interval=2"),
    (dict(n_experts=4, qk_norm=True), "qk_norm"),
    (dict(sliding_window=8), "Llama has none"),
])
def test_save_refuses_what_hf_cannot_represent(tmp_path, changes, message):
    model = Transformer(TlamaConfig.from_preset("tiny", **changes))
    with pytest.raises(ValueError, match=message):
        save_hf_checkpoint(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_save_refuses_a_mismatched_architecture(tmp_path):
    with pytest.raises(ValueError, match="only be saved as LlamaForCausalLM, not 'MixtralForCausalLM'"):
        save_hf_checkpoint(Transformer(TlamaConfig.from_preset("tiny")), tmp_path, "MixtralForCausalLM")
