"""Checks for lesson 13 (images as tokens). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with `tlama_mini.vision`, and names the mistake when it can.

Legend: I images, H x W pixels, p patch_size, N patches, G grid side, Cv features, s = 1 / ratio,
B batch, T positions, C d_model.
"""
from __future__ import annotations

import random

import torch

from ..vision import merge_image_features as ref_merge
from ..vision import patchify as ref_patchify
from ..vision import pixel_shuffle as ref_pixel_shuffle
from ..vision import vision_rope_angles as ref_angles
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_patchify", "check_pixel_shuffle", "check_merge_image_features", "check_vision_rope_angles"]


@attributes_stubs
def check_patchify(fn) -> None:
    """fn(images, patch_size) with images (I, 3, H, W) -> (I, N, 3 p p), patches row-major, each flattened
    channel first, then patch row, then patch column."""
    name = "patchify"
    p = random.choice([2, 3, 4])
    gy, gx = random.choice([(2, 3), (3, 4), (4, 2)])  # a non-square grid: rows and columns cannot be confused
    I = random.randint(1, 3)
    images = torch.randn(I, 3, gy * p, gx * p)
    expected = ref_patchify(images, p)  # (I, gy gx, 3 p p)
    x = images.reshape(I, 3, gy, p, gx, p)
    mistakes = {
        "the patches are in column-major order (down the first column, then the next): number them row by row, "
        "grid (I, rows, columns, ...) before flattening": x.permute(0, 4, 2, 1, 3, 5).reshape(I, gy * gx, -1),
        "each patch is flattened channel-last (row, column, channel): the order torch.nn.Unfold and Llama 4 use is "
        "channel first, then the row and the column inside the patch": x.permute(0, 2, 4, 3, 5, 1).reshape(I, gy * gx, -1),
        "the image was reshaped without a permute, so a 'patch' is a run of consecutive pixels of one row, not a "
        "p x p square: split H into (rows, p) and W into (columns, p), then permute the grid dimensions to the "
        "front": images.reshape(I, gy * gx, -1),
        "inside a patch the rows and columns are swapped: flatten (channel, row in patch, column in patch)":
            x.permute(0, 2, 4, 1, 5, 3).reshape(I, gy * gx, -1),
    }
    out = call(name, fn, images.clone(), p, hint="images is (I, 3, H, W): reshape to (I, 3, H/p, p, W/p, p)")
    diff = check_tensor(name, out, expected, atol=0, rtol=0, mistakes=mistakes,
                        hint="expected (I, (H/p) (W/p), 3 p p); compare with torch.nn.functional.unfold")
    passed(name, f"images {tuple(images.shape)}, p={p} -> {tuple(expected.shape)}, max abs diff {diff:.1e}")


def _shuffle_by(x: torch.Tensor, s: int, order: str) -> torch.Tensor:
    """Wrong variants of pixel shuffle: x (I, N, Cv) on a G x G grid."""
    I, N, Cv = x.shape
    G = round(N ** 0.5)
    g = x.reshape(I, G // s, s, G // s, s, Cv)
    if order == "column-major block":  # (a, b) inside the block swapped
        return g.permute(0, 1, 3, 4, 2, 5).reshape(I, N // s // s, -1)
    if order == "transposed tokens":  # the token grid itself is column-major
        return g.permute(0, 3, 1, 2, 4, 5).reshape(I, N // s // s, -1)
    return x.reshape(I, N // s // s, s * s * Cv)  # consecutive patches of a row


@attributes_stubs
def check_pixel_shuffle(fn) -> None:
    """fn(x, ratio) with x (I, N, Cv) patch features of a square grid -> (I, N r^2, Cv / r^2): each s x s
    block (s = 1 / ratio) becomes one token, its patches concatenated in row-major order."""
    name = "pixel_shuffle"
    results = []
    for s in (2, 4):
        G = s * random.randint(2, 3)
        I, Cv = random.randint(1, 2), random.choice([3, 4, 5])
        x = torch.randn(I, G * G, Cv)
        expected = ref_pixel_shuffle(x, 1 / s)
        mistakes = {
            "a token is s*s consecutive patches of one grid row (a plain reshape), not an s x s block of "
            "neighbours: view the grid as (I, G/s, s, G/s, s, Cv) and bring the two block axes together":
                _shuffle_by(x, s, "reshape"),
            "inside each block the patches are concatenated column by column: the order is row-major, (a, b) for "
            "row a and column b of the block": _shuffle_by(x, s, "column-major block"),
            "the tokens come out column-major (down the first column of blocks first): number them row by row":
                _shuffle_by(x, s, "transposed tokens"),
        }
        out = call(name, fn, x.clone(), 1 / s, hint="x is (I, N, Cv) with N = G * G patches in row-major order")
        results.append(check_tensor(f"{name} (ratio 1/{s})", out, expected, atol=0, rtol=0, mistakes=mistakes))
    passed(name, f"ratios 1/2 and 1/4, max abs diff {max(results):.1e}")


@attributes_stubs
def check_merge_image_features(fn) -> None:
    """fn(h, image_mask, features) with h (B, T, C), image_mask (B, T) bool, features (n, C) -> (B, T, C):
    the features, in order (row by row, left to right), replace h at the masked positions; h is not changed."""
    name = "merge_image_features"
    B, T, C = 3, random.randint(9, 12), random.choice([4, 6])
    h = torch.randn(B, T, C)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    image_mask[0, 2:5] = True  # different counts per row, so row and column order cannot be confused
    image_mask[2, 1:3] = True
    image_mask[2, T - 4:T - 1] = True
    n = int(image_mask.sum())
    features = torch.randn(n, C) + 10.0  # far from h: a feature left out or added shows
    expected = ref_merge(h, image_mask, features)
    h_in = h.clone()
    column_major = h.clone()
    column_major.transpose(0, 1)[image_mask.T] = features  # filled position by position across the batch
    added = h.clone()
    added[image_mask] += features
    mistakes = {
        "the features were added to the token embeddings; they replace them": added,
        "the features fill the positions column by column (position first, across the batch): the order is row "
        "by row, h[image_mask] = features": column_major,
    }
    out = call(name, fn, h_in, image_mask.clone(), features.clone(),
               hint="h[image_mask] selects the (n, C) masked rows, in row-major order")
    if isinstance(out, torch.Tensor) and out.shape == expected.shape and not torch.equal(h_in, h):
        if torch.equal(out, expected):
            fail(name, "the result is right but the input h was changed in place: a caller's embeddings (and "
                 "autograd's saved tensors) would be overwritten; work on h.clone()")
        fail(name, "the input h was changed in place; return a new tensor (start from h.clone())")
    diff = check_tensor(name, out, expected, atol=0, rtol=0, mistakes=mistakes,
                        hint="only the masked positions change; everything else is h itself")
    empty = call(name + " (no image tokens)", fn, h.clone(), torch.zeros(B, T, dtype=torch.bool), features[:0])
    check_tensor(name + " (no image tokens)", empty, h, atol=0, rtol=0)
    passed(name, f"{n} image positions in {B} rows, max abs diff {diff:.1e}")


@attributes_stubs
def check_vision_rope_angles(fn) -> None:
    """fn(grid_size, head_dim, theta) -> (G^2 + 1, D/2) angles: pair i < D/4 turns with column x + 1, pair
    D/4 + i with row y + 1, at frequency theta ** (-4 i / D); patches row-major, then the class token at 0."""
    name = "vision_rope_angles"
    G, D = random.randint(3, 6), random.choice([8, 12, 16])
    theta = random.choice([100.0, 500.0, 10000.0])
    expected = ref_angles(G, D, theta)  # (N + 1, D/2)
    N, Q = G * G, D // 4
    freqs = 1.0 / theta ** (torch.arange(Q, dtype=torch.float64) * 4 / D)
    idx = torch.arange(N)
    col, row = (idx % G + 1).double(), (idx // G + 1).double()
    zero = torch.zeros(1, 2 * Q, dtype=torch.float64)

    def build(first, second, f=freqs, cls_first=False):
        a = torch.cat([first[:, None] * f, second[:, None] * f], dim=-1)
        return torch.cat([zero, a]) if cls_first else torch.cat([a, zero])

    mistakes = {
        "the column and the row are swapped: the first D/4 pairs turn with the column x = i % G, the last D/4 with "
        "the row y = i // G": build(row, col),
        "the coordinates start at 0: Llama 4 rotates by (x + 1) and (y + 1), so no patch is left unrotated like the "
        "class token": build(col - 1, row - 1),
        "the frequencies are lesson 03's theta ** (-2i / D); with D/4 pairs per axis they are theta ** (-4i / D), "
        "as if each axis had a head of D/2": build(col, row, 1.0 / theta ** (torch.arange(Q, dtype=torch.float64) * 2 / D)),
        "the class token comes first; Llama 4 appends it after the patches (the last row is the class token's)":
            build(col, row, cls_first=True),
        "the x and y pairs are interleaved (x, y, x, y, ...); the first D/4 pairs are all x, the last D/4 all y":
            torch.cat([torch.stack([col[:, None] * freqs, row[:, None] * freqs], -1).reshape(N, 2 * Q), zero]),
    }
    out = call(name, fn, G, D, theta, hint="return real angles (N + 1, D/2), not complex rotations")
    if isinstance(out, torch.Tensor) and out.is_complex():
        fail(name, "returned complex rotations; return the angles themselves (torch.polar turns them into rotations)")
    diff = check_tensor(name, out, expected, atol=1e-5, rtol=1e-5, mistakes=mistakes,
                        hint="angle[i, j] = (x + 1) * f_j for j < D/4 and (y + 1) * f_(j - D/4) after, x = i % G")
    passed(name, f"G={G}, D={D}, theta={theta:g}: {tuple(expected.shape)}, max abs diff {diff:.1e}")
