import math

import pytest
import torch

from tlama_mini import (RMSNorm, RopeScaling, apply_rope, build_mask, causal_mask, compute_freqs_cis,
                        create_chunked_attention_mask, reshape_for_broadcast, sliding_window_mask)
from tlama_mini.rope import scale_freqs, xpos_scale


def test_rmsnorm_equals_torch_builtin_and_formula():
    x = torch.randn(3, 7, 32)
    ours = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
    ref = torch.nn.RMSNorm(32, eps=1e-5)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    formula = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * ours.weight
    torch.testing.assert_close(ours(x), formula, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours._norm(x), formula / ours.weight, atol=1e-5, rtol=1e-4)


def test_rms_norm_in_float32_is_the_formula_bit_for_bit():
    """Inference in float32 (no gradients) takes rms_norm's in-place route: the same float32 operations
    in the same order as the formula, so the results are identical, not just close."""
    from tlama_mini.norm import _divide_by_rms, rms_norm
    g = torch.Generator().manual_seed(0)
    for C in (1, 24, 576, 1537):
        x = torch.randn(4, 3, C, generator=g) * 10 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        w = torch.randn(C, generator=g)
        for eps in (1e-5, 1e-6):
            x0, w0 = x.clone(), w.clone()
            with torch.no_grad():
                fast = rms_norm(x, w, eps)
            assert torch.equal(fast, _divide_by_rms(x, eps) * w), (C, eps)
            assert torch.equal(x, x0) and torch.equal(w, w0)  # in place only on its own temporaries


def test_rmsnorm_rejects_wrong_width():
    with pytest.raises(ValueError, match="expects last dim 32"):
        RMSNorm(32)(torch.randn(2, 16))


def _rotate_naive(x, pos, theta=10000.0):
    """Rotate each adjacent pair (2i, 2i+1) of x (T, D) by pos * theta^(-2i/D) with 2x2 matrices."""
    T, D = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for t in range(T):
        for i in range(D // 2):
            a = pos[t] * theta ** (-2 * i / D)
            c, s = math.cos(a), math.sin(a)
            x0, x1 = float(x[t, 2 * i]), float(x[t, 2 * i + 1])
            out[t, 2 * i], out[t, 2 * i + 1] = c * x0 - s * x1, s * x0 + c * x1
    return out


def test_apply_rope_equals_rotation_matrices():
    T, D = 6, 8
    freqs = compute_freqs_cis(D, 16)
    assert freqs.shape == (16, D // 2) and freqs.is_complex()
    xq, xk = torch.randn(1, T, 2, D), torch.randn(1, T, 1, D)
    start = 5
    q, k = apply_rope(xq, xk, freqs[start:start + T])
    pos = list(range(start, start + T))
    torch.testing.assert_close(q[0, :, 1].double(), _rotate_naive(xq[0, :, 1], pos), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k[0, :, 0].double(), _rotate_naive(xk[0, :, 0], pos), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    freqs = compute_freqs_cis(D, 64)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        qm, _ = apply_rope(q, q, freqs[m:m + 1])
        kn, _ = apply_rope(k, k, freqs[n:n + 1])
        return (qm * kn).sum().item()

    assert score(10, 3) == pytest.approx(score(40, 33), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-4)


def test_rope_scaling_equals_transformers_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    D, theta = 64, 500000.0
    cfg = LlamaConfig(hidden_size=D * 4, num_attention_heads=4, rope_theta=theta, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ours = scale_freqs(base, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192))
    torch.testing.assert_close(ours.float(), inv_freq.float(), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(ours, base)  # scaling changed the low frequencies


def test_reshape_for_broadcast_errors_on_mismatch():
    x = torch.randn(2, 5, 3, 4)  # (B, T, H, D/2) complex view shape
    assert reshape_for_broadcast(torch.randn(5, 4), x).shape == (1, 5, 1, 4)
    with pytest.raises(ValueError, match="slice freqs_cis"):
        reshape_for_broadcast(torch.randn(9, 4), x)


def test_masks_from_positions_equal_loops():
    T, start, window, chunk = 5, 3, 3, 4
    S = start + T
    m_causal, m_window, m_chunk = (causal_mask(T, start), sliding_window_mask(T, window, start),
                                   create_chunked_attention_mask(T, chunk, start))
    for i in range(T):
        q = start + i
        for k in range(S):
            assert m_causal[i, k] == (k <= q)
            assert m_window[i, k] == (k <= q and q - k < window)
            assert m_chunk[i, k] == (k <= q and q // chunk == k // chunk)


def test_sliding_window_as_wide_as_context_is_causal():
    assert torch.equal(sliding_window_mask(12, 12), causal_mask(12))
    assert torch.equal(build_mask(torch.arange(4), torch.arange(4), causal=False), torch.ones(4, 4, dtype=torch.bool))


def test_xpos_scores_decay_with_relative_distance_only():
    D, base = 16, 32
    freqs = compute_freqs_cis(D, 80)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n, xpos=True):
        qm, _ = apply_rope(q, q, freqs[m:m + 1])
        kn, _ = apply_rope(k, k, freqs[n:n + 1])
        if xpos:
            qm, kn = qm * xpos_scale(D, m, 1, base), kn / xpos_scale(D, n, 1, base)
        return (qm * kn).sum().item()

    assert score(50, 20) == pytest.approx(score(70, 40), rel=1e-4)
    # zeta ** ((m - n) / base) per pair: written out for one case
    zeta = ((torch.arange(0, D, 2) / D + 0.4) / 1.4).repeat_interleave(2)
    qm, _ = apply_rope(q, q, freqs[30:31])
    kn, _ = apply_rope(k, k, freqs[10:11])
    assert score(30, 10) == pytest.approx((qm * kn * zeta ** (20 / base)).sum().item(), rel=1e-4)


def test_rms_norm_function_is_the_module_and_the_formula():
    from tlama_mini.norm import rms_norm
    x, w = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    formula = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.1) * w
    torch.testing.assert_close(rms_norm(x, w, 0.1), formula, rtol=1e-5, atol=1e-6)  # computed in float32
    module = RMSNorm(24, eps=0.1).double()
    with torch.no_grad():
        module.weight.copy_(w)
    assert torch.equal(module(x), rms_norm(x, w, 0.1))
    xb = x.bfloat16()  # normalised in float32, rounded to the input's dtype before the scale
    yb = rms_norm(xb, w.bfloat16(), 0.1)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), formula, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="expects last dim 24"):
        rms_norm(torch.randn(2, 23), w, 1e-6)
