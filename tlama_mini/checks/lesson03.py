"""Checks for lesson 03 (RoPE). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with `tlama_mini.rope`, and names the mistake when it can.

Legend: B batch, T positions, H query heads, K kv heads, D head_dim (D/2 rotated pairs).
"""
from __future__ import annotations

import math
import random

import torch

from ..config import RopeScaling
from ..rope import apply_rope, compute_freqs_cis, scale_freqs
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_rope_frequencies", "check_apply_rope", "check_relative_score", "check_scale_rope_frequencies"]


def _reference_freqs(dim: int, theta: float) -> torch.Tensor:
    """theta_i = theta ** (-2i / dim) for i = 0..dim/2-1, read off tlama_mini's rotations at position 1."""
    return compute_freqs_cis(dim, 2, theta)[1].angle()  # (D/2,) angles of position 1 = the frequencies


def _rotate_halves(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The classic wrong pairing for this convention: x[i] with x[i + D/2] (Hugging Face's layout)."""
    half = x.shape[-1] // 2
    cos, sin = freqs_cis.real[None, :, None, :], freqs_cis.imag[None, :, None, :]  # (1, T, 1, D/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T, H, D)


@attributes_stubs
def check_rope_frequencies(fn) -> None:
    """fn(dim, theta) -> (dim // 2,) float tensor of rotation frequencies theta ** (-2i / dim)."""
    name = "rope_frequencies"
    dim, theta = random.choice([8, 16, 32, 64, 128]), random.choice([10000.0, 500000.0, 1000.0])
    expected = _reference_freqs(dim, theta)
    i = torch.arange(dim // 2, dtype=torch.float64)
    mistakes = {
        "the exponent is -i/dim instead of -2i/dim (i counts pairs, so the exponent steps by 2/dim)":
            (theta ** (-i / dim)).float(),
        "the exponent has the wrong sign: frequencies must *decrease* with i (theta ** (-2i/dim))":
            (theta ** (2 * i / dim)).float(),
        "these are wavelengths 2*pi/theta_i, not frequencies theta_i": (2 * math.pi * theta ** (2 * i / dim)).float(),
    }
    out = fn(dim, theta)
    if isinstance(out, torch.Tensor) and out.shape == (dim,):
        fail(name, f"returned {dim} values; RoPE needs one frequency per *pair*: dim // 2 = {dim // 2}",
             "use torch.arange(0, dim, 2) / dim (or 2 * torch.arange(dim // 2) / dim) as the exponent")
    diff = check_tensor(name, out, expected, atol=1e-6, rtol=1e-4, mistakes=mistakes)
    passed(name, f"max abs diff {diff:.1e} for dim={dim}, theta={theta:g}")


@attributes_stubs
def check_apply_rope(fn) -> None:
    """fn(xq, xk, freqs_cis) -> (xq_rot, xk_rot); xq (B, T, H, D), xk (B, T, K, D), freqs_cis (T, D/2) complex."""
    name = "apply_rope"
    B, T, H, K, D = 2, random.choice([3, 5, 6, 7]), 4, 2, random.choice([8, 16])  # T != H: a wrong axis fails
    xq, xk = torch.randn(B, T, H, D), torch.randn(B, T, K, D)  # K != H on purpose: shapes must not be assumed equal
    freqs_cis = compute_freqs_cis(D, T, random.choice([100.0, 10000.0]))
    exp_q, exp_k = apply_rope(xq, xk, freqs_cis)
    broadcast_hint = ("the positions are dim 1 of x (B, T, H, D): freqs_cis (T, D/2) must broadcast as (1, T, 1, D/2), "
                      "e.g. freqs_cis[None, :, None, :]")
    out = call(name, fn, xq.clone(), xk.clone(), freqs_cis, hint=broadcast_hint)
    if not isinstance(out, tuple | list) or len(out) != 2:
        fail(name, f"returned {type(out).__name__}, expected a pair (xq_rotated, xk_rotated)", "return xq_out, xk_out")
    pair_hint = ("pair adjacent elements (x[2i], x[2i+1]) as the complex number x[2i] + i*x[2i+1], "
                 "e.g. torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))")

    def hint_for(got: object, x: torch.Tensor) -> str:
        """A rotation keeps the length of every pair it rotates: if adjacent pairs keep theirs, the pairing or the
        angles are wrong; if not, this is not a rotation of adjacent pairs (a missing sin or cos term, a scale)."""
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            return pair_hint
        norms = lambda t: t.detach().float().reshape(*t.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
        if torch.allclose(norms(got), norms(x), atol=1e-4, rtol=1e-4):
            return pair_hint + "; and the angle of pair i at position m is m * theta_i, freqs_cis[m, i]"
        return ("each adjacent pair must keep its length, as a rotation does: x'_2i = x_2i cos - x_2i+1 sin and "
                "x'_2i+1 = x_2i sin + x_2i+1 cos, with cos = freqs_cis.real and sin = freqs_cis.imag; " + pair_hint)

    def mistakes_for(x: torch.Tensor) -> dict:
        c = freqs_cis.real[None, :, None, :].repeat_interleave(2, -1)  # (1, T, 1, D): cos of each element's pair
        return {
            "rotating the wrong pairs: x[i] was paired with x[i + D/2] (halves); this lesson pairs adjacent "
            "elements x[2i], x[2i+1]": lambda: _rotate_halves(x, freqs_cis),
            "rotating by -angle (conjugate rotation): multiply by freqs_cis, not by its conjugate":
                lambda: apply_rope(x, x, freqs_cis.conj())[0],
            "the input is returned unrotated": x,
            "the sin terms are missing: x is only multiplied by cos (multiply by the complex freqs_cis, not by its "
            "real part)": lambda: x * c,
        }

    dq = check_tensor(name + " (queries)", out[0], exp_q, mistakes=mistakes_for(xq), hint=hint_for(out[0], xq))
    k_mistakes = {"forgot to rotate k: the keys came back unrotated (rotate both q and k)": xk,
                  **mistakes_for(xk)}
    dk = check_tensor(name + " (keys)", out[1], exp_k, mistakes=k_mistakes, hint=hint_for(out[1], xk))
    # bf16 inputs, as in a model trained in bf16: the rotation is computed in float32 but returned as bf16
    hq, hk = xq.bfloat16(), xk.bfloat16()
    out = call(name + " (bfloat16)", fn, hq.clone(), hk.clone(), freqs_cis, hint=broadcast_hint)
    for label, got, x in (("queries", out[0], hq), ("keys", out[1], hk)):
        if isinstance(got, torch.Tensor) and got.dtype != x.dtype:
            fail(f"{name} ({label}, bfloat16 input)", f"returned {got.dtype} for {x.dtype} input",
                 "return the input's dtype: .type_as(xq) after computing in float32 (complex64)")
    for label, got, want in zip(("queries", "keys"), out, apply_rope(hq, hk, freqs_cis)):
        check_tensor(f"{name} ({label}, bfloat16 input)", got, want, atol=2e-2, rtol=2e-2)
    passed(name, f"max abs diff {max(dq, dk):.1e} with T={T}, H={H}, K={K}, D={D}; bfloat16 in, bfloat16 out")


@attributes_stubs
def check_relative_score(fn) -> None:
    """fn(q, k, m, n, theta) -> scalar: the dot product of q rotated to position m with k rotated to
    position n (no 1/sqrt(D) scale). q, k (D,)."""
    name = "relative_score"
    D, theta = random.choice([8, 16, 32]), 10000.0
    q, k = torch.randn(D), torch.randn(D)
    positions = [(random.randint(0, 40), random.randint(0, 40)) for _ in range(5)] + [(3, 3), (0, 7)]
    freqs = compute_freqs_cis(D, 41, theta)  # (41, D/2)

    def score(qm: int, kn: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, D), q.view(1, 1, 1, D), freqs[qm:qm + 1])[0]  # q at position qm
        rk = apply_rope(k.view(1, 1, 1, D), k.view(1, 1, 1, D), freqs[kn:kn + 1])[0]  # k at position kn
        return (rq * rk).sum()

    expected = torch.stack([score(m, n) for m, n in positions])
    outs = []
    for m, n in positions:
        s = fn(q.clone(), k.clone(), m, n, theta)
        if isinstance(s, torch.Tensor) and s.numel() != 1:
            fail(name, f"returned a tensor of shape {tuple(s.shape)}, expected one number",
                 "sum the elementwise product: (q_rot * k_rot).sum()")
        if s is None:
            fail(name, "returned None, expected one number", "did you forget a `return`?")
        outs.append(torch.as_tensor(s).detach().reshape(()).float())
    out = torch.stack(outs)
    mistakes = {
        "the score does not depend on the positions: this is the plain dot product q.k (no rotation, or q "
        "and k rotated by the same angle so the rotations cancel); rotate q by m and k by n":
            torch.full_like(expected, float(q @ k)),
        "the positions are swapped (q belongs at m, k at n)": lambda: torch.stack([score(n, m) for m, n in positions]),
        "the score is divided by sqrt(D); this exercise asks for the plain dot product":
            expected / math.sqrt(D),
    }
    diff = check_tensor(name, out, expected, atol=1e-4, mistakes=mistakes)
    passed(name, f"max abs diff {diff:.1e} over {len(positions)} (m, n) pairs, D={D}")


@attributes_stubs
def check_scale_rope_frequencies(fn) -> None:
    """fn(freqs, factor, low_freq_factor, high_freq_factor, original_max_seq_len) -> (D/2,) scaled freqs
    (Llama 3.1 context extension)."""
    name = "scale_rope_frequencies"
    D, theta = random.choice([64, 128]), random.choice([10000.0, 500000.0])
    scaling = RopeScaling(factor=random.choice([4.0, 8.0, 16.0, 32.0]), low_freq_factor=random.choice([1.0, 2.0]),
                          high_freq_factor=4.0, original_max_seq_len=random.choice([2048, 4096, 8192]))
    freqs = _reference_freqs(D, theta).double()  # (D/2,)
    expected = scale_freqs(freqs, scaling)
    wavelen = 2 * math.pi / freqs
    low, high = (scaling.original_max_seq_len / scaling.low_freq_factor,
                 scaling.original_max_seq_len / scaling.high_freq_factor)
    band = (wavelen <= low) & (wavelen >= high)
    s = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)  # the interpolation weight in the band
    slow = wavelen > low
    mistakes = {
        "the interpolation weights are swapped: theta' = (1 - s) * theta / factor + s * theta, so s = 1 (the fast "
        "edge of the band) keeps theta": torch.where(band, s * freqs / scaling.factor + (1 - s) * freqs, expected),
        "the frequencies are multiplied by factor; divide them (a longer context needs *slower* rotations)":
            torch.where(slow, freqs * scaling.factor,
                        torch.where(band, (1 - s) * freqs * scaling.factor + s * freqs, expected)),
        "every frequency was divided by factor (plain position interpolation); Llama 3.1 keeps the high "
        "frequencies (short wavelengths) unchanged": freqs / scaling.factor,
        "nothing changed: frequencies with wavelength > original_max_seq_len / low_freq_factor must be "
        "divided by factor": freqs,
        "the in-between band is not interpolated (it was divided by factor)":
            torch.where(band, freqs / scaling.factor, expected),
        "the in-between band is not interpolated (it was left unchanged)": torch.where(band, freqs, expected),
        "high and low are swapped: long wavelengths (low frequencies) are the ones to divide by factor":
            lambda: torch.where(wavelen < high, freqs / scaling.factor, torch.where(wavelen > low, freqs, expected)),
    }
    out = fn(freqs.clone(), scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
             scaling.original_max_seq_len)
    hint = ("wavelength = 2*pi/freq; compare it with original_max_seq_len / low_freq_factor and "
            "original_max_seq_len / high_freq_factor")
    if isinstance(out, torch.Tensor) and out.shape == expected.shape:  # say which of the three groups is wrong
        wrong = ~torch.isclose(out.detach().double(), expected, atol=1e-7, rtol=1e-5)
        groups = [g for g, m in (("slow (wavelength > L / low_freq_factor, divided by factor)", slow),
                                 ("in-between (interpolated)", band),
                                 ("fast (wavelength < L / high_freq_factor, unchanged)", wavelen < high)) if (wrong & m).any()]
        if groups:
            hint = f"the wrong pairs are the {' and the '.join(groups)} ones, with L = original_max_seq_len; " + hint
    diff = check_tensor(name, out, expected, atol=1e-7, rtol=1e-5, mistakes=mistakes, hint=hint)
    passed(name, f"max abs diff {diff:.1e}; factor={scaling.factor:g}, {int(band.sum())} of {D // 2} pairs "
                 "in the interpolated band")
