"""Checks for lesson 02 (embeddings and absolute positions). Each check_<name>(fn) calls the learner's
fn on fresh random inputs, compares with tlama_mini (torch's embedding lookup, `tlama_mini.embeddings`),
and names the mistake when it can."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..embeddings import add_positions, position_shift_matrix, sinusoidal_positions
from .common import attributes_stubs, call, check_tensor, fail, passed

# Only the checks: `from tlama_mini.checks.lesson02 import *` must not hand the reference solutions to the learner.
__all__ = ["check_add_positions", "check_embed_lookup_onehot", "check_position_shift_matrix",
           "check_sinusoidal_positions"]


def _rand(lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, ()))


def _float32(name: str, out: object, what: str) -> None:
    """The instructions ask for float32; a float64 result would silently promote what it is combined with."""
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float32:
        fail(name, f"returned {out.dtype}; the exercise asks for float32",
             f"convert at the end with .float(): {what} in float64 turns the float32 tensors it meets into float64 "
             "(twice the memory, and slower)")


class _Lookups(TorchFunctionMode):
    """Watches the torch functions called inside and keeps those that read rows of `table` directly (indexing
    it with a tensor, F.embedding, index_select, gather): the lookup the exercise asks to replace by a matmul."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table, self.found = table, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = list(args) + list(kwargs.values())
        name = getattr(func, "__name__", str(func))
        if any(a is self.table for a in operands):
            if name == "__getitem__" and len(args) > 1 and args[0] is self.table and any(
                    isinstance(i, torch.Tensor) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
                self.found.append("table[ids]")
            elif name in ("embedding", "index_select", "gather", "take", "take_along_dim"):
                self.found.append(name)
        return func(*args, **kwargs)


@attributes_stubs
def check_embed_lookup_onehot(fn) -> None:
    """fn(ids (B, T) int64, table (V, C) float) -> (B, T, C), computed as one_hot(ids) @ table: the exercise's
    rule (no lookup of the table's rows) is watched."""
    name = "embed_lookup_onehot"
    B, T, C = _rand(2, 3), _rand(4, 7), _rand(5, 9)
    V = _rand(C + 4, 20)  # V - 3 > C
    table = torch.randn(V, C)
    ids = torch.randint(0, V - 2, (B, T))  # the largest ids never occur: F.one_hot(ids) alone is too narrow
    ids[0, 0] = V - 3                       # and an id >= C always occurs: num_classes = C is refused
    watch = _Lookups(table)
    try:
        with watch:
            out = fn(ids, table)
    except NotImplementedError:  # a RuntimeError too, but the stub: the exercise is still to do
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "one_hot" in msg:
            fail(name, f"F.one_hot failed: {msg}", "F.one_hot takes the int64 ids themselves (not a float "
                 "tensor) and num_classes = V = table.shape[0]")
        if "num_classes" in msg or "class values" in msg.lower():
            fail(name, f"F.one_hot failed: {msg}", f"num_classes is the vocabulary size V = table.shape[0] = {V} "
                 f"(the table's rows), not table.shape[1] = {C} (its width)")
        if "dtype" in msg or "Long" in msg:
            fail(name, f"the matmul failed: {msg}",
                 "F.one_hot returns int64; convert it with .to(table.dtype) before multiplying")
        if "shape" in msg or "size" in msg:
            fail(name, f"the matmul failed: {msg}",
                 "the one-hot needs V columns: F.one_hot(ids) alone makes only max(ids) + 1, so pass "
                 "num_classes=table.shape[0]; then multiply by the table (V, C) as it is, not transposed")
        fail(name, f"crashed with {type(err).__name__}: {msg}", "F.one_hot(ids, num_classes=table.shape[0])"
             ".to(table.dtype) @ table")
    if watch.found:
        fail(name, f"the table's rows were looked up directly ({', '.join(sorted(set(watch.found)))}); the exercise "
             "asks for the same result as a matrix product, without indexing the table",
             "one_hot = F.one_hot(ids, num_classes=table.shape[0]).to(table.dtype)  # (B, T, V); "
             "return one_hot @ table")
    expected = F.embedding(ids, table)  # (B, T, C): the lookup table[ids]
    diff = check_tensor(name, out, expected, hint="one-hot rows (B, T, V) times the table (V, C) give (B, T, C)")
    passed(name, f"max abs diff {diff:.1e}, ids {tuple(ids.shape)}, table ({V}, {C})")


@attributes_stubs
def check_sinusoidal_positions(fn) -> None:
    """fn(n_pos, dim) -> (n_pos, dim) with pe[p, 2i] = sin(p w_i), pe[p, 2i+1] = cos(p w_i),
    w_i = 10000 ** (-2i / dim)."""
    name = "sinusoidal_positions"
    n_pos, dim = _rand(30, 60), 2 * _rand(4, 12)  # n_pos > dim: a transposed table has the wrong shape
    out = call(name, fn, n_pos, dim, hint="angles (n_pos, dim/2) = positions (n_pos, 1) * frequencies (dim/2,): "
               "give the positions a trailing dimension ([:, None]) so that they broadcast")
    expected = sinusoidal_positions(n_pos, dim)
    _float32(name, out, "a position table")
    p = torch.arange(n_pos, dtype=torch.float64)[:, None]   # (P, 1)
    i = torch.arange(0, dim, 2, dtype=torch.float64)         # (C/2,): 2i
    j = torch.arange(dim, dtype=torch.float64)               # (C,): column index

    def interleave(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (P, C/2) x2 -> (P, C)
        return torch.stack([s, c], -1).flatten(1).float()

    def table(freqs: torch.Tensor, start: int = 0) -> torch.Tensor:
        a = (p + start) * freqs
        return interleave(a.sin(), a.cos())

    w = 10000.0 ** (-i / dim)
    mistakes = {
        "sin and cos are swapped (even columns 2i are sin, odd columns 2i+1 are cos)":
            lambda: interleave((p * w).cos(), (p * w).sin()),
        "the sines and cosines are concatenated [sin | cos] instead of interleaved (sin, cos, sin, cos, ...)":
            lambda: torch.cat([(p * w).sin(), (p * w).cos()], -1).float(),
        "the cosines come first and are concatenated [cos | sin]":
            lambda: torch.cat([(p * w).cos(), (p * w).sin()], -1).float(),
        "each column j uses its own exponent j/dim; both columns of pair i must share 10000**(-2i/dim)":
            lambda: torch.where(j.long() % 2 == 0, (p * 10000.0 ** (-j / dim)).sin(),
                                (p * 10000.0 ** (-j / dim)).cos()).float(),
        "the exponent is i/dim instead of 2i/dim (use the column index 2i, or 2 * pair index)":
            lambda: table(10000.0 ** (-(i / 2) / dim)),
        "the exponent is missing its minus sign: w_i = 1 / 10000**(2i/dim), not 10000**(2i/dim)":
            lambda: table(10000.0 ** (i / dim)),
        "the exponent is not divided by dim: w_i = 10000**(-2i/dim)": lambda: table(10000.0 ** (-i)),
        "the positions start at 1; they start at 0 (the first row is sin 0 = 0, cos 0 = 1)": lambda: table(w, 1),
    }
    diff = check_tensor(name, out, expected, atol=1e-4, mistakes=mistakes,
                        hint="pe[p, 2i] = sin(p * 10000**(-2i/dim)), pe[p, 2i+1] = cos(same angle)")
    passed(name, f"max abs diff {diff:.1e} for n_pos={n_pos}, dim={dim}")


@attributes_stubs
def check_add_positions(fn) -> None:
    """fn(x (B, T, C), pos_table (P, C), start_pos) -> (B, T, C) = x + pos_table[start_pos:start_pos+T];
    raises ValueError when start_pos + T > P."""
    name = "add_positions"
    B, C = _rand(2, 4), _rand(4, 8)
    T = B + _rand(1, 3)  # T != B: a (T, 1, C) slice that broadcasts to (T, T, C) cannot pass for (B, T, C)
    P = T + _rand(6, 10)
    x, table = torch.randn(B, T, C), torch.randn(P, C)
    start = _rand(1, P - T - 1)  # not the last rows: a slice one row too late still has T rows, and is named
    x_before = x.clone()

    def fitting(start_pos: int) -> object:  # fn on positions that fit the table: no ValueError allowed
        class Refused(Exception):  # the learner's ValueError, kept apart from the crashes `call` reports
            pass

        def run() -> object:
            try:
                return fn(x, table, start_pos)
            except ValueError as e:
                raise Refused(e) from None

        try:
            return call(name + f" (start_pos={start_pos})", run,
                        hint=f"rows start_pos .. start_pos + T - 1 of the table: pos_table[start_pos:start_pos + T] "
                        f"is (T, C) = ({T}, {C}) and broadcasts against x (B, T, C)")
        except Refused as refused:
            e = refused.args[0]
            exact = " exactly" if start_pos + T == P else ""
            fail(name, f"start_pos={start_pos} with T={T} uses rows {start_pos}..{start_pos + T - 1} of a table of "
                 f"{P} rows, which fits{exact}, but it raised ValueError({e})",
                 "raise only when start_pos + T > P (not >=)" if exact else "raise only when start_pos + T > P")

    out = fitting(start)
    if not torch.equal(x, x_before):
        fail(name, "x was modified in place", "return x + ... (a new tensor) instead of x += ...")
    mistakes = {
        "start_pos is ignored: x starts at row start_pos of the table, not row 0": lambda: x + table[:T],
        "only the positions are returned; add them to x": lambda: table[start:start + T].expand(B, T, C),
    }
    mistakes["the table is sliced one row too late (rows start_pos+1 .. start_pos+T)"] = \
        lambda: x + table[start + 1:start + T + 1]
    diff = check_tensor(name, out, add_positions(x, table, start), mistakes=mistakes,
                        hint="x (B, T, C) + pos_table[start_pos:start_pos + T] (T, C) broadcasts over B")
    check_tensor(name + " (start_pos=0)", fitting(0), add_positions(x, table, 0))
    check_tensor(name + f" (start_pos={P - T}, the last rows)", fitting(P - T), add_positions(x, table, P - T))
    try:
        fn(torch.randn(B, P - 2, C), table, 3)
    except ValueError:
        pass
    except Exception as err:
        fail(name, f"a sequence that does not fit the table raised {type(err).__name__}, not ValueError",
             "check start_pos + T <= P first and raise ValueError with a message that says what to change")
    else:
        fail(name, f"positions 3..{P} do not fit a table of {P} rows, but no error was raised",
             "pos_table[a:b] silently returns fewer rows past the end; check start_pos + T <= P and raise ValueError")
    passed(name, f"max abs diff {diff:.1e}, x {tuple(x.shape)}, table ({P}, {C}), start_pos={start}")


@attributes_stubs
def check_position_shift_matrix(fn) -> None:
    """fn(k, dim) -> M (dim, dim) with pe[p + k] = M @ pe[p] for the interleaved sinusoidal table."""
    name = "position_shift_matrix"
    k, dim = _rand(2, 12), 2 * _rand(3, 8)  # k >= 2: a matrix that moves by 1 whatever k is shows
    M = call(name, fn, k, dim, hint="one 2x2 block [[cos b, sin b], [-sin b, cos b]] per pair, as a tensor, and "
             "torch.block_diag(*blocks) (it takes tensors, one argument per block)")
    expected = position_shift_matrix(k, dim)
    _float32(name, M, "a matrix")

    def blocks(exponent: torch.Tensor) -> torch.Tensor:  # the right 2x2 blocks for angles k * 10000**exponent
        b = k * 10000.0 ** exponent
        c, s_ = b.cos(), b.sin()
        return torch.block_diag(*[torch.stack([torch.stack([ci, si]), torch.stack([-si, ci])])
                                  for ci, si in zip(c, s_)]).float()

    i2 = torch.arange(0, dim, 2, dtype=torch.float64)  # 2i
    mistakes = {
        "the angles use the exponent i/dim instead of 2i/dim (i counts pairs: w_i = 10000**(-2i/dim))":
            blocks(-i2 / 2 / dim),
        "the exponent is missing its minus sign: w_i = 10000**(-2i/dim), not 10000**(2i/dim)": blocks(i2 / dim),
        "M is transposed: this matrix moves *back* k positions (pe[p - k] = M @ pe[p])": expected.T.contiguous(),
        "M moves by 1 position whatever k is (the angle of pair i is k * w_i)": position_shift_matrix(1, dim),
    }
    diff = check_tensor(name, M, expected, atol=1e-4, mistakes=mistakes,
                        hint="pair (sin a, cos a) -> (sin(a+b), cos(a+b)) with b = k w_i: "
                             "sin(a+b) = sin a cos b + cos a sin b, cos(a+b) = cos a cos b - sin a sin b")
    pe = sinusoidal_positions(40 + k, dim)
    moved = (pe[:-k] @ M.float().T - pe[k:]).abs().max().item()  # row p of pe[:-k] @ M^T is M @ pe[p]
    passed(name, f"max abs diff {diff:.1e}; M @ pe[p] matches pe[p + {k}] to {moved:.1e} (dim={dim})")
