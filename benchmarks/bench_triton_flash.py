"""Speed of causal attention, forward and forward + backward: SDPA, `tlama_mini.flash` (tiles in
PyTorch) and `tlama_mini.triton_flash` (fused Triton kernels), in TFLOP/s.

    python benchmarks/bench_triton_flash.py                      # CUDA: T = 1k 2k 4k 8k 16k, B=1, H=16, D=64, bf16
    python benchmarks/bench_triton_flash.py --quick              # CPU without a GPU: T = 64 (Triton's interpreter)
    python benchmarks/bench_triton_flash.py --out benchmarks/triton_flash.md

FLOPs counted as FlashAttention-2 counts them: forward 4 B H T S D, halved for causal attention;
forward + backward 3.5 times the forward (the backward does 2.5 times the forward's matmul work).
Time: the best of --repeats runs after a warm-up (which also compiles the Triton kernels). The table
also reports each method's max |difference| from SDPA's output. Under the interpreter (no GPU) the
times say how slow the interpreter is, nothing about a GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tlama_mini.attention import attention  # noqa: E402
from tlama_mini.flash import flash_attention  # noqa: E402
from tlama_mini.triton_flash import triton_flash_attention  # noqa: E402

METHODS = {
    "sdpa": lambda q, k, v: attention(q, k, v, is_causal=True, backend="sdpa"),
    "flash (PyTorch tiles)": lambda q, k, v: flash_attention(q, k, v, True, block_size=128),
    "triton": lambda q, k, v: triton_flash_attention(q, k, v, causal=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compiles the Triton kernels)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(method: str, T: int, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, T, a.dim, generator=g, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    fn = METHODS[method]
    with torch.no_grad():
        fwd = best_time(lambda: fn(q, k, v), device, a.repeats)
        out = fn(q, k, v)
        ref = METHODS["sdpa"](q, k, v)
    dout = torch.randn_like(out)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)
    both = best_time(step, device, a.repeats)
    flops = 4 * a.heads * T * T * a.dim / 2  # causal: half the (T, T) scores
    return {"fwd_ms": 1e3 * fwd, "fwd_tflops": flops / fwd / 1e12, "both_ms": 1e3 * both,
            "both_tflops": 3.5 * flops / both / 1e12, "diff": (out.float() - ref.float()).abs().max().item()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--quick", action="store_true", help="T = 64, B=1, H=2, D=16 (a smoke test; CI)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        a.lengths, a.heads, a.dim, a.repeats = [64], 2, 16, 1
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'} (Triton interpreter)"
    lines = [f"device: {name}; torch {torch.__version__}; B=1, H={a.heads}, D={a.dim}, {dtype}, causal",
             "", "| T | method | forward ms | forward TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | max diff vs SDPA |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for T in a.lengths:
        for method in a.methods:
            try:
                r = measure(method, T, a, device, dtype)
            except torch.OutOfMemoryError:
                row = f"| {T} | {method} | out of memory | | | | |"
            else:
                row = (f"| {T} | {method} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.2f} | {r['both_ms']:.2f} | "
                       f"{r['both_tflops']:.2f} | {r['diff']:.1e} |")
            print(row, flush=True)
            lines.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
