"""Helpers for exercise checks: compare a learner's function with the reference in `tlama_mini`
on fresh random inputs, and when it is wrong, say *how* it is wrong.

A check raises `ExerciseFailed` (an AssertionError) with a diagnosis, or prints a one-line pass.
Diagnoses come from "known mistakes": the check computes what a typical wrong implementation
would return (no 1/sqrt(d) scale, mask applied after the softmax, ...) and, if the learner's
output matches one of them, names it.

Four properties every check has (the house style; a learner's probe found each one missing somewhere):
1. No wrong answer passes on any draw. Random sizes and constants are fine, but every call includes draws in
   which each known mistake shows: odd and even lengths, constants other than the lesson's defaults (a scale
   that is not 1 / sqrt(D), an alpha that is not r), sizes that differ where a mix-up would go unseen
   (T != H, BLOCK_M != BLOCK_N, O != I), a last tile that raises the running maximum; or two calls that
   together rule the mistake out.
2. A rule the exercise states is checked (e.g. by watching the shapes the learner's code creates), or the
   exercise does not call it a rule.
3. A diagnosis names the mistake that is there and never another: markers (for "never written") are values
   the learner's code cannot produce by mistake (not NaN, not 0), the candidate mistakes are kept apart by
   the draw, and a symptom is confirmed before it is named.
4. A crash inside the learner's code becomes a diagnosis with a hint (`call`), not a raw traceback.
Each realistic mistake is a wrong solution in tests/test_checks_lessonNN.py, rejected by name on every one of
many seeds (`expect_failure_on_every_draw`).
"""
from __future__ import annotations

import functools
import random
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


class ExerciseFailed(AssertionError):
    """The learner's function ran but gave a wrong answer; the message says what is wrong."""


def fail(name: str, problem: str, hint: str = "") -> None:
    raise ExerciseFailed(f"✗ {name}: {problem}" + (f"\n  hint: {hint}" if hint else ""))


def passed(name: str, detail: str = "") -> None:
    print(f"✓ {name}: correct" + (f" ({detail})" if detail else ""))


def check_tensor(name: str, out: Any, expected: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-4,
                 mistakes: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]] | None = None,
                 hint: str = "") -> float:
    """Compare `out` with `expected`; on a mismatch, name the matching known mistake if any.
    Returns the max abs difference."""
    if not isinstance(out, torch.Tensor):
        fail(name, f"returned {type(out).__name__}, expected a torch.Tensor", "did you forget a `return`?")
    if out.shape != expected.shape:
        fail(name, f"wrong shape {tuple(out.shape)}, expected {tuple(expected.shape)}", hint)
    if out.dtype != expected.dtype and out.is_floating_point() != expected.is_floating_point():
        fail(name, f"wrong dtype {out.dtype}, expected {expected.dtype}", hint)
    out_c, exp_c = out.detach().to(expected.dtype), expected.detach()
    if torch.isnan(out_c).any() and not torch.isnan(exp_c).any():
        fail(name, "output contains NaN where the reference has none",
             hint or "a row whose scores are all -inf gives NaN after softmax (0/0)")
    diff = (out_c - exp_c).abs().nan_to_num(0.0).max().item() if out_c.numel() else 0.0
    if torch.allclose(out_c, exp_c, atol=atol, rtol=rtol, equal_nan=True):
        return diff
    for mistake, value in (mistakes or {}).items():
        value = value() if callable(value) else value
        if value.shape == out_c.shape and torch.allclose(out_c, value.to(out_c.dtype), atol=atol, rtol=rtol, equal_nan=True):
            fail(name, f"the output matches a known mistake: {mistake}", hint)
    fail(name, f"values differ from the reference (max abs difference {diff:.3g}, tolerance {atol:g})", hint)
    return diff


def call(name: str, fn: Callable, *args: Any, hint: str = "") -> Any:
    """Run the learner's fn; a crash inside it (a shape or dtype error) becomes a failure that quotes the
    error's first line, with `hint`. NotImplementedError passes through: the exercise is still to do."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        if "view size is not compatible" in str(e):
            hint = ("after a transpose the tensor is not contiguous in memory, so .view cannot merge those "
                    "dimensions: use .reshape (or .contiguous().view)")
        fail(name, f"crashed with {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", hint)


def compare(name: str, out: Any, expected: torch.Tensor, *, mistakes: Mapping[str, Callable[[], torch.Tensor]],
            hint: str = "", nan_hint: str = "", atol: float = 1e-5) -> float:
    """check_tensor, plus: a known mistake is named even when its output has another shape or contains NaN
    (an inverted causal mask leaves the last query no key), and `hint` is shown only when none matches."""
    if isinstance(out, torch.Tensor):
        got = out.detach().to(expected.dtype)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=1e-4, equal_nan=True):
            for mistake, make in mistakes.items():
                value = make()
                for v in (value, value.nan_to_num(0.0)):  # NaN-safe learners turn the NaN row into zeros
                    if v.shape == got.shape and torch.allclose(got, v, atol=atol, rtol=1e-4, equal_nan=True):
                        fail(name, f"the output matches a known mistake: {mistake}")
            if got.shape == expected.shape and torch.isnan(got).any() and nan_hint:
                fail(name, "output contains NaN where the reference has none", nan_hint)
    try:
        return check_tensor(name, out, expected, atol=atol)
    except ExerciseFailed as e:
        if hint and "hint:" not in str(e):
            raise ExerciseFailed(f"{e}\n  hint: {hint}") from None
        raise


def check_unchanged(name: str, given: torch.Tensor, original: torch.Tensor, what: str, hint: str) -> None:
    """Fail if the learner's fn changed its input `given` (a copy of `original`) in place."""
    if given.shape != original.shape or not torch.equal(given, original):
        fail(name, f"{what} was modified in place; the exercise asks for a new tensor and must leave its input "
             "as it was (the caller may still need it)", hint)


def _stub_raiser(e: NotImplementedError) -> str | None:
    """The function whose bare `raise NotImplementedError` (an exercise stub) this is; None for errors with a
    message (torch's own NotImplementedError for an unsupported operation names what is missing)."""
    if e.args:
        return None
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name if tb is not None else None


def attributes_stubs(check: Callable) -> Callable:
    """Decorate a check_<name>: when the learner's <name> itself is done but calls another function that is
    still a stub (exercise 3 reusing exercise 1, as the exercises invite), say which function raised instead of
    reporting <name> as not implemented."""
    exercise = check.__name__.removeprefix("check_")

    @functools.wraps(check)
    def wrapper(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return check(fn, *args, **kwargs)
        except NotImplementedError as e:
            raiser = _stub_raiser(e)
            if raiser is None or raiser in (exercise, getattr(fn, "__name__", exercise)):
                raise
            others = [c.removeprefix("check_") for c in getattr(sys.modules[check.__module__], "__all__", [])]
            what = "another exercise of this lesson, " if raiser in others else ""
            raise NotImplementedError(
                f"{exercise} could not be checked: it calls {raiser}(), {what}which is not implemented yet (it "
                f"raises NotImplementedError). Finish {raiser} first (its own check says when it is right)"
            ) from None
    return wrapper


def expect_failure(check: Callable[[Any], None], fn: Any, *words: str) -> str:
    """Testing the checks themselves: `check(fn)` must reject the wrong `fn` with a message that contains
    every one of `words`. Returns the message."""
    try:
        check(fn)
    except ExerciseFailed as e:
        message = str(e)
    else:
        raise AssertionError(f"{getattr(check, '__name__', check)} accepted a wrong implementation")
    missing = [w for w in words if w not in message]
    assert not missing, f"message lacks {missing}: {message}"
    return message


def expect_failure_on_every_draw(check: Callable[[Any], None], fn: Any, *words: str,
                                 seeds: Iterable[int] = range(30)) -> str:
    """Testing the checks themselves: `expect_failure(check, fn, *words)` with Python's and torch's random
    generators seeded with each of `seeds` in turn, so that a mistake that shows only on some draws (an odd
    length, a constant that is not the default) fails the test. Returns the last draw's message."""
    message = ""
    for seed in seeds:
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            message = expect_failure(check, fn, *words)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from None
    return message
