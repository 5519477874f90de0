"""Time and peak memory of naive, SDPA and tiled (flash-style) causal attention.

    python benchmarks/bench_attention.py                 # T = 1024 2048 4096 8192, B=1, H=8, D=64, fp32
    python benchmarks/bench_attention.py --backward --lengths 1024 4096 8192 16384   # forward + backward
    python benchmarks/bench_attention.py --quick         # T = 256 512 (CI)
    python benchmarks/bench_attention.py --out benchmarks/attention.md
    python benchmarks/bench_attention.py --interleave 3 --threads 1 --lengths 1024 4096 8192 16384

--interleave N: SDPA and the tiled version, forward + backward, alternated N rounds in one process per
length (a busy machine then slows both alike); reports wall and process CPU time (best and median),
their ratios, the kernels one tiled call runs (`count_kernels`: each one pass over its tensors and,
with several threads, one parallel region) and the load average before and after.

Every (device, method, length) runs in a fresh Python process so the measurements cannot disturb one
another. Peak memory is the extra memory above the state right before the call:
- CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs on
  Linux; ru_maxrss elsewhere) minus the resident set before the call. tracemalloc cannot see
  torch's allocations, so it is not used.
- CUDA: torch.cuda.max_memory_allocated minus the memory allocated before the call.
Time is the best of --repeats runs after the measured one (which doubles as warm-up). Each child
saves its output; the parent reports the max |difference| from the naive output (from SDPA's where
naive is not run: above --naive-max, since its (H, T, T) matrices outgrow the memory). With --backward
every run is forward + backward (out.backward of a fixed random gradient); the summary gives the tiled
time over SDPA's per length.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

METHODS = ("naive", "sdpa", "flash")


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _attend(method: str, q, k, v, block: int):
    if method == "naive":
        from tlama_mini.attention import naive_attention
        return naive_attention(q, k, v, is_causal=True)
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from tlama_mini.flash import flash_attention
    return flash_attention(q, k, v, True, block_size=block)


def _run(method: str, q, k, v, block, dout):
    """The timed work: the forward, or with dout the forward and the backward."""
    out = _attend(method, q, k, v, block)
    if dout is not None:
        out.backward(dout)
        q.grad = k.grad = v.grad = None
    return out.detach()


# operations that only make views or allocate: no pass over memory, no parallel region
_NOT_KERNELS = {"view", "_unsafe_view", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "alias",
                "detach", "expand", "as_strided", "reshape", "_reshape_alias", "permute", "narrow", "empty",
                "empty_strided", "new_empty", "resize_", "lift_fresh"}


def count_kernels(fn) -> int:
    """The operations that run a kernel in one call of fn: the innermost ATen operations the profiler
    records (so a batched matmul that ATen runs as one matmul per head counts once per head), minus views
    and allocations. Each is one pass over its tensors and, with several threads, one parallel region."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if not e.cpu_children and e.name.startswith("aten::")
               and e.name[len("aten::"):] not in _NOT_KERNELS)


def interleaved_child(a: argparse.Namespace) -> None:
    """SDPA and flash, forward + backward, alternated --interleave rounds; prints one JSON line."""
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.length, a.dim, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, a.heads, a.length, a.dim, generator=g)
    load = os.getloadavg()[0]
    ops = count_kernels(lambda: _run("flash", q, k, v, a.block, dout))   # doubles as flash's warm-up
    _run("sdpa", q, k, v, a.block, dout)      # SDPA's warm-up
    wall = {"sdpa": [], "flash": []}
    cpu = {"sdpa": [], "flash": []}
    outs = {}
    for _ in range(a.interleave):
        for method in ("sdpa", "flash"):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[method] = _run(method, q, k, v, a.block, dout)
            cpu[method].append(time.process_time() - c0)
            wall[method].append(time.perf_counter() - t0)
    med = lambda x: sorted(x)[len(x) // 2]
    print(json.dumps({"wall": wall, "cpu": cpu, "best": {m: min(t) for m, t in wall.items()},
                      "median": {m: med(t) for m, t in wall.items()}, "cpu_best": {m: min(t) for m, t in cpu.items()},
                      "ops": ops, "load": [load, os.getloadavg()[0]],
                      "diff": float((outs["flash"] - outs["sdpa"]).abs().max())}))


def interleaved(a: argparse.Namespace, lengths: list[int]) -> str:
    threads = a.threads or torch.get_num_threads()
    lines = [f"Causal attention forward + backward, B=1, H={a.heads}, D={a.dim}, fp32, CPU, SDPA and flash "
             f"alternated {a.interleave} rounds in one process per length; flash tiles "
             f"{f'{a.block}x{a.block}' if a.block else 'from flash.default_blocks'}; torch {torch.__version__}, "
             f"{threads} threads, CPU cores {os.cpu_count()}.", "",
             "| T | SDPA ms (best / median) | flash ms (best / median) | flash / SDPA, wall (best) | "
             "flash / SDPA, CPU time (best) | flash kernels per call | max abs diff | load average (before, after) |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    for T in lengths:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--interleave", str(a.interleave),
               "--length", str(T), "--heads", str(a.heads), "--dim", str(a.dim)] + \
            (["--threads", str(a.threads)] if a.threads else []) + (["--block", str(a.block)] if a.block else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"interleaved run at T={T} failed:\n{res.stderr[-2000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        b, m, c = r["best"], r["median"], r["cpu_best"]
        lines.append(f"| {T} | {1000 * b['sdpa']:.1f} / {1000 * m['sdpa']:.1f} | {1000 * b['flash']:.1f} / "
                     f"{1000 * m['flash']:.1f} | {b['flash'] / b['sdpa']:.2f} | {c['flash'] / c['sdpa']:.2f} | "
                     f"{r['ops']} | {r['diff']:.1e} | {r['load'][0]:.1f}, {r['load'][1]:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def child(a: argparse.Namespace) -> None:
    """Run one measurement and print it as JSON."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.length, a.dim, generator=g, device=device).requires_grad_(a.backward)
               for _ in range(3))
    dout = torch.randn(1, a.heads, a.length, a.dim, generator=g, device=device) if a.backward else None
    _run(a.method, q[:, :, :8], k[:, :, :8], v[:, :, :8], a.block,
         None if dout is None else dout[:, :, :8])  # load kernels, import modules
    with torch.set_grad_enabled(a.backward):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = _run(a.method, q, k, v, a.block, dout)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            reset = _reset_peak()  # without it the high-water mark may still hold an earlier peak
            base = _rss_kib("VmRSS") if reset else _maxrss_kib()
            out = _run(a.method, q, k, v, a.block, dout)
            peak = ((_rss_kib("VmHWM") if reset else _maxrss_kib()) - base) / 1024
        times = []
        for _ in range(a.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _run(a.method, q, k, v, a.block, dout)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    torch.save(out.cpu(), a.save)
    print(json.dumps({"ms": 1000 * min(times), "peak_mib": peak}))


def measure(device: str, method: str, length: int, a: argparse.Namespace, save: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--device", device, "--method", method,
           "--length", str(length), "--heads", str(a.heads), "--dim", str(a.dim),
           "--repeats", str(a.repeats), "--save", save] + (["--threads", str(a.threads)] if a.threads else []) + \
        (["--block", str(a.block)] if a.block else []) + \
        (["--backward"] if a.backward else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{method} at T={length} on {device} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--quick", action="store_true", help="lengths 256 512, for CI")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--block", type=int, default=None, help="tile size of the flash method "
                   "(default: flash.default_blocks, chosen for the device and length)")
    p.add_argument("--backward", action="store_true", help="time forward + backward, not the forward alone")
    p.add_argument("--naive-max", type=int, default=8192, help="skip naive attention above this length")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS", help="forward + backward of SDPA "
                   "and flash alternated ROUNDS times in one process per length (CPU; no memory, no naive)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice); 1 gives "
                   "steadier numbers on a busy machine")
    # internal: one measurement in a fresh process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return interleaved_child(a) if a.interleave else child(a)
    lengths = [256, 512] if a.quick else a.lengths
    if a.interleave:
        text = interleaved(a, lengths)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        return
    devices = a.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    tiles = f"{a.block}x{a.block}" if a.block else "from flash.default_blocks"
    lines = [f"Causal attention {'forward + backward' if a.backward else 'forward'}, B=1, H={a.heads}, D={a.dim}, "
             f"fp32, flash tiles {tiles}; "
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{a.threads or torch.get_num_threads()} threads, CPU cores {os.cpu_count()}.", "",
             "| device | T | method | time (ms, best of %d) | peak extra memory (MiB) | max abs diff vs naive (SDPA) |"
             % a.repeats, "|---|---:|---|---:|---:|---:|"]
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for T in lengths:
                rows = {}
                ref = "naive" if T <= a.naive_max else "sdpa"
                for method in METHODS:
                    if method == "naive" and T > a.naive_max:
                        lines.append(f"| {device} | {T} | naive | not run (T > --naive-max) | | |")
                        print(lines[-1], flush=True)
                        continue
                    save = os.path.join(tmp, f"{device}_{T}_{method}.pt")
                    r = measure(device, method, T, a, save)
                    diff = (torch.load(save) - torch.load(os.path.join(tmp, f"{device}_{T}_{ref}.pt"))).abs().max()
                    rows[method] = r
                    lines.append(f"| {device} | {T} | {method} | {r['ms']:.1f} | {r['peak_mib']:.1f} | {diff:.1e} |")
                    print(lines[-1], flush=True)
                memory = "naive not run"
                if "naive" in rows:
                    share = rows["flash"]["peak_mib"] / max(rows["naive"]["peak_mib"], 1e-9)
                    memory = f"flash peak memory = {share:.3f} x naive"
                speed = rows["flash"]["ms"] / rows["sdpa"]["ms"]
                summary.append(f"- {device}, T={T}: flash time = {speed:.2f} x SDPA; "
                               f"{memory}; naive's (H, T, T) fp32 scores alone = {a.heads * T * T * 4 / 2**20:.0f} MiB")
                print(summary[-1], flush=True)
    text = "\n".join(lines + [""] + summary) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
