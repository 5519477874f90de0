"""Longest trainable sequence in a fixed memory budget: vanilla vs memory-efficient attention vs
blockwise (Blockwise Parallel Transformer, Liu & Abbeel 2023; seed 002).

    python benchmarks/bench_long_context.py                     # budgets 4 MiB (65 chars) / 24 MiB (GPT-2)
    python benchmarks/bench_long_context.py --budget-mib 32 --vocab char
    python benchmarks/bench_long_context.py --quick             # tiny model and budget (CI)
    python benchmarks/bench_long_context.py --out benchmarks/long_context.json

One model (`tlama_mini.bpt.BlockwiseLM`: GPT-J-style blocks, LayerNorm, GELU FFN, LM head with
bias), one training step = forward + loss + backward at batch 1, computed three ways with the same
parameters:
- vanilla:          naive attention (the (T, T) scores), the FFN on all tokens, all (T, V) logits
- memory_efficient: F.scaled_dot_product_attention (flash kernel: no (T, T) matrix), FFN and
                    logits whole
- blockwise:        tiled attention (tlama_mini.flash via blockwise_compute_attn), FFN over chunks,
                    LM head + cross-entropy over chunks, every block checkpointed whole
Peak memory is what the step allocates on top of the model (`tlama_mini.memory.peak_memory`:
PeakMemory on CPU, as lesson 08 measures; torch.cuda.max_memory_allocated on CUDA). For each
variant the longest length (a multiple of --grid) whose step stays within the budget is found by
doubling and then bisection (memory grows monotonically with length). Vocabularies: "char" (65,
Tiny Shakespeare's characters) and "gpt2" (50257, GPT-2's BPE); tokens are random ids, since
memory does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tlama_mini.bpt import BlockwiseLM  # noqa: E402
from tlama_mini.memory import peak_memory  # noqa: E402

VOCABS = {"char": 65, "gpt2": 50257}


def step_peak(model: BlockwiseLM, variant: str, T: int, device: torch.device) -> int:
    """Peak bytes of one training step at length T (gradients of the parameters included)."""
    g = torch.Generator().manual_seed(T)
    tokens = torch.randint(0, model.wte.num_embeddings, (1, T + 1), generator=g).to(device)

    def step() -> None:
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:], variant=variant)
        loss.backward()

    model.zero_grad(set_to_none=True)
    peak = peak_memory(step, device)
    model.zero_grad(set_to_none=True)
    return peak


def longest(model: BlockwiseLM, variant: str, budget: int, start: int, grid: int, device: torch.device,
            log: dict[int, int]) -> int:
    """The longest multiple of `grid` whose step peak is <= budget (0 if not even `grid` fits).
    Every (length, peak) measured is recorded in `log`."""
    def fits(T: int) -> bool:
        if T not in log:
            log[T] = step_peak(model, variant, T, device)
        return log[T] <= budget

    lo, hi = 0, max(grid, start // grid * grid)
    while fits(hi):                       # doubling: lo fits, hi does not
        lo, hi = hi, hi * 2
    while hi - lo > grid and (hi - lo) > lo / 16:  # bisection to ~6 % (or one grid step)
        mid = (lo + hi) // 2 // grid * grid
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def run(vocab: str, budget_mib: float, a: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    V = VOCABS[vocab]
    model = BlockwiseLM(V, a.layers, a.d_model, a.heads, a.ffn, chunk_size=a.chunk,
                        loss_chunk_size=a.loss_chunk if V > 1000 else a.chunk).to(device)
    budget = int(budget_mib * 2**20)
    out = {"vocab": vocab, "vocab_size": V, "budget_mib": budget_mib, "variants": {}}
    for variant in BlockwiseLM.VARIANTS:
        log: dict[int, int] = {}
        t0 = time.perf_counter()
        T = longest(model, variant, budget, a.start, a.grid, device, log)
        out["variants"][variant] = {"longest": T, "peak_mib": log.get(T, 0) / 2**20, "seconds": time.perf_counter() - t0,
                                    "measured": {str(k): v / 2**20 for k, v in sorted(log.items())}}
        print(f"  {vocab:5s} {variant:17s} longest T = {T:6d}  (peak {log.get(T, 0) / 2**20:7.2f} MiB, "
              f"{len(log)} steps measured, {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def table(results: list[dict]) -> str:
    lines = ["| vocabulary | budget MiB | variant | longest T | peak MiB at T | x vanilla | x memory-efficient |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        v = r["variants"]
        for name, d in v.items():
            ratio = lambda ref: f"{d['longest'] / v[ref]['longest']:.1f}" if v[ref]["longest"] else "inf"  # noqa: E731
            lines.append(f"| {r['vocab']} ({r['vocab_size']}) | {r['budget_mib']:g} | {name} | {d['longest']} | "
                         f"{d['peak_mib']:.2f} | {ratio('vanilla')} | {ratio('memory_efficient')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and budget, 65-char vocabulary (CI)")
    p.add_argument("--vocab", choices=["char", "gpt2", "both"], default="both")
    p.add_argument("--budget-mib", type=float, default=None, help="one budget for every vocabulary")
    p.add_argument("--char-budget-mib", type=float, default=4.0)
    p.add_argument("--gpt2-budget-mib", type=float, default=24.0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--chunk", type=int, default=128, help="query/key/FFN chunk of the blockwise variant")
    p.add_argument("--loss-chunk", type=int, default=16, help="LM-head chunk for the GPT-2 vocabulary")
    p.add_argument("--grid", type=int, default=64, help="lengths searched are multiples of this")
    p.add_argument("--start", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.vocab, a.layers, a.d_model, a.heads, a.ffn, a.chunk, a.grid, a.start = "char", 2, 16, 2, 64, 32, 16, 64
        a.char_budget_mib = a.budget_mib or 0.25
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"# long context: {platform.node()} {platform.machine()}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}; model: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, "
          f"ffn {a.ffn}, chunk {a.chunk}, loss chunk {a.loss_chunk} (GPT-2 vocabulary); batch 1; "
          f"command: {' '.join(sys.argv)}", flush=True)
    results = []
    for vocab in (["char", "gpt2"] if a.vocab == "both" else [a.vocab]):
        budget = a.budget_mib or (a.char_budget_mib if vocab == "char" else a.gpt2_budget_mib)
        results.append(run(vocab, budget, a, device))
    print(table(results))
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
