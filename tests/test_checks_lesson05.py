"""The lesson 05 (GQA / MQA) checks accept a correct solution and reject typical mistakes by name."""
import math

import torch

from tlama_mini.checks.lesson05 import (check_gqa_attention, check_kv_cache_bytes, check_llama3_kv_cache_gib,
                                        check_repeat_kv)
from tlama_mini.checks.common import expect_failure as fails_with


# --- correct implementations, written independently of tlama_mini
def repeat_kv(kv, n_rep):
    return kv.repeat_interleave(n_rep, dim=2)


def gqa_attention(q, k, v, mask=None):
    B, H, T, D = q.shape
    K = k.shape[1]
    qg = q.view(B, K, H // K, T, D)  # group the query heads by their kv head: no copy of k, v
    s = qg @ k[:, :, None].transpose(-2, -1) / math.sqrt(D)  # (B, K, n_rep, T, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v[:, :, None]).view(B, H, T, D)


def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch, dtype_bytes):
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * dtype_bytes


def llama3_kv_cache_gib():
    return tuple(kv_cache_bytes(32, K, 128, 8192, 16, 2) / 2**30 for K in (8, 32))


def gqa_by_repeat(q, k, v, mask=None):  # another correct style: copy the kv heads, then plain attention
    n = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(n, 1).transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.repeat_interleave(n, 1)


def test_correct_solutions_pass(capsys):
    for _ in range(3):
        check_repeat_kv(repeat_kv)
        check_gqa_attention(gqa_attention)
        check_gqa_attention(gqa_by_repeat)
        check_kv_cache_bytes(kv_cache_bytes)
        check_llama3_kv_cache_gib(llama3_kv_cache_gib)
    check_llama3_kv_cache_gib(lambda: [16, torch.tensor(64.0)])  # rounded numbers, a list, a tensor
    assert capsys.readouterr().out.count("✓") == 16




def test_repeat_kv_mistakes():
    fails_with(check_repeat_kv, lambda kv, n: kv.repeat(1, 1, n, 1), "tiled", "h // n_rep")
    fails_with(check_repeat_kv, lambda kv, n: kv.repeat_interleave(n, dim=1), "wrong shape")


def test_gqa_attention_mistakes():
    def tiled(q, k, v, mask=None):
        n = q.shape[1] // k.shape[1]
        return gqa_attention(q, k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1), mask)

    fails_with(check_gqa_attention, tiled, "tiled")
    fails_with(check_gqa_attention, lambda q, k, v, mask=None: gqa_attention(q * math.sqrt(q.shape[-1]), k, v, mask),
               "sqrt(head_dim)")
    fails_with(check_gqa_attention, lambda q, k, v, mask=None: gqa_attention(q, k, v, None), "mask is ignored")


HEAD_HINT = "the heads are dim 1"


def test_gqa_attention_diagnoses_point_at_the_bug():
    """Each mistake gets its own diagnosis; the hint about the head layout appears only when the heads are wrong."""
    def inverted(q, k, v, mask=None):
        return gqa_attention(q, k, v, ~mask)  # NaN in the last query row: it may see no key

    def inverted_nan_safe(q, k, v, mask=None):
        return gqa_attention(q, k, v, ~mask).nan_to_num(0.0)

    def scale_d(q, k, v, mask=None):  # divides the scores by D instead of sqrt(D)
        return gqa_attention(q / math.sqrt(q.shape[-1]), k, v, mask)

    for wrong in (inverted, inverted_nan_safe):
        assert HEAD_HINT not in fails_with(check_gqa_attention, wrong, "mask is inverted", "~mask")
    assert HEAD_HINT not in fails_with(check_gqa_attention, scale_d, "head_dim instead of sqrt(head_dim)")
    assert HEAD_HINT not in fails_with(check_gqa_attention, lambda *a: gqa_attention(*a) * 1.1, "values differ",
                                       "before the softmax")

    def swapped_groups(q, k, v, mask=None):  # query heads attend with the other group's kv head
        return gqa_attention(q, k.flip(1), v.flip(1), mask)

    def heads_on_dim_2(q, k, v, mask=None):  # repeat_kv (heads on dim 2) applied to (B, K, S, D)
        n = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n), repeat_kv(v, n)  # (B, K, S * n, D): the positions were repeated
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(s, -1) @ v

    fails_with(check_gqa_attention, swapped_groups, "used kv heads", "expected h // n_rep", HEAD_HINT)
    fails_with(check_gqa_attention, heads_on_dim_2, "crashed", HEAD_HINT)


def test_llama3_kv_cache_gib_mistakes():
    right = llama3_kv_cache_gib()
    fails_with(check_llama3_kv_cache_gib, lambda: right[::-1], "swapped")
    fails_with(check_llama3_kv_cache_gib, lambda: tuple(g * 2**30 / 1e9 for g in right), "GB (1e9 bytes)")
    fails_with(check_llama3_kv_cache_gib, lambda: tuple(g * 2**30 for g in right), "bytes")
    fails_with(check_llama3_kv_cache_gib, lambda: tuple(g / 16 for g in right), "one sequence")
    fails_with(check_llama3_kv_cache_gib, lambda: (right[0], right[0]), "8 kv heads")
    fails_with(check_llama3_kv_cache_gib, lambda: right[0], "expected a pair")


def test_kv_cache_bytes_mistakes():
    fails_with(check_kv_cache_bytes, lambda L, K, D, S, B, b: L * K * D * S * B * b, "factor 2")
    fails_with(check_kv_cache_bytes, lambda L, K, D, S, B, b: 2 * L * K * D * S * B * b / 2**30, "GiB")
    fails_with(check_kv_cache_bytes, lambda L, K, D, S, B, b: 2 * L * K * D * S * B, "dtype_bytes")
    fails_with(check_kv_cache_bytes, lambda L, K, D, S, B, b: None, "return")
