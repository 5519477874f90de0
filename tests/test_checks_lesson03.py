"""The lesson 03 (RoPE) checks accept a correct solution and reject typical mistakes by name."""
import math

import torch

from tlama_mini.checks.lesson03 import (check_apply_rope, check_relative_score, check_rope_frequencies,
                                        check_scale_rope_frequencies)
from tlama_mini.config import RopeScaling
from tlama_mini.rope import scale_freqs
from tlama_mini.checks.common import expect_failure as fails_with


# --- correct implementations, written independently of tlama_mini (real arithmetic, no complex numbers)
def rope_frequencies(dim, theta=10000.0):
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rotate(x, freqs_cis):  # x (B, T, H, D), adjacent pairs
    cos, sin = freqs_cis.real[None, :, None, :], freqs_cis.imag[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)  # bf16 in, bf16 out


def apply_rope(xq, xk, freqs_cis):
    return rotate(xq, freqs_cis), rotate(xk, freqs_cis)


def relative_score(q, k, m, n, theta=10000.0):
    f = rope_frequencies(q.shape[-1], theta)
    # <R(m) q, R(n) k> = <q, R(n - m) k>: rotate only k by the difference
    ang = (n - m) * f
    k0, k1 = k[0::2].double(), k[1::2].double()
    c, s = torch.cos(ang), torch.sin(ang)
    rk = torch.stack([k0 * c - k1 * s, k0 * s + k1 * c], -1).flatten()
    return (q.double() @ rk).float()


def scale_rope_frequencies(freqs, factor, low_freq_factor, high_freq_factor, original_max_seq_len):
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl > original_max_seq_len / low_freq_factor:
            out.append(f / factor)
        elif wl < original_max_seq_len / high_freq_factor:
            out.append(f)
        else:
            s = (original_max_seq_len / wl - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=freqs.dtype)


def test_correct_solutions_pass(capsys):
    for _ in range(3):  # fresh random shapes each time
        check_rope_frequencies(rope_frequencies)
        check_apply_rope(apply_rope)
        check_relative_score(relative_score)
        check_scale_rope_frequencies(scale_rope_frequencies)
    assert capsys.readouterr().out.count("✓") == 12




def test_frequency_mistakes():
    fails_with(check_rope_frequencies, lambda d, t=1e4: t ** (-torch.arange(d // 2) / d), "-i/dim instead of -2i/dim")
    fails_with(check_rope_frequencies, lambda d, t=1e4: t ** (torch.arange(0, d, 2) / d), "wrong sign")
    fails_with(check_rope_frequencies, lambda d, t=1e4: t ** (-torch.arange(d) / d), "one frequency per *pair*")


def test_rope_mistakes():
    def halves(x, f):
        h = x.shape[-1] // 2
        cos, sin = f.real[None, :, None], f.imag[None, :, None]
        return torch.cat([x[..., :h] * cos - x[..., h:] * sin, x[..., :h] * sin + x[..., h:] * cos], -1)

    fails_with(check_apply_rope, lambda q, k, f: (halves(q, f), halves(k, f)), "rotating the wrong pairs")
    fails_with(check_apply_rope, lambda q, k, f: apply_rope(q, k, f.conj()), "-angle")
    fails_with(check_apply_rope, lambda q, k, f: (rotate(q, f), k), "forgot to rotate k")
    fails_with(check_apply_rope, lambda q, k, f: rotate(q, f), "expected a pair")


def test_rope_mistakes_found_by_the_probe():
    def wrong_axis(q, k, f):  # freqs_cis lined up with the heads instead of the positions
        fc = f[None, None]  # (1, 1, T, D/2)
        turn = lambda x: torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * fc)  # noqa: E731
        return turn(q).flatten(-2), turn(k).flatten(-2)

    def float32_out(q, k, f):  # right values, but bf16 inputs come back as float32
        fc = f[None, :, None, :]
        turn = lambda x: torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * fc)  # noqa: E731
        return turn(q).flatten(-2), turn(k).flatten(-2)

    def cos_only(x, f):
        return x * f.real[None, :, None, :].repeat_interleave(2, -1)

    def sin_sign(x, f):  # x'_2i = x_2i cos + x_2i+1 sin, x'_2i+1 = x_2i sin + x_2i+1 cos: not a rotation
        cos, sin = f.real[None, :, None, :], f.imag[None, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos + x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    fails_with(check_apply_rope, wrong_axis, "crashed", "(1, T, 1, D/2)")
    fails_with(check_apply_rope, float32_out, "bfloat16", "float32", "type_as")
    fails_with(check_apply_rope, lambda q, k, f: (rotate(q, f), cos_only(k, f)), "(keys)", "sin terms are missing")
    message = fails_with(check_apply_rope, lambda q, k, f: (sin_sign(q, f), k), "values differ", "keep its length")
    assert "angle of pair i" not in message
    message = fails_with(check_apply_rope, lambda q, k, f: (rotate(q, f * f), k), "values differ", "angle of pair i")
    assert "keep its length" not in message


def test_relative_score_mistakes():
    fails_with(check_relative_score, lambda q, k, m, n, t=1e4: q @ k, "does not depend on the positions")
    fails_with(check_relative_score, lambda q, k, m, n, t=1e4: relative_score(q, k, n, m, t), "swapped")
    fails_with(check_relative_score, lambda q, k, m, n, t=1e4: relative_score(q, k, m, n, t) / math.sqrt(q.numel()),
               "sqrt(D)")


def test_scaling_mistakes():
    fails_with(check_scale_rope_frequencies, lambda f, factor, *rest: f / factor, "position interpolation")
    fails_with(check_scale_rope_frequencies, lambda f, *rest: f.clone(), "nothing changed")

    def no_interp(f, factor, lo, hi, orig):  # hard switch: scale whatever is not clearly high-frequency
        wl = 2 * math.pi / f
        return torch.where(wl < orig / hi, f, f / factor)

    fails_with(check_scale_rope_frequencies, no_interp, "not interpolated")

    def rule(f, factor, lo, hi, orig, *, swap_weights=False, multiply=False):
        wl = 2 * math.pi / f
        scaled = f * factor if multiply else f / factor
        s = (orig / wl - lo) / (hi - lo)
        mid = s * scaled + (1 - s) * f if swap_weights else (1 - s) * scaled + s * f
        return torch.where(wl > orig / lo, scaled, torch.where(wl < orig / hi, f, mid))

    fails_with(check_scale_rope_frequencies, lambda *a: rule(*a, swap_weights=True), "interpolation weights are swapped",
               "in-between")
    fails_with(check_scale_rope_frequencies, lambda *a: rule(*a, multiply=True), "multiplied by factor")
    def slow_off(f, factor, lo, hi, orig):  # only the slow pairs are wrong (by 1%)
        return torch.where(2 * math.pi / f > orig / lo, 1.01 * rule(f, factor, lo, hi, orig), rule(f, factor, lo, hi, orig))

    message = fails_with(check_scale_rope_frequencies, slow_off, "values differ", "the wrong pairs are the slow")
    assert "fast" not in message


def test_scaling_reference_is_llama31():
    # independent spot check of the reference itself: Llama 3.1's published constants
    freqs = rope_frequencies(128, 500000.0)
    scaled = scale_freqs(freqs, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_seq_len=8192))
    assert torch.equal(scaled[:10], freqs[:10])                         # high frequencies kept
    assert torch.allclose(scaled[-10:], freqs[-10:] / 8)                # low frequencies divided by 8
