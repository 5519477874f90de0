"""Test-wide setup, loaded for tests/, notebooks/ and solutions/ alike (nbval kernels inherit it).

Data needs no setup: tests and notebooks find files the way the package does (the small files ship
inside it, see tlama_mini/paths.py), so nothing needs the network or ../shared. Without a CUDA GPU, Triton
kernels (tlama_mini.triton_flash) run under Triton's CPU interpreter, a switch that must be set before
triton is first imported. Under pytest-xdist, each worker's thread count is its share of the cores.
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
# Under pytest-xdist (`-n auto`) each worker gets its share of the cores, so that the workers, their notebook
# kernels and subprocesses (which inherit the variable) do not run more threads than there are cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
