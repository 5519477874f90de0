"""Blockwise FFN, cross-entropy and LM-head loss equal their unchunked versions in value and
gradient, and a model trained with `blockwise_chunk_size` gets the same loss and gradients.

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
    y_ref = moe(x)
    aux_ref = moe.aux_loss
    y = blockwise_ffn(moe, x, 7)
    assert _close(y, y_ref, 1e-6) and _close(moe.aux_loss, aux_ref, 1e-6)
    loss, loss_ref = y.sum() + moe.aux_loss, y_ref.sum() + aux_ref
    params = [x, *moe.parameters()]
    for a, b in zip(_grads(loss, params), _grads(loss_ref, params)):
        assert _close(a, b, 1e-5)
    assert _close(moe.aux_loss, aux_ref, 1e-6)  # the backward's recompute did not overwrite it


def _targets(ignore_index=-100):
    t = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    t[0, :4] = ignore_index
    t[1, -1] = ignore_index
    return t


@pytest.mark.parametrize("chunk", [4, 13, 100])
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_blockwise_cross_entropy(chunk, ignore_index):
    logits = torch.randn(B, T, V, requires_grad=True)
    t = _targets(ignore_index)
    ref = F.cross_entropy(logits.view(-1, V), t.view(-1), ignore_index=ignore_index)
    got = blockwise_cross_entropy(logits, t, chunk, ignore_index=ignore_index)
    assert _close(got, ref)
    assert _close(_grads(got, logits)[0], _grads(ref, logits)[0], 1e-7)


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
