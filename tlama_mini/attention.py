"""Multi-head attention with grouped-query heads (GQA), RoPE, optional QK-norm and a KV cache.

    attention(q, k, v) = softmax(q k^T / sqrt(D) + mask) v        (Vaswani et al., 2017)

GQA (Ainslie et al., 2023): K key/value heads are shared by groups of n_rep = H / K query heads;
K = H is ordinary multi-head attention (MHA), K = 1 is multi-query attention (MQA, Shazeer 2019).
Four interchangeable backends compute the same thing and are tested equal: `naive` (the formula
above, written out), `sdpa` (torch's fused `scaled_dot_product_attention`), `flash` (the tiled
online-softmax algorithm of `tlama_mini.flash`) and `triton` (the same algorithm as fused Triton
kernels, `tlama_mini.triton_flash`).

Masks: boolean, True = may attend (see masks.py). `is_causal=True` means the plain causal mask with
the queries aligned to the *last* T of the S keys, which is what decoding with a cache needs.
Legend: B batch, T queries, S keys, H heads, K kv heads, D head_dim, C d_model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TlamaConfig
from .flash import flash_attention
from .fuse import fused_weight, linear, project
from .kv_cache import KVCache
from .masks import causal_mask
from .norm import RMSNorm, rms_normalize
from .parallel import column_linear, row_linear, tp_world_size
from .rope import apply_rope, rotate, xpos_scale


# torch >= 2.5 lets SDPA share kv heads across query groups without copying them (enable_gqa).
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def repeat_kv(kv: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, S, K, D) -> (B, S, K * n_rep, D): each kv head repeated n_rep times, adjacent copies
    (head h of the output uses kv head h // n_rep)."""
    if n_rep == 1:
        return kv
    B, S, K, D = kv.shape
    return kv[:, :, :, None, :].expand(B, S, K, n_rep, D).reshape(B, S, K * n_rep, D)


def _causal_bottom_right(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S): the T queries are the last T of the S positions (S - T keys are cached before them)."""
    return causal_mask(T, start_pos=S - T, device=device)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    *, is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """The textbook formula. q (B, H, T, D), k and v (B, H, S, D), mask broadcastable to (B, H, T, S).
    Returns (B, H, T, D). A query whose every key is masked gets NaN (0/0 in the softmax)."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if is_causal:
        mask = _causal_bottom_right(T, S, q.device) if mask is None else mask & _causal_bottom_right(T, S, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask *before* the softmax
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)  # (B, H, T, S)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, T, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
              is_causal: bool = False, backend: str = "sdpa", dropout_p: float = 0.0,
              flash_block_size: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped kv heads.

    q (B, H, T, D); k, v (B, K, S, D) with H a multiple of K; mask (T, S) or broadcastable to
    (B, H, T, S), True = may attend. Returns (B, H, T, D).
    """
    H, K = q.shape[1], k.shape[1]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({K})")
    T, S = q.shape[-2], k.shape[-2]
    if mask is not None and mask.shape[-2:] != (T, S):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {T} queries and {S} keys; "
                         f"expected (..., {T}, {S})")
    if backend in ("flash", "triton"):
        if mask is not None or dropout_p > 0.0:
            raise ValueError(f"the {backend} backend supports causal or unmasked attention without dropout; "
                             "use backend='sdpa' for explicit masks")
        if backend == "triton":
            from .triton_flash import triton_flash_attention  # lazy: triton is optional (absent on macOS, Windows)
            return triton_flash_attention(q, k, v, causal=is_causal)
        return flash_attention(q, k, v, causal=is_causal, block_size=flash_block_size)
    if backend not in ("naive", "sdpa"):
        raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa', 'naive', 'flash' or 'triton'")
    gqa_kernel = backend == "sdpa" and _SDPA_HAS_GQA and K != H
    if K != H and not gqa_kernel:  # share each kv head with its group of query heads: (B, K, S, D) -> (B, H, S, D)
        k = repeat_kv(k.transpose(1, 2), H // K).transpose(1, 2)
        v = repeat_kv(v.transpose(1, 2), H // K).transpose(1, 2)
    if backend == "naive":
        return naive_attention(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p)
    if is_causal and T != S:  # SDPA's is_causal is top-left aligned; decoding needs bottom-right
        causal = _causal_bottom_right(T, S, q.device)
        mask, is_causal = (causal if mask is None else mask & causal), False
    if is_causal and mask is not None:
        mask, is_causal = mask & _causal_bottom_right(T, S, q.device), False
    extra = {"enable_gqa": True} if gqa_kernel else {}  # the kernel reads each kv head once per group
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, **extra)


def attn_temperature(positions: torch.Tensor, floor: int, scale: float) -> torch.Tensor:
    """Llama 4's attention temperature tuning for NoPE layers (Nakanishi, 2025, "Scalable-Softmax"):
    the query at position p is multiplied by 1 + scale * log(1 + floor((p + 1) / floor)), so scores
    sharpen slowly as the context grows and attention over many keys does not flatten out.
    (T,) integer positions -> (T,) float32 factors (1.0 for every p < floor - 1)."""
    return 1.0 + scale * torch.log1p(torch.floor((positions.float() + 1.0) / floor))


class Attention(nn.Module):
    """Attention layer of a `TransformerBlock`: Wq/Wk/Wv projections, optional QK RMSNorm, RoPE,
    the KV cache (eval mode only), attention, and the output projection Wo."""

    def __init__(self, config: TlamaConfig) -> None:
        super().__init__()
        self.config = config
        tp = tp_world_size() if config.use_parallel else 1
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        if self.n_kv_heads % tp:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must be divisible by the tensor-parallel size ({tp})")
        self.n_local_heads = config.n_heads // tp
        self.n_local_kv_heads = self.n_kv_heads // tp
        self.n_rep = config.n_rep
        self.head_dim = config.head_dim
        C, D = config.d_model, config.head_dim
        self.Wq = column_linear(C, self.n_heads * D, config.use_parallel)
        self.Wk = column_linear(C, self.n_kv_heads * D, config.use_parallel)
        self.Wv = column_linear(C, self.n_kv_heads * D, config.use_parallel)
        self.Wo = row_linear(self.n_heads * D, C, config.use_parallel)
        self.q_norm = RMSNorm(D, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(D, config.norm_eps) if config.qk_norm else None
        self.cache = KVCache(config.max_batch_size, config.max_seq_len, self.n_local_kv_heads, D)

    @property
    def cache_k(self) -> torch.Tensor | None:
        return self.cache.cache_k

    @property
    def cache_v(self) -> torch.Tensor | None:
        return self.cache.cache_v

    def forward(self, x: torch.Tensor, start_pos: int, freq_cis: torch.Tensor | None,
                mask: torch.Tensor | None, kv_cache: bool = True, *, is_causal: bool = False) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        start_pos: position of x[:, 0]; freq_cis: (T, D/2) rotations for those positions, or None
        for a NoPE layer; mask: (T, S) boolean, True = may attend, or None; kv_cache: use the cache if
        the config enables it and the module is in eval mode (training never reads or writes it).

        mask=None with is_causal=False is *no mask*: every query attends to every key, in both
        directions, as seed 001's signature has it (its examples pass mask=None and say "use a causal
        mask" for generation). A language model needs is_causal=True or masks.causal_mask(T, start_pos);
        `Transformer.forward` always passes one of them.
        """
        B, T, _ = x.shape
        H, K, D = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        wqkv = None if torch.is_grad_enabled() else fused_weight(self.Wq, self.Wk, self.Wv)
        rotated = False
        if wqkv is not None:  # one product for the three (fuse.py): (B, T, (H + 2K) D)
            qkv = linear(x, wqkv).view(B, T, H + 2 * K, D)
            if freq_cis is not None and self.q_norm is None:  # queries and keys side by side: one rotation
                xq, xk = rotate(qkv[:, :, :H + K], freq_cis).split([H, K], dim=2)
                xv, rotated = qkv[:, :, H + K:], True
            else:
                xq, xk, xv = qkv.split([H, K, K], dim=2)
        else:
            xq = project(self.Wq, x).view(B, T, H, D)  # (B, T, H, D); project(m, x) = m(x), see fuse.py
            xk = project(self.Wk, x).view(B, T, K, D)  # (B, T, K, D)
            xv = project(self.Wv, x).view(B, T, K, D)  # (B, T, K, D)
        if self.q_norm is not None:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        if freq_cis is not None:
            if not rotated:
                xq, xk = apply_rope(xq, xk, freq_cis)
            if self.config.qk_l2_norm:  # Llama 4: after RoPE, on RoPE layers only
                xq, xk = rms_normalize(xq, self.config.norm_eps), rms_normalize(xk, self.config.norm_eps)
            if self.config.xpos_scale_base is not None:  # keys are cached already scaled
                scale = xpos_scale(self.head_dim, start_pos, T, self.config.xpos_scale_base, device=x.device)
                xq, xk = xq * scale[:, None, :].to(xq.dtype), xk / scale[:, None, :].to(xk.dtype)  # (T, 1, D) bcast
        elif self.config.attn_temperature_floor is not None:  # a NoPE layer with Llama 4's temperature tuning
            pos = torch.arange(start_pos, start_pos + T, device=x.device)
            temp = attn_temperature(pos, self.config.attn_temperature_floor, self.config.attn_temperature_scale)
            xq = (xq * temp[:, None, None]).to(xq.dtype)  # (T, 1, 1) broadcast over (B, T, H, D)
        if kv_cache and self.config.kv_cache and not self.training:
            xk, xv = self.cache.update(start_pos, xk, xv)  # (B, S, K, D), S = start_pos + T
        out = attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), mask,  # (B, H, T, D)
                        is_causal=is_causal, backend=self.config.attn_backend,
                        dropout_p=self.config.dropout if self.training else 0.0,
                        flash_block_size=self.config.flash_block_size)
        return project(self.Wo, out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * D) -> (B, T, C)
