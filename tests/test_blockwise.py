"""Blockwise FFN, cross-entropy and LM-head loss equal their unchunked versions in value and
gradient, and a model trained with `blockwise_chunk_size` gets the same loss and gradients.
Seed 002's API (`BlockwiseParallel`, `blockwise_compute_attn` / `_ffn`, `Blockwise_LM_Head`,
`BlockwiseLM`) equals the block written out unchunked here, with GPT-J's rotary from `transformers`:
outputs within 2e-5 and gradients of the input and every parameter within 1e-4 relative (fp32).

Measured max abs differences (fp32, CPU): losses 0 to ~1e-6 (MoE model), gradients <= ~1e-7.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tlama_mini import FeedForward, MoE, TlamaConfig, Transformer
from tlama_mini.blockwise import blockwise_cross_entropy, blockwise_ffn, blockwise_lm_head_loss

B, T, C, V = 2, 13, 8, 50  # N = 26 tokens


def _grads(out, tensors):
    return torch.autograd.grad(out, tensors)


def _close(a, b, atol=1e-6):
    return (a - b).abs().max().item() <= atol


@pytest.mark.parametrize("chunk", [5, 13, 100])  # 5 does not divide 26, 13 does, 100 > 26
def test_blockwise_ffn_equals_ffn(chunk):
    torch.manual_seed(0)
    ffn = FeedForward(C, 24, exact=True, use_parallel=False)
    x = torch.randn(B, T, C, requires_grad=True)
    params = [x, *ffn.parameters()]
    y_ref = ffn(x)
    y = blockwise_ffn(ffn, x, chunk)
    assert y.shape == x.shape and _close(y, y_ref)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y_ref, params, dy)):
        assert _close(a, b, 1e-5)  # weight gradients sum the chunks in another order


def test_blockwise_ffn_runs_chunks_and_recomputes_them_in_backward():
    seen = []
    w = torch.randn(C, C, requires_grad=True)

    def fn(x):
        seen.append(x.shape[0])
        return torch.tanh(x @ w)

    x = torch.randn(B, T, C)
    y = blockwise_ffn(fn, x, 10)
    assert seen == [10, 10, 6]  # one chunk at a time, never all 26 tokens
    y.sum().backward()
    assert sorted(seen) == sorted([10, 10, 6] * 2)  # the backward recomputed each chunk (checkpointing)
    assert _close(w.grad, torch.autograd.grad(torch.tanh(x @ w).sum(), w)[0])


def test_blockwise_ffn_moe_outputs_and_aux_loss():
    torch.manual_seed(0)
    moe = MoE(C, 16, n_experts=4, k=2)
    x = torch.randn(B, T, C, requires_grad=True)
    y_ref, aux_ref = moe(x)
    y, aux = blockwise_ffn(moe, x, 7)
    assert _close(y, y_ref, 1e-6) and _close(aux, aux_ref, 1e-6)
    loss, loss_ref = y.sum() + aux, y_ref.sum() + aux_ref
    params = [x, *moe.parameters()]
    for a, b in zip(_grads(loss, params), _grads(loss_ref, params)):
        assert _close(a, b, 1e-5)


def _targets(ignore_index=-100):
    t = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    t[0, :4] = ignore_index
    t[1, -1] = ignore_index
    return t


@pytest.mark.parametrize("chunk", [None, 4, 13, 100])
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_blockwise_cross_entropy(chunk, ignore_index):
    logits = torch.randn(B, T, V, requires_grad=True)
    t = _targets(ignore_index)
    ref = F.cross_entropy(logits.view(-1, V), t.view(-1), ignore_index=ignore_index)
    valid = t != ignore_index
    got, acc = blockwise_cross_entropy(logits, t, valid, chunk_size=chunk)
    assert _close(got, ref)
    assert _close(_grads(got, logits)[0], _grads(ref, logits)[0], 1e-7)
    ref_acc = (logits.argmax(-1) == t)[valid].float().mean()
    assert acc.requires_grad is False and _close(acc, ref_acc)


@pytest.mark.parametrize("chunk", [4, 13, 100])
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_blockwise_lm_head_loss(chunk, ignore_index):
    torch.manual_seed(0)
    h = torch.randn(B, T, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    t = _targets(ignore_index)
    ref = F.cross_entropy((h @ w.T).view(-1, V), t.view(-1), ignore_index=ignore_index)
    got = blockwise_lm_head_loss(h, w, t, chunk, ignore_index=ignore_index)
    assert _close(got, ref, 1e-5)
    for a, b in zip(_grads(got, (h, w)), _grads(ref, (h, w))):
        assert _close(a, b, 1e-6)


def test_lm_head_loss_never_saves_the_logits():
    h = torch.randn(B, T, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss = blockwise_lm_head_loss(h, w, _targets(), 5)
    assert saved and max(saved) < B * T * V  # h, weight, targets and the per-token lse only
    loss.backward()


def test_lm_head_edge_cases():
    h, w = torch.randn(1, 3, C), torch.randn(V, C)
    t = torch.full((1, 3), -100)
    assert torch.isnan(blockwise_lm_head_loss(h, w, t, 2)) and torch.isnan(
        F.cross_entropy((h @ w.T).view(-1, V), t.view(-1)))  # all ignored: nan, as torch does
    with pytest.raises(ValueError, match="vocab_size"):
        blockwise_lm_head_loss(h, w, torch.tensor([[1, V, 2]]), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        blockwise_lm_head_loss(h, w, torch.tensor([[1, 2, 3]]), 0)


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny", {"tie_embeddings": True}), ("moe-tiny", {})])
def test_model_with_blockwise_chunks_trains_identically(preset, overrides):
    torch.manual_seed(0)
    cfg = TlamaConfig.from_preset(preset, **overrides)
    plain, chunked = Transformer(cfg), Transformer(cfg.replace(blockwise_chunk_size=7))
    chunked.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    _, loss_ref = plain(tokens, targets=targets)
    logits, loss = chunked(tokens, targets=targets)
    assert logits is None and _close(loss, loss_ref, 1e-5)
    loss_ref.backward()
    loss.backward()
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters()):
        assert _close(a.grad, b.grad, 1e-6), name


# ---- seed 002's API: BlockwiseParallel, blockwise_compute_attn / _ffn, Blockwise_LM_Head, BlockwiseLM ----
import math  # noqa: E402

from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions  # noqa: E402

from tlama_mini.blockwise import (Blockwise_LM_Head, BlockwiseLM, BlockwiseParallel,  # noqa: E402
                                  blockwise_compute_attn, blockwise_compute_ffn)
from tlama_mini.bpt import gptj_rotary  # noqa: E402
from tlama_mini.remat import POLICIES  # noqa: E402

ACTS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def _hf_rotary(x, pos, R, max_pos=1024):
    """GPT-J's partial rotary, as transformers applies it: x (B, T, H, D), pos (B|1, T)."""
    sin, cos = torch.split(create_sinusoidal_positions(max_pos, R)[pos].to(x.dtype), R // 2, dim=-1)
    return torch.cat([apply_rotary_pos_emb(x[..., :R], sin, cos), x[..., R:]], dim=-1)


def ref_block(blk, x, mask, pos, causal):
    """The seed's block written out unchunked: (B, T, C); mask (B, S) of 0/1; pos (B|1, T)."""
    B, T, C = x.shape
    H, D = blk.num_heads, C // blk.num_heads
    R = blk.rotary_dim or D
    h = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    q, k, v = ((h @ p.weight.T).view(B, T, H, D) for p in (blk.q_proj, blk.k_proj, blk.v_proj))
    q, k = _hf_rotary(q, pos, R), _hf_rotary(k, pos, R)
    s = torch.einsum("bthd,bshd->bhts", q / math.sqrt(D), k)          # (B, H, T, S)
    s = s + torch.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    if causal:
        s = s + torch.where(torch.ones(T, T, dtype=torch.bool).triu(1), -1e10, 0.0)
    a = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(B, T, C)
    h1 = x + a @ blk.out_proj.weight.T
    f = F.layer_norm(h1, (C,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    f = ACTS[blk.activation_function](f @ blk.fc_in.weight.T + blk.fc_in.bias) @ blk.fc_out.weight.T
    return h1 + f + blk.fc_out.bias


def _block(qc=5, kc=7, C=32, H=4, R=4, act="gelu", causal=True, seed=0, **kw):
    torch.manual_seed(seed)
    blk = BlockwiseParallel(qc, kc, C, H, R, 3 * C, activation_function=act, causal=causal, **kw)
    for p in blk.parameters():  # non-trivial LayerNorm and bias values
        torch.nn.init.normal_(p, std=0.3 if p.ndim == 1 else 0.2)
    return blk


def _all_grads(out, x, blk, dy):
    return torch.autograd.grad(out, [x, *blk.parameters()], dy)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("R,act", [(4, "gelu"), (None, "gelu_new"), (2, "relu"), (8, "silu")])
@pytest.mark.parametrize("T,padded,offset", [(23, False, 0), (20, True, 0), (17, True, 9)])
def test_block_equals_unchunked_reference(causal, R, act, T, padded, offset):
    blk = _block(R=R, act=act, causal=causal)
    x = torch.randn(2, T, 32, requires_grad=True)
    mask = torch.ones(2, T)
    if padded:  # left padding in row 0, a hole in row 1
        mask[0, :4] = 0
        mask[1, T // 2] = 0
    pos = torch.arange(offset, offset + T)[None]
    out = blk(x, mask[:, None, None, :], pos)
    ref = ref_block(blk, x, mask, pos, causal)
    assert out.shape == (2, T, 32)
    assert (out - ref).abs().max() < 2e-5
    dy = torch.randn_like(out)
    for name, a, b in zip(["x", *dict(blk.named_parameters())], _all_grads(out, x, blk, dy),
                          _all_grads(ref, x, blk, dy)):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), name


def test_gptj_rotary_matches_transformers():
    x = torch.randn(2, 9, 3, 16)
    pos = torch.randint(0, 500, (2, 9))
    for R in (2, 6, 16):
        assert (gptj_rotary(x, pos, R) - _hf_rotary(x, pos, R)).abs().max() < 1e-5
        assert torch.equal(gptj_rotary(x, pos, R)[..., R:], x[..., R:])  # the rest passes through
    assert (gptj_rotary(x, pos, None) - _hf_rotary(x, pos, 16)).abs().max() < 1e-5


def test_chunk_sizes_and_policies_do_not_change_the_result():
    x = torch.randn(2, 30, 32, requires_grad=True)
    mask, pos = torch.ones(2, 30), torch.arange(30)[None]
    mask[1, :5] = 0
    base = _block(qc=30, kc=30)
    ref = base(x, mask, pos)
    dy = torch.randn_like(ref)
    ref_g = _all_grads(ref, x, base, dy)
    for qc, kc in [(1, 1), (4, 11), (16, 8), (64, 64)]:
        blk = _block(qc=qc, kc=kc)
        out = blk(x, mask, pos)
        assert (out - ref).abs().max() < 1e-5, (qc, kc)
    for policy in POLICIES:
        blk = _block(policy=policy)
        out = blk(x, mask, pos)
        assert (out - ref).abs().max() < 1e-5, policy
        for a, b in zip(_all_grads(out, x, blk, dy), ref_g):
            assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), policy


def test_nothing_saveable_keeps_no_score_tile():
    blk = _block(qc=4, kc=4)
    x = torch.randn(1, 40, 32, requires_grad=True)
    mask = torch.ones(1, 40)
    mask[0, 0] = 0  # the general path (a bias), which saves nothing but chunk inputs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = blk(x, mask, torch.arange(40)[None])
    assert all(s[-2:] != (4, 4) for s in saved if len(s) == 4)  # no (B, H, n, m) probability tile
    assert all(s[-1] != 96 for s in saved)                      # no (.., intermediate) FFN activation
    out.sum().backward()


def test_cached_decoding_equals_full_forward():
    blk = _block(qc=4, kc=3)
    x = torch.randn(2, 15, 32)
    mask = torch.ones(2, 15)
    mask[0, :3] = 0
    pos = torch.arange(15)[None]
    with torch.no_grad():
        full = blk(x, mask, pos)
        outs = [blk(x[:, :8], mask[:, :8], pos[:, :8], init_cache=True)]
        for t0, t1 in [(8, 9), (9, 12), (12, 13), (13, 15)]:  # one token and several at a time
            outs.append(blk(x[:, t0:t1], mask[:, None, None, :t1], pos[:, t0:t1]))
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-5
    assert blk.cache[0].shape == (2, 15, 4, 8)
    with pytest.raises(ValueError, match="cached \\+ new"):
        blk(x[:, :1], mask[:, :1], pos[:, :1])  # the mask must cover the 16 keys
    blk.reset_cache()
    assert blk.cache is None


def test_attention_function_against_softmax_formula():
    torch.manual_seed(1)
    B, T, S, H, D = 2, 11, 14, 3, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    for bias in [None, torch.randn(B, 1, 1, S), torch.randn(1, H, T, S), torch.randn(T, S)]:
        for causal in (True, False):
            s = torch.einsum("bthd,bshd->bhts", q, k)  # not scaled, as in the seed
            if bias is not None:
                s = s + bias
            if causal:
                s = s + torch.where(torch.ones(T, S, dtype=torch.bool).triu(S - T + 1), -1e10, 0.0)
            ref = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
            out = blockwise_compute_attn(q, k, v, bias, causal_mask=causal, query_chunk_size=4, key_chunk_size=5)
            assert (out - ref).abs().max() < 1e-5


def test_fast_and_general_attention_paths_agree_with_gradients():
    q, k, v = (torch.randn(2, 19, 2, 8, requires_grad=True) for _ in range(3))
    fast = blockwise_compute_attn(q, k, v, None, query_chunk_size=6, key_chunk_size=4)
    general = blockwise_compute_attn(q, k, v, torch.zeros(1, 1, 1, 19), query_chunk_size=6, key_chunk_size=4)
    assert (fast - general).abs().max() < 1e-6
    dy = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), dy), torch.autograd.grad(general, (q, k, v), dy)):
        assert (a - b).abs().max() < 1e-5


def test_attention_dropout_drops_normalised_weights():
    # value = identity, so the output row is the dropped attention weights themselves
    T, p = 12, 0.4
    q, k = torch.randn(1, T, 1, T), torch.randn(1, T, 1, T)
    v = torch.eye(T)[None, :, None, :]
    w = blockwise_compute_attn(q, k, v, deterministic=True, attn_pdrop=p, query_chunk_size=5, key_chunk_size=3)
    g = torch.Generator().manual_seed(0)
    d = blockwise_compute_attn(q, k, v, attn_pdrop=p, dropout_rng=g, query_chunk_size=5, key_chunk_size=3)
    ratio = (d / (w / (1 - p)))[w > 1e-6]
    assert torch.all((ratio.abs() < 1e-4) | ((ratio - 1).abs() < 1e-4))  # each weight kept (scaled) or dropped
    assert 0.25 < (ratio.abs() < 1e-4).float().mean() < 0.55
    again = blockwise_compute_attn(q, k, v, attn_pdrop=p, dropout_rng=torch.Generator().manual_seed(0),
                                   query_chunk_size=5, key_chunk_size=3)
    assert torch.equal(d, again)


def test_dropout_is_replayed_in_the_recomputation():
    x = torch.randn(2, 13, 32, requires_grad=True)
    mask, pos = torch.ones(2, 13), torch.arange(13)[None]
    results = []
    for policy in ("everything_saveable", "nothing_saveable"):
        blk = _block(policy=policy, attn_pdrop=0.3, resid_pdrop=0.2)
        torch.manual_seed(5)
        out = blk(x, mask, pos, deterministic=False)
        results.append((out, _all_grads(out, x, blk, torch.ones_like(out))))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2) and (o1 - blk(x, mask, pos)).abs().max() > 1e-3  # dropout acted
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max())
    assert torch.equal(blk(x, mask, pos, deterministic=True), blk(x, mask, pos))


def test_bfloat16_compute():
    x = torch.randn(2, 16, 32)
    mask, pos = torch.ones(2, 16), torch.arange(16)[None]
    ref = _block()(x, mask, pos)
    for f32 in (False, True):
        out = _block(dtype=torch.bfloat16, float32_logits=f32)(x, mask, pos)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() < 0.1 * (1 + ref.abs().max())


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BlockwiseParallel(4, 4, 30, 4, None, 64)
    with pytest.raises(ValueError, match="rotary_dim"):
        BlockwiseParallel(4, 4, 32, 4, 3, 64)
    with pytest.raises(ValueError, match="rotary_dim"):
        BlockwiseParallel(4, 4, 32, 4, 10, 64)
    with pytest.raises(ValueError, match="activation_function"):
        BlockwiseParallel(4, 4, 32, 4, 4, 64, activation_function="swish2")
    with pytest.raises(ValueError, match="checkpoint policy"):
        BlockwiseParallel(4, 4, 32, 4, 4, 64, policy="save_all")
    with pytest.raises(ValueError, match="q_chunk_size"):
        BlockwiseParallel(0, 4, 32, 4, 4, 64)
    blk = _block()
    x, pos = torch.randn(2, 6, 32), torch.arange(6)[None]
    with pytest.raises(ValueError, match="attention_mask"):
        blk(x, torch.ones(2, 1, 6), pos)
    with pytest.raises(ValueError, match="attention_mask"):
        blk(x, torch.ones(2, 7), pos)
    with pytest.raises(ValueError, match="hidden_states"):
        blk(torch.randn(2, 6, 31), torch.ones(2, 6), pos)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        blk(x, torch.ones(2, 6), pos + 1020)
    with pytest.raises(ValueError, match="broadcast"):
        blockwise_compute_attn(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8),
                               torch.randn(3, 4))
    with pytest.raises(ValueError, match="precision"):
        blockwise_compute_attn(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8),
                               precision="ultra")


@pytest.mark.parametrize("two_args", [True, False])
def test_blockwise_compute_ffn(two_args):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    calls = []

    def cell(x, deterministic):
        calls.append((x.shape[1], deterministic))
        return net(x)

    x = torch.randn(2, 11, 8, requires_grad=True)
    out = blockwise_compute_ffn(cell if two_args else net, x, 4, deterministic=False)
    ref = net(x)
    assert (out - ref).abs().max() < 1e-6
    if two_args:
        assert calls == [(4, False), (4, False), (3, False)]
    for a, b in zip(torch.autograd.grad(out.sum(), [x, *net.parameters()]),
                    torch.autograd.grad(ref.sum(), [x, *net.parameters()])):
        assert (a - b).abs().max() < 1e-5


def test_lm_head_forward_and_loss():
    torch.manual_seed(0)
    head = Blockwise_LM_Head(V, 5)  # lazy: C from the first call
    h = torch.randn(B, T, C, requires_grad=True)
    logits = head(h)
    torch.nn.init.normal_(head.linear.bias)
    logits = head(h)
    ref = h @ head.linear.weight.T + head.linear.bias
    assert logits.shape == (B, T, V) and (logits - ref).abs().max() < 1e-5
    t = _targets()
    valid = t != -100
    loss, acc = head.loss(h, t, valid)
    ref_loss = F.cross_entropy(ref.view(-1, V), t.view(-1))
    assert _close(loss, ref_loss, 1e-5)
    assert _close(acc, (ref.argmax(-1) == t)[valid].float().mean())
    params = [h, head.linear.weight, head.linear.bias]
    for a, b in zip(_grads(loss, params), _grads(ref_loss, params)):
        assert _close(a, b, 1e-5)


def test_cross_entropy_is_the_token_mean_not_the_mean_of_chunk_means():
    logits = torch.randn(12, V)
    t = torch.randint(0, V, (12,))
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)  # chunks of 6: 6 and 1 valid
    loss, _ = blockwise_cross_entropy(logits, t, valid, chunk_size=6)
    per = F.cross_entropy(logits, t, reduction="none")
    assert _close(loss, per[valid].mean())
    assert not _close(loss, (per[:6].mean() + per[11]) / 2, 1e-3)  # what the seed computes
    lg = logits.clone().requires_grad_()
    zero, acc = blockwise_cross_entropy(lg, t, torch.zeros(12), chunk_size=5)  # nothing valid: 0, as the seed
    assert zero.item() == 0 and acc.item() == 0
    assert torch.all(torch.autograd.grad(zero, lg)[0] == 0)
    with pytest.raises(ValueError, match="vocab_size"):
        blockwise_cross_entropy(logits, torch.full((12,), V))
    with pytest.raises(ValueError, match="valid"):
        blockwise_cross_entropy(logits, t, torch.ones(11))
    with pytest.raises(ValueError, match="checkpoint policy"):
        blockwise_cross_entropy(logits, t, policy="everything")


def test_blockwise_lm_variants_agree():
    torch.manual_seed(0)
    lm = BlockwiseLM(V, 2, 32, 4, 96, chunk_size=6, rotary_dim=4)
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.2)
    tokens = torch.randint(0, V, (2, 17))
    targets = torch.roll(tokens, -1, 1)
    valid = torch.ones(2, 17)
    valid[:, -1] = 0
    results = {}
    for variant in BlockwiseLM.VARIANTS:
        loss, acc = lm.loss(tokens, targets, valid, variant=variant)
        results[variant] = (loss, acc, torch.autograd.grad(loss, list(lm.parameters())))
    ref = results["vanilla"]
    for variant, (loss, acc, grads) in results.items():
        assert _close(loss, ref[0], 1e-5) and _close(acc, ref[1]), variant
        for a, b in zip(grads, ref[2]):
            assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), variant
    with pytest.raises(ValueError, match="variant"):
        lm.loss(tokens, targets, variant="fast")
