"""The lesson 09 (KV cache and generation) checks accept a correct solution and reject each typical mistake by
name on every draw: every wrong solution runs through its check over many seeds."""
import random

import pytest
import torch

from tlama_mini.checks.common import expect_failure_on_every_draw
from tlama_mini.checks.lesson09 import (check_cache_update, check_sample_loop, check_top_k_filter,
                                        check_top_p_filter)

NEG_INF = float("-inf")
SEEDS = range(30)
SEEDS_MODEL = range(12)  # check_sample_loop builds a model on every call


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def fails_with_all_seeds(check, fn, *words, seeds=SEEDS):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed;
    returns the last message."""
    return expect_failure_on_every_draw(check, fn, *words, seeds=seeds)


fails_with = fails_with_all_seeds


# --- correct implementations, written from the definitions (not from tlama_mini)
def cache_update(cache_k, cache_v, xk, xv, start_pos):
    B, T = xk.shape[:2]
    cache_k[:B, start_pos:start_pos + T] = xk
    cache_v[:B, start_pos:start_pos + T] = xv
    return cache_k[:B, :start_pos + T], cache_v[:B, :start_pos + T]


def top_k_filter(logits, k):
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits, p):
    out = torch.full_like(logits, NEG_INF)
    for b in range(logits.shape[0]):  # one row at a time, in plain Python
        probs = torch.softmax(logits[b], -1)
        total = 0.0
        for i in torch.argsort(logits[b], descending=True).tolist():
            if total >= p:
                break
            out[b, i] = logits[b, i]
            total += probs[i].item()
    return out


def sample_loop(model, tokens, n, *, first_pos=lambda T, i: T + i, whole=False):
    T = tokens.shape[1]
    logits, _ = model(tokens, 0, kv_cache=True)
    seq = tokens
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if i < n - 1:
            logits, _ = model(seq, 0) if whole else model(nxt, first_pos(T, i))
    return seq


def test_correct_solutions_pass_on_every_draw(capsys):
    for seed in SEEDS:
        random.seed(seed)
        torch.manual_seed(seed)
        check_cache_update(cache_update)
        check_top_k_filter(top_k_filter)
        check_top_p_filter(top_p_filter)
        if seed in SEEDS_MODEL:
            check_sample_loop(sample_loop)
    assert capsys.readouterr().out.count("✓") == 3 * len(SEEDS) + len(SEEDS_MODEL)


def test_filters_that_work_on_a_copy_pass(capsys):
    def top_k_on_a_copy(logits, k):  # in-place operations on its own copy are fine
        out = logits.clone()
        out[out < out.topk(k, dim=-1).values[:, -1:]] = NEG_INF
        return out

    def top_p_vectorised(logits, p):
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        drop = torch.cumsum(probs, -1) - probs >= p
        return logits.clone().masked_fill_(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)

    check_top_k_filter(top_k_on_a_copy)
    check_top_p_filter(top_p_vectorised)
    assert capsys.readouterr().out.count("✓") == 2




def test_cache_update_mistakes():
    def written_at_zero(ck, cv, xk, xv, start_pos):
        B, T = xk.shape[:2]
        ck[:B, :T], cv[:B, :T] = xk, xv
        return ck[:B, :start_pos + T], cv[:B, :start_pos + T]

    def whole_buffer(ck, cv, xk, xv, start_pos):
        cache_update(ck, cv, xk, xv, start_pos)
        return ck, cv

    def all_rows(ck, cv, xk, xv, start_pos):
        T = xk.shape[1]
        cache_update(ck, cv, xk, xv, start_pos)
        return ck[:, :start_pos + T], cv[:, :start_pos + T]

    def not_in_place(ck, cv, xk, xv, start_pos):
        return cache_update(ck.clone(), cv.clone(), xk, xv, start_pos)

    fails_with(check_cache_update, written_at_zero, "position 0 instead of start_pos")
    fails_with(check_cache_update, whole_buffer, "whole buffer")
    fails_with(check_cache_update, all_rows, "buffer rows")
    fails_with(check_cache_update, lambda ck, cv, xk, xv, s: (xk, xv), "only the new positions")
    fails_with(check_cache_update, not_in_place, "in place")

    def one_new_token(ck, cv, xk, xv, start_pos):  # writes all T, but returns as if T were 1
        cache_update(ck, cv, xk, xv, start_pos)
        B = xk.shape[0]
        return ck[:B, :start_pos + 1], cv[:B, :start_pos + 1]

    fails_with(check_cache_update, one_new_token, "start_pos + 1", "T = xk.shape[1]", "not 1")

    def every_buffer_row(ck, cv, xk, xv, start_pos):  # crashes: B < B_max rows cannot fill every buffer row
        B, T = xk.shape[:2]
        ck[:, start_pos:start_pos + T], cv[:, start_pos:start_pos + T] = xk, xv
        return ck[:B, :start_pos + T], cv[:B, :start_pos + T]

    def writes_other_rows(ck, cv, xk, xv, start_pos):  # fills the unused rows too (what a batch of 1 broadcast does)
        B, T = xk.shape[:2]
        cache_update(ck, cv, xk, xv, start_pos)
        ck[B:, start_pos:start_pos + T], cv[B:, start_pos:start_pos + T] = xk[:1], xv[:1]
        return ck[:B, :start_pos + T], cv[:B, :start_pos + T]

    def writes_too_far(ck, cv, xk, xv, start_pos):  # the right keys returned, but one position too many written
        B, T = xk.shape[:2]
        cache_update(ck, cv, xk, xv, start_pos)
        ck[:B, start_pos + T], cv[:B, start_pos + T] = xk[:, -1], xv[:, -1]
        return ck[:B, :start_pos + T], cv[:B, :start_pos + T]

    def keys_twice(ck, cv, xk, xv, start_pos):
        keys, _ = cache_update(ck, cv, xk, xv, start_pos)
        return keys, keys

    fails_with(check_cache_update, every_buffer_row, "crashed with RuntimeError",
               "cache_k[:B, start_pos:start_pos + T]")
    fails_with(check_cache_update, writes_other_rows, "does not use")
    fails_with(check_cache_update, writes_too_far, "past position")
    fails_with(check_cache_update, keys_twice, "(values)", "write xv into cache_v")


def test_top_k_filter_mistakes():
    def k_plus_one(logits, k):
        return top_k_filter(logits, k + 1)

    def zero_fill(logits, k):
        kth = logits.topk(k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, 0.0)

    fails_with(check_top_k_filter, k_plus_one, "k + 1")
    fails_with(check_top_k_filter, lambda logits, k: top_k_filter(logits, k - 1), "k - 1")
    fails_with(check_top_k_filter, zero_fill, "instead of -inf")
    fails_with(check_top_k_filter, lambda logits, k: logits.topk(k, dim=-1).values, "only the top-k")

    def in_place(logits, k):  # right values, but written into the caller's tensor
        kth = logits.topk(k, dim=-1).values[:, -1:]
        return logits.masked_fill_(logits < kth, NEG_INF)

    def assigns(logits, k):
        logits[logits < logits.topk(k, dim=-1).values[:, -1:]] = NEG_INF
        return logits

    fails_with(check_top_k_filter, in_place, "`logits` was modified in place", "new tensor", "masked_fill")
    fails_with(check_top_k_filter, assigns, "modified in place")

    def kth_without_keepdim(logits, k):  # (B,) against (B, V): a broadcasting crash inside the learner's code
        return logits.masked_fill(logits < logits.topk(k, dim=-1).values[:, -1], NEG_INF)

    def over_the_batch(logits, k):  # top-k over dim 0 (the batch): crashes when k > B, wrong otherwise
        return logits.masked_fill(logits < logits.topk(k, dim=0).values[-1:], NEG_INF)

    fails_with(check_top_k_filter, kth_without_keepdim, "crashed with RuntimeError", "(B, 1)")
    fails_with(check_top_k_filter, over_the_batch, "dim=-1")
    fails_with(check_top_k_filter, lambda logits, k: logits.masked_fill(logits >= logits.topk(k, -1).values[:, -1:],
                                                                        NEG_INF), "swapped")


def test_top_p_filter_mistakes():
    def drops_crossing(logits, p):  # drop where the cumulative probability *including* the token > p
        srt, order = torch.sort(logits, dim=-1, descending=True)
        drop = torch.cumsum(torch.softmax(srt, -1), -1) > p
        return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)

    def unsorted(logits, p):
        probs = torch.softmax(logits, -1)
        return logits.masked_fill(torch.cumsum(probs, -1) - probs >= p, NEG_INF)

    def keeps_none_if_confident(logits, p):  # right on ordinary rows, empty on a confident one
        out = top_p_filter(logits, p)
        confident = torch.softmax(logits, -1).amax(-1) > p
        return out.masked_fill(confident[:, None], NEG_INF)

    fails_with(check_top_p_filter, drops_crossing, "crosses p")
    fails_with(check_top_p_filter, unsorted, "vocabulary order")
    fails_with(check_top_p_filter, keeps_none_if_confident, "no token is kept")

    def in_place(logits, p):
        out = top_p_filter(logits, p)
        logits.copy_(out)  # e.g. logits[drop] = -inf on the caller's tensor
        return logits

    def not_scattered_back(logits, p):  # the decision in sorted order, applied to the unsorted logits
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        drop_sorted = torch.cumsum(probs, -1) - probs >= p
        return logits.masked_fill(drop_sorted, NEG_INF)

    def sorted_returned(logits, p):  # the filtered *sorted* logits
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        return srt.masked_fill(torch.cumsum(probs, -1) - probs >= p, NEG_INF)

    fails_with(check_top_p_filter, in_place, "`logits` was modified in place", "new tensor")
    for wrong in (not_scattered_back, sorted_returned):
        message = fails_with(check_top_p_filter, wrong, "keeps tokens", "first ones of the vocabulary",
                             "vocabulary order", "scatter")
        assert "3.4e+38" not in message

    def scattered_into_floats(logits, p):  # scatter(bool src) into a float tensor: a dtype crash
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        drop = torch.cumsum(probs, -1) - probs >= p
        return logits.masked_fill(torch.zeros_like(logits).scatter(-1, order, drop), NEG_INF)

    def swapped(logits, p):
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        drop = torch.cumsum(probs, -1) - probs < p
        return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)

    def gathered_back(logits, p):  # gather with the sort order is not its inverse: the wrong tokens
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        drop = torch.cumsum(probs, -1) - probs >= p
        return logits.masked_fill(drop.gather(-1, order), NEG_INF)

    fails_with(check_top_p_filter, scattered_into_floats, "crashed with RuntimeError", "same dtype")
    fails_with(check_top_p_filter, swapped, "swapped")
    fails_with(check_top_p_filter, gathered_back, "not the most likely ones")


def test_sample_loop_mistakes():
    def fails_with(check, fn, *words):
        return fails_with_all_seeds(check, fn, *words, seeds=SEEDS_MODEL)

    fails_with(check_sample_loop, lambda m, t, n: sample_loop(m, t, n, whole=True), "whole sequence again")
    fails_with(check_sample_loop, lambda m, t, n: sample_loop(m, t, n, first_pos=lambda T, i: 0), "start_pos=0")
    fails_with(check_sample_loop, lambda m, t, n: sample_loop(m, t, n, first_pos=lambda T, i: T + i + 1),
               "one too large")
    fails_with(check_sample_loop, lambda m, t, n: sample_loop(m, t, n, first_pos=lambda T, i: T + i - 1),
               "one too small")
    fails_with(check_sample_loop, lambda m, t, n: sample_loop(m, t, n)[:, t.shape[1]:], "only the new tokens")

    def uncached(m, t, n):
        seq = t
        for _ in range(n):
            logits, _ = m(seq, 0, kv_cache=False)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq

    fails_with(check_sample_loop, uncached, "kv_cache=False")

    def decode(m, t, n, *, pair=True, feed=lambda nxt: nxt[:, None], pick=lambda logits: logits[:, -1]):
        T = t.shape[1]
        out = m(t, 0, kv_cache=True)
        logits = out[0] if pair else out
        seq = t
        for i in range(n):
            nxt = pick(logits).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if i < n - 1:
                logits, _ = m(feed(nxt), T + i)
        return seq

    fails_with(check_sample_loop, lambda m, t, n: decode(m, t, n, pair=False), "crashed with TypeError",
               "returns a pair")
    fails_with(check_sample_loop, lambda m, t, n: decode(m, t, n, feed=lambda nxt: nxt), "tokens of shape (2,)",
               "(B, 1)")
    fails_with(check_sample_loop, lambda m, t, n: decode(m, t, n, pick=lambda logits: logits[:, 0]), "*last* position")
    fails_with(check_sample_loop, lambda m, t, n: decode(m, t, n)[:, :-1], "shape")

def test_sample_loop_prefill_without_a_cache_is_diagnosed():
    def plain_prefill(m, t, n):  # model(tokens, 0): a plain forward allocates no cache
        T = t.shape[1]
        logits, _ = m(t, 0)
        seq = t
        for i in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if i < n - 1:
                logits, _ = m(nxt, T + i)
        return seq

    fails_with(check_sample_loop, plain_prefill, "without a cache", "kv_cache=True")
