"""Attention: naive = SDPA (outputs and gradients), GQA with K == H = MHA, repeat_kv, the module's
backends, the KV cache's bounds, and that training never touches the cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from tlama_mini import Attention, TlamaConfig, attention, compute_freqs_cis, naive_attention, repeat_kv
from tlama_mini.masks import build_mask


def _reference(q, k, v, mask):
    """Attention written independently: explicit loops over heads, float64."""
    B, H, T, D = q.shape
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h].double() @ k[b, h].double().T / math.sqrt(D)
            s = s.masked_fill(~mask, float("-inf")) if mask is not None else s
            out[b, h] = torch.softmax(s, -1) @ v[b, h].double()
    return out


@pytest.mark.parametrize("kind", ["none", "causal", "window", "chunk"])
def test_naive_equals_sdpa_and_reference(kind):
    B, H, T, D = 2, 3, 11, 16
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    pos = torch.arange(T)
    mask = {"none": None, "causal": build_mask(pos, pos), "window": build_mask(pos, pos, sliding_window=4),
            "chunk": build_mask(pos, pos, chunk_size=4)}[kind]
    a = attention(q, k, v, mask, backend="naive")
    b = attention(q, k, v, mask, backend="sdpa")
    torch.testing.assert_close(a.double(), _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), (q, k, v))
    gb = torch.autograd.grad(b.square().sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_is_causal_is_bottom_right_aligned_for_cached_queries():
    q = torch.randn(1, 2, 3, 8)
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = build_mask(torch.arange(4, 7), torch.arange(7))  # queries at positions 4, 5, 6
    expected = _reference(q, k, v, mask).float()
    for backend in ("naive", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, None, is_causal=True, backend=backend), expected,
                                   atol=1e-5, rtol=1e-5)


def test_repeat_kv_matches_repeat_interleave():
    kv = torch.randn(2, 5, 3, 4)  # (B, S, K, D)
    out = repeat_kv(kv, 4)
    assert out.shape == (2, 5, 12, 4)
    torch.testing.assert_close(out, torch.repeat_interleave(kv, 4, dim=2))
    assert repeat_kv(kv, 1) is kv


def test_grouped_attention_equals_mha_with_repeated_heads():
    B, H, K, T, D = 2, 6, 2, 9, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    mha = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    for backend in ("naive", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, is_causal=True, backend=backend), mha, atol=1e-5, rtol=1e-5)


def test_gqa_module_with_as_many_kv_heads_as_heads_is_mha():
    cfg = TlamaConfig(d_model=32, n_heads=4, n_kv_heads=4, max_seq_len=16, max_batch_size=2)
    att = Attention(cfg)
    x = torch.randn(2, 10, 32)
    freqs = compute_freqs_cis(cfg.head_dim, 10)
    out = att(x, 0, freqs, None, is_causal=True)
    # the same computation, MHA written directly with torch's kernel
    from tlama_mini import apply_rope
    q = att.Wq(x).view(2, 10, 4, 8)
    k = att.Wk(x).view(2, 10, 4, 8)
    q, k = apply_rope(q, k, freqs)
    v = att.Wv(x).view(2, 10, 4, 8)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(out, att.Wo(ref.transpose(1, 2).reshape(2, 10, 32)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("qk_norm", [False, True])
def test_module_backends_agree(n_kv_heads, qk_norm):
    cfg = TlamaConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, qk_norm=qk_norm, max_seq_len=16, max_batch_size=2)
    torch.manual_seed(0)
    a = Attention(cfg)
    b = Attention(cfg.replace(attn_backend="naive"))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 12, 32)
    freqs = compute_freqs_cis(cfg.head_dim, 12)
    torch.testing.assert_close(a(x, 0, freqs, None, is_causal=True), b(x, 0, freqs, None, is_causal=True),
                               atol=1e-5, rtol=1e-5)


def test_training_never_writes_or_reads_the_cache():
    cfg = TlamaConfig(d_model=32, n_heads=4, max_seq_len=16, max_batch_size=2, kv_cache=True)
    att = Attention(cfg)  # modules start in training mode
    x = torch.randn(2, 5, 32)
    out = att(x, 0, compute_freqs_cis(8, 5), None, kv_cache=True)
    out.sum().backward()
    assert att.cache_k is None and att.cache_v is None
    att.eval()
    with torch.no_grad():
        att(x, 0, compute_freqs_cis(8, 5), None, kv_cache=True)
    assert att.cache_k.shape == (2, 5, 4, 8)  # sized to the call, not (max_batch_size, max_seq_len, K, D)


def test_attention_input_errors():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="does not fit 4 queries and 4 keys"):
        attention(q, q, q, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, backend="magic")


def test_fully_masked_row_gives_nan_in_naive_attention():
    q = torch.randn(1, 1, 2, 4)
    mask = torch.tensor([[True, False], [False, False]])
    out = naive_attention(q, q, q, mask)
    assert not out[0, 0, 0].isnan().any() and out[0, 0, 1].isnan().all()
