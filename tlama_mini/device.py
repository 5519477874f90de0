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


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (all devices) RNGs so reruns agree."""
    random.seed(seed)
    torch.manual_seed(seed)
