"""The KV cache: keys and values of past positions, kept so that each decode step computes
attention for one new token instead of re-running the whole prefix (gpt-fast's design).

Buffers are preallocated once at the full (max_batch_size, max_seq_len) size, on the device and in
the dtype of the keys that first arrive, and written at explicit positions (`start_pos`), so a step
never reallocates or copies the past. They are non-persistent: never saved in a checkpoint.
Legend: B batch, T new positions, S cached positions (start_pos + T), K kv heads, D head_dim.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("cache_k", None, persistent=False)  # (B_max, S_max, K, D) once allocated
        self.register_buffer("cache_v", None, persistent=False)

    def _ensure_allocated(self, like: torch.Tensor) -> None:
        k = self.cache_k
        stale = (k is None or k.device != like.device or k.dtype != like.dtype
                 # a buffer made under torch.inference_mode cannot be written outside it
                 or (k.is_inference() and not torch.is_inference_mode_enabled()))
        if stale:
            self.cache_k = torch.zeros(self.shape, device=like.device, dtype=like.dtype)
            self.cache_v = torch.zeros(self.shape, device=like.device, dtype=like.dtype)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, T, K, D) at positions start_pos..start_pos+T-1 and return all keys and
        values of positions 0..start_pos+T-1: two tensors (B, S, K, D)."""
        B, T = xk.shape[:2]
        if B > self.max_batch_size:
            raise ValueError(f"batch size {B} exceeds the KV cache's max_batch_size ({self.max_batch_size}); "
                             "use a smaller batch, raise config.max_batch_size, or run without the cache "
                             "(model.train(), or config kv_cache=False)")
        if start_pos < 0:
            raise ValueError(f"start_pos ({start_pos}) must be >= 0")
        if start_pos + T > self.max_seq_len:
            raise ValueError(f"KV-cache overflow: start_pos ({start_pos}) + seq_len ({T}) = {start_pos + T} "
                             f"> max_seq_len ({self.max_seq_len}); crop the prompt or generate fewer tokens, "
                             "or raise config.max_seq_len")
        self._ensure_allocated(xk)
        end = start_pos + T
        self.cache_k[:B, start_pos:end] = xk.detach()
        self.cache_v[:B, start_pos:end] = xv.detach()
        if torch.is_grad_enabled() and (xk.requires_grad or xv.requires_grad):
            # keep the autograd path through the new keys/values (eval mode with gradients on)
            return (torch.cat([self.cache_k[:B, :start_pos], xk], dim=1),
                    torch.cat([self.cache_v[:B, :start_pos], xv], dim=1))
        return self.cache_k[:B, :end], self.cache_v[:B, :end]  # (B, S, K, D) each

    def reset(self) -> None:
        """Free the buffers; they are allocated again on the next update."""
        self.cache_k = None
        self.cache_v = None
