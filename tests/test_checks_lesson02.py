"""The lesson-02 checks accept correct answers and reject each typical wrong one with the right diagnosis on
every draw (every wrong solution runs through its check over many seeds); and the reference
`tlama_mini.embeddings` agrees with independent formulas."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from tlama_mini.checks import lesson02 as checks
from tlama_mini.checks.common import expect_failure_on_every_draw
from tlama_mini.embeddings import add_positions, position_shift_matrix, sinusoidal_positions


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
SEEDS = range(30)


def expect_failure(check, fn, *words):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed."""
    expect_failure_on_every_draw(check, fn, *words, seeds=SEEDS)


def passes_on_every_draw(check, *fns):
    for seed in SEEDS:
        random.seed(seed)
        torch.manual_seed(seed)
        for fn in fns:
            check(fn)


def test_embed_lookup_onehot():
    def good(ids, table):
        return F.one_hot(ids, table.shape[0]).to(table.dtype) @ table

    def eye_rows(ids, table):  # rows of an identity matrix are one-hot vectors too (eye is indexed, not the table)
        return torch.eye(table.shape[0], dtype=table.dtype)[ids] @ table

    def einsum(ids, table):
        return torch.einsum("btv,vc->btc", F.one_hot(ids, table.shape[0]).type_as(table), table)

    passes_on_every_draw(checks.check_embed_lookup_onehot, good, eye_rows, einsum)
    check = checks.check_embed_lookup_onehot
    expect_failure(check, lambda ids, t: F.one_hot(ids).to(t.dtype) @ t, "num_classes")
    expect_failure(check, lambda ids, t: F.one_hot(ids, t.shape[0]) @ t, "int64")
    expect_failure(check, lambda ids, t: F.one_hot(ids, t.shape[0]).float(), "wrong shape")
    expect_failure(check, lambda ids, t: F.one_hot(ids, t.shape[1]).to(t.dtype) @ t, "F.one_hot failed",
                   "not table.shape[1]")  # num_classes = C: an id >= C occurs in every draw
    expect_failure(check, lambda ids, t: F.one_hot(ids, t.shape[0]).to(t.dtype) @ t.T, "not transposed")
    expect_failure(check, lambda ids, t: F.one_hot(ids.float(), t.shape[0]).to(t.dtype) @ t, "F.one_hot failed",
                   "int64 ids")
    # the rule "do not index the table" is watched
    expect_failure(check, lambda ids, t: t[ids], "looked up directly", "table[ids]")
    expect_failure(check, lambda ids, t: F.embedding(ids, t), "looked up directly", "embedding")
    expect_failure(check, lambda ids, t: t.index_select(0, ids.flatten()).view(*ids.shape, -1), "index_select")
    expect_failure(check, lambda ids, t: (F.one_hot(ids, t.shape[0]).to(t.dtype) @ t) + 0 * t[ids], "looked up")


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
    passes_on_every_draw(checks.check_sinusoidal_positions, _pe)
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, swap=True), "swapped")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, concat=True), "concatenated")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, per_column=True), "its own exponent")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d, start=1), "start at 1")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d).T, "wrong shape")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: _pe(n, d).double(), "float64", "float32")

    def angles(n, d, *, i_over_dim=False, sign=-1, by_dim=True):
        p = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(d // 2, dtype=torch.float64)
        a = p * 10000.0 ** (sign * (1 if i_over_dim else 2) * i / (d if by_dim else 1))
        return torch.stack([a.sin(), a.cos()], -1).flatten(1).float()

    expect_failure(checks.check_sinusoidal_positions, lambda n, d: angles(n, d, i_over_dim=True), "i/dim instead")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: angles(n, d, sign=1), "minus sign")
    expect_failure(checks.check_sinusoidal_positions, lambda n, d: angles(n, d, by_dim=False), "not divided by dim")

    def no_broadcast(n, d):  # positions (n,) times frequencies (d/2,): the positions lack their trailing dim
        a = torch.arange(n) * 10000.0 ** (-torch.arange(0, d, 2) / d)
        return torch.stack([a.sin(), a.cos()], -1).flatten(1)

    expect_failure(checks.check_sinusoidal_positions, no_broadcast, "crashed with RuntimeError", "[:, None]")


def test_add_positions():
    def good(x, table, start_pos=0):
        if start_pos + x.shape[1] > table.shape[0]:
            raise ValueError("too long")
        return x + table[start_pos:start_pos + x.shape[1]]

    def in_place(x, table, start_pos=0):
        x += good(torch.zeros_like(x), table, start_pos)
        return x

    passes_on_every_draw(checks.check_add_positions, good)
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

    def one_row_late(x, table, start_pos=0):  # rows start_pos+1 .. start_pos+T
        if start_pos + x.shape[1] > table.shape[0]:
            raise ValueError("too long")
        return x + table[start_pos + 1:start_pos + 1 + x.shape[1]]

    def never_raises(x, table, start_pos=0):  # the slice past the end silently has fewer rows, then broadcasting fails
        return x + table[start_pos:start_pos + x.shape[1]]

    expect_failure(checks.check_add_positions, one_row_late, "one row too late")
    expect_failure(checks.check_add_positions, never_raises, "raised RuntimeError, not ValueError")
    expect_failure(checks.check_add_positions, lambda x, t, s=0: t[s:s + x.shape[1]].expand_as(x).clone(),
                   "only the positions")

    def broadcast_wrong(x, table, start_pos=0):  # (T, C) made (T, 1, C): broadcasting crashes inside the learner's code
        return x + table[start_pos:start_pos + x.shape[1], None]

    expect_failure(checks.check_add_positions, broadcast_wrong, "crashed with RuntimeError", "broadcasts")


def test_position_shift_matrix():
    passes_on_every_draw(checks.check_position_shift_matrix, position_shift_matrix)
    expect_failure(checks.check_position_shift_matrix, lambda k, d: position_shift_matrix(k, d).T, "transposed")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: position_shift_matrix(k + 1, d), "differ")

    def shift(k, dim, *, exponent=2, dtype=torch.float32):  # written from the angle-addition formulas
        blocks = []
        for i in range(dim // 2):
            b = k * 10000.0 ** (-exponent * i / dim)
            blocks.append(torch.tensor([[math.cos(b), math.sin(b)], [-math.sin(b), math.cos(b)]], dtype=torch.float64))
        return torch.block_diag(*blocks).to(dtype)

    passes_on_every_draw(checks.check_position_shift_matrix, shift)
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(k, d, exponent=1), "i/dim instead of 2i/dim")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(k, d, exponent=-2), "minus sign")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(k, d, dtype=torch.float64), "float32")
    expect_failure(checks.check_position_shift_matrix, lambda k, d: shift(1, d), "whatever k is")  # k >= 2 each draw

    def lists_to_block_diag(k, dim):  # block_diag takes tensors: a crash inside the learner's code
        return torch.block_diag(*[[[1.0, 0.0], [0.0, 1.0]]] * (dim // 2))

    expect_failure(checks.check_position_shift_matrix, lists_to_block_diag, "crashed with TypeError", "block_diag")
