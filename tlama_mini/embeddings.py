"""Absolute position embeddings, the pre-RoPE way of telling a transformer where each token is.

Self-attention treats its input as a *set*: permute the tokens and the outputs are permuted the same
way, nothing else changes. The original Transformer (Vaswani et al., 2017, "Attention Is All You
Need") therefore *adds* a position vector to each token embedding before the first block:

    x[b, t] = token_emb[ids[b, t]] + pos_table[start_pos + t]

`pos_table` is either learned (an `nn.Embedding(max_seq_len, C)`, as in GPT-2) or the fixed
sinusoidal table below. `tlama_mini`'s model uses neither: it rotates queries and keys with RoPE
(rope.py), which makes attention scores depend on *relative* positions. This module exists so the
lessons can build the older idea, and compare, with the same pair convention as rope.py.

Sinusoidal convention (the paper's formula, *interleaved*): for pair i = 0 .. C/2 - 1,

    pe[p, 2i]     = sin(p * w_i)        w_i = base ** (-2i / C),  base = 10000
    pe[p, 2i + 1] = cos(p * w_i)

so columns (2i, 2i+1) are one point on a circle turning at frequency w_i, like a RoPE pair.
(Some code, e.g. tensor2tensor, concatenates all sines then all cosines instead: the same
information in another column order.)

Legend: B batch, T sequence, C model width (dim), P table length (n_pos).
"""
from __future__ import annotations

import torch


def sinusoidal_frequencies(dim: int, base: float = 10000.0) -> torch.Tensor:
    """w_i = base ** (-2i / dim) for i = 0 .. dim/2 - 1: (dim/2,), float64. From 1 (one radian per
    position) down to nearly 1/base, a geometric progression of wavelengths 2*pi .. 2*pi*base."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim ({dim}) must be a positive even number: the table has one sin and one cos per frequency")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (C/2,)


def sinusoidal_positions(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed position table of Vaswani et al. (2017), interleaved: (n_pos, dim), float32,
    with pe[p, 2i] = sin(p w_i) and pe[p, 2i+1] = cos(p w_i). Positions start at 0."""
    if n_pos <= 0:
        raise ValueError(f"n_pos ({n_pos}) must be positive")
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), sinusoidal_frequencies(dim, base))  # (P, C/2)
    # Computed in float64 so that positions in the thousands keep their phase; returned as float32.
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (P, C/2, 2)
    return pe.flatten(1).float()  # (P, C): sin, cos, sin, cos, ...


def position_shift_matrix(k: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """M (dim, dim) with pe[p + k] = M @ pe[p] for every p: moving k positions is one fixed linear
    map, a rotation of each (sin, cos) pair by the angle k w_i. Vaswani et al. chose sinusoids
    because of this; RoPE (Su et al., 2021) applies the same rotations to queries and keys."""
    angles = k * sinusoidal_frequencies(dim, base)  # (C/2,)
    cos, sin = angles.cos(), angles.sin()
    # sin(a + b) = sin a cos b + cos a sin b;  cos(a + b) = cos a cos b - sin a sin b
    blocks = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (C/2, 2, 2)
    return torch.block_diag(*blocks).float()  # (C, C), block diagonal


def add_positions(x: torch.Tensor, pos_table: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """x (B, T, C) + the rows start_pos .. start_pos + T - 1 of pos_table (P, C) -> (B, T, C).
    `start_pos` is where x begins in the sequence (nonzero when decoding with a cache)."""
    if x.ndim != 3 or pos_table.ndim != 2 or x.shape[-1] != pos_table.shape[-1]:
        raise ValueError(f"x {tuple(x.shape)} and pos_table {tuple(pos_table.shape)} do not fit: "
                         "expected x (B, T, C) and pos_table (P, C) with the same C")
    T, P = x.shape[1], pos_table.shape[0]
    if start_pos < 0 or start_pos + T > P:
        raise ValueError(f"positions {start_pos}..{start_pos + T - 1} are outside the position table of {P} "
                         "rows: shorten the sequence or build a longer table")
    return x + pos_table[start_pos:start_pos + T]  # (B, T, C) + (T, C) broadcasts over the batch
