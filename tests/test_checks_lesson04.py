"""The lesson 04 (attention) checks accept a correct solution and reject typical mistakes by name."""
import math

import pytest
import torch

from tlama_mini.checks.lesson04 import (check_causal_mask, check_masked_softmax, check_merge_heads,
                                        check_multi_head_attention, check_scaled_dot_product_attention,
                                        check_split_heads)
from tlama_mini.checks.common import expect_failure as fails_with


# --- correct implementations, written from the formulas (not from tlama_mini)
def causal_mask(T):
    i = torch.arange(T)
    return i[None, :] <= i[:, None]


def masked_softmax(scores, mask):
    scores = scores.masked_fill(~mask, float("-inf"))
    m = scores.amax(-1, keepdim=True).clamp(min=-1e30)  # finite max even for a fully masked row
    e = torch.exp(scores - m)
    s = e.sum(-1, keepdim=True)
    return torch.where(s > 0, e / s.clamp(min=1e-30), torch.zeros_like(e))


def sdpa(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def split_heads(x, n_heads):
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def mha(x, Wq, Wk, Wv, Wo, n_heads, mask=None):
    q, k, v = (split_heads(x @ w.T, n_heads) for w in (Wq, Wk, Wv))
    return merge_heads(sdpa(q, k, v, mask)) @ Wo.T


def test_correct_solutions_pass(capsys):
    for _ in range(3):
        check_causal_mask(causal_mask)
        check_masked_softmax(masked_softmax)
        check_scaled_dot_product_attention(sdpa)
        check_split_heads(split_heads)
        check_merge_heads(merge_heads)
        check_multi_head_attention(mha)
    assert capsys.readouterr().out.count("✓") == 18




def test_causal_mask_mistakes():
    fails_with(check_causal_mask, lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "upper triangle")
    fails_with(check_causal_mask, lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), "diagonal is excluded")
    fails_with(check_causal_mask, lambda T: ~torch.ones(T, T, dtype=torch.bool).tril(), "inverted")
    fails_with(check_causal_mask, lambda T: torch.ones(T, T).tril(), "boolean")


def test_stubs_are_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError

    for check in (check_causal_mask, check_masked_softmax, check_scaled_dot_product_attention, check_split_heads,
                  check_merge_heads, check_multi_head_attention):
        with pytest.raises(NotImplementedError):
            check(stub)


def test_masked_softmax_mistakes():
    fails_with(check_masked_softmax, lambda s, m: torch.softmax(s.masked_fill(~m, float("-inf")), -1), "NaN", "0/0")
    fails_with(check_masked_softmax, lambda s, m: torch.softmax(s.masked_fill(~m, -1e9), -1), "uniform")
    e = fails_with(check_masked_softmax, lambda s, m: torch.softmax(s, -1) * m, "after the softmax")
    assert "0/0" not in e, "the NaN hint must not be shown for an unrelated mistake"
    fails_with(check_masked_softmax, lambda s, m: torch.softmax(s, -1), "ignored")
    # masked_fill fills where its argument is True: the classic inversion, with or without the NaN fix
    fails_with(check_masked_softmax, lambda s, m: torch.softmax(s.masked_fill(m, float("-inf")), -1), "inverted")
    fails_with(check_masked_softmax, lambda s, m: masked_softmax(s, ~m), "inverted")
    # the mask may be (T, S) for (B, T, S) scores, as exercise 3 uses it
    fails_with(check_masked_softmax, lambda s, m: masked_softmax(s, m.reshape(s.shape)), "(T, S) mask", "broadcast")

    def over_queries(scores, mask):  # the NaN-safe recipe, but the softmax over dim -2
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-2)
        return probs.nan_to_num(0.0)

    fails_with(check_masked_softmax, over_queries, "wrong dimension", "dim=-1")


def test_sdpa_mistakes():
    fails_with(check_scaled_dot_product_attention,
               lambda q, k, v, m=None: sdpa(q * math.sqrt(q.shape[-1]), k, v, m), "sqrt(head_dim)")
    fails_with(check_scaled_dot_product_attention,
               lambda q, k, v, m=None: (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
                                        * (1 if m is None else m)) @ v, "after the softmax")
    fails_with(check_scaled_dot_product_attention,
               lambda q, k, v, m=None: sdpa(q / math.sqrt(q.shape[-1]), k, v, m), "instead of sqrt(head_dim)")
    # masked_fill(m, -inf) blanks the *allowed* keys; the last query then sees nothing and comes out NaN
    fails_with(check_scaled_dot_product_attention,
               lambda q, k, v, m=None: sdpa(q, k, v, None if m is None else ~m), "inverted")

    def no_none(q, k, v, m=None):  # correct with a mask, crashes without one
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~m, float("-inf"))
        return torch.softmax(s, -1) @ v

    fails_with(check_scaled_dot_product_attention, no_none, "mask=None", "TypeError")


def test_head_reshape_mistakes():
    fails_with(check_split_heads, lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1), "wrong reshape order")
    fails_with(check_split_heads, lambda x, H: x.view(*x.shape[:2], H, -1), "(B, T, H, D)", "transpose(1, 2)")
    fails_with(check_merge_heads, lambda x: x.reshape(x.shape[0], x.shape[2], -1), "wrong reshape order")
    fails_with(check_merge_heads, lambda x: x.transpose(1, 2).view(x.shape[0], x.shape[2], -1), "not contiguous")
    e = fails_with(check_merge_heads, lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1), "(D, H)")
    assert "contiguous" not in e, "the .view hint must only be shown when .view crashed"


def test_multi_head_attention_mistakes():
    def wrong_order(x, Wq, Wk, Wv, Wo, H, mask=None):
        B, T, C = x.shape
        q, k, v = ((x @ w.T).view(B, H, T, C // H) for w in (Wq, Wk, Wv))
        return sdpa(q, k, v, mask).reshape(B, T, C) @ Wo.T

    def no_wo(x, Wq, Wk, Wv, Wo, H, mask=None):
        return mha(x, Wq, Wk, Wv, torch.eye(x.shape[-1]), H, mask)

    def untransposed(x, Wq, Wk, Wv, Wo, H, mask=None):
        return mha(x, Wq.T, Wk.T, Wv.T, Wo.T, H, mask)

    def scale_by_d_model(x, Wq, Wk, Wv, Wo, H, mask=None):  # divides the scores by sqrt(C) instead of sqrt(D)
        C = x.shape[-1]
        return mha(x, Wq * math.sqrt(C // H) / math.sqrt(C), Wk, Wv, Wo, H, mask)

    fails_with(check_multi_head_attention, wrong_order, "wrong reshape order")
    fails_with(check_multi_head_attention, no_wo, "Wo is missing")
    fails_with(check_multi_head_attention, untransposed, "untransposed")
    fails_with(check_multi_head_attention, scale_by_d_model, "sqrt(d_model)")
    def inverted_mask(x, Wq, Wk, Wv, Wo, H, mask=None):
        return mha(x, Wq, Wk, Wv, Wo, H, None if mask is None else ~mask)

    fails_with(check_multi_head_attention, inverted_mask, "inverted")

    def bad_helper(x, Wq, Wk, Wv, Wo, H, mask=None):  # a split_heads without the transpose breaks the matmuls
        B, T, C = x.shape
        q, k, v = ((x @ w.T).view(B, T, H, C // H) for w in (Wq, Wk, Wv))
        return merge_heads(sdpa(q, k, v, mask)) @ Wo.T

    fails_with(check_multi_head_attention, bad_helper, "crashed", "make their checks pass first")
