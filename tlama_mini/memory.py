"""Peak memory of a piece of PyTorch work, measured the way lesson 08 does.

- CPU (and any device): `PeakMemory`, a TorchDispatchMode that sees every tensor an operator
  creates inside the `with` block (forward and backward, recomputations included), adds its
  storage's bytes when it appears and subtracts them when the storage is freed, and keeps the
  peak. Only tensors created inside the block count: parameters and inputs made before it are the
  baseline, so the number is what the step itself needs on top of the model. It is exact for
  torch's own allocations and independent of the allocator, the OS and other processes (the
  resident set size is none of these).
- CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the call.
`peak_memory(fn, device)` picks one. Lesson 08 builds `PeakMemory` from scratch; lesson 12 and
benchmarks/bench_long_context.py use this one.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """with PeakMemory() as m: ...  ->  m.peak (bytes), m.live (bytes still held at the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                # a new allocation: not a view of an input (a slice of a tensor made before the block) nor of
                # a tensor already counted
                if key not in self.seen and key not in inputs and size > 0:
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        if key in self.seen:
            self.seen.discard(key)
            self.live -= size


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Run fn() once and return its peak extra memory in bytes: torch.cuda.max_memory_allocated on
    CUDA, `PeakMemory` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakMemory() as tracker:
        fn()
    return tracker.peak
