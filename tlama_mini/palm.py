"""PaLM's parallel transformer block (Chowdhery et al., 2022), seed 000's `TransformerBlock`.

    y = attn(LN(x)) + ff(LN(x))          (the caller adds the residual: x + y)

One bias-free LayerNorm feeds both branches, and ONE fused matmul produces the queries of all
heads, a single key head and a single value head (multi-query attention, Shazeer 2019) and the
SwiGLU input, so the block needs one big matmul and one synchronisation instead of two.

Built from tlama_mini's pieces: `attention.attention` (MQA is GQA with one kv head; `flash_attn`
selects the SDPA backend, otherwise the written-out `naive` formula), `rope.apply_rope` and
`rope.xpos_scale` for the rotary embedding with xPos decay, `lora.LoRA` for the fine-tune modules:
the package's one LoRA formula (`lora.lora_delta`, alpha = 2 r unless given), stored in the
reference's transposed layout A (dim, r), B (r, dim_out) so its checkpoints load (see lora.py; the
reference defaults to alpha = r, so pass alpha=r to reproduce its outputs).

Checkpoint compatibility: `state_dict()` has exactly the keys and shapes of
`palm_rlhf_pytorch.palm.ParallelTransformerBlock` (PyPI `palm-rlhf-pytorch`, the same class as
Zeta's `TransformerBlock`), so checkpoints load either way with `strict=True`. That reference pairs
feature i with i + D/2 for the rotation ("rotate half"); `apply_rope` pairs adjacent features, so q
and k are permuted into adjacent pairs first. A score q.k is unchanged by applying one permutation
to both, and v is not permuted, so nothing has to be permuted back.

Differences from the reference, on purpose:
- `qk_scale`: the reference stores it but always scales the logits by dim_head ** -0.5. Seed 000
  says it scales queries and keys when `qk_rmsnorm` is on, so here the logits are multiplied by
  `qk_scale` instead of 1/sqrt(dim_head) when `qk_rmsnorm=True` (both agree at qk_scale = dim_head ** -0.5).
- With `flash_attn=True`, `causal=True` and a padding mask the reference raises (SDPA refuses an
  explicit mask together with is_causal); here the two masks are combined.
- A query that sees no key at all (left padding under a causal mask) gets an output of zero here
  (the reference gives NaN with flash_attn and a mean of the masked values without).

Relation to `TlamaConfig(parallel_block=True)`: that flag gives `model.TransformerBlock` the same
computation, x + attn(norm(x)) + ff(norm(x)), with tlama-core's separate projections (Wq Wk Wv Wo,
w1 w2 w3), RMSNorm, GQA and KV cache. With n_kv_heads=1, attn_head_dim=dim_head, ffn_hidden_dim=
ff_mult * dim, xpos_scale_base and norm_eps 1e-5 it computes exactly this block, up to the norm:
    palm(x) == block(xc) - xc,   xc = x - x.mean(-1)
(LayerNorm is RMSNorm of the centred input; the tlama block adds the residual itself). The weights map
as: the fused matrix cut into Wq | Wk | Wv | w3 (value) | w1 (gate), ff_out.2 is w2, attn_out is Wo,
gamma + 1 the norm's weight, and the rows of Wq and Wk (per head) permuted from pairs (i, i + D/2) to
adjacent pairs. tests/test_palm.py and lesson 11 check it. Not shared: qk_rmsnorm (l2 norm times
qk_scale, not the config's qk_norm RMSNorm) and this block's padding mask.
Legend: B batch, T sequence, H heads, D dim_head, C dim, F ff inner dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .lora import LoRA
from .masks import causal_mask
from .rope import apply_rope, xpos_scale

__all__ = ["LoRA", "PaLMLayerNorm", "ParallelTransformerBlock", "TransformerBlock"]


class PaLMLayerNorm(nn.Module):
    """LayerNorm without bias; the gain is stored as an offset `gamma` from 1 (beta is a zero buffer,
    kept for checkpoint compatibility)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma + 1, self.beta)


class _RotaryTables(nn.Module):
    """The rotary frequencies and xPos factors as buffers (names of the reference's checkpoint)."""

    def __init__(self, dim_head: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("scale", (torch.arange(0, dim_head, 2) + 0.4 * dim_head) / (1.4 * dim_head))


class ParallelTransformerBlock(nn.Module):
    """Seed 000's TransformerBlock. forward(x (B, T, dim), mask (B, T) bool True=keep or None,
    finetune_modules=(lora_q, lora_k, lora_v, lora_o) or None) -> (B, T, dim), without the residual."""

    def __init__(self, dim: int, dim_head: int = 64, causal: bool = True, heads: int = 8,
                 qk_rmsnorm: bool = False, qk_scale: float = 8, ff_mult: int = 4, attn_dropout: float = 0.0,
                 ff_dropout: float = 0.0, use_xpos: bool = True, xpos_scale_base: int = 512,
                 flash_attn: bool = False, finetune_modules: tuple[nn.Module, ...] | None = None) -> None:
        super().__init__()
        if min(dim, dim_head, heads, ff_mult) <= 0:
            raise ValueError(f"sizes must be positive: dim={dim}, dim_head={dim_head}, heads={heads}, ff_mult={ff_mult}")
        if dim_head % 2:
            raise ValueError(f"dim_head ({dim_head}) must be even: the rotary embedding rotates feature pairs")
        if not (0.0 <= attn_dropout < 1.0 and 0.0 <= ff_dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1): attn_dropout={attn_dropout}, ff_dropout={ff_dropout}")
        self.dim, self.dim_head, self.heads, self.causal = dim, dim_head, heads, causal
        self.qk_rmsnorm, self.qk_scale, self.flash_attn = qk_rmsnorm, qk_scale, flash_attn
        self.use_xpos, self.xpos_scale_base = use_xpos and causal, xpos_scale_base  # xPos only on causal blocks
        self.attn_dropout = attn_dropout
        attn_inner, ff_inner = dim_head * heads, dim * ff_mult
        self.fused_dims = (attn_inner, dim_head, dim_head, 2 * ff_inner)  # q of all heads, one k, one v, SwiGLU in
        self.norm = PaLMLayerNorm(dim)
        if qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.rotary_emb = _RotaryTables(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Dropout(ff_dropout), nn.Linear(ff_inner, dim, bias=False))
        # q, k, v: pair feature i with i + D/2 (the reference's layout) as adjacent pairs for apply_rope
        half = torch.arange(dim_head // 2)
        self.register_buffer("_pairs", torch.stack([half, half + dim_head // 2], -1).flatten(), persistent=False)
        self._tables: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (length, freqs_cis, xpos), grown on demand
        self._finetune = None
        if finetune_modules is not None:
            self._finetune = nn.ModuleList(self._check_finetune(finetune_modules))

    def _check_finetune(self, modules) -> tuple[nn.Module, ...]:
        if not isinstance(modules, (tuple, list)) or len(modules) != 4:
            raise ValueError("finetune_modules must be four modules (lora_q, lora_k, lora_v, lora_o)")
        inner = self.dim_head * self.heads
        want = ((self.dim, inner), (self.dim, self.dim_head), (self.dim, self.dim_head), (inner, self.dim))
        for name, module, (i, o) in zip(("lora_q", "lora_k", "lora_v", "lora_o"), modules, want):
            shape = (getattr(module, "dim", None), getattr(module, "dim_out", None))
            if isinstance(module, LoRA) and shape != (i, o):
                raise ValueError(f"{name} maps {shape[0]} -> {shape[1]} features, but this block needs {i} -> {o}: "
                                 f"use LoRA({i}, {o}, r)")
        return tuple(modules)

    def _rotary(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations (n, D/2) and xPos factors (n, D) for positions 0..n-1, cached for the longest
        length seen. xPos is centred on the cached length's middle, as in the reference; only the
        ratio between a query's and a key's factor matters, so the centre cancels in every score."""
        if self._tables is None or self._tables[0] < n or self._tables[1].device != device:
            t = torch.arange(n, device=device, dtype=torch.float32)
            angles = torch.outer(t, self.rotary_emb.inv_freq.to(device))  # (n, D/2)
            freqs = torch.polar(torch.ones_like(angles), angles)
            if self.use_xpos:
                scale = xpos_scale(self.dim_head, -(n // 2), n, self.xpos_scale_base, device=device)
            else:
                scale = torch.ones(n, self.dim_head, device=device)
            self._tables = (n, freqs, scale)
        return self._tables[1][:n], self._tables[2][:n]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                finetune_modules: tuple[nn.Module, ...] | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x of shape {tuple(x.shape)}: expected (B, T, {self.dim})")
        B, T, _ = x.shape
        if mask is not None and (mask.shape != (B, T) or mask.dtype != torch.bool):
            raise ValueError(f"mask of shape {tuple(mask.shape)} and dtype {mask.dtype}: expected a boolean "
                             f"key-padding mask ({B}, {T}), True = keep")
        loras = self._check_finetune(finetune_modules) if finetune_modules is not None else self._finetune
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)  # (B,T,H*D) (B,T,D) (B,T,D) (B,T,2F)
        if loras is not None:
            q, k, v = q + loras[0](x), k + loras[1](x), v + loras[2](x)
        q = q.view(B, T, self.heads, self.dim_head)  # (B, T, H, D)
        k = k.view(B, T, 1, self.dim_head)           # one shared key head
        if self.qk_rmsnorm:  # l2-normalised, times learned per-feature scales
            q, k = F.normalize(q, dim=-1) * self.q_scale, F.normalize(k, dim=-1) * self.k_scale
        freqs, scale = self._rotary(T, x.device)
        q, k = q[..., self._pairs], k[..., self._pairs]
        q, k = apply_rope(q, k, freqs)
        q, k = q * scale[:, None, :].to(q.dtype), k / scale[:, None, :].to(k.dtype)
        if self.qk_rmsnorm:  # attention divides by sqrt(D); make the logits q.k * qk_scale
            q = q * (self.qk_scale * math.sqrt(self.dim_head))
        attn_mask, empty = None, None
        if mask is not None:
            attn_mask = mask[:, None, None, :].expand(B, 1, T, T)  # (B, 1, T, S)
            if self.causal:
                attn_mask = attn_mask & causal_mask(T, device=x.device)
            empty = ~attn_mask.any(-1, keepdim=True)  # (B, 1, T, 1): queries that see no key
            attn_mask = attn_mask | empty  # let them attend (harmlessly) and zero their output below
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v[:, None], attn_mask,  # (B, H, T, D)
                        is_causal=self.causal and mask is None, backend="sdpa" if self.flash_attn else "naive",
                        dropout_p=self.attn_dropout if self.training else 0.0)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        out = out.transpose(1, 2).reshape(B, T, -1)  # merge heads: (B, T, H * D)
        attn_out = self.attn_out(out)
        if loras is not None:
            attn_out = attn_out + loras[3](out)
        return attn_out + self.ff_out(ff)


class _SwiGLU(nn.Module):
    """(..., 2F) -> (..., F): the first half gated by silu of the second (PaLM's split order).
    PaLM's own SwiGLU, kept for checkpoint compatibility rather than calling `ffn.swiglu`: the gate
    and the value come out of the fused projection as halves of one (..., 2F) tensor, in the
    reference's order, and `ff_out` must be a Sequential with a module at index 0 so that the down
    projection's key stays `ff_out.2.weight`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


TransformerBlock = ParallelTransformerBlock  # seed 000's name
