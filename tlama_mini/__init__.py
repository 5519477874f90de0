"""tlama_mini: a small, tested, modern LLM in PyTorch, built to be read.

Module map (one concept each): config, embeddings (absolute positions), norm, rope, masks, attention, kv_cache, ffn, moe, model,
sample (generation), training, parallel (tensor parallelism), flash (tiled attention), blockwise
(chunked FFN / LM head / loss, seed 002's API), blockwise_attn (tiled attention with bias and dropout),
bpt (the Blockwise Parallel Transformer block), remat (checkpointing policies), memory (peak memory), tokenizer,
paths (offline data lookup), data, trainer, checkpoint, hf (Hugging Face checkpoints; hf_llama4 for Llama 4),
vision (images as tokens: Llama 4's ViT, pixel shuffle, projector), shapes (a synthetic image-caption data set),
device, checks (exercise checks).

Glossary: our names (Llama's) and what other code calls them.

| tlama_mini            | Hugging Face (Llama)             | nanoGPT              | meaning                          |
|-----------------------|----------------------------------|----------------------|----------------------------------|
| d_model               | hidden_size                      | n_embd               | width of the residual stream     |
| n_heads / n_kv_heads  | num_attention_heads / num_key_value_heads | n_head      | query heads / key-value heads    |
| config.kv_heads       | num_key_value_heads              | -                    | n_kv_heads, or n_heads if None   |
| head_dim              | head_dim                         | hs                   | d_model / n_heads                |
| n_rep                 | num_key_value_groups             | -                    | query heads per kv head          |
| token_emb             | model.embed_tokens               | transformer.wte      | token embedding table            |
| layers[i]             | model.layers[i]                  | transformer.h[i]     | transformer block                |
| attention.Wq Wk Wv Wo | self_attn.q_proj k_proj v_proj o_proj | attn.c_attn / c_proj | attention projections      |
| ffn.w1 / w3 / w2      | mlp.gate_proj / up_proj / down_proj | mlp.c_fc / c_proj | SwiGLU gate / up / down          |
| attention_norm        | input_layernorm                  | ln_1                 | norm before attention            |
| ffn_norm              | post_attention_layernorm         | ln_2                 | norm before the FFN              |
| norm                  | model.norm                       | transformer.ln_f     | final norm                       |
| output                | lm_head                          | lm_head              | LM head (to vocabulary logits)   |
| freq_cis              | rotary_emb (cos, sin)            | -                    | RoPE rotations                   |
| freqs_cis             | position_embeddings (cos, sin)   | -                    | the same rotations, as the       |
|                       |                                  |                      | functions name them (seed 001)   |
| cache_k / cache_v     | past_key_values                  | -                    | KV cache                         |
| max_seq_len           | max_position_embeddings          | block_size           | longest sequence                 |
| rope_theta            | rope_theta                       | -                    | RoPE base                        |
| norm_eps              | rms_norm_eps                     | -                    | RMSNorm epsilon                  |
| lora_A / lora_B       | lora_A / lora_B (PEFT)           | -                    | LoRA's A (r, in), B (out, r)     |

Two spellings come from seed 001 and stay: the model attribute and the forwards' argument are
`freq_cis` (Transformer.freq_cis, Attention.forward(x, start_pos, freq_cis, mask)), while the RoPE
functions say `freqs_cis` (compute_freqs_cis, apply_rope(xq, xk, freqs_cis)); both hold the same
(T, head_dim/2) complex rotations. The config field is `n_kv_heads` (None means "as many as
n_heads"); `config.kv_heads` is the resolved number, and `Attention.n_kv_heads` holds it.

LoRA has one formula, W + (alpha / r) B A with alpha = 2 r unless given (lora.py); palm.LoRA, seed
000's finetune module, stores the same A and B transposed, as A (in, r) and B (r, out), because that
is palm-rlhf-pytorch's checkpoint layout.

mask=None means no mask (attention in both directions) for `Attention` and `TransformerBlock`; pass
is_causal=True or masks.causal_mask for a language model (`Transformer` does).
"""
from .attention import Attention, attention, naive_attention, repeat_kv
from .config import PRESETS, RopeScaling, TlamaConfig
from .ffn import FeedForward
from .kv_cache import KVCache
from .masks import build_mask, causal_mask, create_chunked_attention_mask, sliding_window_mask
from .model import Transformer, TransformerBlock
from .moe import MoE, load_balancing_loss, moe_loop
from .norm import RMSNorm
from .rope import apply_rope, compute_freqs_cis, reshape_for_broadcast
from .tokenizer import BPETokenizer, CharTokenizer, get_tokenizer, load_tokenizer
from .sample import generate, generate_stream, sample_next_token, top_k_filter, top_p_filter

__version__ = "0.1.0"

__all__ = [
    "Attention", "BPETokenizer", "CharTokenizer", "FeedForward", "KVCache", "MoE", "PRESETS", "RMSNorm", "RopeScaling", "TlamaConfig",
    "Transformer", "TransformerBlock", "apply_rope", "attention", "build_mask", "causal_mask",
    "compute_freqs_cis", "create_chunked_attention_mask", "generate", "generate_stream", "get_tokenizer", "load_tokenizer",
    "load_balancing_loss", "moe_loop", "naive_attention", "repeat_kv", "reshape_for_broadcast",
    "sample_next_token", "sliding_window_mask", "top_k_filter", "top_p_filter",
]
