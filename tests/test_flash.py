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

from tlama_mini import TlamaConfig, Transformer, generate, naive_attention, repeat_kv
from torch.utils._python_dispatch import TorchDispatchMode

from tlama_mini.flash import default_blocks, flash_attention, online_softmax_update


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


class _CountOps(TorchDispatchMode):
    """Counts the ATen operations by name: one amax per forward tile, one exp2_ per backward tile."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal,tiles", [(True, 4 * 5 // 2), (False, 16)])
def test_causal_tiles_above_the_diagonal_are_skipped(causal, tiles):
    # a 4 x 4 grid of 16 x 16 tiles; causal: the lower triangle, diagonal included
    q, k, v = _qkv(1, 2, 2, 64, 64, 8)
    out = flash_attention(q, k, v, causal, block_size=16)
    with _CountOps() as fwd:
        flash_attention(q.detach(), k.detach(), v.detach(), causal, block_size=16)
    with _CountOps() as bwd:
        out.sum().backward()
    assert fwd.counts["amax"] == tiles and bwd.counts["exp2_"] == tiles
    assert fwd.counts.get("masked_fill_", 0) == (4 if causal else 0)  # only the diagonal tiles are masked


def _plain_flash(q, k, v, causal, block_q, block_k):
    """Lesson 08's teaching version, one formula a line: (out, lse, backward(dout) -> (dq, dk, dv)), with
    the kv heads repeated for GQA. Written independently of tlama_mini.flash except its online step."""
    B, H, T, D = q.shape
    S, n_rep = k.shape[2], H // k.shape[1]
    kr, vr = _expand(k, n_rep), _expand(v, n_rep)  # (B, H, S, D)
    scale, offset = 1 / math.sqrt(D), S - T
    visible = _bottom_right(T, S) if causal else torch.ones(T, S, dtype=torch.bool)
    out, lse = torch.empty_like(q), torch.empty(B, H, T)
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        m, l = torch.full((B, H, i1 - i0), float("-inf")), torch.zeros(B, H, i1 - i0)  # (B, H, bq)
        acc = torch.zeros(B, H, i1 - i0, D)  # (B, H, bq, D)
        for j0 in range(0, S, block_k):
            j1 = min(j0 + block_k, S)
            if causal and j0 > offset + i1 - 1:  # the whole tile is in the future
                continue
            s = q[:, :, i0:i1] @ kr[:, :, j0:j1].transpose(-2, -1) * scale  # (B, H, bq, bk)
            s = s.masked_fill(~visible[i0:i1, j0:j1], float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, s, vr[:, :, j0:j1])
        out[:, :, i0:i1], lse[:, :, i0:i1] = acc / l[..., None], m + l.log()

    def backward(dout):
        delta = (dout * out).sum(-1)  # (B, H, T)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kr), torch.zeros_like(vr)
        for j0 in range(0, S, block_k):
            j1 = min(j0 + block_k, S)
            for i0 in range(0, T, block_q):
                i1 = min(i0 + block_q, T)
                s = q[:, :, i0:i1] @ kr[:, :, j0:j1].transpose(-2, -1) * scale
                p = torch.exp(s - lse[:, :, i0:i1, None]).masked_fill(~visible[i0:i1, j0:j1], 0.0)
                do_i = dout[:, :, i0:i1]
                dv[:, :, j0:j1] += p.transpose(-2, -1) @ do_i
                ds = p * (do_i @ vr[:, :, j0:j1].transpose(-2, -1) - delta[:, :, i0:i1, None])
                dq[:, :, i0:i1] += ds @ kr[:, :, j0:j1] * scale
                dk[:, :, j0:j1] += ds.transpose(-2, -1) @ q[:, :, i0:i1] * scale
        fold = lambda g: g.reshape(B, H // n_rep, n_rep, S, D).sum(2)  # sum each kv head's group
        return dq, fold(dk), fold(dv)
    return out, lse, backward


# (T, S, causal, H, K, block_q, block_k); None: the default tiles. Odd lengths, GQA and MQA, causal and not
TEACHING_CASES = [
    (77, 77, True, 4, 2, 16, 16), (77, 77, False, 6, 3, 32, 8), (45, 130, True, 4, 1, 8, 40),
    (130, 131, True, 2, 2, 64, 17), (29, 51, False, 4, 4, 7, 64), (300, 300, True, 2, 1, None, None),
    (257, 600, False, 4, 2, None, None),
]


@pytest.mark.parametrize("T,S,causal,H,K,block_q,block_k", TEACHING_CASES)
def test_fast_path_equals_lesson_08_teaching_version(T, S, causal, H, K, block_q, block_k):
    B, D = 2, 16
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs every run; the seed is in the failure message
    q, k, v = _qkv(B, H, K, T, S, D, seed=seed)
    out, lse = flash_attention(q, k, v, causal, block_q=block_q, block_k=block_k, return_lse=True)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    with torch.no_grad():
        bq, bk = block_q or min(256, T), block_k or min(256, S)
        ref_out, ref_lse, ref_backward = _plain_flash(q, k, v, causal, bq, bk)
        want = ref_backward(dout)
    assert (out - ref_out).abs().max() < 1e-5, f"seed {seed}"
    assert (lse - ref_lse).abs().max() < 1e-5, f"seed {seed}"
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        assert (a - b).abs().max() < 5e-5, f"d{name} differs by {(a - b).abs().max():.2e}, seed {seed}"


def test_default_blocks_fit_the_device_and_length():
    assert default_blocks(8, 8192, 8192, "cpu") == (128, 2048)  # 8 MiB of float32 scores per strip
    assert default_blocks(32, 8192, 8192, "cpu") == (128, 512)  # more heads: narrower strips
    assert default_blocks(8, 100, 8192, "cpu") == (100, 2048)  # never longer than the sequence
    assert default_blocks(8, 8192, 300, "cpu") == (128, 300)
    assert default_blocks(1, 16384, 16384, "cpu") == (128, 16384)  # one head: a whole row of keys at once
    assert default_blocks(8, 16384, 16384, "cuda") == (1024, 4096)  # 128 MiB on a GPU: fewer launches
    for heads in (1, 3, 8, 64, 1000, 10**5):
        bq, bk = default_blocks(heads, 10**6, 10**6, "cpu")
        assert bq & (bq - 1) == 0 and bk & (bk - 1) == 0 and 16 <= bq <= 128 and bk >= bq, (heads, bq, bk)
        assert heads * bq * bk * 4 <= 8 * 2**20 or bq == bk == 16, (heads, bq, bk)  # within the budget


def test_each_strip_is_one_batched_matmul_per_product():
    # causal T = S = 1024, 8 heads, default blocks (128 x 2048 on a CPU, cut to 1024 keys): 8 query blocks
    # of one strip each; 2 matmuls per strip forward, 5 backward, each one batched call over all heads
    # (ATen's CPU bmm into a strided slice would run one addmm per head instead)
    q, k, v = _qkv(1, 8, 4, 1024, 1024, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = flash_attention(q, k, v, True)
        out.backward(torch.ones_like(out))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::bmm", 0) + counts.get("aten::baddbmm_", 0) == 7 * 8, counts
    assert counts.get("aten::addmm_", 0) == counts.get("aten::mm", 0) == counts.get("aten::addmm", 0) == 0, counts
    with _CountOps() as ops:
        out = flash_attention(q, k, v, True)
        out.backward(torch.ones_like(out))
    views = {"view", "_unsafe_view", "slice", "select", "transpose", "unsqueeze", "alias", "detach", "expand"}
    passes = {name: n for name, n in ops.counts.items() if name not in views}  # each a pass over its tensors
    assert sum(passes.values()) <= 20 * 8 + 40, passes  # ~18 per strip (7 matmuls), a few per call


def test_long_keys_go_through_several_strips_of_one_query_block():
    # 1 head, T = 40 queries after 300 cached keys, strips of 64 keys: the online softmax across strips,
    # the widened first (diagonal) strip when block_k < block_q, and GQA rows, against naive attention
    for (H, K, T, S, bq, bk) in [(1, 1, 40, 340, 16, 64), (4, 2, 64, 64, 32, 8), (6, 2, 50, 131, 64, 17)]:
        q, k, v = _qkv(2, H, K, T, S, 16, seed=H + bk)
        ref = naive_attention(q, _expand(k, H // K), _expand(v, H // K), _bottom_right(T, S))
        out = flash_attention(q, k, v, True, block_q=bq, block_k=bk)
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (q, k, v), dout)
        assert (out - ref).abs().max() < 1e-5
        for name, a, b in zip("qkv", got, want):
            assert (a - b).abs().max() < 5e-5, (H, K, T, S, bq, bk, name)


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


def test_model_default_tiles_and_config_validation():
    torch.manual_seed(0)
    config = TlamaConfig.from_preset("tiny", attn_backend="flash")
    assert config.flash_block_size is None  # flash.default_blocks picks the tiles
    flash, sdpa = Transformer(config), Transformer(config.replace(attn_backend="sdpa"))
    sdpa.load_state_dict(flash.state_dict())
    tokens = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(2))
    assert (flash(tokens)[0] - sdpa(tokens)[0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="flash_block_size"):
        TlamaConfig.from_preset("tiny", flash_block_size=0)
