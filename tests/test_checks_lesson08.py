"""The lesson 08 (flash attention, blockwise computation) checks accept a correct solution and reject
typical mistakes by name."""
import math

import torch

from tlama_mini.checks.lesson08 import (check_attention_backward, check_attention_probs_from_lse,
                                        check_blockwise_cross_entropy, check_online_softmax_update,
                                        check_tiled_attention_forward)
from tlama_mini.checks.common import expect_failure as fails_with

NEG_INF = float("-inf")


# --- correct implementations, written from the formulas (not from tlama_mini)
def online_softmax_update(m, l, acc, scores, v, *, rescale_acc=True, nan_safe=True):
    m_new = torch.maximum(m, scores.amax(-1))
    ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new) if nan_safe else m_new
    alpha = torch.exp(m - ref)
    p = torch.exp(scores - ref[..., None])
    acc = (alpha[..., None] * acc if rescale_acc else acc) + p @ v
    return m_new, alpha * l + p.sum(-1), acc


def tiled_attention_forward(q, k, v, block, *, reset_per_tile=False, return_m=False, skip_partial=False,
                            skip_partial_q=False):
    B, H, T, D = q.shape
    S = k.shape[2]
    out, lse = torch.zeros_like(q), torch.zeros(B, H, T)
    for i in range(0, (T // block * block) if skip_partial_q else T, block):
        qi = q[..., i:i + block, :] / math.sqrt(D)
        m = torch.full(qi.shape[:-1], NEG_INF)
        l, acc = torch.zeros_like(m), torch.zeros_like(qi)
        for j in range(0, (S // block * block) if skip_partial else S, block):
            if reset_per_tile:
                m, l, acc = torch.full_like(m, NEG_INF), torch.zeros_like(l), torch.zeros_like(acc)
            s = qi @ k[..., j:j + block, :].transpose(-2, -1)
            m, l, acc = online_softmax_update(m, l, acc, s, v[..., j:j + block, :])
        out[..., i:i + block, :] = acc / l[..., None]
        lse[..., i:i + block] = m if return_m else m + torch.log(l)
    return out, lse


def untiled_forward(q, k, v, block):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def probs_from_lse(scores, lse):
    return torch.exp(scores - lse[..., None])


def attention_backward(q, k, v, out, lse, dout, *, dsum=True, scale_grads=True):
    scale = 1 / math.sqrt(q.shape[-1])
    p = torch.exp(q @ k.transpose(-2, -1) * scale - lse[..., None])
    dv = p.transpose(-2, -1) @ dout
    dp = dout @ v.transpose(-2, -1)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) if dsum else p * dp
    c = scale if scale_grads else 1.0
    return ds @ k * c, ds.transpose(-2, -1) @ q * c, dv


def _unscaled(q, k, v, out, lse, dout):  # attention_backward with P recomputed from q k^T (no 1/sqrt(D))
    scale = 1 / math.sqrt(q.shape[-1])
    p = torch.exp(q @ k.transpose(-2, -1) - lse[..., None])
    dp = dout @ v.transpose(-2, -1)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ dout


def blockwise_ce(logits, targets, chunk_size):
    total = logits.new_zeros(())
    for i in range(0, logits.shape[0], chunk_size):
        c, t = logits[i:i + chunk_size], targets[i:i + chunk_size]
        total = total + (torch.logsumexp(c, -1) - c.gather(1, t[:, None]).squeeze(1)).sum()
    return total / logits.shape[0]


def test_correct_solutions_pass(capsys):
    for _ in range(3):
        check_online_softmax_update(online_softmax_update)
        check_tiled_attention_forward(tiled_attention_forward)
        check_attention_probs_from_lse(probs_from_lse)
        check_attention_backward(attention_backward)
        check_blockwise_cross_entropy(blockwise_ce)
    assert capsys.readouterr().out.count("✓") == 15




def test_online_softmax_update_mistakes():
    fails_with(check_online_softmax_update, lambda *a: online_softmax_update(*a, rescale_acc=False),
               "acc is not rescaled by exp(m_old - m_new)")
    fails_with(check_online_softmax_update, lambda *a: online_softmax_update(*a, nan_safe=False), "NaN")

    def no_l_rescale(m, l, acc, scores, v):
        m_new, _, acc_new = online_softmax_update(m, l, acc, scores, v)
        return m_new, l + torch.exp(scores - m_new[..., None]).sum(-1), acc_new

    fails_with(check_online_softmax_update, no_l_rescale, "old sum l is not rescaled")

    def tile_max(m, l, acc, scores, v):
        return (scores.amax(-1), *online_softmax_update(m, l, acc, scores, v)[1:])

    fails_with(check_online_softmax_update, tile_max, "max of the new tile only")


def test_tiled_attention_forward_mistakes():
    fails_with(check_tiled_attention_forward, lambda *a: tiled_attention_forward(*a, reset_per_tile=True),
               "only the last key tile counts")
    fails_with(check_tiled_attention_forward, lambda *a: tiled_attention_forward(*a, skip_partial=True),
               "partial key tile is skipped")
    fails_with(check_tiled_attention_forward, lambda *a: tiled_attention_forward(*a, return_m=True),
               "lse is the running max")
    fails_with(check_tiled_attention_forward,
               lambda q, k, v, b: tiled_attention_forward(q * math.sqrt(q.shape[-1]), k, v, b), "1/sqrt(D)")
    fails_with(check_tiled_attention_forward, untiled_forward, "full (T, S)")
    fails_with(check_tiled_attention_forward, lambda *a: tiled_attention_forward(*a, skip_partial_q=True),
               "partial query tile", "never computed")
    fails_with(check_tiled_attention_forward,
               lambda *a: tiled_attention_forward(*a, skip_partial_q=True, skip_partial=True),
               "partial query tile", "partial key tile is skipped too")

    def garbage_rows(q, k, v, block):  # the partial query tile left as torch.empty garbage (here: ones)
        out, lse = tiled_attention_forward(q, k, v, block, skip_partial_q=True)
        full = q.shape[2] // block * block
        out[..., full:, :] = 1.0
        return out, lse

    fails_with(check_tiled_attention_forward, garbage_rows, "values differ", "only the rows of the last, partial "
               "query tile")


def test_attention_probs_from_lse_mistakes():
    fails_with(check_attention_probs_from_lse, lambda s, lse: torch.exp(s - s.amax(-1, keepdim=True)), "row max")
    fails_with(check_attention_probs_from_lse, lambda s, lse: torch.exp(s - lse[..., None, :]), "wrong dimension")
    fails_with(check_attention_probs_from_lse, lambda s, lse: torch.exp(s - lse), "crashed", "lse[..., None]")


def test_attention_backward_mistakes():
    fails_with(check_attention_backward, lambda *a: attention_backward(*a, dsum=False), "rowsum(dO * O)")
    fails_with(check_attention_backward, lambda *a: attention_backward(*a, scale_grads=False), "1/sqrt(D)")

    def with_max(q, k, v, out, lse, dout):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return attention_backward(q, k, v, out, s.amax(-1), dout)

    fails_with(check_attention_backward, with_max, "row max instead of lse")

    fails_with(check_attention_backward, _unscaled, "unscaled scores", "*scaled*")


def test_blockwise_cross_entropy_mistakes():
    def mean_of_means(logits, targets, chunk):
        return torch.stack([blockwise_ce(logits[i:i + chunk], targets[i:i + chunk], chunk)
                            for i in range(0, len(targets), chunk)]).mean()

    fails_with(check_blockwise_cross_entropy, mean_of_means, "mean of the chunk means")
    fails_with(check_blockwise_cross_entropy, lambda lg, t, c: blockwise_ce(lg, t, c) * lg.shape[0], "not the mean")
    fails_with(check_blockwise_cross_entropy, lambda lg, t, c: torch.nn.functional.cross_entropy(lg, t),
               "as large as all N x V")
    fails_with(check_blockwise_cross_entropy, lambda lg, t, c: blockwise_ce(lg, t, lg.shape[0]),  # one chunk
               "as large as all N x V")
    fails_with(check_blockwise_cross_entropy, lambda lg, t, c: blockwise_ce(lg, t, c).detach(), "no gradient")

    def first_targets(logits, targets, chunk):  # targets[:len(chunk)] for every chunk
        total = logits.new_zeros(())
        for i in range(0, logits.shape[0], chunk):
            c = logits[i:i + chunk]
            total = total + (torch.logsumexp(c, -1) - c.gather(1, targets[:len(c), None]).squeeze(1)).sum()
        return total / logits.shape[0]

    def row_max(logits, targets, chunk):
        total = logits.new_zeros(())
        for i in range(0, logits.shape[0], chunk):
            c, t = logits[i:i + chunk], targets[i:i + chunk]
            total = total + (c.amax(-1) - c.gather(1, t[:, None]).squeeze(1)).sum()
        return total / logits.shape[0]

    fails_with(check_blockwise_cross_entropy, first_targets, "targets[i:i + chunk_size]")
    fails_with(check_blockwise_cross_entropy, row_max, "row max", "log-sum-exp")
