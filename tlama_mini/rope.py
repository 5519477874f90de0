"""Rotary position embeddings, RoPE (Su et al., 2021, "RoFormer").

Each head vector is split into D/2 pairs; pair i at position m is rotated by the angle m * theta_i,
theta_i = rope_theta ** (-2i / D). A query at position m and a key at position n then score
<R(m) q, R(n) k> = <q, R(n - m) k>: the score depends only on the *relative* position.

The rotation is a complex multiplication: pair (x0, x1) is the complex number x0 + i x1, and
`freqs_cis[m, i] = cos(m theta_i) + i sin(m theta_i)` ("cis" = cos + i sin). Pairs are adjacent
elements (x[2i], x[2i+1]), as in Meta's Llama code. Hugging Face pairs x[i] with x[i + D/2]
instead; `hf.py` permutes the Wq/Wk rows when converting so that both agree.

Legend: B batch, T sequence, H heads, K kv heads, D head_dim.
"""
from __future__ import annotations

import math

import torch

from .config import RopeScaling


def scale_freqs(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 context extension: divide low frequencies (long wavelengths) by `factor`, keep high
    ones, and interpolate smoothly in between. (D/2,) -> (D/2,)."""
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    return torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor,
                       torch.where(wavelen < high_freq_wavelen, freqs, interpolated))


def compute_freqs_cis(dim: int, end: int, theta: float = 10000.0,
                      scaling: RopeScaling | None = None) -> torch.Tensor:
    """Complex rotations for positions 0..end-1: (end, dim // 2), complex64."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"RoPE dim ({dim}) must be a positive even number (it is rotated in pairs)")
    if end <= 0:
        raise ValueError(f"RoPE end ({end}) must be positive")
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (D/2,)
    if scaling is not None:
        freqs = scale_freqs(freqs, scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float64), freqs)  # (end, D/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # (end, D/2)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T, D/2) -> (1, T, 1, D/2), to broadcast against x viewed as complex (B, T, H, D/2)."""
    if x.ndim != 4 or freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"freqs_cis of shape {tuple(freqs_cis.shape)} does not match x of shape "
                         f"{tuple(x.shape)}: expected ({x.shape[1] if x.ndim > 1 else 'T'}, D/2) for x (B, T, H, D/2); "
                         "slice freqs_cis to the positions of x, e.g. freqs_cis[start_pos:start_pos + T]")
    return freqs_cis.view(1, x.shape[1], 1, x.shape[-1])


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs of every head of x (B, T, H, D) by freqs_cis (T, D/2); computed in
    float32, returned in x's dtype. apply_rope is this for queries and keys; attention rotates both at
    once when they lie side by side (its fused projection's output)."""
    xc = torch.view_as_complex(x.float().contiguous().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, D/2) complex
    out = torch.view_as_real(xc * reshape_for_broadcast(freqs_cis, xc))  # (B, T, H, D/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, D)


def xpos_scale(head_dim: int, start_pos: int, seq_len: int, scale_base: int, gamma: float = 0.4,
               device: torch.device | str | None = None) -> torch.Tensor:
    """xPos (Sun et al., 2022, "A Length-Extrapolatable Transformer"): per-pair factors
    zeta_i = (2i / D + gamma) / (1 + gamma) < 1, raised to n / scale_base at position n. Queries are
    multiplied and keys divided by them, so a score is scaled by zeta ** ((n - m) / scale_base): it
    decays smoothly with distance on top of RoPE's rotation. Returns (T, D), pairs adjacent."""
    zeta = (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim + gamma) / (1 + gamma)
    pos = torch.arange(start_pos, start_pos + seq_len, dtype=torch.float32, device=device)  # (T,)
    return (zeta[None, :] ** (pos[:, None] / scale_base)).repeat_interleave(2, dim=-1)  # (T, D/2) -> (T, D)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, T, H, D) and keys (B, T, K, D) by their positions' angles (T, D/2).
    Returns (xq, xk) with the same shapes and dtypes."""
    if xq.shape[-1] % 2:
        raise ValueError(f"head_dim ({xq.shape[-1]}) must be even for RoPE")
    return rotate(xq, freqs_cis), rotate(xk, freqs_cis)
