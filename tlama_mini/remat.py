"""Activation checkpointing ("rematerialisation") policies, named as in JAX's
`jax.checkpoint_policies`, which seed 002's blockwise functions take as `policy`.

A checkpointed function keeps only its inputs in the forward pass and runs again in the backward
pass to rebuild what the gradients need (Chen et al. 2016). A policy says which intermediate
results may be kept anyway, trading memory for recomputation:

    "nothing_saveable"                  keep nothing inside: least memory, one extra forward
    "everything_saveable"               keep everything: no checkpointing at all
    "dots_saveable" / "checkpoint_dots" keep the outputs of matrix products (mm, addmm, bmm, baddbmm),
                                        recompute the cheap elementwise work (softmax, GELU, masks)
    "dots_with_no_batch_dims_saveable" / "checkpoint_dots_with_no_batch_dims"
                                        keep only products without batch dimensions (mm, addmm:
                                        the linear layers), recompute the batched ones (attention's bmm)

In PyTorch the dots policies use selective activation checkpointing
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`).

`prevent_cse`: in JAX, `jax.checkpoint(prevent_cse=True)` stops XLA from merging the backward's
recomputation with the forward's identical computation (common-subexpression elimination), which
would silently undo the checkpoint. PyTorch's eager mode has no compiler that could do that, so the
flag is accepted and validated and changes nothing here.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_DOTS = [_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default]
_DOTS_NO_BATCH = [_aten.mm.default, _aten.addmm.default]
POLICIES = {"nothing_saveable": None, "everything_saveable": None,
            "dots_saveable": _DOTS, "checkpoint_dots": _DOTS,
            "dots_with_no_batch_dims_saveable": _DOTS_NO_BATCH,
            "checkpoint_dots_with_no_batch_dims": _DOTS_NO_BATCH}


def check_policy(policy: str | None, prevent_cse: bool | None = False) -> str:
    """Validate (policy, prevent_cse); None means "nothing_saveable". Returns the policy name."""
    policy = "nothing_saveable" if policy is None else policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; use one of {sorted(POLICIES)}")
    if prevent_cse is not None and not isinstance(prevent_cse, bool):
        raise ValueError(f"prevent_cse must be a bool (or None), got {prevent_cse!r}")
    return policy


def remat(fn: Callable, policy: str | None = "nothing_saveable", prevent_cse: bool | None = False) -> Callable:
    """`fn` wrapped in activation checkpointing under `policy` (see the module docstring). The
    wrapped function checkpoints only while autograd records (training); under `torch.no_grad()` it
    is `fn`. Random ops (dropout) replay the same numbers in the recomputation (torch saves and
    restores the RNG state)."""
    policy = check_policy(policy, prevent_cse)
    if policy == "everything_saveable":
        return fn
    ops = POLICIES[policy]

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if ops is None:
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, ops), **kwargs)
    return run
