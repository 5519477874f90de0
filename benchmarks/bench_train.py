"""Train the default preset for a fixed wall-clock budget and report the loss on the whole validation split.

    python benchmarks/bench_train.py --seconds 60                 # one run, prints a markdown table row
    python benchmarks/bench_train.py --seconds 60 300 --out benchmarks/RESULTS.md   # also append the rows
    python benchmarks/bench_train.py --seconds 60 -- --preset char-cpu --lr 3e-3     # extra train options

Each run is `python -m tlama_mini train --max-seconds S --out <tmp>` in a fresh process (Tiny Shakespeare,
character level, the default preset for the device). Wall time is measured here, from launch to exit,
so it includes start-up, data loading, the final full-split evaluation, the checkpoint and the samples.
The loss is the `final` row of metrics.jsonl; tokens/s is the trainer's training throughput.
Reference (the issue): nanoGPT's CPU config on 2 cores reaches 2.035 after 60 s, 1.635 after 300 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def bench(seconds: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "tlama_mini", "train", "--max-seconds", str(seconds), "--out", tmp,
               "--overwrite", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        final = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()][-1]
        summary = json.loads(Path(tmp, "summary.json").read_text())
        config = json.loads(Path(tmp, "config.json").read_text())
    shown = ["python", "-m", "tlama_mini", "train", "--max-seconds", f"{seconds:g}", *extra]
    return {"seconds": seconds, "wall_s": wall, "val_loss": final["val_loss"], "steps": final["step"],
            "tokens": final["tokens"], "tokens_per_s": summary["tokens_per_s"], "preset": config["train"]["preset"],
            "command": shlex.join(shown)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[60.0], help="time budgets to run, one run each")
    p.add_argument("--out", default=None, help="markdown file to append the table rows to (e.g. benchmarks/RESULTS.md)")
    p.add_argument("extra", nargs="*", help="options passed on to `train` (after --)")
    a = p.parse_args()
    header = ("| machine | command | budget s | wall s | steps | tokens | tokens/s | val loss (whole split) |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    print(header)
    rows = []
    for s in a.seconds:
        r = bench(s, a.extra)
        row = (f"| {machine()} | `{r['command']}` | {r['seconds']:g} | {r['wall_s']:.1f} | {r['steps']:,} | "
               f"{r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} |")
        print(row, flush=True)
        rows.append(row)
    if a.out:
        path = Path(a.out)
        new = not path.exists() or "| machine | command | budget s" not in path.read_text()
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n## Training (bench_train.py)\n\n" + header + "\n" if new else "") + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
