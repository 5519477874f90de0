"""Greedy generation speed (tokens/s), batch 1: tlama_mini with and without its KV cache, beside
Hugging Face `transformers` `LlamaForCausalLM.generate` (cached) on a Llama of the same shape.

    python benchmarks/bench_generation.py                     # 500 new tokens, presets tiny and gpt2-small
    python benchmarks/bench_generation.py --quick             # 16 new tokens (CI)
    python benchmarks/bench_generation.py --out benchmarks/generation.md

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
    a = p.parse_args(argv)
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
