"""The KV cache: keys and values of past positions, kept so that each decode step computes
attention for one new token instead of re-running the whole prefix (gpt-fast's design).

Buffers are sized to the request, not to the config's limits: `allocate(batch_size, seq_len)`
(called by `Transformer.setup_cache`, which `generate` calls with the prompt length plus the new
tokens) makes them exactly that large, and an `update` that runs past the end grows them (capacity
doubled, at most max_seq_len, the past copied once). A (max_batch_size, max_seq_len) cache for a
real model is gigabytes: SmolLM2-135M's 30 layers x 32 x 8192 positions x 3 heads x 64 x K and V
in float32 are 12 GB, while a 200-token chat needs 9 MB. Keys are written at explicit positions
(`start_pos`), so a decode step never copies the past. Buffers are non-persistent: never saved in a
checkpoint. `length` counts the positions written so far: attention never reads past it.
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
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.length = 0  # positions 0..length-1 hold keys and values
        self.register_buffer("cache_k", None, persistent=False)  # (B_cap, S_cap, K, D) once allocated
        self.register_buffer("cache_v", None, persistent=False)

    @property
    def allocated(self) -> bool:
        return self.cache_k is not None

    def _check_size(self, batch_size: int, seq_len: int) -> None:
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the KV cache's max_batch_size ({self.max_batch_size}); "
                             "use a smaller batch, raise config.max_batch_size, or run without the cache "
                             "(model.train(), or config kv_cache=False)")
        if seq_len > self.max_seq_len:
            raise ValueError(f"KV-cache overflow: {seq_len} positions > max_seq_len ({self.max_seq_len}); crop the "
                             "prompt or generate fewer tokens, or raise config.max_seq_len")

    def allocate(self, batch_size: int, seq_len: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        """Empty buffers (batch_size, seq_len, K, D): room for exactly this request."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        self._check_size(batch_size, seq_len)
        shape = (batch_size, seq_len, self.n_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def _fit(self, B: int, end: int, like: torch.Tensor) -> None:
        """Make the buffers hold B rows and `end` positions, on like's device and dtype, keeping the past."""
        k = self.cache_k
        stale = (k is None or k.device != like.device or k.dtype != like.dtype
                 # a buffer made under torch.inference_mode cannot be written outside it
                 or (k.is_inference() and not torch.is_inference_mode_enabled()))
        if not stale and B <= k.shape[0] and end <= k.shape[1]:
            return
        rows = max(B, k.shape[0]) if k is not None else B
        cap = end if k is None else min(self.max_seq_len, max(end, 2 * k.shape[1]))  # amortised growth
        old_k, old_v, n = self.cache_k, self.cache_v, self.length
        self.allocate(rows, cap, device=like.device, dtype=like.dtype)
        if old_k is not None and n > 0:
            keep = min(rows, old_k.shape[0])
            self.cache_k[:keep, :n] = old_k[:keep, :n]
            self.cache_v[:keep, :n] = old_v[:keep, :n]
        self.length = n

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, T, K, D) at positions start_pos..start_pos+T-1 and return all keys and
        values of positions 0..start_pos+T-1: two tensors (B, S, K, D)."""
        B, T = xk.shape[:2]
        end = start_pos + T
        k = self.cache_k
        # the usual decoding step (the buffers already hold room for it) is checked in one expression
        fits = (k is not None and 0 <= start_pos <= self.length and B <= k.shape[0] and end <= k.shape[1]
                and k.dtype == xk.dtype and k.device == xk.device
                # a buffer made under torch.inference_mode cannot be written outside it
                and (torch.is_inference_mode_enabled() or not k.is_inference()))
        if not fits:
            self._check_update(start_pos, B, end)
            self._fit(B, end, xk)
            k = self.cache_k
        v = self.cache_v
        k[:B, start_pos:end] = xk.detach()
        v[:B, start_pos:end] = xv.detach()
        object.__setattr__(self, "length", end)  # a plain int: skips nn.Module.__setattr__'s checks, once per layer and step
        if torch.is_grad_enabled() and (xk.requires_grad or xv.requires_grad):
            # keep the autograd path through the new keys/values (eval mode with gradients on)
            return torch.cat([k[:B, :start_pos], xk], dim=1), torch.cat([v[:B, :start_pos], xv], dim=1)
        return k[:B, :end], v[:B, :end]  # (B, S, K, D) each

    def _check_update(self, start_pos: int, B: int, end: int) -> None:
        """Every way an update can be wrong, each with its own message."""
        if start_pos < 0:
            raise ValueError(f"start_pos ({start_pos}) must be >= 0")
        if end > self.max_seq_len:
            raise ValueError(f"KV-cache overflow: start_pos ({start_pos}) + seq_len ({end - start_pos}) = {end} "
                             f"> max_seq_len ({self.max_seq_len}); crop the prompt or generate fewer tokens, "
                             "or raise config.max_seq_len")
        self._check_size(B, end)
        if start_pos > self.length:
            raise ValueError(f"the KV cache holds positions 0..{self.length - 1} only ({self.length} positions), so "
                             f"keys at start_pos {start_pos} would leave a gap: run the prompt first with "
                             "model(prompt, 0, kv_cache=True), or call model.setup_cache(batch_size, seq_len) "
                             "before it")
        if start_pos > 0 and self.cache_k is not None and B > self.cache_k.shape[0]:
            raise ValueError(f"batch size {B} at start_pos {start_pos} exceeds the {self.cache_k.shape[0]} rows "
                             "the prefill cached; decode the same batch that was prefilled")

    def reset(self) -> None:
        """Free the buffers; they are allocated again by `allocate` or the next update."""
        self.cache_k = None
        self.cache_v = None
        self.length = 0
