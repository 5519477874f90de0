"""The lesson-02 checks accept correct answers and reject typical wrong ones with the right diagnosis;
and the reference `tlama_mini.embeddings` agrees with independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from tlama_mini.checks import ExerciseFailed
from tlama_mini.checks import lesson02 as checks
from tlama_mini.embeddings import add_positions, position_shift_matrix, sinusoidal_positions


# ----------------------------------------------------------------- the reference module
def test_sinusoidal_positions_matches_the_paper_formula():
    n_pos, dim = 7, 6
    pe = sinusoidal_positions(n_pos, dim)
    assert pe.shape == (n_pos, dim) and pe.dtype == torch.float32
    for p in range(n_pos):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert math.isclose(pe[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_sinusoidal_pairs_are_the_rope_angles():
    from tlama_mini.rope import compute_freqs_cis
    pe = sinusoidal_positions(20, 8)
    cis = compute_freqs_cis(8, 20)  # cos + i sin of the same angles, same pair order
    assert torch.allclose(pe[:, 0::2], cis.imag, atol=1e-6) and torch.allclose(pe[:, 1::2], cis.real, atol=1e-6)


def test_shift_matrix_moves_k_positions():
    pe = sinusoidal_positions(50, 12)
    for k in (1, 5):
        M = position_shift_matrix(k, 12)
        assert torch.allclose(pe[:-k] @ M.T, pe[k:], atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="even"):
        sinusoidal_positions(4, 5)
    with pytest.raises(ValueError, match="outside the position table"):
        add_positions(torch.zeros(1, 5, 4), torch.zeros(6, 4), start_pos=2)
    with pytest.raises(ValueError, match="same C"):
        add_positions(torch.zeros(1, 5, 4), torch.zeros(6, 3))


# ----------------------------------------------------------------- the checks
def expect_failure(check, fn, *words):
    with pytest.raises(ExerciseFailed) as info:
        check(fn)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_embed_lookup_onehot():
    def good(ids, table):
        return F.one_hot(ids, table.shape[0]).to(table.dtype) @ table

    checks.check_embed_lookup_onehot(good)
    expect_failure(checks.check_embed_lookup_onehot, lambda ids, t: F.one_hot(ids).to(t.dtype) @ t, "num_classes")
    expect_failure(checks.check_embed_lookup_onehot, lambda ids, t: F.one_hot(ids, t.shape[0]) @ t, "int64")
    expect_failure(checks.check_embed_lookup_onehot, lambda ids, t: F.one_hot(ids, t.shape[0]).float(), "wrong shape")
    with pytest.raises(ExerciseFailed) as info:  # num_classes = C: one_hot refuses ids >= C, or the shape is wrong
        checks.check_embed_lookup_onehot(lambda ids, t: F.one_hot(ids, t.shape[1]).to(t.dtype) @ t.T)
    assert "table.shape[0]" in str(info.value) or "wrong shape" in str(info.value), str(info.value)


def _pe(n_pos, dim, *, swap=False, concat=False, per_column=False, start=0):
    p = torch.arange(start, start + n_pos, dtype=torch.float32)[:, None]
    if per_column:
        j = torch.arange(dim)
        a = p / 10000 ** (j / dim)
        return torch.where(j % 2 == 0, a.sin(), a.cos())
    a = p / 10000 ** (torch.arange(0, dim, 2) / dim)
    s, c = (a.cos(), a.sin()) if swap else (a.sin(), a.cos())
    return torch.cat([s, c], -1) if concat else torch.stack([s, c], -1).flatten(1)


def test_sinusoidal_positions():
    checks.check_sinusoidal_positions(_pe)
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, swap=True), "swapped")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, concat=True), "concatenated")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, per_column=True), "its own exponent")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, start=1), "start at 1")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d).T, "wrong shape")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d).double(), "float64", "float32")


def test_add_positions():
    def good(x, table, start_pos=0):
        if start_pos + x.shape[1] > table.shape[0]:
            raise ValueError("too long")
        return x + table[start_pos:start_pos + x.shape[1]]

    def in_place(x, table, start_pos=0):
        x += good(torch.zeros_like(x), table, start_pos)
        return x

    checks.check_add_positions(good)
    expect_failure(checks.check_add_positions, lambda x, t, s=0: x + t[:x.shape[1]], "start_pos is ignored")
    expect_failure(checks.check_add_positions, in_place, "in place")
    expect_failure(checks.check_add_positions, lambda x, t, s=0: x + t[s:s + x.shape[1]], "RuntimeError")
    expect_failure(checks.check_add_positions, lambda x, t, s=0: torch.cat([x, t[s:s + x.shape[1]].expand_as(x)], -1),
                   "wrong shape")

    def rejects_an_exact_fit(x, table, start_pos=0):  # >= instead of >: the last row of the table is never used
        if start_pos + x.shape[1] >= table.shape[0]:
            raise ValueError("too long")
        return x + table[start_pos:start_pos + x.shape[1]]

    expect_failure(checks.check_add_positions, rejects_an_exact_fit, "fits exactly", "not >=")


def test_position_shift_matrix():
    checks.check_position_shift_matrix(position_shift_matrix)
    expect_failure(checks.check_position_shift_matrix, lambda k, d: position_shift_matrix(k, d).T, "transposed")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: position_shift_matrix(k + 1, d), "differ")

    def shift(k, dim, *, exponent=2, dtype=torch.float32):  # written from the angle-addition formulas
        blocks = []
        for i in range(dim // 2):
            b = k * 10000.0 ** (-exponent * i / dim)
            blocks.append(torch.tensor([[math.cos(b), math.sin(b)], [-math.sin(b), math.cos(b)]], dtype=torch.float64))
        return torch.block_diag(*blocks).to(dtype)

    checks.check_position_shift_matrix(shift)
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(k, d, exponent=1), "i/dim instead of 2i/dim")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(k, d, exponent=-2), "minus sign")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(k, d, dtype=torch.float64), "float32")
