"""Greedy generation speed (tokens/s), batch 1: tlama_mini with and without its KV cache, beside
Hugging Face `transformers` `LlamaForCausalLM.generate` (cached) on a Llama of the same shape.

    python benchmarks/bench_generation.py                     # 500 new tokens, presets tiny and gpt2-small
    python benchmarks/bench_generation.py --quick             # 16 new tokens (CI)
    python benchmarks/bench_generation.py --out benchmarks/generation.md
    python benchmarks/bench_generation.py --smollm2           # the real SmolLM2-135M-Instruct, fp32, beside transformers
    python benchmarks/bench_generation.py --smollm2 --threads 1 --repeat 3   # interleaved, for a busy machine

--smollm2 loads SmolLM2-135M-Instruct from its GGUF file (tlama_mini.gguf.load_gguf, and transformers'
own GGUF loader for the baseline), dequantized to fp32, and generates greedily (batch 1, a 40-token
prompt, 128 new tokens). Each implementation runs in a fresh subprocess, so each has its own peak
memory: the process's peak RSS above its RSS after importing torch and tlama_mini (loading, the
mapped file and the reader count). tokens/s is given for the first call (allocation included) and
a second one, in wall-clock time and per CPU-second (process CPU time, steadier on a busy machine);
--repeat N runs the two implementations N times, interleaved.

All models have random weights (speed does not depend on them). The uncached run recomputes the
whole sequence at every step, so its cost grows quadratically; it generates at most
--uncached-tokens tokens (tokens/s is then for that many). Every timed run follows a short warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from tlama_mini import TlamaConfig, Transformer, generate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def hf_llama(c: TlamaConfig):
    """A randomly initialised `LlamaForCausalLM` with the sizes of `c`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                     num_key_value_heads=c.kv_heads, max_position_embeddings=c.max_seq_len,
                     rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                     rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(hc)


def bench_preset(preset: str, a: argparse.Namespace, device: torch.device) -> list[tuple[str, int, float]]:
    """[(implementation, new tokens, tokens/s)] for one preset."""
    torch.manual_seed(0)
    c = TlamaConfig.from_preset(preset)
    if c.max_seq_len < a.prompt_len + a.new_tokens:
        c = c.replace(max_seq_len=a.prompt_len + a.new_tokens)
    model = Transformer(c).to(device).eval()
    prompt = torch.randint(0, c.vocab_size, (1, a.prompt_len), device=device)
    n_unc = min(a.new_tokens, a.uncached_tokens)
    rows = []
    for label, use_cache, n in (("tlama_mini, KV cache", True, a.new_tokens),
                                ("tlama_mini, no cache", False, n_unc)):
        generate(model, prompt, min(n, 8), temperature=0, use_cache=use_cache)  # warm-up
        dt = _timed(lambda: generate(model, prompt, n, temperature=0, use_cache=use_cache), device)
        rows.append((label, n, n / dt))
    del model
    if not a.no_hf:
        hf = hf_llama(c).to(device).eval()

        def run(n: int):
            with torch.no_grad():
                out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  attention_mask=torch.ones_like(prompt), pad_token_id=0)
            assert out.shape[1] == a.prompt_len + n, "transformers stopped early"

        run(8)  # warm-up
        dt = _timed(lambda: run(a.new_tokens), device)
        rows.append(("transformers LlamaForCausalLM, cache", a.new_tokens, a.new_tokens / dt))
    return rows


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def smollm2_one(impl: str, a: argparse.Namespace) -> None:
    """Run in a subprocess: load, generate twice, print one result line (key=value ...)."""
    import resource

    from tlama_mini.gguf import find_smollm2, load_gguf
    base = _rss_mb()
    path = find_smollm2()
    t0 = time.perf_counter()
    if impl == "tlama_mini":
        model, tok = load_gguf(path, torch.float32)
    else:
        from transformers import AutoModelForCausalLM
        from tlama_mini.gguf import tokenizer_from_gguf, metadata, read_gguf
        tok = tokenizer_from_gguf(metadata(read_gguf(path)))
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    text = "The quick brown fox jumps over the lazy dog. " * 8
    prompt = torch.tensor([tok.encode(text)[:a.prompt_len]])
    n = a.new_tokens

    def run():
        if impl == "tlama_mini":
            out = generate(model, prompt, n, temperature=0, stop_token=None)  # exactly n tokens
        else:
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     attention_mask=torch.ones_like(prompt), pad_token_id=2)
        assert out.shape[1] == prompt.shape[1] + n
        return out

    c0 = time.process_time()
    first = _timed(run, torch.device("cpu"))
    c1 = time.process_time()
    second = _timed(run, torch.device("cpu"))
    c2 = time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tokens = run()[0, prompt.shape[1]:prompt.shape[1] + 8].tolist()
    print(f"RESULT impl={impl} load_s={load_s:.2f} first_tps={n / first:.2f} second_tps={n / second:.2f} "
          f"first_cpu_tps={n / (c1 - c0):.2f} second_cpu_tps={n / (c2 - c1):.2f} "
          f"peak_mb={peak - base:.0f} tokens={','.join(map(str, tokens))}", flush=True)


def smollm2(a: argparse.Namespace) -> None:
    import statistics
    import subprocess
    import sys
    runs: list[dict[str, dict[str, str]]] = []
    loads = [os.getloadavg()[0]]
    for _ in range(a.repeat):  # interleaved: ours, theirs, ours, theirs ... so both see the same load
        rows = {}
        for impl in ("tlama_mini", "transformers"):
            args = [sys.executable, __file__, "--smollm2-impl", impl, "--prompt-len", str(a.prompt_len),
                    "--new-tokens", str(a.new_tokens)] + (["--threads", str(a.threads)] if a.threads else [])
            out = subprocess.run(args, capture_output=True, text=True, check=False)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
            if line is None:
                raise SystemExit(f"{impl} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            rows[impl] = dict(kv.split("=") for kv in line.split()[1:])
            loads.append(os.getloadavg()[0])
        if rows["tlama_mini"]["tokens"] != rows["transformers"]["tokens"]:
            raise SystemExit(f"the greedy tokens differ: {rows}")
        runs.append(rows)
    weights_mb = 134.5e6 * 4 / 2**20
    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, {weights_mb:.0f} MiB of weights), greedy, batch 1, "
             f"prompt {a.prompt_len} tokens, {a.new_tokens} new tokens; torch {torch.__version__}, "
             f"{a.threads or torch.get_num_threads()} threads, CPU cores {os.cpu_count()}, {a.repeat} interleaved "
             f"repetitions, load average (1 min) {min(loads):.1f}-{max(loads):.1f}. Peak memory: peak RSS above the "
             "RSS after importing torch and tlama_mini.", "",
             "Tokens per CPU-second (process CPU time, not wall time) is the steadier measure on a busy machine.", "",
             "| run | implementation | load s | tokens/s, first call | tokens/s, second call | "
             "tokens per CPU-s, first | tokens per CPU-s, second | peak memory MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for k, rows in enumerate(runs, 1):
        for impl, r in rows.items():
            lines.append(f"| {k} | {impl} | {r['load_s']} | {r['first_tps']} | {r['second_tps']} | "
                         f"{r['first_cpu_tps']} | {r['second_cpu_tps']} | {r['peak_mb']} |")
    lines.append("")
    for col, label in (("first_tps", "tokens/s"), ("first_cpu_tps", "tokens per CPU-second")):
        ratio = {c: [float(r["tlama_mini"][c]) / float(r["transformers"][c]) for r in runs]
                 for c in (col, col.replace("first", "second"))}
        first, second = ratio.values()
        lines.append(f"tlama_mini / transformers in {label}, per run: first call "
                     + ", ".join(f"{v:.2f}x" for v in first) + "; second call " + ", ".join(f"{v:.2f}x" for v in second)
                     + f" (medians {statistics.median(first):.2f}x and {statistics.median(second):.2f}x).")
    lines.append("The first 8 greedy tokens are identical.")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "gpt2-small"])
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--uncached-tokens", type=int, default=100, help="cap for the uncached run")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="16 new tokens (CI)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice); 1 gives "
                   "steadier numbers on a busy machine")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--repeat", type=int, default=1, help="--smollm2: interleaved repetitions of both implementations")
    p.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct beside transformers")
    p.add_argument("--smollm2-impl", choices=["tlama_mini", "transformers"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smollm2 or a.smollm2_impl:
        if a.prompt_len == 16:
            a.prompt_len = 40
        if a.new_tokens == 500:
            a.new_tokens = 128
        if a.quick:
            a.new_tokens = 8
        if a.threads:
            torch.set_num_threads(a.threads)
        return smollm2_one(a.smollm2_impl, a) if a.smollm2_impl else smollm2(a)
    if a.quick:
        a.new_tokens, a.uncached_tokens = 16, 16
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    lines = [f"Greedy decoding, batch 1, prompt {a.prompt_len} tokens, random weights, fp32, {device}; "
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, CPU cores {os.cpu_count()}.", "",
             "| preset | implementation | new tokens | tokens/s |", "|---|---|---:|---:|"]
    for preset in a.presets:
        for label, n, tps in bench_preset(preset, a, device):
            lines.append(f"| {preset} | {label} | {n} | {tps:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
