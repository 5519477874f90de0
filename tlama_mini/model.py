"""The model: `TransformerBlock` (pre-norm attention + FFN/MoE with residuals) and `Transformer`
(embedding, blocks, final norm, LM head), with Llama's structure and names.

    h = x + attention(attention_norm(x))        # the residual stream carries x through
    out = h + ffn(ffn_norm(h))

Legend: B batch, T sequence, C d_model, V vocab_size.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .blockwise import blockwise_ffn, blockwise_lm_head_loss
from .config import TlamaConfig
from .ffn import FeedForward
from .fuse import fused_weight, linear, project
from .masks import build_mask
from .moe import MoE
from .muon import Muon, muon_param_groups
from .norm import RMSNorm
from .rope import compute_freqs_cis
from .vision import VisionEncoder, merge_image_features


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, config: TlamaConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        self.attention = Attention(config)
        if config.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoE(config.d_model, config.moe_hidden_dim or config.ffn_dim,
                                      config.n_experts, config.n_experts_per_tok,
                                      shared_expert=config.moe_shared_expert,
                                      norm_topk_prob=config.moe_norm_topk_prob, router=config.moe_router)
        else:
            self.ffn = FeedForward(config.d_model, config.ffn_dim, config.multiple_of,
                                   config.ffn_dim_multiplier, config.use_parallel, exact=True)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn_norm = None if config.parallel_block else RMSNorm(config.d_model, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.use_rope = not config.is_nope_layer(layer_id)
        # Llama 4 pairs chunked local attention with RoPE layers; NoPE layers attend globally.
        self.chunk_size = config.attention_chunk_size if self.use_rope else None

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def _ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) -> (output (B, T, C), the MoE's load-balancing loss or None for a dense FFN)."""
        ffn = self.ffn
        is_moe = isinstance(ffn, MoE)
        chunk = self.config.blockwise_chunk_size
        w13 = None if is_moe or torch.is_grad_enabled() else fused_weight(ffn.w1, ffn.w3)
        if chunk is not None and self.training:
            out = blockwise_ffn(ffn, x, chunk)
        elif w13 is not None:  # gate and up in one product (fuse.py): (B, T, 2F)
            gate, up = linear(x, w13).chunk(2, dim=-1)  # (B, T, F) each
            out = project(ffn.w2, F.silu(gate) * up)    # = swiglu(x, w1, w2, w3)
        else:
            out = ffn(x)
        return out if is_moe else (out, None)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.training else x  # dropout is the identity in eval mode: skip the call

    def forward(self, x: torch.Tensor, start_pos: int, freq_cis: torch.Tensor | None,
                mask: torch.Tensor | None, kv_cache: bool = True, *, is_causal: bool = False,
                return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) -> (B, T, C). Arguments as in `Attention.forward`: mask=None with
        is_causal=False attends in both directions; pass a causal mask (masks.causal_mask) or
        is_causal=True for a language model. return_aux=True returns (output, aux_loss) with the
        load-balancing loss of this layer's MoE (None for a dense FFN); `Transformer` asks for it."""
        freq_cis = freq_cis if self.use_rope else None
        if self.config.parallel_block:  # PaLM: both branches read the same normalised input
            hn = self.attention_norm(x)
            a = self.attention(hn, start_pos, freq_cis, mask, kv_cache, is_causal=is_causal)
            f, aux = self._ffn(hn)
            out = x + self._drop(a) + self._drop(f)
        else:
            h = x + self._drop(self.attention(self.attention_norm(x), start_pos, freq_cis, mask, kv_cache,
                                              is_causal=is_causal))
            f, aux = self._ffn(self.ffn_norm(h))
            out = h + self._drop(f)
        return (out, aux) if return_aux else out


class Transformer(nn.Module):
    def __init__(self, config: TlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # Llama 4's image encoder (vision.py): its features replace the embeddings of image tokens
        self.vision = VisionEncoder(config.vision, config.d_model) if config.vision is not None else None
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix for both ends (GPT-2, Llama 3.2 1B)
            self.output.weight = self.token_emb.weight
        self._freq_cis: dict[torch.device, torch.Tensor] = {}
        self.apply(self._init_weights)
        # The LM head's weight (V, C) lives transposed in memory (strides (1, V)), moved there after
        # initialisation, so model.output.weight.is_contiguous() is False on purpose (with tied
        # embeddings the table is the same tensor); values, shape and state_dict are those of the usual
        # layout, and code that needs contiguous memory (safetensors) calls .contiguous(). Batch-1 decoding
        # multiplies one row by this largest matrix of the model at every step: on CPU (MKL) that
        # product streams W about twice as fast in this layout, and larger batches are no slower
        # (benchmarks/RESULTS.md, "Generation").
        self.output.weight.data = self.output.weight.data.t().contiguous().t()

    @property
    def freq_cis(self) -> torch.Tensor:
        """RoPE rotations for positions 0..max_seq_len-1: (max_seq_len, head_dim/2), complex64, on
        the model's device. Kept out of the state dict and computed once per device, so casting the
        model to bf16 can never round the rotations."""
        device = self.token_emb.weight.device
        if device not in self._freq_cis:
            c = self.config
            self._freq_cis[device] = compute_freqs_cis(c.head_dim, c.max_seq_len, c.rope_theta,
                                                       c.rope_scaling).to(device)
        return self._freq_cis[device]

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(mean, std) for linears and embeddings (config.weight_init = (std, mean)); the
        projections that write into the residual stream (Wo, w2) get std / sqrt(2 n_layers) so the
        stream's variance does not grow with depth (GPT-2)."""
        std, mean = self.config.weight_init
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__.endswith("ParallelLinear"):
            nn.init.normal_(module.weight, mean=mean, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, TransformerBlock):
            scaled = std / math.sqrt(2 * self.config.n_layers)
            ffn = module.ffn
            down = [module.attention.Wo.weight, ffn.w2] if isinstance(ffn, MoE) else \
                [module.attention.Wo.weight, ffn.w2.weight]
            for w in down:
                nn.init.normal_(w, mean=mean, std=scaled)
            if isinstance(ffn, MoE):
                for w in (ffn.w1, ffn.w3):
                    nn.init.normal_(w, mean=mean, std=std)

    def _check_input(self, tokens: torch.Tensor, start_pos: int) -> None:
        c = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids (torch.long), got {tokens.dtype}")
        T = tokens.shape[1]
        if T == 0:
            raise ValueError("tokens is empty: give at least one token per row")
        if start_pos < 0 or start_pos + T > c.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len ({c.max_seq_len}): "
                             f"crop the input to at most {c.max_seq_len - start_pos} tokens, or build the "
                             "model with a larger max_seq_len")
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(tokens)).tolist())  # one device sync for both
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, {c.vocab_size}) (vocab_size); got ids from {lo} to {hi}. "
                             "Was the text encoded with the tokenizer this model was built for?")

    def _embed(self, tokens: torch.Tensor, start_pos: int, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, C), with image features written over the image-token positions."""
        h = self.token_emb(tokens)  # (B, T, C)
        c = self.config
        if images is None:
            if self.vision is not None and start_pos == 0 and bool((tokens == c.image_token_id).any()):
                raise ValueError(f"tokens hold {int((tokens == c.image_token_id).sum())} image tokens "
                                 f"(id {c.image_token_id}) but no images were given; pass images=...")
            return h
        if self.vision is None:
            raise ValueError("images given to a text-only model (config.vision is None); build the model with a "
                             "VisionConfig and an image_token_id to read images")
        self.vision.check_images(images)
        mask = tokens == c.image_token_id  # (B, T)
        per_image = c.vision.tokens_per_image
        if int(mask.sum()) != per_image * images.shape[0]:
            raise ValueError(f"tokens hold {int(mask.sum())} image tokens (id {c.image_token_id}), but "
                             f"{images.shape[0]} images need {per_image} each = {per_image * images.shape[0]}")
        features = self.vision(images)  # (I, tokens_per_image, C)
        return merge_image_features(h, mask, features.reshape(-1, features.shape[-1]))

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, targets: torch.Tensor | None = None,
                *, images: torch.Tensor | None = None, kv_cache: bool | None = None,
                last_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """tokens (B, T) -> (logits (B, T, V), loss or None).

        With `targets` (B, T) the loss is the mean next-token cross-entropy (ignore_index=-100),
        plus `moe_aux_loss_coef` times the load-balancing loss of MoE layers. With
        config.blockwise_chunk_size set, training computes the loss chunk by chunk and returns
        logits=None. kv_cache (eval mode, no targets only): None (default) uses the cache when one is
        set up (`setup_cache`, or an earlier kv_cache=True prefill) or start_pos > 0, so a plain
        forward allocates none; True uses it, allocating one sized to this call when there is none.
        images (I, 3, H, W) float, for a model with config.vision: their features fill, in order, the
        positions where tokens == config.image_token_id; targets equal to that id are ignored in the loss.
        last_only=True (no targets): the logits of the last position only, (B, 1, V), all that generation
        needs from a prompt; the final norm and the LM head then process one position instead of T (for a
        1,000-token prompt and a 49,152-token vocabulary the full logits are 188 MiB in float32).
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True gives the last position's logits, but a loss needs every position's: "
                             "pass targets or last_only, not both")
        self._check_input(tokens, start_pos)
        B, T = tokens.shape
        c = self.config
        if kv_cache is None:
            kv_cache = targets is None and (start_pos > 0 or self.layers[0].attention.cache.allocated)
        use_cache = kv_cache and c.kv_cache and not self.training
        if use_cache and B > c.max_batch_size:
            raise ValueError(f"batch size {B} exceeds max_batch_size ({c.max_batch_size}) of the KV cache; use a "
                             "smaller batch, raise max_batch_size, or call model(..., kv_cache=False)")
        h = self.dropout(self._embed(tokens, start_pos, images))  # (B, T, C)
        freq_cis = self.freq_cis[start_pos:start_pos + T]  # (T, D/2)
        q_pos = torch.arange(start_pos, start_pos + T, device=tokens.device)
        k_pos = torch.arange(0, start_pos + T, device=tokens.device) if use_cache else q_pos
        masks: dict[int | None, torch.Tensor | None] = {}
        aux = []  # load-balancing losses of the MoE layers
        for layer in self.layers:
            chunk = layer.chunk_size
            if chunk is None and c.sliding_window is None:  # plain causal: let the kernel build it
                mask, is_causal = None, T > 1
            else:
                if chunk not in masks:
                    masks[chunk] = build_mask(q_pos, k_pos, sliding_window=c.sliding_window, chunk_size=chunk)
                mask, is_causal = masks[chunk], False
            if layer.is_moe:
                h, layer_aux = layer(h, start_pos, freq_cis, mask, use_cache, is_causal=is_causal, return_aux=True)
                aux.append(layer_aux)
            else:
                h = layer(h, start_pos, freq_cis, mask, use_cache, is_causal=is_causal)
        if last_only:
            h = h[:, -1:]  # (B, 1, C)
        h = self.norm(h)  # (B, T, C)
        if targets is None:
            return project(self.output, h), None  # (B, T, V)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        if c.image_token_id is not None:  # an image token is input, never something to predict
            targets = targets.masked_fill(targets == c.image_token_id, -100)
        if c.blockwise_chunk_size is not None and self.training:
            logits, loss = None, blockwise_lm_head_loss(h, self.output.weight, targets, c.blockwise_chunk_size)
        else:
            logits = self.output(h)  # (B, T, V)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if aux and c.moe_aux_loss_coef > 0:
            loss = loss + c.moe_aux_loss_coef * torch.stack(aux).sum()
        return logits, loss

    def setup_cache(self, batch_size: int, seq_len: int) -> None:
        """Allocate every layer's KV cache for `batch_size` rows and `seq_len` positions (prompt plus
        new tokens), on the model's device and dtype; `generate` calls it with what it needs."""
        w = self.token_emb.weight
        for layer in self.layers:
            layer.attention.cache.allocate(batch_size, seq_len, device=w.device, dtype=w.dtype)

    def reset_cache(self) -> None:
        """Free every layer's KV cache."""
        for layer in self.layers:
            layer.attention.cache.reset()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.token_emb.weight.numel()
        return n

    def configure_optimizers(self, weight_decay: float, learning_rate: float, device_type: str,
                             master_process: bool = True, betas: tuple[float, float] = (0.9, 0.95), *,
                             optimizer: str = "adamw", muon_lr_ratio: float = 10.0) -> torch.optim.Optimizer:
        """AdamW with two groups: matrices and embeddings decay, vectors (norm weights) do not.
        The fused CUDA kernel is used only when every parameter really is on CUDA, whatever
        `device_type` says, so a CPU model given device_type='cuda' still works.
        optimizer="muon": `tlama_mini.muon.Muon` for the blocks' matrices (learning rate
        muon_lr_ratio * learning_rate, no weight decay) and AdamW as above for everything else."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'muon'")
        params = [p for p in self.parameters() if p.requires_grad]
        if optimizer == "muon":
            groups = muon_param_groups(self, weight_decay, muon_lr_ratio)
            if master_process:
                print(f"optimizer: Muon for {len(groups[0]['params'])} block matrices "
                      f"({sum(p.numel() for p in groups[0]['params']):,} params), AdamW for the rest")
            return Muon(groups, lr=learning_rate, betas=betas)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        on_cuda = all(p.device.type == "cuda" for p in params)
        fused = on_cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters
        if master_process:
            print(f"optimizer: {len(decay)} decayed tensors ({sum(p.numel() for p in decay):,} params), "
                  f"{len(no_decay)} not decayed ({sum(p.numel() for p in no_decay):,} params); "
                  f"fused AdamW: {fused} (asked for device_type={device_type!r})")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, **({"fused": True} if fused else {}))
