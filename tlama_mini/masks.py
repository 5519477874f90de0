"""Attention masks, one convention everywhere: a boolean tensor, True = "this query may attend to
this key". Masks are built from absolute positions, so the same function serves training (queries
and keys at 0..T-1), prefill and decode with a KV cache (queries at start_pos.., keys at 0..), the
sliding window (Mistral) and chunked local attention (Llama 4).

Legend: T queries, S keys.
"""
from __future__ import annotations

import torch


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool = True,
               sliding_window: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """(T,) query positions and (S,) key positions -> (T, S) boolean mask.

    causal: a key may not be in the query's future.
    sliding_window: the query sees only the last `sliding_window` positions, itself included.
    chunk_size: the query sees only keys in its own chunk of `chunk_size` positions.
    """
    q = q_pos[:, None]  # (T, 1)
    k = k_pos[None, :]  # (1, S)
    mask = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)  # (T, S)
    if causal:
        mask &= k <= q
    if sliding_window is not None:
        mask &= (q - k) < sliding_window
    if chunk_size is not None:
        mask &= (q // chunk_size) == (k // chunk_size)
    return mask


def causal_mask(seq_len: int, start_pos: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Causal mask for `seq_len` new queries after `start_pos` cached keys: (T, start_pos + T)."""
    q_pos = torch.arange(start_pos, start_pos + seq_len, device=device)
    return build_mask(q_pos, torch.arange(start_pos + seq_len, device=device))


def sliding_window_mask(seq_len: int, window: int, start_pos: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    q_pos = torch.arange(start_pos, start_pos + seq_len, device=device)
    return build_mask(q_pos, torch.arange(start_pos + seq_len, device=device), sliding_window=window)


def create_chunked_attention_mask(seq_len: int, chunk_size: int, start_pos: int = 0,
                                  device: torch.device | str | None = None) -> torch.Tensor:
    """Chunked local causal attention (the name Llama 4's code uses): (T, start_pos + T)."""
    q_pos = torch.arange(start_pos, start_pos + seq_len, device=device)
    return build_mask(q_pos, torch.arange(start_pos + seq_len, device=device), chunk_size=chunk_size)
