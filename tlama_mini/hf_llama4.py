"""Llama 4 checkpoints in and out (`Llama4ForCausalLM`, `Llama4ForConditionalGeneration`), as
transformers 5 writes them; `hf.load_hf_checkpoint` / `hf.save_hf_checkpoint` call this module.

What Llama 4 does and which config field of ours does it:
    moe_layers every interleave_moe_layer_step       moe_layer_interval (layer i is MoE when (i+1) % step == 0)
    sigmoid top-k router, score scales expert input   moe_router="sigmoid"; a shared expert: moe_shared_expert
    intermediate_size (experts) / _mlp (dense)        moe_hidden_dim / ffn_hidden_dim
    no_rope_layers (0 = NoPE every Nth layer)         nope_layer_interval
    attention_chunk_size on RoPE layers               attention_chunk_size (NoPE layers attend globally)
    use_qk_norm: weightless RMS norm after RoPE       qk_l2_norm
    attn_temperature_tuning, floor_scale, attn_scale  attn_temperature_floor, attn_temperature_scale
    rope_parameters (llama3)                          rope_theta, rope_scaling

Names (per layer `model.layers.{i}.` <-> `layers.{i}.`; a vision checkpoint puts the text model
under `language_model.`):
    self_attn.{q,k,v,o}_proj                          attention.{Wq,Wk,Wv,Wo}
    feed_forward.{gate,up,down}_proj                  ffn.{w1,w3,w2}                    (dense layers)
    feed_forward.router                               ffn.gate
    feed_forward.experts.gate_up_proj (E, C, 2F)      ffn.w1 (E, F, C) and ffn.w3 (E, F, C), transposed
    feed_forward.experts.down_proj (E, F, C)          ffn.w2 (E, C, F), transposed
    feed_forward.shared_expert.{gate,up,down}_proj    ffn.shared.{w1,w3,w2}
    vision_model.*, multi_modal_projector.linear_1    vision.* (see `vision.py`), vision.projector
Llama 4 rotates adjacent pairs (x[2i], x[2i+1]) as we do (`apply_rope`), so Wq and Wk need no
permutation, unlike Llama 3 in `hf.py`.
Legend: E experts, F expert hidden size, C d_model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import TlamaConfig, VisionConfig
from .hf_io import check_tensors_match, read_tensors, rope_from_hf
from .model import Transformer

ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
_MODEL_TYPES = {"llama4_text": "Llama4ForCausalLM", "llama4": "Llama4ForConditionalGeneration"}

_ATTN = [("attention.Wq.weight", "self_attn.q_proj.weight"), ("attention.Wk.weight", "self_attn.k_proj.weight"),
         ("attention.Wv.weight", "self_attn.v_proj.weight"), ("attention.Wo.weight", "self_attn.o_proj.weight"),
         ("attention_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight")]
_DENSE = [("ffn.w1.weight", "feed_forward.gate_proj.weight"), ("ffn.w3.weight", "feed_forward.up_proj.weight"),
          ("ffn.w2.weight", "feed_forward.down_proj.weight")]
_MOE = [("ffn.gate.weight", "feed_forward.router.weight"),
        ("ffn.shared.w1.weight", "feed_forward.shared_expert.gate_proj.weight"),
        ("ffn.shared.w3.weight", "feed_forward.shared_expert.up_proj.weight"),
        ("ffn.shared.w2.weight", "feed_forward.shared_expert.down_proj.weight")]
# vision encoder: (ours under `vision.`, theirs under `vision_model.`); per layer `encoder.{i}.` <-> `model.layers.{i}.`
_VISION = [("patch_emb.weight", "patch_embedding.linear.weight"), ("class_emb", "class_embedding"),
           ("pos_emb", "positional_embedding_vlm"), ("norm_pre.weight", "layernorm_pre.weight"),
           ("norm_pre.bias", "layernorm_pre.bias"), ("norm_post.weight", "layernorm_post.weight"),
           ("norm_post.bias", "layernorm_post.bias"), ("adapter.fc1.weight", "vision_adapter.mlp.fc1.weight"),
           ("adapter.fc2.weight", "vision_adapter.mlp.fc2.weight")]
_VISION_LAYER = [(f"{o}.{p}", f"{t}.{p}") for o, t in [
    ("attention.Wq", "self_attn.q_proj"), ("attention.Wk", "self_attn.k_proj"), ("attention.Wv", "self_attn.v_proj"),
    ("attention.Wo", "self_attn.o_proj"), ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")] for p in ("weight", "bias")]


def is_llama4(hf: dict[str, Any]) -> bool:
    """Whether a config.json dict describes a Llama 4 model."""
    names = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), "")]
    return names[0] in ARCHITECTURES


def wants_llama4(c: TlamaConfig) -> bool:
    """Whether a model uses something only Llama 4 (of the formats we write) can store."""
    return (c.moe_router == "sigmoid" or c.qk_l2_norm or c.attention_chunk_size is not None
            or c.nope_layer_interval is not None or c.vision is not None)


# --- configs ---------------------------------------------------------------------------------
def _interval(layers: list[int], n_layers: int, what: str, field: str) -> int | None:
    """The N of `layer i is special when (i + 1) % N == 0` that gives exactly `layers`; None when empty."""
    layers = sorted(layers)
    if not layers:
        return None
    n = layers[0] + 1
    if layers != list(range(n - 1, n_layers, n)):
        raise ValueError(f"unsupported {what} {layers} in config.json: tlama_mini needs every {field}-th layer "
                         f"(layers N-1, 2N-1, ...), e.g. {list(range(n - 1, n_layers, n))}")
    return n


def text_config_from_hf(hf: dict[str, Any], **overrides: Any) -> TlamaConfig:
    """A `TlamaConfig` from a Llama4TextConfig dict (config.json, or its `text_config`)."""
    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ValueError(f"config.json of a Llama 4 model has no {key!r}")
        return hf[key]

    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("router_jitter_noise", 0.0)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"unsupported {key}={hf[key]!r} in config.json; tlama_mini needs {key}={ok!r}")
    n_layers, d_model, n_heads = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = hf.get("moe_layers")
    moe_layers = list(range(step - 1, n_layers, step)) if moe_layers is None else moe_layers
    moe_interval = _interval(moe_layers, n_layers, "moe_layers", "interleave_moe_layer_step")
    no_rope = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                           for i in range(n_layers)]
    nope_interval = _interval([i for i, r in enumerate(no_rope[:n_layers]) if not r], n_layers, "NoPE layers",
                              "no_rope_layer_interval")
    chunk = hf.get("attention_chunk_size")
    expected_types = ["chunked_attention" if r and chunk is not None else "full_attention" for r in no_rope[:n_layers]]
    if hf.get("layer_types") not in (None, expected_types):
        raise ValueError(f"unsupported layer_types {hf['layer_types']} in config.json: tlama_mini uses chunked "
                         f"attention on every RoPE layer and global attention on NoPE layers ({expected_types})")
    head_dim = hf.get("head_dim") or d_model // n_heads
    rope_theta, rope_scaling = rope_from_hf(hf, 500000.0)
    temperature = hf.get("attn_temperature_tuning", True) and nope_interval is not None
    fields = dict(vocab_size=need("vocab_size"), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                  n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                  attn_head_dim=None if d_model % n_heads == 0 and head_dim == d_model // n_heads else head_dim,
                  ffn_hidden_dim=need("intermediate_size_mlp"), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                  rope_theta=rope_theta, rope_scaling=rope_scaling,
                  max_seq_len=hf.get("max_position_embeddings", 4096 * 32),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  attention_chunk_size=chunk if chunk is not None and (nope_interval or 0) != 1 else None,
                  nope_layer_interval=nope_interval, qk_l2_norm=bool(hf.get("use_qk_norm", True)),
                  attn_temperature_floor=int(hf.get("floor_scale", 8192)) if temperature else None,
                  attn_temperature_scale=float(hf.get("attn_scale", 0.1)))
    if moe_interval is not None:
        fields.update(n_experts=need("num_local_experts"), n_experts_per_tok=hf.get("num_experts_per_tok", 1),
                      moe_hidden_dim=need("intermediate_size"), moe_layer_interval=moe_interval,
                      moe_shared_expert=True, moe_router="sigmoid", moe_norm_topk_prob=False,
                      moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    return TlamaConfig(**{**fields, **overrides})


def vision_config_from_hf(v: dict[str, Any]) -> VisionConfig:
    """A `VisionConfig` from a Llama4VisionConfig dict, refusing what Llama 4's code would break on."""
    size, patch = v.get("image_size", 448), v.get("patch_size", 14)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ValueError(f"unsupported non-square image_size {size!r} / patch_size {patch!r} in config.json")
    for key, ok in (("hidden_act", "gelu"), ("multi_modal_projector_bias", False),
                    ("vision_feature_select_strategy", "default")):
        if v.get(key, ok) != ok:
            raise ValueError(f"unsupported vision {key}={v[key]!r} in config.json; tlama_mini needs {ok!r}")
    d, ratio = v.get("hidden_size", 768), v.get("pixel_shuffle_ratio", 0.5)
    proj_in, proj_out = v.get("projector_input_dim", 4096), v.get("projector_output_dim", 4096)
    inter, out_dim = v.get("intermediate_size", 5632), v.get("vision_output_dim", 7680)
    if inter != round(d / ratio ** 2) or not proj_in == proj_out == out_dim:
        raise ValueError(f"inconsistent vision config: the adapter needs intermediate_size ({inter}) = hidden_size / "
                         f"pixel_shuffle_ratio**2 ({d / ratio ** 2:g}) and projector_input_dim ({proj_in}) = "
                         f"projector_output_dim ({proj_out}) = vision_output_dim ({out_dim})")
    theta, scaling = rope_from_hf(v, 10000.0)
    if scaling is not None:
        raise ValueError("unsupported rope scaling in the vision config")
    return VisionConfig(image_size=size, patch_size=patch, n_channels=v.get("num_channels", 3), d_model=d,
                        n_layers=v.get("num_hidden_layers", 34), n_heads=v.get("num_attention_heads", 16),
                        ffn_dim=inter, rope_theta=theta, pixel_shuffle_ratio=ratio, projector_dim=out_dim,
                        norm_eps=float(v.get("norm_eps", 1e-5)))


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TlamaConfig:
    """A `TlamaConfig` from a Llama 4 config.json dict (text-only or with vision)."""
    if "text_config" not in hf:
        return text_config_from_hf(hf, **overrides)
    if hf.get("tie_word_embeddings", False) != hf["text_config"].get("tie_word_embeddings", False):
        raise ValueError("config.json sets tie_word_embeddings differently for the model and its text_config")
    vision = vision_config_from_hf(hf.get("vision_config") or {})
    return text_config_from_hf(hf["text_config"], vision=vision,
                               image_token_id=hf.get("image_token_index", 200092), **overrides)


def _text_config_to_hf(c: TlamaConfig) -> dict[str, Any]:
    problems = [why for bad, why in [
        (c.qk_norm, "qk_norm with weights (Llama 4's QK-norm is qk_l2_norm)"),
        (c.sliding_window is not None, f"sliding_window={c.sliding_window}"),
        (c.parallel_block, "the parallel block (parallel_block=True)"),
        (c.xpos_scale_base is not None, f"xPos (xpos_scale_base={c.xpos_scale_base})"),
        (c.n_experts is not None and (c.moe_router != "sigmoid" or not c.moe_shared_expert),
         "MoE without Llama 4's sigmoid router and shared expert"),
        (c.attention_chunk_size is not None and c.nope_layer_interval == 1,
         "attention_chunk_size with every layer NoPE"),
        (c.attn_head_dim is None and c.d_model % c.n_heads, "head_dim"),
    ] if bad]
    if problems:
        raise ValueError("cannot save as a Llama 4 checkpoint: " + "; ".join(problems))
    scaling = None if c.rope_scaling is None else {
        "rope_type": "llama3", "factor": c.rope_scaling.factor, "low_freq_factor": c.rope_scaling.low_freq_factor,
        "high_freq_factor": c.rope_scaling.high_freq_factor,
        "original_max_position_embeddings": c.rope_scaling.original_max_seq_len}
    no_rope = [int(not c.is_nope_layer(i)) for i in range(c.n_layers)]
    moe_step = c.moe_layer_interval if c.n_experts is not None else c.n_layers + 1
    return {
        "model_type": "llama4_text", "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim, "intermediate_size": c.moe_hidden_dim or c.ffn_dim, "intermediate_size_mlp": c.ffn_dim,
        "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta} if scaling is None
        else {**scaling, "rope_theta": c.rope_theta},
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
        "num_local_experts": c.n_experts or 1, "num_experts_per_tok": c.n_experts_per_tok if c.n_experts else 1,
        "interleave_moe_layer_step": moe_step, "moe_layers": [i for i in range(c.n_layers) if c.is_moe_layer(i)],
        "router_aux_loss_coef": c.moe_aux_loss_coef, "router_jitter_noise": 0.0,
        "use_qk_norm": c.qk_l2_norm, "no_rope_layers": no_rope, "no_rope_layer_interval": c.nope_layer_interval or 4,
        "attention_chunk_size": c.attention_chunk_size,
        "layer_types": ["chunked_attention" if r and c.attention_chunk_size is not None else "full_attention"
                        for r in no_rope],
        "attn_temperature_tuning": c.attn_temperature_floor is not None,
        "floor_scale": c.attn_temperature_floor or 8192, "attn_scale": c.attn_temperature_scale,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def config_to_hf(c: TlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json contents for `c`: Llama4ForCausalLM, or Llama4ForConditionalGeneration with vision."""
    text = _text_config_to_hf(c)
    dt = str(dtype).removeprefix("torch.")
    if c.vision is None:
        return {"architectures": ["Llama4ForCausalLM"], **text, "dtype": dt}
    v = c.vision
    vision = {"model_type": "llama4_vision_model", "hidden_size": v.d_model, "hidden_act": "gelu",
              "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads, "num_channels": v.n_channels,
              "intermediate_size": v.ffn_dim, "vision_output_dim": v.projector_dim, "image_size": v.image_size,
              "patch_size": v.patch_size, "norm_eps": v.norm_eps, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
              "projector_input_dim": v.projector_dim, "projector_output_dim": v.projector_dim,
              "multi_modal_projector_bias": False, "vision_feature_select_strategy": "default",
              "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta}}
    if v.ffn_dim != v.shuffled_dim:
        raise ValueError(f"cannot save as a Llama 4 checkpoint: Llama 4's adapter reads vision.ffn_dim "
                         f"({v.ffn_dim}) features, which must equal d_model / pixel_shuffle_ratio**2 ({v.shuffled_dim})")
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
            "vision_config": vision, "image_token_index": c.image_token_id,
            "tie_word_embeddings": c.tie_embeddings, "dtype": dt}


# --- tensors -----------------------------------------------------------------------------------
def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under Llama 4's names and layouts."""
    c, sd = model.config, model.state_dict()
    text = "language_model." if c.vision is not None else ""
    out = {f"{text}model.embed_tokens.weight": sd["token_emb.weight"], f"{text}model.norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:
        out[f"{text}lm_head.weight"] = sd["output.weight"]
    for i in range(c.n_layers):
        ours, theirs = f"layers.{i}.", f"{text}model.layers.{i}."
        for o, t in _ATTN + (_MOE if c.is_moe_layer(i) else _DENSE):
            out[theirs + t] = sd[ours + o]
        if c.is_moe_layer(i):  # (E, F, C) x2 -> (E, C, 2F): gate columns first, then up
            out[theirs + "feed_forward.experts.gate_up_proj"] = torch.cat(
                [sd[ours + "ffn.w1"], sd[ours + "ffn.w3"]], dim=1).transpose(1, 2)
            out[theirs + "feed_forward.experts.down_proj"] = sd[ours + "ffn.w2"].transpose(1, 2)  # (E, F, C)
    if c.vision is not None:
        out["multi_modal_projector.linear_1.weight"] = sd["vision.projector.weight"]
        for o, t in _VISION:
            out["vision_model." + t] = sd["vision." + o]
        for i in range(c.vision.n_layers):
            for o, t in _VISION_LAYER:
                out[f"vision_model.model.layers.{i}.{t}"] = sd[f"vision.encoder.{i}.{o}"]
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], c: TlamaConfig) -> dict[str, torch.Tensor]:
    """Llama 4's names and layouts -> our state dict (the inverse of `to_hf_state_dict`)."""
    text = "language_model." if c.vision is not None else ""
    sd = {"token_emb.weight": tensors[f"{text}model.embed_tokens.weight"],
          "norm.weight": tensors[f"{text}model.norm.weight"],
          "output.weight": tensors[f"{text}model.embed_tokens.weight" if c.tie_embeddings else f"{text}lm_head.weight"]}
    for i in range(c.n_layers):
        ours, theirs = f"layers.{i}.", f"{text}model.layers.{i}."
        for o, t in _ATTN + (_MOE if c.is_moe_layer(i) else _DENSE):
            sd[ours + o] = tensors[theirs + t]
        if c.is_moe_layer(i):
            gate_up = tensors[theirs + "feed_forward.experts.gate_up_proj"]  # (E, C, 2F)
            if gate_up.ndim != 3 or gate_up.shape[2] % 2:
                raise ValueError(f"{theirs}feed_forward.experts.gate_up_proj has shape {tuple(gate_up.shape)}; "
                                 "expected (E, C, 2F)")
            w1, w3 = gate_up.transpose(1, 2).chunk(2, dim=1)  # (E, F, C) each
            sd[ours + "ffn.w1"], sd[ours + "ffn.w3"] = w1, w3
            sd[ours + "ffn.w2"] = tensors[theirs + "feed_forward.experts.down_proj"].transpose(1, 2)  # (E, C, F)
    if c.vision is not None:
        sd["vision.projector.weight"] = tensors["multi_modal_projector.linear_1.weight"]
        for o, t in _VISION:
            sd["vision." + o] = tensors["vision_model." + t]
        for i in range(c.vision.n_layers):
            for o, t in _VISION_LAYER:
                sd[f"vision.encoder.{i}.{o}"] = tensors[f"vision_model.model.layers.{i}.{t}"]
    return sd


def load_llama4_checkpoint(path: Path, hf: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """A `Transformer` from a Llama 4 checkpoint directory; see `hf.load_hf_checkpoint`."""
    config = config_from_hf(hf, **overrides)
    tensors = {k: v for k, v in read_tensors(path).items() if not k.endswith("rotary_embedding.freqs_ci")}
    prefix = "language_model." if config.vision is not None else ""
    if config.tie_embeddings:
        tensors.pop(f"{prefix}lm_head.weight", None)
    check_tensors_match(tensors, to_hf_state_dict, config)
    model = Transformer(config)
    model.load_state_dict(from_hf_state_dict(tensors, config), strict=True)
    return model


def save_llama4_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """config.json and model.safetensors that transformers loads as Llama 4."""
    hf = config_to_hf(model.config, model.token_emb.weight.dtype)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in to_hf_state_dict(model).items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path
