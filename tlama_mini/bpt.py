"""Seed 002's block, `BlockwiseParallel` (the PyTorch `BlockwiseParallelJax`), and `BlockwiseLM`, a
small GPT built from it (Liu & Abbeel 2023, "Blockwise Parallel Transformer for Large Context Models").

The block is GPT-J's, computed blockwise:

    h   = x + out_proj(attn(ln_1(x)))            attention over (query chunk, key chunk) tiles
    out = h + fc_out(act(fc_in(ln_2(h))))        the FFN over query chunks

with GPT-J's partial rotary embedding (interleaved pairs on the first rotary_dim features of each
head), queries scaled by 1/sqrt(head_dim), padding keys biased by -1e9 and future keys by -1e10.
No (T, T) scores and no full (T, intermediate) activation ever exist. `forward_unchunked` is the
same block computed the plain way (the slow reference; the benchmark's "vanilla" and
"memory-efficient" variants).
Legend: B batch, T new tokens, S keys (cached + new), C hidden_size, H num_heads, D head_dim,
R rotary_dim, F intermediate_size, V vocab_size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import Blockwise_LM_Head, blockwise_compute_attn, blockwise_compute_ffn
from .masks import causal_mask
from .remat import check_policy, remat

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "silu": F.silu}
PAD_BIAS = -1e9  # added to the scores of keys whose attention_mask is 0 (the seed's value)


def gptj_rotary(x: torch.Tensor, position_ids: torch.Tensor, rotary_dim: int | None = None) -> torch.Tensor:
    """GPT-J's rotary embedding: x (B, T, H, D), position_ids (B|1, T). Features 2i and 2i+1 of the
    first rotary_dim (None: all D) form a pair rotated by the angle pos * 10000^(-2i/rotary_dim);
    the rest pass through. (Llama/NeoX rotate the halves (i, i + D/2) instead: same idea, another
    pairing.)"""
    R = x.shape[-1] if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / 10000 ** (torch.arange(0, R, 2, device=x.device, dtype=torch.float32) / R)  # (R/2,)
    angle = position_ids.float()[..., None] * inv_freq                     # (B|1, T, R/2)
    sin = angle.sin().repeat_interleave(2, dim=-1)[:, :, None, :]          # (B|1, T, 1, R)
    cos = angle.cos().repeat_interleave(2, dim=-1)[:, :, None, :]          # (B|1, T, 1, R)
    rot, rest = x[..., :R], x[..., R:]                                     # (B, T, H, R), (B, T, H, D-R)
    pairs = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    out = rot.float() * cos + pairs.float() * sin                         # (B, T, H, R)
    return torch.cat((out.to(x.dtype), rest), dim=-1)                     # (B, T, H, D)


class BlockwiseParallel(nn.Module):
    """Seed 002's block with its constructor. Parameters are float32 (GPT-J's names); `dtype` is the
    compute dtype (bf16: weights and activations cast on use; float32_logits keeps q and k in fp32).
    forward(hidden_states (B, T, C), attention_mask (B, 1, 1, S) or (B, S), 1 = attend,
    position_ids (B|1, T), deterministic=True, init_cache=False) -> (B, T, C).
    init_cache=True starts a KV cache with this call's keys and values; while it exists, each call
    appends to it and attends to cached + new keys (the mask then covers all S of them), as the
    seed's Flax module decodes. `reset_cache()` drops it."""

    def __init__(self, q_chunk_size: int, k_chunk_size: int, hidden_size: int, num_heads: int,
                 rotary_dim: int | None, intermediate_size: int, layer_norm_epsilon: float = 1e-5,
                 activation_function: str = "gelu", attn_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 max_position_embeddings: int = 1024, dtype: torch.dtype = torch.float32, causal: bool = True,
                 policy: str = "nothing_saveable", prevent_cse: bool = False, float32_logits: bool = False) -> None:
        super().__init__()
        for name, v in (("q_chunk_size", q_chunk_size), ("k_chunk_size", k_chunk_size),
                        ("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("intermediate_size", intermediate_size), ("max_position_embeddings", max_position_embeddings)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} ({v!r}) must be a positive integer")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        D = hidden_size // num_heads
        if rotary_dim is not None and (not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2
                                       or rotary_dim > D):
            raise ValueError(f"rotary_dim ({rotary_dim!r}) must be None or an even integer in [2, head_dim = {D}]")
        if rotary_dim is None and D % 2:
            raise ValueError(f"rotary_dim=None rotates the whole head, which needs an even head_dim (got {D})")
        if activation_function not in ACTIVATIONS:
            raise ValueError(f"unknown activation_function {activation_function!r}; use one of {sorted(ACTIVATIONS)}")
        for name, p in (("attn_pdrop", attn_pdrop), ("resid_pdrop", resid_pdrop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} ({p}) must be in [0, 1)")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.q_chunk_size, self.k_chunk_size, self.hidden_size, self.num_heads = (
            q_chunk_size, k_chunk_size, hidden_size, num_heads)
        self.head_dim, self.rotary_dim, self.intermediate_size = D, rotary_dim, intermediate_size
        self.activation_function, self.attn_pdrop, self.resid_pdrop = activation_function, attn_pdrop, resid_pdrop
        self.max_position_embeddings, self.dtype, self.causal = max_position_embeddings, dtype, causal
        self.policy, self.prevent_cse = check_policy(policy, prevent_cse), prevent_cse
        self.float32_logits = float32_logits
        self.ln_1 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(4))
        self.ln_2 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon)
        self.fc_in = nn.Linear(hidden_size, intermediate_size)
        self.fc_out = nn.Linear(intermediate_size, hidden_size)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (k, v), each (B, S, H, D)

    def reset_cache(self) -> None:
        self.cache = None

    def _lin(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b = None if layer.bias is None else layer.bias.to(self.dtype)
        return F.linear(x.to(self.dtype), layer.weight.to(self.dtype), b)

    def _ln(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.to(self.dtype), ln.normalized_shape, ln.weight.to(self.dtype), ln.bias.to(self.dtype),
                            ln.eps)

    def _mlp(self, h: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """fc_out(act(fc_in(ln_2(h)))) with residual dropout: one chunk (B, n, C) -> (B, n, C)."""
        a = ACTIVATIONS[self.activation_function](self._lin(self.fc_in, self._ln(self.ln_2, h)))  # (B, n, F)
        return F.dropout(self._lin(self.fc_out, a), self.resid_pdrop, training=not deterministic)

    def _qkv(self, x: torch.Tensor, position_ids: torch.Tensor, init_cache: bool):
        """ln_1, projections, rotary, cache -> q (B, T, H, D) scaled, k, v (B, S, H, D)."""
        B, T, _ = x.shape
        if position_ids.ndim != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids must be (1, {T}) or ({B}, {T}), got {tuple(position_ids.shape)}")
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= self.max_position_embeddings:
            raise ValueError(f"position_ids must be in [0, {self.max_position_embeddings}) "
                             "(max_position_embeddings)")
        hn = self._ln(self.ln_1, x)                                             # (B, T, C)
        q, k, v = (self._lin(p, hn).view(B, T, self.num_heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))           # each (B, T, H, D)
        q, k = gptj_rotary(q, position_ids, self.rotary_dim), gptj_rotary(k, position_ids, self.rotary_dim)
        if init_cache:
            self.cache = (k.detach(), v.detach())
        elif self.cache is not None:
            if self.cache[0].shape[0] != B:
                raise ValueError(f"the KV cache holds batch {self.cache[0].shape[0]}, this call has {B}")
            k, v = torch.cat((self.cache[0], k), dim=1), torch.cat((self.cache[1], v), dim=1)  # (B, S, H, D)
            self.cache = (k.detach(), v.detach())
        if self.float32_logits:
            q, k = q.float(), k.float()
        return q / math.sqrt(self.head_dim), k, v

    def _bias(self, attention_mask: torch.Tensor | None, B: int, S: int) -> torch.Tensor | None:
        """attention_mask (B|1, 1, 1, S) or (B|1, S) -> additive bias (B|1, 1, 1, S), None when all ones."""
        if attention_mask is None:
            return None
        m = attention_mask
        if m.ndim == 4 and m.shape[1:3] == (1, 1):
            m = m[:, 0, 0]
        if m.ndim != 2 or m.shape[0] not in (1, B) or m.shape[1] != S:
            raise ValueError(f"attention_mask must be ({B}, 1, 1, {S}) or ({B}, {S}), covering every key the "
                             f"call attends to (cached + new), got {tuple(attention_mask.shape)}")
        if bool((m > 0).all()):
            return None
        return torch.where(m > 0, 0.0, PAD_BIAS)[:, None, None, :]             # (B|1, 1, 1, S)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be (batch, seq_len, {self.hidden_size}), got {tuple(x.shape)}")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor, deterministic: bool = True, init_cache: bool = False) -> torch.Tensor:
        self._check_input(hidden_states)
        B, T, C = hidden_states.shape
        q, k, v = self._qkv(hidden_states, position_ids, init_cache)
        bias = self._bias(attention_mask, B, k.shape[1])
        a = blockwise_compute_attn(q, k, v, bias, deterministic, None, self.attn_pdrop, self.causal,
                                   self.q_chunk_size, self.k_chunk_size, self.dtype, self.policy,
                                   prevent_cse=self.prevent_cse)                 # (B, T, H, D)
        a = F.dropout(self._lin(self.out_proj, a.reshape(B, T, C)), self.resid_pdrop, training=not deterministic)
        h = hidden_states.to(self.dtype) + a                                      # (B, T, C)
        return h + blockwise_compute_ffn(self._mlp, h, self.q_chunk_size, deterministic, self.policy,
                                         self.prevent_cse)                       # (B, T, C)

    def forward_unchunked(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor, attention: str = "naive") -> torch.Tensor:
        """The same block computed the plain way (no dropout, no cache): attention="naive" builds the
        (B, H, T, S) scores; "sdpa" calls F.scaled_dot_product_attention (memory-efficient kernels
        where the device has them); the FFN runs on all T tokens at once."""
        self._check_input(hidden_states)
        B, T, C = hidden_states.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(hidden_states, position_ids, False))  # (B, H, T|S, D)
        bias = self._bias(attention_mask, B, k.shape[2])
        S = k.shape[2]
        if attention == "naive":
            s = q @ k.transpose(-2, -1).to(q.dtype)                                # (B, H, T, S)
            if bias is not None:
                s = s + bias
            if self.causal:
                allowed = causal_mask(T, start_pos=S - T, device=s.device)  # (T, S), bottom-right aligned
                s = s + torch.where(allowed, 0.0, -1e10)
            a = torch.softmax(s, dim=-1).to(v.dtype) @ v                           # (B, H, T, D)
        elif attention == "sdpa":
            if self.causal and (bias is not None or S != T):
                raise ValueError("forward_unchunked(attention='sdpa') supports causal attention only without "
                                 "padding or cache")
            mask = None if bias is None else bias.to(q.dtype)
            a = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask, is_causal=self.causal,
                                               scale=1.0).to(self.dtype)         # (B, H, T, D)
        else:
            raise ValueError(f"attention must be 'naive' or 'sdpa', got {attention!r}")
        h = hidden_states.to(self.dtype) + self._lin(self.out_proj, a.transpose(1, 2).reshape(B, T, C))
        return h + self._mlp(h, True)                                             # (B, T, C)


class BlockwiseLM(nn.Module):
    """A small GPT-J-style language model of `BlockwiseParallel` blocks, for measuring and teaching
    long-context training: token embedding, n_layers blocks, final LayerNorm, `Blockwise_LM_Head`.
    loss(tokens, targets, valid=None, variant) -> (loss, accuracy), for the same parameters computed
    three ways: "vanilla" (naive attention, whole FFN, whole logits), "memory_efficient" (SDPA
    attention, whole FFN and logits) and "blockwise" (tiled attention, chunked FFN, chunked LM head
    and loss, and each block checkpointed whole, so a layer keeps only its (B, T, C) input).
    chunk_size: the query / key / FFN chunk; loss_chunk_size (default chunk_size): tokens per LM-head
    chunk, smaller for large vocabularies (one chunk's logits are loss_chunk_size x V)."""

    VARIANTS = ("vanilla", "memory_efficient", "blockwise")

    def __init__(self, vocab_size: int, n_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
                 *, chunk_size: int = 256, loss_chunk_size: int | None = None, rotary_dim: int | None = None,
                 max_position_embeddings: int = 65536, activation_function: str = "gelu",
                 policy: str = "nothing_saveable") -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden_size)
        self.h = nn.ModuleList(BlockwiseParallel(chunk_size, chunk_size, hidden_size, num_heads, rotary_dim,
                                                 intermediate_size, activation_function=activation_function,
                                                 max_position_embeddings=max_position_embeddings, policy=policy)
                               for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(hidden_size)
        self.lm_head = Blockwise_LM_Head(vocab_size, loss_chunk_size or chunk_size, policy, hidden_size=hidden_size)
        self.policy = policy
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
             variant: str = "blockwise") -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, targets (B, T) -> (mean loss over valid targets, accuracy)."""
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)[None]                           # (1, T)
        x = self.wte(tokens)                                                        # (B, T, C)
        for block in self.h:
            if variant == "blockwise":
                x = remat(lambda y, b=block: b(y, None, pos), self.policy)(x)       # keeps only x per layer
            else:
                x = block.forward_unchunked(x, None, pos, "naive" if variant == "vanilla" else "sdpa")
        x = F.layer_norm(x, (x.shape[-1],), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)  # (B, T, C)
        if variant == "blockwise":
            return self.lm_head.loss(x, targets, valid)
        logits = self.lm_head.linear(x)                                             # (B, T, V) all at once
        v = torch.ones_like(targets, dtype=torch.float32) if valid is None else valid.float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
        n = v.sum().clamp_min(1e-10)
        acc = ((logits.argmax(-1) == targets).float() * v).sum() / n
        return (nll * v.flatten()).sum() / n, acc.detach()
