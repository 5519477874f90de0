"""Hugging Face checkpoints in and out: every name and layout difference in one adapter.

`load_hf_checkpoint(dir)` reads what `transformers`' `save_pretrained` writes (config.json plus
model.safetensors, a sharded model.safetensors.index.json, or a pytorch_model.bin loaded with
`weights_only=True`) for `LlamaForCausalLM`, `Qwen3ForCausalLM` (QK-norm) and `MixtralForCausalLM`
(MoE); `save_hf_checkpoint(model, dir)` writes one that `AutoModelForCausalLM.from_pretrained` loads.
Llama 4 (`Llama4ForCausalLM`, and `Llama4ForConditionalGeneration` with vision) has its own adapter,
`hf_llama4.py`, which both functions hand over to; what both read with is in `hf_io.py`.

Names (per layer `model.layers.{i}.` <-> `layers.{i}.`; see the glossary in `tlama_mini/__init__.py`):
    model.embed_tokens / model.norm / lm_head        token_emb / norm / output
    self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm   attention.{Wq,Wk,Wv,Wo}, attention.{q,k}_norm
    input_layernorm / post_attention_layernorm       attention_norm / ffn_norm
    mlp.{gate,up,down}_proj                          ffn.{w1,w3,w2}
    block_sparse_moe.gate, .experts.{e}.w{1,2,3}     ffn.gate, ffn.w{1,2,3}[e] (stacked: (E, F, C), (E, C, F))
    mlp.gate, mlp.experts.gate_up_proj (E, 2F, C)    transformers 5's fused in-memory Mixtral layout (read only)

RoPE layout. Our `apply_rope` rotates adjacent pairs (x[2i], x[2i+1]) of each head (Meta's Llama);
HF's `rotate_half` rotates (x[i], x[i + D/2]). Both use frequency i for pair i, so a head is the
same vector in another order: ours[2i] = hf[i], ours[2i + 1] = hf[i + D/2]. Wq and Wk produce q and
k, so permuting their output rows within each head (and the per-head q_norm/k_norm weights, since an
RMSNorm commutes with a permutation of its features) converts one layout into the other. Scores
q.k are unchanged because q and k get the same permutation; v, Wo and everything else need nothing.
Legend: H heads, K kv heads, D head_dim, C d_model, E experts, F ffn hidden size, V vocab_size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import save_file

from . import hf_llama4
from .config import TlamaConfig
from .hf_io import check_tensors_match, read_tensors, rope_from_hf
from .model import Transformer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM"}
# transformers' defaults for fields a config.json may leave out: (rms_norm_eps, rope_theta, max_position_embeddings)
_DEFAULTS = {"LlamaForCausalLM": (1e-6, 1e4, 2048), "Qwen3ForCausalLM": (1e-6, 1e4, 32768),
             "MixtralForCausalLM": (1e-5, 1e6, 131072)}
# (our suffix, HF suffix) inside one layer; the experts of a MoE layer are handled separately.
_LAYER_NAMES = [
    ("attention.Wq.weight", "self_attn.q_proj.weight"), ("attention.Wk.weight", "self_attn.k_proj.weight"),
    ("attention.Wv.weight", "self_attn.v_proj.weight"), ("attention.Wo.weight", "self_attn.o_proj.weight"),
    ("attention.q_norm.weight", "self_attn.q_norm.weight"), ("attention.k_norm.weight", "self_attn.k_norm.weight"),
    ("attention_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn.w1.weight", "mlp.gate_proj.weight"), ("ffn.w3.weight", "mlp.up_proj.weight"),
    ("ffn.w2.weight", "mlp.down_proj.weight"), ("ffn.gate.weight", "block_sparse_moe.gate.weight"),
]
_EXPERT_NAMES = ("w1", "w2", "w3")  # Mixtral's per-expert names are ours: gate, down, up


# --- the RoPE permutation --------------------------------------------------------------------
def hf_to_adjacent(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head from HF's halves (x[i], x[i+D/2]) to adjacent pairs (x[2i], x[2i+1]).
    w: (n_heads * D, ...) -> same shape."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H, D/2, 2, ...)


def adjacent_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_adjacent`. (n_heads * D, ...) -> same shape."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H, 2, D/2, ...)


def _rope_heads(our_suffix: str, config: TlamaConfig) -> int:
    """How many heads a tensor's rows hold, if it needs the RoPE permutation, else 0."""
    return {"attention.Wq.weight": config.n_heads, "attention.Wk.weight": config.kv_heads,
            "attention.q_norm.weight": 1, "attention.k_norm.weight": 1}.get(our_suffix, 0)


# --- configs ---------------------------------------------------------------------------------
def _architecture(hf: dict[str, Any]) -> str:
    names = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
    if names[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {names[0]!r} in config.json; tlama_mini reads "
                         f"{list(ARCHITECTURES)} and Llama 4 (Llama4ForCausalLM, Llama4ForConditionalGeneration)")
    return names[0]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TlamaConfig:
    """A `TlamaConfig` from a config.json dict; `overrides` (e.g. max_seq_len, max_batch_size) win."""
    arch = _architecture(hf)
    eps, theta, max_pos = _DEFAULTS[arch]

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ValueError(f"config.json of a {arch} has no {key!r}")
        return hf[key]

    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"unsupported {key}={hf[key]!r} in config.json; tlama_mini needs {key}={ok!r}")
    d_model, n_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim")
    attn_head_dim = None if head_dim is None or (not d_model % n_heads and head_dim == d_model // n_heads) else head_dim
    rope_theta, rope_scaling = rope_from_hf(hf, theta)
    sliding = hf.get("sliding_window") if arch == "MixtralForCausalLM" else None
    if arch == "Qwen3ForCausalLM" and hf.get("use_sliding_window"):
        kinds = set(hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                              else "full_attention" for i in range(need("num_hidden_layers"))])
        if kinds != {"sliding_attention"}:
            raise ValueError(f"unsupported layer_types {sorted(kinds)}: tlama_mini needs one kind in all layers")
        sliding = need("sliding_window")
    fields = dict(vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"),
                  n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, attn_head_dim=attn_head_dim,
                  ffn_hidden_dim=need("intermediate_size"), norm_eps=float(hf.get("rms_norm_eps", eps)),
                  rope_theta=rope_theta, rope_scaling=rope_scaling, sliding_window=sliding,
                  max_seq_len=hf.get("max_position_embeddings", max_pos),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  qk_norm=arch == "Qwen3ForCausalLM")
    if arch == "MixtralForCausalLM":  # Mixtral renormalises its top-k router weights to sum to 1
        fields.update(n_experts=need("num_local_experts"), n_experts_per_tok=need("num_experts_per_tok"),
                      moe_hidden_dim=fields["ffn_hidden_dim"], moe_norm_topk_prob=True,
                      moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    return TlamaConfig(**{**fields, **overrides})


def _hf_architecture(c: TlamaConfig, requested: str | None) -> str:
    """The one HF architecture that can represent `c`, or a ValueError naming what cannot be."""
    problems = [why for bad, why in [
        (c.parallel_block, "the parallel block (parallel_block=True)"),
        (c.xpos_scale_base is not None, f"xPos (xpos_scale_base={c.xpos_scale_base})"),
        (c.moe_shared_expert, "a shared expert (moe_shared_expert=True)"),
        (c.n_experts is not None and c.moe_layer_interval != 1,
         f"MoE in only some layers (moe_layer_interval={c.moe_layer_interval})"),
        (c.n_experts is not None and c.qk_norm, "MoE together with qk_norm (Qwen3-MoE is not supported)"),
        (c.n_experts is not None and not c.moe_norm_topk_prob, "moe_norm_topk_prob=False (Mixtral renormalises)"),
        (c.n_experts is None and not c.qk_norm and c.sliding_window is not None,
         f"sliding_window={c.sliding_window} in a dense model without qk_norm (Llama has none)"),
    ] if bad]
    if problems:
        raise ValueError("cannot save as a Hugging Face checkpoint: " + "; ".join(problems))
    arch = ("MixtralForCausalLM" if c.n_experts is not None else
            "Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM")
    if requested is not None and requested != arch:
        raise ValueError(f"this model can only be saved as {arch}, not {requested!r} (qk_norm={c.qk_norm}, "
                         f"n_experts={c.n_experts})")
    return arch


def config_to_hf(c: TlamaConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json contents. RoPE goes in the 4.x keys (rope_theta, rope_scaling), which 5.x also reads."""
    scaling = None if c.rope_scaling is None else {
        "rope_type": "llama3", "factor": c.rope_scaling.factor, "low_freq_factor": c.rope_scaling.low_freq_factor,
        "high_freq_factor": c.rope_scaling.high_freq_factor,
        "original_max_position_embeddings": c.rope_scaling.original_max_seq_len}
    hf = {"architectures": [arch], "model_type": {v: k for k, v in _MODEL_TYPES.items()}[arch],
          "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
          "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
          "intermediate_size": (c.moe_hidden_dim or c.ffn_dim) if c.n_experts else c.ffn_dim,
          "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": scaling,
          "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
          "attention_bias": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
          "dtype": str(dtype).removeprefix("torch.")}
    if arch == "LlamaForCausalLM":
        hf["mlp_bias"] = False
    if arch == "Qwen3ForCausalLM":
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  max_window_layers=0, layer_types=[("full_attention" if c.sliding_window is None
                                                     else "sliding_attention")] * c.n_layers)
    if arch == "MixtralForCausalLM":
        hf.update(num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_tok,
                  sliding_window=c.sliding_window, router_aux_loss_coef=c.moe_aux_loss_coef)
    return hf


# --- tensors -----------------------------------------------------------------------------------
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under HF names and layouts (Mixtral experts one by one, as save_pretrained writes)."""
    c, sd = model.config, model.state_dict()
    out = {"model.embed_tokens.weight": sd["token_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:  # a tied head is the embedding: written once, as HF does
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(c.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for our_suffix, hf_suffix in _LAYER_NAMES:
            if ours + our_suffix in sd:
                w, heads = sd[ours + our_suffix], _rope_heads(our_suffix, c)
                out[theirs + hf_suffix] = adjacent_to_hf(w, heads) if heads else w
        if c.is_moe_layer(i):
            for name in _EXPERT_NAMES:
                for e, w in enumerate(sd[f"{ours}ffn.{name}"]):  # (E, F, C) -> E tensors (F, C)
                    out[f"{theirs}block_sparse_moe.experts.{e}.{name}.weight"] = w
    return out


def _unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused Mixtral layout -> the per-expert one (a no-op for other checkpoints)."""
    out = {}
    for name, w in tensors.items():
        prefix = name.rsplit("mlp.", 1)[0]
        if name.endswith("mlp.gate.weight"):
            out[prefix + "block_sparse_moe.gate.weight"] = w
        elif name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            if w.ndim != 3 or (name.endswith("gate_up_proj") and w.shape[1] % 2):
                raise ValueError(f"tensor {name} has shape {tuple(w.shape)}; expected (E, 2F, C) or (E, C, F)")
            parts = dict(zip(("w1", "w3"), w.chunk(2, dim=1))) if name.endswith("gate_up_proj") else {"w2": w}
            for expert_name, stacked in parts.items():  # gate rows first, then up rows
                for e, we in enumerate(stacked):
                    out[f"{prefix}block_sparse_moe.experts.{e}.{expert_name}.weight"] = we
        else:
            out[name] = w
    return out


def _from_hf_state_dict(tensors: dict[str, torch.Tensor], c: TlamaConfig) -> dict[str, torch.Tensor]:
    """HF names and layouts -> our state dict (the inverse of `to_hf_state_dict`)."""
    sd = {"token_emb.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"],
          "output.weight": tensors["model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"]}
    for i in range(c.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for our_suffix, hf_suffix in _LAYER_NAMES:
            if theirs + hf_suffix in tensors:
                w, heads = tensors[theirs + hf_suffix], _rope_heads(our_suffix, c)
                sd[ours + our_suffix] = hf_to_adjacent(w, heads) if heads else w
        if c.is_moe_layer(i):
            for name in _EXPERT_NAMES:
                sd[f"{ours}ffn.{name}"] = torch.stack([tensors[f"{theirs}block_sparse_moe.experts.{e}.{name}.weight"]
                                                       for e in range(c.n_experts)])  # (E, F, C) or (E, C, F)
    return sd


def load_hf_checkpoint(path: str | Path, **overrides: Any) -> Transformer:
    """A `Transformer` with the weights of a Hugging Face checkpoint directory (in float32).
    `overrides` change config fields HF does not store, e.g. `max_batch_size=1, max_seq_len=4096`
    to keep the preallocated KV cache small."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; save it with save_pretrained or save_hf_checkpoint")
    hf = json.loads((path / "config.json").read_text())
    if hf_llama4.is_llama4(hf):
        return hf_llama4.load_llama4_checkpoint(path, hf, **overrides)
    config = config_from_hf(hf, **overrides)
    tensors = _unfuse_experts(read_tensors(path))
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # HF ignores a stored head when tied; so do we
    check_tensors_match(tensors, to_hf_state_dict, config)
    model = Transformer(config)
    model.load_state_dict(_from_hf_state_dict(tensors, config), strict=True)
    return model


def save_hf_checkpoint(model: Transformer, path: str | Path, architecture: str | None = None) -> Path:
    """Write config.json and model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained`
    loads: Llama for a dense model, Qwen3 with qk_norm, Mixtral for MoE, Llama 4 for Llama 4's features
    (`hf_llama4.py`; with vision, Llama4ForConditionalGeneration). Returns the directory."""
    if hf_llama4.wants_llama4(model.config) or architecture in hf_llama4.ARCHITECTURES:
        arch = "Llama4ForConditionalGeneration" if model.config.vision is not None else "Llama4ForCausalLM"
        if architecture is not None and architecture != arch:
            raise ValueError(f"this model can only be saved as {arch}, not {architecture!r}")
        return hf_llama4.save_llama4_checkpoint(model, Path(path))
    arch = _hf_architecture(model.config, architecture)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in to_hf_state_dict(model).items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})  # "pt": what transformers expects
    hf = config_to_hf(model.config, arch, model.token_emb.weight.dtype)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path
