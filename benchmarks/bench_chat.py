"""SmolLM2-135M-Instruct learns to count a letter in a word (tlama_mini/chat_tasks.py): held-out
exact-match accuracy before fine-tuning, after LoRA SFT, and after DPO on top, with the training times and
trainable parameters; then the same SFT without the assistant mask (loss on every token) for comparison.
Every training run goes through the CLI (`python -m tlama_mini train --gguf ... --sft ...`), so the whole
thing is reproduced by one command:

    python benchmarks/bench_chat.py --out out/chat-bench          # long on 2 CPU cores (see RESULTS.md)
    python benchmarks/bench_chat.py --quick                       # a smoke test of the whole pipeline

--parts runs a subset (before, sft, dpo, unmasked; dpo needs sft's folder), e.g. two processes side by
side: `--parts sft,dpo` and `--parts before,unmasked`. Prints a markdown table and writes OUT/results.json
(every held-out reply, the load average around each run); --save PATH also merges the results into PATH
(benchmarks/results/chat_smollm2.json is the committed copy lesson 16 reads).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from tlama_mini import chat_tasks as C
from tlama_mini.sample import load_for_inference
from tlama_mini.cli import main as cli
from tlama_mini.sft import gguf_to_checkpoint, load_chat_corpus, reply_to

PARTS = ("before", "sft", "dpo", "unmasked")


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
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--save", default=None, help="also merge the results into this JSON file")
    p.add_argument("--n-sft", type=int, default=400, help="SFT conversations written (train split words)")
    p.add_argument("--n-dpo", type=int, default=200, help="DPO pairs written")
    p.add_argument("--n-eval", type=int, default=40, help="held-out questions (words never trained on)")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--dpo-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-training", action="store_true",
                   help="evaluate the parts' finished runs in OUT again (e.g. with another --n-eval) without training")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole pipeline")
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        p.error(f"unknown --parts {', '.join(unknown)} (choose among {', '.join(PARTS)})")
    if a.quick:
        a.n_sft, a.n_dpo, a.n_eval, a.sft_steps, a.dpo_steps, a.batch_size = 20, 10, 2, 1, 1, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    from tlama_mini.gguf import find_smollm2
    gguf = str(find_smollm2(a.gguf, download=False) if a.gguf is None else a.gguf)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if "dpo" in parts and "sft" not in parts and not (out / "sft" / "summary.json").is_file():
        p.error(f"--parts dpo trains on top of {out / 'sft'}: run the sft part first (or with it)")
    sft_data, dpo_data = out / "sft.jsonl", out / "dpo.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in C.sft_records(a.n_sft)), encoding="utf-8")
    dpo_data.write_text("".join(json.dumps(r) + "\n" for r in C.dpo_records(a.n_dpo)), encoding="utf-8")
    held = C.make_examples(a.n_eval, "held_out", seed=0)
    common = ["--batch-size", str(a.batch_size), "--lora-rank", str(a.lora_rank), "--seq-len", "256",
              "--warmup-steps", "5", "--min-lr", "0", "--dtype", "float32", "--overwrite",
              "--sample-tokens", "0", "--eval-batches", "2"] + (["--threads", str(a.threads)] if a.threads else [])
    results_file = out / "results.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not a.skip_training:  # the settings of the runs trained here
        results.update({"n_sft": a.n_sft, "n_dpo": a.n_dpo, "sft_steps": a.sft_steps,
                        "dpo_steps": a.dpo_steps, "batch_size": a.batch_size, "lora_rank": a.lora_rank,
                        "sft_lr": a.sft_lr, "dpo_lr": a.dpo_lr, "cpu_count": os.cpu_count()})

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
        if a.save:  # merge: other processes (other --parts) write their own keys into the same file
            target = Path(a.save)
            merged = json.loads(target.read_text()) if target.is_file() else {}
            merged.update(results)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")

    def trained(name: str, folder: Path, seconds: float, load: tuple[float, ...]) -> None:
        summary = json.loads((folder / "summary.json").read_text())
        results[name] = {"train_seconds": seconds, "steps": summary["step"], "tokens": summary.get("tokens"),
                         "tokens_per_s": summary["tokens_per_s"], "trainable_params": summary["trainable_params"],
                         "total_params": summary["total_params"], "base_val_loss": summary["base_val_loss"],
                         "reported_val_loss": summary["val_loss"], "torch_threads": torch.get_num_threads(),
                         "load_average_before": [round(x, 2) for x in load],
                         "load_average_after": [round(x, 2) for x in os.getloadavg()],
                         "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        save()

    def run_sft(name: str, *extra: str) -> None:
        if a.skip_training:
            return
        load = os.getloadavg()
        seconds = train(["train", "--gguf", gguf, "--sft", str(sft_data), "--out", str(out / name),
                         "--max-steps", str(a.sft_steps), "--lr", str(a.sft_lr),
                         "--eval-interval", str(a.sft_steps), *common, *extra])
        trained(name, out / name, seconds, load)

    def evaluate(name: str, folder: Path) -> None:
        model, tok, _ = load_for_inference(folder)
        acc, rows, seconds = accuracy(model, tok, held)
        results.setdefault(name, {}).update(accuracy=acc, correct=sum(r["correct"] for r in rows), n_eval=len(rows),
                                            eval_seconds=seconds, replies=rows,
                                            answer_loss=answer_loss(model, tok, sft_data))
        print(f"{name}: held-out exact match {acc:.1%} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        save()

    if "before" in parts:
        evaluate("before", gguf_to_checkpoint(gguf, out / "base"))
    if "sft" in parts:
        run_sft("sft")  # --gguf: the GGUF converted once to OUT/sft/base, then LoRA SFT
        evaluate("sft", out / "sft")
    if "dpo" in parts and not a.skip_training:
        load = os.getloadavg()
        seconds = train(["train", "--init-from", str(out / "sft"), "--dpo", str(dpo_data), "--out", str(out / "dpo"),
                         "--max-steps", str(a.dpo_steps), "--lr", str(a.dpo_lr), "--eval-interval", str(a.dpo_steps),
                         *common])
        trained("dpo", out / "dpo", seconds, load)
    if "dpo" in parts:
        evaluate("dpo", out / "dpo")
    if "unmasked" in parts:
        run_sft("sft_unmasked", "--no-assistant-only")
        evaluate("sft_unmasked", out / "sft_unmasked")
    print("| model | held-out exact match | answer-token loss | training time | trainable params |")
    print("|---|---:|---:|---:|---:|")
    for name in ("before", "sft", "dpo", "sft_unmasked"):
        if name in results and "accuracy" in results[name]:
            r = results[name]
            t = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
            n = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
            print(f"| {name} | {r['accuracy']:.1%} | {r['answer_loss']:.3f} | {t} | {n} |")
    return results


if __name__ == "__main__":
    main()
