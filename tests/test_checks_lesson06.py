"""The lesson 06 (transformer block) checks accept a correct solution and reject typical mistakes by name."""
import math

import torch
import torch.nn.functional as F

from tlama_mini.checks.lesson06 import check_block_forward, check_ffn_hidden_size, check_rms_norm, check_swiglu
from tlama_mini.checks.common import expect_failure as fails_with


# --- correct implementations, written from the formulas (not from tlama_mini)
def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def block_forward(x, attention, ffn, attention_norm, ffn_norm):
    h = x + attention(attention_norm(x))
    return h + ffn(ffn_norm(h))


def ffn_hidden_size(hidden_dim, multiple_of, ffn_dim_multiplier):
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def test_correct_solutions_pass(capsys):
    for _ in range(3):
        check_rms_norm(rms_norm)
        check_swiglu(swiglu)
        check_block_forward(block_forward)
        check_ffn_hidden_size(ffn_hidden_size)
    assert capsys.readouterr().out.count("✓") == 12




def test_rms_norm_mistakes():
    fails_with(check_rms_norm, lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps), "LayerNorm")
    fails_with(check_rms_norm, lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w,
               "outside the square root")
    fails_with(check_rms_norm, lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * w,
               "wrong dimension")
    fails_with(check_rms_norm, lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean() + eps) * w, "all elements")
    fails_with(check_rms_norm, lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),
               "`weight` is not applied")
    fails_with(check_rms_norm, lambda x, w, eps: x / torch.sqrt(x.var(-1, keepdim=True) + eps) * w,
               "standard deviation")
    fails_with(check_rms_norm, lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(2, keepdim=True) + eps) * w,
               "2-D input", "dim=-1")  # right on (B, T, C), crashes on (N, C): the check says why
    fails_with(check_rms_norm, lambda x, w, eps: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w,
               "L2 norm", "*mean*")


def test_swiglu_mistakes():
    fails_with(check_swiglu, lambda x, w1, w2, w3: (F.silu(x @ w3.T) * (x @ w1.T)) @ w2.T, "swapped")
    fails_with(check_swiglu, lambda x, w1, w2, w3: (F.gelu(x @ w1.T) * (x @ w3.T)) @ w2.T, "GELU")
    fails_with(check_swiglu, lambda x, w1, w2, w3: (F.relu(x @ w1.T) * (x @ w3.T)) @ w2.T, "ReLU")
    fails_with(check_swiglu, lambda x, w1, w2, w3: (F.silu(x @ w1) * (x @ w3)) @ w2, "nn.Linear layout")
    fails_with(check_swiglu, lambda x, w1, w2, w3: F.silu((x @ w1.T) * (x @ w3.T)) @ w2.T, "after the product")


def test_block_forward_mistakes():
    def post_norm(x, attn, ffn, n1, n2):
        h = n1(x + attn(x))
        return n2(h + ffn(h))

    fails_with(check_block_forward, post_norm, "post-norm")
    fails_with(check_block_forward, lambda x, attn, ffn, n1, n2: (lambda h: h + ffn(n2(h)))(attn(n1(x))),
               "attention residual is missing")
    fails_with(check_block_forward, lambda x, attn, ffn, n1, n2: ffn(n2(x + attn(n1(x)))),
               "feed-forward residual is missing")
    fails_with(check_block_forward, lambda x, attn, ffn, n1, n2: x + attn(n1(x)) + ffn(n2(x)), "parallel block")
    fails_with(check_block_forward, lambda x, attn, ffn, n1, n2: block_forward(x, attn, ffn, n2, n1), "swapped")

    def second_residual_from_x(x, attn, ffn, n1, n2):
        h = x + attn(n1(x))
        return x + ffn(n2(h))

    fails_with(check_block_forward, second_residual_from_x, "adds x instead of h")


def test_ffn_hidden_size_mistakes():
    fails_with(check_ffn_hidden_size, lambda h, m, mult: m * math.ceil(int((mult or 1) * h) / m), "2/3")
    fails_with(check_ffn_hidden_size,
               lambda h, m, mult: m * (int((mult or 1) * int(2 * h / 3)) // m), "rounds down")
    fails_with(check_ffn_hidden_size, lambda h, m, mult: ffn_hidden_size(h, m, None), "ignored")
    fails_with(check_ffn_hidden_size,
               lambda h, m, mult: m * math.ceil((mult or 1) * (2 * h / 3) / m), "truncated to int")
    fails_with(check_ffn_hidden_size, lambda h, m, mult: float(ffn_hidden_size(h, m, mult)), "return an int")

    def next_multiple(hidden_dim, multiple_of, mult):  # (h // m + 1) * m: one multiple too many when h is one
        h = int(2 * hidden_dim / 3)
        if mult is not None:
            h = int(mult * h)
        return (h // multiple_of + 1) * multiple_of

    fails_with(check_ffn_hidden_size, next_multiple, "*next* multiple", "math.ceil")
    check_ffn_hidden_size(lambda h, m, mult: -(-int((mult or 1) * int(2 * h / 3)) // m) * m)  # ceil by floor division
