"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) for the linears of attention and the FFN.

A column-parallel linear splits its *output* features over the ranks of a process group; a
row-parallel linear splits its *input* features and sums the partial results with an all-reduce.
Chaining column -> row (Wq/Wk/Wv -> Wo, w1/w3 -> w2) needs one all-reduce per block in the
forward pass and one in the backward pass.

Tensor parallelism is off until `init_tensor_parallel()` is called inside an initialised
`torch.distributed` job; until then `column_linear`/`row_linear` return plain `nn.Linear`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_TP_GROUP: dist.ProcessGroup | None = None  # set once per process by init_tensor_parallel


def init_tensor_parallel(group: dist.ProcessGroup | None = None) -> None:
    """Shard the model's linears over `group` (default: all ranks). Call after init_process_group."""
    global _TP_GROUP
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_tensor_parallel needs torch.distributed.init_process_group() first")
    _TP_GROUP = group if group is not None else dist.group.WORLD


def tp_world_size() -> int:
    return dist.get_world_size(_TP_GROUP) if _TP_GROUP is not None else 1


def tp_rank() -> int:
    return dist.get_rank(_TP_GROUP) if _TP_GROUP is not None else 0


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input fed every rank)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=_TP_GROUP)
        return grad


class _ReduceFromParallel(torch.autograd.Function):
    """All-reduce forward (sum the partial products); identity backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, group=_TP_GROUP)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


def _shard(n: int, what: str) -> int:
    world = tp_world_size()
    if n % world:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel world size ({world})")
    return n // world


class ColumnParallelLinear(nn.Module):
    """y[..., shard] = x @ W[shard].T: each rank holds out_features / world rows of W."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(_shard(out_features, "out_features"), in_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToParallel.apply(x), self.weight)  # (..., out / world)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., shard] @ W[:, shard].T: input arrives already split."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, _shard(in_features, "in_features")))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromParallel.apply(F.linear(x, self.weight))  # (..., out)


def column_linear(in_features: int, out_features: int, use_parallel: bool) -> nn.Module:
    if use_parallel and tp_world_size() > 1:
        return ColumnParallelLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)


def row_linear(in_features: int, out_features: int, use_parallel: bool) -> nn.Module:
    if use_parallel and tp_world_size() > 1:
        return RowParallelLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)
