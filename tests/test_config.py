import dataclasses

import pytest

from tlama_mini import PRESETS, RopeScaling, TlamaConfig
from tlama_mini.config import ffn_hidden_size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name):
    cfg = TlamaConfig.from_preset(name)
    assert TlamaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=16, n_kv_heads=5, d_model=512), "n_heads (16) must be divisible by n_kv_heads (5)"),
    (dict(d_model=100, n_heads=16), "d_model (100) must be divisible by n_heads (16)"),
    (dict(d_model=48, n_heads=16), "head_dim (3) must be even"),
    (dict(vocab_size=-5), "vocab_size (-5) must be a positive integer"),
    (dict(n_layers=0), "n_layers (0) must be a positive integer"),
    (dict(max_seq_len=2.5), "max_seq_len (2.5) must be a positive integer"),
    (dict(dropout=1.0), "dropout (1.0) must be in [0, 1)"),
    (dict(attn_backend="fast"), "attn_backend ('fast') must be one of"),
    (dict(n_experts=2, n_experts_per_tok=3), "n_experts_per_tok (3) must be <= n_experts (2)"),
    (dict(sliding_window=8, attention_chunk_size=8), "mutually exclusive"),
    (dict(attn_backend="flash", sliding_window=8), "attn_backend='flash'"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_invalid_configs_name_fields_and_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TlamaConfig(**kwargs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        TlamaConfig.from_preset("huge")


def test_unknown_fields_in_from_dict():
    with pytest.raises(ValueError, match=r"unknown TlamaConfig fields \['n_embd'\]"):
        TlamaConfig.from_dict({"n_embd": 3})


def test_config_is_immutable_and_replace_validates():
    cfg = TlamaConfig.from_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 5
    assert cfg.replace(n_layers=3).n_layers == 3 and cfg.n_layers == 2
    with pytest.raises(ValueError, match="n_kv_heads"):
        cfg.replace(n_kv_heads=3)


def test_derived_values():
    cfg = TlamaConfig(d_model=1024, n_heads=16, n_kv_heads=4)
    assert (cfg.head_dim, cfg.n_rep, cfg.kv_heads) == (64, 4, 4)
    assert TlamaConfig(d_model=1024, n_heads=16).kv_heads == 16
    assert TlamaConfig(d_model=100, n_heads=4, attn_head_dim=32).head_dim == 32
    assert TlamaConfig(rope_scaling={"factor": 4.0}).rope_scaling == RopeScaling(factor=4.0)


def test_ffn_hidden_size_matches_llama():
    # Llama-2-7B: d_model 4096, multiple_of 256 -> 11008; Llama-3-8B: multiplier 1.3, multiple_of 1024 -> 14336.
    assert ffn_hidden_size(4 * 4096, 256, None) == 11008
    assert ffn_hidden_size(4 * 4096, 1024, 1.3) == 14336
    assert TlamaConfig(d_model=4096, n_heads=32).ffn_dim == 11008
    assert TlamaConfig(ffn_hidden_dim=100).ffn_dim == 100
