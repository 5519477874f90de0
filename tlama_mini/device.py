"""Pick the best available device, and seed every random number generator. Lessons and the
trainer use these, so the same code runs unchanged on CUDA, Apple's MPS, and CPU."""
from __future__ import annotations

import random

import torch


def get_device(preferred: str | None = None) -> torch.device:
    """`preferred` ("cuda", "mps", "cpu", "cuda:1", ...) if given and available, else CUDA > MPS > CPU."""
    if preferred not in (None, "auto"):
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preferred!r} requested but CUDA is not available; use --device cpu or auto")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {preferred!r} requested but MPS is not available; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX): bf16 autocast is ~1.25x faster there, slower elsewhere."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat float32 on `device`: CUDA with bf16 support, or a CPU with native bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (all devices) RNGs so reruns agree."""
    random.seed(seed)
    torch.manual_seed(seed)
