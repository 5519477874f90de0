"""SmolLM2-135M-Instruct learns to count a letter in a word (tlama_mini/chat_tasks.py): held-out
exact-match accuracy before fine-tuning, after LoRA SFT, and after DPO on top, with the training times and
trainable parameters; then the same SFT without the assistant mask (loss on every token) for comparison.
Every training run goes through the CLI (`python -m tlama_mini train --gguf ... --sft ...`), so the whole
thing is reproduced by one command:

    python benchmarks/bench_chat.py --out out/chat-bench          # a few minutes per run on 2 CPU cores
    python benchmarks/bench_chat.py --quick                       # a smoke test (tests/test_benchmarks.py)

Prints a markdown table and writes OUT/results.json (with a few before/after answers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tlama_mini import chat_tasks as C
from tlama_mini.sample import load_for_inference
from tlama_mini.cli import main as cli
from tlama_mini.sft import load_chat_corpus, reply_to


def accuracy(model, tokenizer, examples, max_new_tokens: int = 48) -> tuple[float, list[dict], float]:
    """(held-out exact-match accuracy, the replies, seconds) with greedy decoding."""
    t = time.perf_counter()
    rows = []
    for e in examples:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(C.messages(e, with_answer=False)), allowed_special="all")
        reply = reply_to(model, tokenizer, prompt, max_new_tokens)
        rows.append({"question": e.question, "reply": reply, "correct": C.grade(reply, e)})
    return sum(r["correct"] for r in rows) / len(rows), rows, time.perf_counter() - t


@torch.no_grad()
def answer_loss(model, tokenizer, data: Path) -> float:
    """Mean cross-entropy on the assistant's tokens of the SFT file's validation rows."""
    corpus = load_chat_corpus(data, "sft", tokenizer, model.config.max_seq_len)
    total, count = 0.0, 0
    for ids, mask in corpus.val:
        logp = model(torch.tensor([ids[:-1]]), kv_cache=False)[0][0].double().log_softmax(-1)  # (T, V)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        total += -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][keep].sum().item()
        count += int(keep.sum())
    return total / count


def train(args_list: list[str]) -> float:
    t = time.perf_counter()
    rc = cli(args_list)
    if rc != 0:
        raise SystemExit(f"training failed ({rc}): {' '.join(args_list)}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="the GGUF chat model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="out/chat-bench")
    p.add_argument("--n-sft", type=int, default=400, help="SFT conversations written (train split words)")
    p.add_argument("--n-dpo", type=int, default=200, help="DPO pairs written")
    p.add_argument("--n-eval", type=int, default=40, help="held-out questions (words never trained on)")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--dpo-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--no-unmasked", action="store_true", help="skip the SFT run without the assistant mask")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole pipeline")
    a = p.parse_args(argv)
    if a.quick:
        a.n_sft, a.n_dpo, a.n_eval, a.sft_steps, a.dpo_steps, a.batch_size = 20, 10, 2, 1, 1, 2
    from tlama_mini.gguf import find_smollm2
    gguf = str(find_smollm2(a.gguf, download=False) if a.gguf is None else a.gguf)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sft_data, dpo_data = out / "sft.jsonl", out / "dpo.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in C.sft_records(a.n_sft)), encoding="utf-8")
    dpo_data.write_text("".join(json.dumps(r) + "\n" for r in C.dpo_records(a.n_dpo)), encoding="utf-8")
    held = C.make_examples(a.n_eval, "held_out", seed=0)
    common = ["--batch-size", str(a.batch_size), "--lora-rank", str(a.lora_rank), "--seq-len", "256",
              "--warmup-steps", "5", "--min-lr", "0", "--dtype", "float32", "--quiet", "--overwrite",
              "--sample-tokens", "0", "--eval-batches", "2"] + (["--threads", str(a.threads)] if a.threads else [])
    results: dict = {"n_eval": a.n_eval, "sft_steps": a.sft_steps, "dpo_steps": a.dpo_steps,
                     "batch_size": a.batch_size, "lora_rank": a.lora_rank, "torch_threads": torch.get_num_threads()}

    def run_sft(name: str, *extra: str) -> None:
        source = ["--gguf", gguf] if name == "sft" else ["--init-from", str(out / "sft" / "base")]
        seconds = train(["train", *source, "--sft", str(sft_data), "--out", str(out / name),
                         "--max-steps", str(a.sft_steps), "--lr", str(a.sft_lr),
                         "--eval-interval", str(a.sft_steps), *common, *extra])
        summary = json.loads((out / name / "summary.json").read_text())
        results[name] = {"train_seconds": seconds, "trainable_params": summary["trainable_params"],
                         "total_params": summary["total_params"]}

    def evaluate(name: str, folder: Path) -> None:
        model, tok, _ = load_for_inference(folder)
        acc, rows, seconds = accuracy(model, tok, held)
        results.setdefault(name, {}).update(accuracy=acc, eval_seconds=seconds, replies=rows[:6],
                                            answer_loss=answer_loss(model, tok, sft_data))
        print(f"{name}: held-out exact match {acc:.1%} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")  # so far

    run_sft("sft")  # also writes OUT/sft/base: the GGUF as a checkpoint
    evaluate("before", out / "sft" / "base")
    evaluate("sft", out / "sft")
    seconds = train(["train", "--init-from", str(out / "sft"), "--dpo", str(dpo_data), "--out", str(out / "dpo"),
                     "--max-steps", str(a.dpo_steps), "--lr", str(a.dpo_lr), "--eval-interval", str(a.dpo_steps),
                     *common])
    summary = json.loads((out / "dpo" / "summary.json").read_text())
    results["dpo"] = {"train_seconds": seconds, "trainable_params": summary["trainable_params"],
                      "total_params": summary["total_params"], "base_val_loss": summary["base_val_loss"],
                      "val_loss": summary["val_loss"]}
    evaluate("dpo", out / "dpo")
    if not a.no_unmasked:
        run_sft("sft_unmasked", "--no-assistant-only")
        evaluate("sft_unmasked", out / "sft_unmasked")
        results["sft_unmasked"]["reported_val_loss"] = json.loads((out / "sft_unmasked" / "summary.json").read_text())["val_loss"]
    results["sft"]["reported_val_loss"] = json.loads((out / "sft" / "summary.json").read_text())["val_loss"]
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("| model | held-out exact match | answer-token loss | training time | trainable params |")
    print("|---|---:|---:|---:|---:|")
    for name in ("before", "sft", "dpo", "sft_unmasked"):
        if name in results:
            r = results[name]
            t = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
            n = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
            print(f"| {name} | {r['accuracy']:.1%} | {r['answer_loss']:.3f} | {t} | {n} |")
    return results


if __name__ == "__main__":
    main()
