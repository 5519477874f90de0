"""Test-wide setup, loaded for tests/, notebooks/ and solutions/ alike (nbval kernels inherit it).

Data needs no setup: tests and notebooks find files the way the package does (the small files ship
inside it, see tlama_mini/paths.py), so nothing needs the network or ../shared. Without a CUDA GPU, Triton
kernels (tlama_mini.triton_flash) run under Triton's CPU interpreter, a switch that must be set before
triton is first imported.
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
