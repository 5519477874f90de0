"""Helpers for exercise checks: compare a learner's function with the reference in `tlama_mini`
on fresh random inputs, and when it is wrong, say *how* it is wrong.

A check raises `ExerciseFailed` (an AssertionError) with a diagnosis, or prints a one-line pass.
Diagnoses come from "known mistakes": the check computes what a typical wrong implementation
would return (no 1/sqrt(d) scale, mask applied after the softmax, ...) and, if the learner's
output matches one of them, names it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
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
