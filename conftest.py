"""Test-wide setup, loaded for tests/, notebooks/ and solutions/ alike (nbval kernels inherit it).

Points the package at the offline data beside the checkout (../shared/data) unless the caller has
already chosen a location, so no test or notebook ever needs the network. Without a CUDA GPU, Triton
kernels (tlama_mini.triton_flash) run under Triton's CPU interpreter, a switch that must be set before
triton is first imported.
"""
import os
from pathlib import Path

_DATA = (Path(__file__).resolve().parent.parent / "shared" / "data").resolve()
if _DATA.is_dir():
    os.environ.setdefault("TLAMA_DATA_DIR", str(_DATA))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_DATA / "tiktoken" / "cache"))
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
