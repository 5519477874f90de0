"""Tiled (flash-style) attention equals naive attention and torch's SDPA in outputs, log-sum-exp and
gradients; the model gives the same logits, gradients and greedy decode with either backend.

Measured max abs differences over CASES (fp32, CPU, torch 2.13): outputs 7e-7 vs naive and 4e-7 vs
SDPA, lse 5e-7, dq/dk/dv 2e-6; tiny model logits 2e-7 and parameter gradients 1e-8 vs SDPA.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tlama_mini.flash as flash_mod
from tlama_mini import TlamaConfig, Transformer, generate, naive_attention, repeat_kv
from tlama_mini.flash import flash_attention, flash_forward, online_softmax_update


def _qkv(B, H, K, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, K, S, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, K, S, D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def _expand(kv, n_rep):  # (B, K, S, D) -> (B, H, S, D)
    return repeat_kv(kv.transpose(1, 2), n_rep).transpose(1, 2)


def _bottom_right(T, S):  # built independently of tlama_mini.masks: query i sees keys 0..S-T+i
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)


# (T, S, causal, H, K, D, block): lengths 1, 7, 33, 100; T == S and S > T; MHA, GQA, MQA
CASES = [
    (1, 1, True, 4, 4, 16, 16), (7, 7, True, 4, 2, 16, 16), (33, 33, True, 4, 2, 32, 16),
    (100, 100, True, 4, 1, 16, 32), (33, 33, False, 4, 2, 16, 32), (100, 100, False, 4, 4, 32, 16),
    (1, 33, True, 4, 2, 16, 16), (7, 100, True, 4, 1, 32, 16), (33, 100, True, 4, 2, 16, 32),
    (7, 33, False, 4, 2, 16, 16), (1, 100, False, 4, 1, 16, 32),
]


@pytest.mark.parametrize("T,S,causal,H,K,D,block", CASES)
def test_flash_matches_naive_and_sdpa(T, S, causal, H, K, D, block):
    B = 2
    q, k, v = _qkv(B, H, K, T, S, D)
    out, lse = flash_attention(q, k, v, causal, block_size=block, return_lse=True)
    assert out.shape == (B, H, T, D) and lse.shape == (B, H, T)

    kr, vr = _expand(k, H // K), _expand(v, H // K)
    mask = _bottom_right(T, S) if causal else None
    ref = naive_attention(q, kr, vr, mask)
    sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    assert (out - ref).abs().max() < 1e-5
    assert (out - sdpa).abs().max() < 1e-5

    scores = (q @ kr.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    assert (lse - torch.logsumexp(scores, dim=-1)).abs().max() < 1e-5

    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        assert (a - b).abs().max() < 5e-5, f"d{name} differs by {(a - b).abs().max():.2e}"


def test_separate_query_and_key_blocks_and_scale():
    q, k, v = _qkv(1, 4, 2, 37, 53, 16)
    ref = naive_attention(q * 0.3 * math.sqrt(16), _expand(k, 2), _expand(v, 2), _bottom_right(37, 53))
    out = flash_attention(q, k, v, True, block_q=8, block_k=24, scale=0.3)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    q, k, v = _qkv(1, 2, 1, 5, 7, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal, block_q=2, block_k=3),
                                    (q, k, v))


def test_online_softmax_update_two_tiles_equal_one_softmax():
    g = torch.Generator().manual_seed(1)
    s, v = torch.randn(3, 10, generator=g), torch.randn(10, 4, generator=g)
    s[0, :6] = float("-inf")  # row 0 sees nothing in the first tile: must not become NaN
    m, l, acc = torch.full((3,), float("-inf")), torch.zeros(3), torch.zeros(3, 4)
    m, l, acc = online_softmax_update(m, l, acc, s[:, :6], v[:6])
    assert torch.isfinite(acc).all() and l[0] == 0
    m, l, acc = online_softmax_update(m, l, acc, s[:, 6:], v[6:])
    assert torch.allclose(acc / l[:, None], torch.softmax(s, -1) @ v, atol=1e-6)
    assert torch.allclose(m + l.log(), torch.logsumexp(s, -1), atol=1e-6)


def test_causal_tiles_above_the_diagonal_are_skipped(monkeypatch):
    calls = []
    real = flash_mod.online_softmax_update
    monkeypatch.setattr(flash_mod, "online_softmax_update", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(1, 2, 2, 64, 64, 8)
    flash_forward(q.detach(), k.detach(), v.detach(), causal=True, block_q=16, block_k=16)
    assert len(calls) == 4 * 5 // 2  # lower triangle of a 4 x 4 grid of tiles, diagonal included
    calls.clear()
    flash_forward(q.detach(), k.detach(), v.detach(), causal=False, block_q=16, block_k=16)
    assert len(calls) == 16


def test_backward_saves_no_score_matrix():
    T = S = 96
    q, k, v = _qkv(1, 2, 2, T, S, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = flash_attention(q, k, v, True, block_size=16)
    assert saved and max(saved) == q.numel() < T * S * 2  # q, k, v, out, lse only; never (H, T, S)
    out.sum().backward()


def test_low_precision_keeps_dtype():
    q, k, v = _qkv(1, 4, 2, 20, 20, 16)
    ref = flash_attention(q, k, v, True, block_size=8)
    out = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), True, block_size=8)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 3e-2


def test_clear_errors():
    q, k, v = _qkv(1, 4, 2, 8, 4, 8)
    with pytest.raises(ValueError, match="fewer keys"):
        flash_attention(q, k, v, True)
    q, k, v = _qkv(1, 4, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, v, True)
    q, k, v = _qkv(1, 4, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="block"):
        flash_attention(q, k, v, True, block_size=0)


def _pair(**overrides):
    torch.manual_seed(0)
    sdpa = Transformer(TlamaConfig.from_preset("tiny", **overrides))
    flash = Transformer(TlamaConfig.from_preset("tiny", attn_backend="flash", flash_block_size=16, **overrides))
    flash.load_state_dict(sdpa.state_dict())
    return sdpa, flash


def test_model_flash_equals_sdpa_logits_and_gradients():
    sdpa, flash = _pair()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, dims=1)
    logits_s, loss_s = sdpa(tokens, targets=targets)
    logits_f, loss_f = flash(tokens, targets=targets)
    assert (logits_s - logits_f).abs().max() < 1e-5
    loss_s.backward()
    loss_f.backward()
    for (name, a), b in zip(sdpa.named_parameters(), flash.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-6, name


def test_model_flash_cached_prefill_in_pieces_and_greedy_decode():
    sdpa, flash = _pair()
    sdpa.eval(), flash.eval()
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # prefill in two pieces: the second is causal with S > T (bottom-right)
        for model in (sdpa, flash):
            model(tokens[:, :12], 0, kv_cache=True)
        a, _ = sdpa(tokens[:, 12:], 12)
        b, _ = flash(tokens[:, 12:], 12)
    assert (a - b).abs().max() < 1e-5
    prompt = tokens[:1, :8]
    out_s = generate(sdpa, prompt, 24, temperature=0)
    out_f = generate(flash, prompt, 24, temperature=0)
    out_f_nocache = generate(flash, prompt, 24, temperature=0, use_cache=False)
    assert torch.equal(out_s, out_f) and torch.equal(out_f, out_f_nocache)
