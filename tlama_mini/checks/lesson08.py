"""Checks for lesson 08 (flash-style tiled attention and blockwise computation). Each check_<name>(fn)
calls the learner's fn on fresh random inputs, compares with tlama_mini (`flash.online_softmax_update`,
`flash.flash_attention`, autograd through the textbook formula, `F.cross_entropy`), and names the mistake
when it can. The tiled exercises are also watched for building the full (T, S) or (N, V) matrix."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..attention import naive_attention
from ..flash import flash_attention, online_softmax_update
from ..masks import causal_mask
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_online_softmax_update", "check_tiled_attention_forward", "check_attention_probs_from_lse",
           "check_attention_backward", "check_blockwise_cross_entropy"]

NEG_INF = float("-inf")


class _LargestNewTensor(TorchDispatchMode):
    """Watches every operation a function runs: `largest` is the largest tensor (in elements) that an
    operation creates (the inputs and views of them do not count), and `largest_read` the largest tensor
    that a computing operation reads whole (views, slicing and gathers of a few entries do not count)."""

    _SPARSE_READS = ("aten::gather", "aten::index", "aten::index_select", "aten::take",
                     # these only read the shape, dtype and device of their argument
                     "aten::new_zeros", "aten::new_empty", "aten::new_ones", "aten::new_full",
                     "aten::empty_like", "aten::zeros_like", "aten::ones_like", "aten::full_like")

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = self.largest_read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.name().split(".")[0] not in self._SPARSE_READS:
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.largest_read = max(self.largest_read, a.numel())
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.numel())
        return out


def _unpack(name: str, out: object, n: int, what: str) -> tuple:
    if not isinstance(out, (tuple, list)) or len(out) != n:
        fail(name, f"returned {type(out).__name__}, expected a tuple {what}", f"return {what.strip('()')}")
    return tuple(out)


def _previous_state(shape: tuple[int, ...], D: int) -> tuple[torch.Tensor, ...]:
    """The running state (m, l, acc) after one earlier tile of 5 keys."""
    s0, v0 = torch.randn(*shape, 5), torch.randn(*shape[:-1], 5, D)
    m0 = s0.amax(-1)
    p0 = torch.exp(s0 - m0[..., None])
    return m0, p0.sum(-1), p0 @ v0


@attributes_stubs
def check_online_softmax_update(fn) -> None:
    """fn(m, l, acc, scores, v) -> (m, l, acc): fold one tile into the running softmax state.
    m, l (B, H, bq); acc (B, H, bq, D); scores (B, H, bq, bk) scaled, -inf where masked; v (B, H, bk, D)."""
    name = "online_softmax_update"
    B, H, bq, bk, D = 2, 2, int(torch.randint(3, 7, ())), int(torch.randint(3, 7, ())), 8
    m, l, acc = _previous_state((B, H, bq), D)
    scores = torch.randn(B, H, bq, bk)
    scores[..., ::2, :] += 3.0  # every other query row finds a larger max in the new tile
    scores[..., 1::2, :] -= 3.0  # and the rows in between keep their old one (the tile-only max is then wrong)
    v = torch.randn(B, H, bk, D)
    exp_m, exp_l, exp_acc = online_softmax_update(m, l, acc, scores, v)
    got_m, got_l, got_acc = _unpack(name, fn(m.clone(), l.clone(), acc.clone(), scores.clone(), v), 3, "(m, l, acc)")

    m_new = torch.maximum(m, scores.amax(-1))
    p = torch.exp(scores - m_new[..., None])
    alpha = torch.exp(m - m_new)
    inv = torch.exp(m_new - m)
    check_tensor(name + " (m)", got_m, exp_m, mistakes={
        "m is the max of the new tile only: keep the running max, torch.maximum(m, scores.amax(-1))":
            scores.amax(-1)}, hint="m_new = torch.maximum(m, scores.amax(-1))")
    check_tensor(name + " (l)", got_l, exp_l, mistakes={
        "the old sum l is not rescaled by exp(m_old - m_new)": l + p.sum(-1),
        "the rescaling factor is upside down: use exp(m_old - m_new) (<= 1), not exp(m_new - m_old)":
            inv * l + p.sum(-1),
        "the new tile's exp is not shifted by the new max: use exp(scores - m_new)":
            alpha * l + torch.exp(scores).sum(-1),
    }, hint="l_new = exp(m - m_new) * l + exp(scores - m_new).sum(-1)")
    diff = check_tensor(name + " (acc)", got_acc, exp_acc, mistakes={
        "the old accumulator acc is not rescaled by exp(m_old - m_new): its terms were computed relative to "
        "the old max": acc + p @ v,
        "the rescaling factor is upside down: use exp(m_old - m_new) (<= 1), not exp(m_new - m_old)":
            inv[..., None] * acc + p @ v,
        "acc is divided by l already: keep it unnormalised and divide once at the very end":
            (alpha[..., None] * acc + p @ v) / (alpha * l + p.sum(-1))[..., None],
    }, hint="acc_new = exp(m - m_new)[..., None] * acc + exp(scores - m_new) @ v")

    # a first tile in which some query rows see no key at all (causal masking): no NaN allowed
    m0, l0 = torch.full((B, H, bq), NEG_INF), torch.zeros(B, H, bq)
    acc0 = torch.zeros(B, H, bq, D)
    masked = torch.randn(B, H, bq, bk)
    masked[..., 0, :] = NEG_INF  # query row 0 is fully masked in this tile
    e_m, e_l, e_acc = online_softmax_update(m0, l0, acc0, masked, v)
    g_m, g_l, g_acc = _unpack(name, fn(m0.clone(), l0.clone(), acc0.clone(), masked.clone(), v), 3, "(m, l, acc)")
    hint = ("a row with only -inf so far has m_new = -inf, and exp(-inf - (-inf)) is NaN: subtract 0 instead "
            "there, e.g. m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)")
    for label, got, exp in (("m", g_m, e_m), ("l", g_l, e_l), ("acc", g_acc, e_acc)):
        check_tensor(f"{name} ({label}, a fully masked row)", got, exp, hint=hint)
    passed(name, f"max abs diff {diff:.1e} with bq={bq}, bk={bk}; a fully masked row stays NaN-free")


@attributes_stubs
def check_tiled_attention_forward(fn) -> None:
    """fn(q, k, v, block) -> (out, lse), non-causal: q (B, H, T, D), k, v (B, H, S, D), tiles of `block`
    queries and keys; out (B, H, T, D), lse (B, H, T) = logsumexp of each query's scaled scores."""
    name = "tiled_attention_forward"
    B, H, D = 1, 2, 8
    T, S = int(torch.randint(10, 21, ())), int(torch.randint(24, 41, ()))
    block = int(torch.randint(4, 8, ()))
    S += S % block == 0  # always a partial last key tile
    T += T % block == 0  # and a partial last query tile
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    exp_out, exp_lse = flash_attention(q, k, v, causal=False, block_size=block, return_lse=True)
    watch = _LargestNewTensor(q, k, v)
    with watch:
        result = fn(q, k, v, block)
    out, lse = _unpack(name, result, 2, "(out, lse)")

    scale = 1 / math.sqrt(D)
    s = q @ k.transpose(-2, -1) * scale                               # (B, H, T, S), for the diagnoses only
    m = s.amax(-1)
    full_tiles = S // block * block
    tiles = range(0, S, block)
    mistakes = {
        "the scores are not multiplied by 1/sqrt(D)": lambda: naive_attention(q * math.sqrt(D), k, v),
        "out is not divided by l at the end (acc / l)": lambda: exp_out * torch.exp(exp_lse - m)[..., None],
        "the last, partial key tile is skipped (use range(0, S, block) and slice up to min(j + block, S))":
            lambda: naive_attention(q, k[..., :full_tiles, :], v[..., :full_tiles, :]),
        "only the last key tile counts: the running state (m, l, acc) must be created once per query tile, "
        "before the loop over key tiles, not inside it":
            lambda: naive_attention(q, k[..., tiles[-1]:, :], v[..., tiles[-1]:, :]),
        "each key tile is normalised on its own and the results are added: tiles must share one softmax "
        "(rescale the running sums instead)":
            lambda: sum(naive_attention(q, k[..., j:j + block, :], v[..., j:j + block, :]) for j in tiles),
    }
    full_q = T // block * block  # queries 0 .. full_q - 1 are in full tiles
    no_last_q = f"the last, partial query tile (rows {full_q}..{T - 1}) is never computed: use range(0, T, block)"
    mistakes[no_last_q] = lambda: torch.cat([exp_out[..., :full_q, :], torch.zeros_like(exp_out[..., full_q:, :])], -2)
    mistakes[no_last_q + ", and the last, partial key tile is skipped too (range(0, S, block))"] = lambda: torch.cat(
        [naive_attention(q[..., :full_q, :], k[..., :full_tiles, :], v[..., :full_tiles, :]),
         torch.zeros_like(exp_out[..., full_q:, :])], -2)
    hint = ""
    if isinstance(out, torch.Tensor) and out.shape == exp_out.shape:  # which query rows are wrong?
        bad = (~torch.isclose(out.detach().float(), exp_out, atol=1e-5, rtol=1e-4)).flatten(0, 1).any(0).any(-1)  # (T,)
        if bad.any() and not bad[:full_q].any():
            hint = f"only the rows of the last, partial query tile ({full_q}..{T - 1}) are wrong: " + \
                   "loop over range(0, T, block) and slice the queries up to min(i + block, T)"
    diff = check_tensor(name + " (out)", out, exp_out, atol=1e-5, mistakes=mistakes, hint=hint)
    check_tensor(name + " (lse)", lse, exp_lse, atol=1e-5, mistakes={
        "lse is the running max m: add log(l), lse = m + log(l)": m,
        "lse is log(l) without the max: lse = m + log(l)": exp_lse - m,
    }, hint="lse = m + log(l) per query row, shape (B, H, T)")
    if watch.largest >= B * H * T * S:
        fail(name, f"a tensor of {watch.largest} elements was created, as large as the full (T, S) = ({T}, {S}) "
             "score matrix", f"compute the scores of one ({block}, {block}) tile at a time: "
             "q_tile @ k_tile.transpose(-2, -1)")
    passed(name, f"max abs diff {diff:.1e} with T={T}, S={S}, block={block}; largest intermediate "
           f"{watch.largest} elements < T*S*B*H = {B * H * T * S}")


@attributes_stubs
def check_attention_probs_from_lse(fn) -> None:
    """fn(scores, lse) -> probs: scores (B, H, T, S) (scaled, -inf where masked), lse (B, H, T).
    probs = softmax(scores, -1), recomputed as exp(scores - lse)."""
    name = "attention_probs_from_lse"
    for T, S in ((int(torch.randint(5, 10, ())),) * 2, (int(torch.randint(3, 6, ())), int(torch.randint(7, 12, ())))):
        scores = torch.randn(2, 3, T, S) * 2
        scores = scores.masked_fill(~causal_mask(T, start_pos=S - T), NEG_INF)  # causal, bottom-right aligned
        lse = torch.logsumexp(scores, dim=-1)                            # (B, H, T)
        expected = torch.softmax(scores, dim=-1)
        mistakes = {
            "exp(scores - max) uses the row max instead of lse: the rows do not sum to 1 (the max only "
            "makes exp safe; lse = max + log(sum) also normalises)":
                lambda: torch.exp(scores - scores.amax(-1, keepdim=True)),
            "exp(lse - scores): the sign is flipped": lambda: torch.exp(lse[..., None] - scores),
        }
        if T == S:  # lse[..., None, :] broadcasts silently only when the matrix is square
            mistakes["lse is subtracted along the wrong dimension: lse[..., :, None] lines up with the query "
                     "rows"] = lambda: torch.exp(scores - lse[..., None, :])
        out = call(name, fn, scores.clone(), lse.clone(),
                   hint="lse is (B, H, T), one number per query row, and scores (B, H, T, S): give lse a trailing key "
                        "axis so it lines up with the rows, lse[..., None] (B, H, T, 1)")
        diff = check_tensor(name, out, expected, mistakes=mistakes, hint="probs = torch.exp(scores - lse[..., None])")
    passed(name, f"max abs diff {diff:.1e} with T={T}, S={S} and T = S")


def _backward(q, k, v, out, lse, dout, *, use_max=False, with_dsum=True, scale_grads=True, scale_s=True):
    """The backward formulas, with switches that reproduce typical mistakes."""
    scale = 1 / math.sqrt(q.shape[-1])
    s = q @ k.transpose(-2, -1) * (scale if scale_s else 1.0)
    p = torch.exp(s - (s.amax(-1, keepdim=True) if use_max else lse[..., None]))
    dv = p.transpose(-2, -1) @ dout
    dp = dout @ v.transpose(-2, -1)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) if with_dsum else p * dp
    c = scale if scale_grads else 1.0
    return ds @ k * c, ds.transpose(-2, -1) @ q * c, dv


@attributes_stubs
def check_attention_backward(fn) -> None:
    """fn(q, k, v, out, lse, dout) -> (dq, dk, dv) of non-causal attention out = softmax(q k^T / sqrt(D)) v,
    with P recomputed from lse. q (B, H, T, D), k, v (B, H, S, D), out, dout (B, H, T, D), lse (B, H, T)."""
    name = "attention_backward"
    B, H, D = 2, 2, 8
    T, S = int(torch.randint(4, 9, ())), int(torch.randint(9, 14, ()))
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for n in (T, S, S))
    # the textbook formula in float64 (naive_attention takes its softmax in float32)
    out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v   # (B, H, T, D)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q, k, v, out = q.detach(), k.detach(), v.detach(), out.detach()
    lse = torch.logsumexp(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)   # (B, H, T)
    got = _unpack(name, fn(q, k, v, out, lse, dout), 3, "(dq, dk, dv)")
    args = (q, k, v, out, lse, dout)
    wrong = {  # each known mistake, as the (dq, dk, dv) it produces
        "P is recomputed with the row max instead of lse (exp(s - max) is not normalised)":
            _backward(*args, use_max=True),
        "dS = P * dP is missing the row term: dS = P * (dP - rowsum(dO * O))": _backward(*args, with_dsum=False),
        "dQ and dK miss the 1/sqrt(D) factor of the scores (S = scale * Q K^T)": _backward(*args, scale_grads=False),
        "P is recomputed from the unscaled scores q k^T: lse is the log-sum-exp of the *scaled* scores, so "
        "P = exp(scale * q k^T - lse)": _backward(*args, scale_s=False),
    }
    diffs = []
    for label in ("dv", "dq", "dk"):
        j = {"dq": 0, "dk": 1, "dv": 2}[label]
        mistakes = {m: g[j] for m, g in wrong.items() if not torch.allclose(g[j], (dq, dk, dv)[j])}
        diffs.append(check_tensor(f"{name} ({label})", got[j], (dq, dk, dv)[j], atol=1e-8, rtol=1e-6,
                                  mistakes=mistakes, hint={"dv": "dV = P^T dO", "dq": "dQ = scale * dS K",
                                                           "dk": "dK = scale * dS^T Q"}[label]))
    passed(name, f"max abs diff {max(diffs):.1e} against autograd through softmax(q k^T / sqrt(D)) v "
           f"(float64, T={T}, S={S})")


@attributes_stubs
def check_blockwise_cross_entropy(fn) -> None:
    """fn(logits, targets, chunk_size) -> scalar mean cross-entropy, computed chunk_size rows at a time.
    logits (N, V), targets (N,) ids. Equals F.cross_entropy(logits, targets), also in its gradient."""
    name = "blockwise_cross_entropy"
    V, chunk = int(torch.randint(20, 40, ())), int(torch.randint(4, 8, ()))
    N = chunk * int(torch.randint(3, 6, ())) + int(torch.randint(1, chunk, ()))  # a partial last chunk
    logits = (torch.randn(N, V) * 3).requires_grad_()
    targets = torch.randint(0, V, (N,))
    expected = F.cross_entropy(logits, targets)
    (exp_grad,) = torch.autograd.grad(expected, logits)
    watch = _LargestNewTensor(logits, targets)
    with watch:
        loss = fn(logits, targets, chunk)
    if isinstance(loss, torch.Tensor) and loss.ndim != 0:
        fail(name, f"returned shape {tuple(loss.shape)}, expected a scalar",
             "sum the per-token losses, then divide by N")
    per_token = F.cross_entropy(logits.detach(), targets, reduction="none")
    chunks = per_token.split(chunk)
    mistakes = {
        "the mean of the chunk means: the last chunk is smaller, so divide the *sum* of all losses by N":
            torch.stack([c.mean() for c in chunks]).mean(),
        "the sum of the losses, not the mean: divide by N": per_token.sum(),
        "the last, partial chunk is skipped": per_token[:N // chunk * chunk].mean(),
        "the sign is flipped: the loss is -log softmax[target] = lse - logit[target]": -per_token.mean(),
        "the row max is used instead of the log-sum-exp: loss = logsumexp(z) - z[target], and max(z) is only "
        "its first term": (logits.detach().amax(-1) - logits.detach().gather(1, targets[:, None])[:, 0]).mean(),
        "every chunk reads the first targets: slice them with the logits, targets[i:i + chunk_size]":
            torch.cat([F.cross_entropy(c, targets[:len(c)], reduction="none") for c in logits.detach().split(chunk)]).mean(),
    }
    # rtol 1e-5, not the default 1e-4: the mean of the chunk means can come within 1e-4 of the mean (0.5% of draws)
    diff = check_tensor(name, loss, expected.detach(), rtol=1e-5, mistakes=mistakes,
                        hint="per chunk: torch.logsumexp(chunk, -1) - chunk.gather(1, t[:, None]).squeeze(1)")
    if max(watch.largest, watch.largest_read) >= N * V:
        fail(name, f"an operation {'created' if watch.largest >= N * V else 'ran on'} a tensor as large as all "
             f"N x V = {N} x {V} logits at once", "work on logits[i:i + chunk_size] so that only one chunk's "
             "softmax / log-sum-exp is computed at a time")
    if not loss.requires_grad:
        fail(name, "the loss has no gradient (was it detached, or computed with .item()?)")
    (grad,) = torch.autograd.grad(loss, logits)
    check_tensor(name + " (gradient)", grad, exp_grad)
    passed(name, f"max abs diff {diff:.1e} with N={N}, V={V}, chunk_size={chunk}; the largest tensor an "
           f"operation read or made had {max(watch.largest, watch.largest_read)} < N*V = {N * V} elements; "
           "gradient matches")
