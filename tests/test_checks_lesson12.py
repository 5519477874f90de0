"""The lesson 12 (Blockwise Parallel Transformer) checks accept correct solutions written in several
styles and reject typical mistakes by name, on many random draws."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tlama_mini.checks.common import expect_failure as fails_with
from tlama_mini.checks.lesson12 import check_chunked_ffn, check_gptj_rotary, check_masked_cross_entropy

SEEDS = range(12)


def _seed(s):
    random.seed(s)
    torch.manual_seed(s)


# --- gptj_rotary: correct versions, then mistakes
def gptj_rotary(x, position_ids, rotary_dim, *, pairing="neighbours", rotate_all=False, base_dim=None,
                sign=1, use_positions=True, keep_rest=True):
    D = x.shape[-1]
    R = D if rotate_all else rotary_dim
    f = base_dim or R
    inv = 1.0 / 10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / f)
    pos = position_ids if use_positions else torch.arange(x.shape[1])[None].expand_as(position_ids)
    ang = sign * pos.float()[..., None] * inv                       # (B, T, R/2)
    sin, cos = ang.sin()[:, :, None], ang.cos()[:, :, None]
    if pairing == "neighbours":
        a, b = x[..., 0:R:2], x[..., 1:R:2]
        rot = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = x[..., :R // 2], x[..., R // 2:R]
        rot = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([rot, x[..., R:]], dim=-1) if keep_rest else rot


def gptj_rotary_complex(x, position_ids, rotary_dim):
    R = rotary_dim
    pairs = torch.view_as_complex(x[..., :R].reshape(*x.shape[:-1], R // 2, 2).contiguous())
    ang = position_ids.float()[..., None] * 10000 ** (-torch.arange(0, R, 2).float() / R)
    out = torch.view_as_real(pairs * torch.polar(torch.ones_like(ang), ang)[:, :, None]).flatten(-2)
    return torch.cat([out, x[..., R:]], dim=-1)


def gptj_rotary_in_place(x, position_ids, rotary_dim):
    x[..., :rotary_dim] = gptj_rotary(x, position_ids, rotary_dim)[..., :rotary_dim]
    return x


@pytest.mark.parametrize("seed", SEEDS)
def test_gptj_rotary(seed, capsys):
    _seed(seed)
    check_gptj_rotary(gptj_rotary)
    check_gptj_rotary(gptj_rotary_complex)
    assert capsys.readouterr().out.count("✓ gptj_rotary") == 2
    fails_with(check_gptj_rotary, lambda *a: gptj_rotary(*a, pairing="halves"), "Llama")
    fails_with(check_gptj_rotary, lambda *a: gptj_rotary(*a, rotate_all=True), "all D features")
    fails_with(check_gptj_rotary, lambda x, p, r: gptj_rotary(x, p, r, base_dim=x.shape[-1]), "10000^(-2i / rotary_dim)")
    fails_with(check_gptj_rotary, lambda *a: gptj_rotary(*a, sign=-1), "wrong way")
    fails_with(check_gptj_rotary, lambda *a: gptj_rotary(*a, use_positions=False), "position_ids are ignored")
    fails_with(check_gptj_rotary, lambda *a: gptj_rotary(*a, keep_rest=False), "only the")
    fails_with(check_gptj_rotary, gptj_rotary_in_place, "in place")
    fails_with(check_gptj_rotary, lambda x, p, r: x @ torch.ones(3, 3), "crashed")
    fails_with(check_gptj_rotary, lambda x, p, r: x.sum(), "wrong shape")


def test_gptj_rotary_stub_is_todo():
    def stub(x, p, r):
        raise NotImplementedError
    with pytest.raises(NotImplementedError):
        check_gptj_rotary(stub)


# --- chunked_ffn
def chunked_ffn(ffn, x, chunk_size, *, ckpt=True, drop_last=False, grad=True):
    outs = []
    T = x.shape[1]
    stop = T // chunk_size * chunk_size if drop_last else T
    for i in range(0, stop, chunk_size):
        c = x[:, i:i + chunk_size]
        if not grad:
            with torch.no_grad():
                outs.append(ffn(c))
        else:
            outs.append(checkpoint(ffn, c, use_reentrant=False) if ckpt else ffn(c))
    return torch.cat(outs, dim=1)


def chunked_ffn_split(ffn, x, chunk_size):
    return torch.cat([checkpoint(ffn, c, use_reentrant=False) for c in x.split(chunk_size, dim=1)], dim=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_ffn(seed, capsys):
    _seed(seed)
    check_chunked_ffn(chunked_ffn)
    check_chunked_ffn(chunked_ffn_split)
    assert capsys.readouterr().out.count("✓ chunked_ffn") == 2
    fails_with(check_chunked_ffn, lambda *a: chunked_ffn(*a, ckpt=False), "not checkpointed")
    fails_with(check_chunked_ffn, lambda f, x, c: f(x), "not checkpointed")
    fails_with(check_chunked_ffn, lambda *a: chunked_ffn(*a, drop_last=True), "last, shorter chunk")
    fails_with(check_chunked_ffn, lambda *a: chunked_ffn(*a, grad=False), "no gradient")
    fails_with(check_chunked_ffn, lambda f, x, c: torch.cat([checkpoint(f, p, use_reentrant=False)
                                                             for p in x.split(c, dim=1)], dim=0), "dim=1")


# --- masked_cross_entropy
def masked_ce(logits, tokens, valid, chunk_size, *, mode="ok", acc_mode="ok"):
    nll_sum = correct = logits.new_zeros(())
    means = []
    for i in range(0, logits.shape[0], chunk_size):
        z, t, v = logits[i:i + chunk_size], tokens[i:i + chunk_size], valid[i:i + chunk_size]
        nll = torch.logsumexp(z, -1) - z.gather(1, t[:, None])[:, 0]
        if mode == "no_valid":
            v_loss = torch.ones_like(v)
        else:
            v_loss = v
        nll_sum = nll_sum + (nll * v_loss).sum()
        means.append((nll * v).sum() / v.sum())
        right = (z.argmax(-1) == t).float()
        correct = correct + (right * (torch.ones_like(v) if acc_mode == "no_valid" else v)).sum()
    n = valid.sum()
    loss = {"ok": nll_sum / n, "no_valid": nll_sum / len(valid), "by_N": nll_sum / len(valid),
            "chunk_means": torch.stack(means).mean(), "sum": nll_sum}[mode]
    acc = {"ok": correct / n, "no_valid": correct / len(valid), "count": correct, "by_N": correct / len(valid)}[acc_mode]
    return loss, acc.detach()


def masked_ce_torch(logits, tokens, valid, chunk_size):
    losses = [F.cross_entropy(z, t, reduction="none") for z, t in zip(logits.split(chunk_size), tokens.split(chunk_size))]
    nll = torch.cat(losses)
    acc = ((logits.argmax(-1) == tokens).float() * valid).sum() / valid.sum()
    return (nll * valid).sum() / valid.sum(), acc.item()


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_cross_entropy(seed, capsys):
    _seed(seed)
    check_masked_cross_entropy(masked_ce)
    check_masked_cross_entropy(masked_ce_torch)
    assert capsys.readouterr().out.count("✓ masked_cross_entropy") == 2
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, mode="chunk_means"), "mean of the chunk means")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, mode="no_valid"), "valid is ignored")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, mode="by_N"), "divided by all N")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, mode="sum"), "the sum, not the mean")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, acc_mode="no_valid"), "counts masked tokens")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, acc_mode="count"), "a count")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a, acc_mode="by_N"), "accuracy is divided by all N")
    fails_with(check_masked_cross_entropy, lambda *a: masked_ce(*a)[0], "expected a tuple")
    fails_with(check_masked_cross_entropy, lambda *a: (masked_ce(*a)[0].detach(), masked_ce(*a)[1]), "no gradient")
