"""The matrix products of one batch-1 decoding step, alone: how fast each route streams the weights.

    python benchmarks/bench_matvec.py                   # SmolLM2-135M's shapes, 1 and 2 threads
    python benchmarks/bench_matvec.py --quick           # 3 layers instead of 30 (CI)
    python benchmarks/bench_matvec.py --out benchmarks/matvec.md

A decoding step multiplies one row by every weight matrix of the model once, so on a CPU it is bound
by reading the weights from memory. This runs exactly those products for a model of SmolLM2-135M's
shape (30 blocks of Wq|Wk|Wv 960x576, Wo 576x576, w1|w3 3072x576, w2 576x1536, and the 49,152 x 576 LM
head: 513 MiB in float32; random weights, fresh for every block so nothing stays in the caches) in
four ways:

- `F.linear`, weights stored (out, in) row-major, as `nn.Linear` keeps them (and transformers' Llama);
- `tlama_mini.fuse.linear` on them: the rows cut into one block per thread, one `torch.bmm` (what
  `generate` runs for a model trained here);
- `F.linear`, weights stored transposed, as `tlama_mini.fuse.stack_linears` and the LM head keep them;
- `tlama_mini.fuse.linear` on the transposed weights: the reduction cut into one slice per thread, one
  `torch.bmm`, the partial rows added (what `generate` runs for a GGUF model).

and, as the ceiling, a plain read of the same number of bytes (`torch.sum` over one 513 MiB tensor).
Each time is the best of --repeat rounds (ms per step: every product once); GiB/s = 513 MiB / time.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from tlama_mini.fuse import linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # one block: qkv, Wo, w1|w3, w2 (out, in)
HEAD = (49152, 576)


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(layers: int, repeat: int, seed: int = 0) -> tuple[dict[str, float], int, float]:
    """({route: seconds per step} for `layers` blocks and the LM head, and the plain read of as many bytes;
    the bytes of the weights; the largest difference between the routes' products, relative to the largest
    product)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, k, generator=g) for _ in range(layers) for n, k in SHAPES] + [torch.randn(*HEAD, generator=g)]
    cols = [w.t().contiguous().t() for w in rows]  # the same values, stored transposed (strides (1, out))
    xs = {k: torch.randn(1, 1, k, generator=g) for k in {k for _, k in SHAPES}}
    block = torch.randn(sum(w.numel() for w in rows), generator=g)
    with torch.inference_mode():
        routes = {
            "F.linear, (out, in) row-major": lambda: [F.linear(xs[w.shape[1]], w) for w in rows],
            "fuse.linear, (out, in) row-major": lambda: [linear(xs[w.shape[1]], w) for w in rows],
            "F.linear, stored transposed": lambda: [F.linear(xs[w.shape[1]], w) for w in cols],
            "fuse.linear, stored transposed": lambda: [linear(xs[w.shape[1]], w) for w in cols],
            "read the same bytes (torch.sum)": lambda: block.sum(),
        }
        times = {name: _best(fn, repeat) for name, fn in routes.items()}
        outs = [fn() for fn in list(routes.values())[:4]]  # the four routes compute the same products
        diff = max(float((a - b).abs().max() / b.abs().max()) for other in outs[1:] for a, b in zip(other, outs[0]))
    return times, sum(w.numel() for w in rows) * 4, diff


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=7, help="rounds; the best is kept")
    p.add_argument("--quick", action="store_true", help="3 layers, 2 rounds (CI)")
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.repeat = 3, 2
    lines = [f"Batch-1 matrix products of {a.layers} SmolLM2-shaped blocks and the LM head, float32, CPU "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
             f"best of {a.repeat}; load average (1 min) {os.getloadavg()[0]:.1f}.", "",
             "| threads | route | ms per step | GiB/s |", "|---:|---|---:|---:|"]
    old = torch.get_num_threads()
    diffs: list[float] = []
    try:
        for threads in a.threads:
            torch.set_num_threads(threads)
            times, nbytes, diff = measure(a.layers, a.repeat)
            for name, s in times.items():
                lines.append(f"| {threads} | {name} | {s * 1e3:.1f} | {nbytes / 2**30 / s:.1f} |")
                print(lines[-1], flush=True)
            diffs.append(diff)
    finally:
        torch.set_num_threads(old)
    lines += ["", f"The four routes' products agree within {max(diffs):.1e} of the largest product (float32 round-off)."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
