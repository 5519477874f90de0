"""Command line: `python -m tlama_mini train ...` and `python -m tlama_mini sample ...`.

    python -m tlama_mini train                              # char-level GPT on Tiny Shakespeare, 5 minutes
    python -m tlama_mini train --max-seconds 60 --out out/quick
    python -m tlama_mini train --out out/quick --resume --max-seconds 120
    torchrun --nproc_per_node=2 -m tlama_mini train --max-steps 500
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m tlama_mini train ...
    python -m tlama_mini sample --ckpt out/quick --prompt "ROMEO:" --top-k 50 --seed 1

Several nodes: every node runs the same torchrun command; only global rank 0 writes, so --resume needs
--out on a filesystem that every node can read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, TlamaConfig
from .trainer import TRAIN_PRESETS, Reporter, TrainConfig, Trainer, train_config

DEFAULT_SECONDS = 300.0
# Model fields settable from the command line (--d-model 256 ...); any other one with --set name=value.
MODEL_FLAGS = {"d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "dropout": float,
               "multiple_of": int, "ffn_hidden_dim": int, "rope_theta": float}
_IMPORTED = time.perf_counter()


def seconds_since_launch() -> float:
    """Seconds since this process started (Linux: from /proc, so interpreter start-up and `import
    torch` count); elsewhere since this module was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED



class TqdmReporter(Reporter):
    """A progress bar (loss, tokens/s, time left) on a terminal; one line per evaluation otherwise."""

    def __init__(self, cfg: TrainConfig, start_step: int, master: bool) -> None:
        from tqdm.auto import tqdm
        enabled = master and not cfg.quiet
        self.tqdm, self.master, self.enabled, self.timed = tqdm, master, enabled, cfg.max_seconds is not None
        total = cfg.max_seconds if self.timed else cfg.max_steps
        fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{postfix}]" if self.timed else None  # time left: ours
        self.bar = tqdm(total=total, initial=0 if self.timed else start_step, unit="s" if self.timed else "step",
                        disable=None if enabled else True, dynamic_ncols=True, bar_format=fmt, file=sys.stderr)

    def update(self, step, train_seconds, elapsed, loss, tokens_per_s, lr) -> None:
        if self.bar.disable or (step % 5 and self.timed):
            return
        self.bar.n = min(elapsed, self.bar.total) if self.timed else step
        speed = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "- tok/s"
        left = f", {self.bar.total - elapsed:.0f} s left" if self.timed else ""
        self.bar.set_postfix_str(f"step {step}, loss {loss:.3f}, {speed}, lr {lr:.2e}{left}", refresh=True)

    def evaluated(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        train = f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "-"
        tag = "final (whole val split)" if row.get("final") else "eval"
        self.tqdm.write(f"{tag} step {row['step']}: train {train} val {row['val_loss']:.4f} "
                        f"({row['tokens']:,} tokens, {row['elapsed_s']:.1f} s)", file=sys.stderr)

    def message(self, text: str) -> None:
        if self.master:
            self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def plot_metrics(out: Path) -> Path | None:
    """OUT/loss.png from OUT/metrics.jsonl (train and validation loss against tokens seen)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install matplotlib)")
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train (mean since the last evaluation)"),
                       ("val_loss", "validation (fixed batches)")):
        pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None and not r.get("final")]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=label)
    finals = [r for r in rows if r.get("final")]
    if finals:
        ax.scatter([finals[-1]["tokens"]], [finals[-1]["val_loss"]], color="black", zorder=3,
                   label=f"whole val split: {finals[-1]['val_loss']:.3f}")
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title=f"{out.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return out / "loss.png"


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, *, num_samples: int = 1,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None) -> list[str]:
    """Continue `prompt` num_samples times. Longer than the model's context: generate in windows,
    each re-reading the last half context of text (the positions restart at 0, which RoPE allows)."""
    from .sample import generate
    device = next(model.parameters()).device
    T = model.config.max_seq_len
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")
    x = torch.tensor([ids[-(T - 1):]] * num_samples, device=device)  # (B, t)
    produced, window = 0, 0
    while produced < max_new_tokens:
        ctx = x if x.shape[1] <= T // 2 or produced == 0 else x[:, -(T // 2):]  # (B, t')
        n = min(max_new_tokens - produced, T - ctx.shape[1])
        new = generate(model, ctx, n, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=None if seed is None else seed + window)[:, ctx.shape[1]:]  # (B, n)
        x, produced, window = torch.cat([x, new], dim=1), produced + n, window + 1
        if new.shape[1] < n:  # every row reached the model's end-of-text token (config.eos_token_id)
            break
    return [prompt + tokenizer.decode(row[len(ids[-(T - 1):]):].tolist()) for row in x]


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set name=value pairs; values parsed as JSON when they can be (numbers, true, null)."""
    fields = {f.name for f in dataclasses.fields(TlamaConfig)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {item!r}: expected name=value with name one of {sorted(fields)}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


class _Help(argparse.HelpFormatter):
    """Shows an option's default when it has a real one (not None/False) and the text does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _hyper(name: str) -> str:
    """'default: 16 for char-cpu, 64 for char-gpu, else 32' for a TrainConfig field."""
    fallback = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
    by_preset = [f"{d[name]} for {p}" for p, d in TRAIN_PRESETS.items() if d.get(name, fallback) != fallback]
    return f"default: {', '.join(by_preset)}, else {fallback}" if by_preset else f"default: {fallback}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tlama_mini", description="Train and sample small GPTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", formatter_class=_Help,
                       help="train a model (default: character-level GPT on Tiny Shakespeare, 5 minutes)",
                       description="Train a GPT and write OUT/config.json, OUT/metrics.jsonl (one row per "
                       "evaluation, the last over the whole validation split), OUT/loss.png, OUT/samples.txt and "
                       "the checkpoint OUT/ckpt/. Ctrl-C saves a checkpoint and exits; --resume continues exactly.")
    a = t.add_argument
    a("--preset", default=None, choices=sorted(PRESETS),
      help="model preset (shape); default: char-gpu on CUDA, char-cpu elsewhere")
    a("--data", default="shakespeare", help="a named corpus (shakespeare), a .txt file, or a folder of .txt files")
    a("--tokenizer", default=None, choices=["char", "bpe", "gpt2"],
      help="char: one token per character; bpe: byte-level BPE trained on the data; gpt2: GPT-2's BPE "
      "(default: char; with --init-from: the checkpoint's)")
    a("--bpe-vocab-size", type=int, default=512, help="vocabulary size of --tokenizer bpe")
    a("--max-seconds", type=float, default=None,
      help=f"time budget from launch to exit, in seconds (default {DEFAULT_SECONDS:.0f} if --max-steps is unset)")
    a("--max-steps", type=int, default=None, help="optimizer steps to train (deterministic; use for exact resume)")
    a("--out", default="out", help="run folder: config.json, metrics.jsonl, loss.png, samples.txt, ckpt/")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="start again even if --out holds a run")
    a("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast dtype; auto: bf16 on CUDA with bf16 support, fp16 (+ gradient scaling) on older CUDA, "
      "bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    a("--seed", type=int, default=None, help="seed of the initial weights, the data order and dropout (default 1337)")
    a("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    a("--quiet", action="store_true", help="no progress bar, no evaluation lines, no samples")
    g = t.add_argument_group("training hyperparameters (default: from the preset)").add_argument
    g("--batch-size", type=int, help="sequences per micro-step, summed over all processes; " + _hyper("batch_size"))
    g("--seq-len", type=int, help="context length in tokens (also the model's max_seq_len); " + _hyper("seq_len"))
    g("--grad-accum", type=int, help="micro-steps per optimizer step; " + _hyper("grad_accum"))
    g("--lr", type=float, help="peak learning rate (after linear warmup); " + _hyper("lr"))
    g("--min-lr", type=float, help="learning rate at the end of the cosine decay; " + _hyper("min_lr"))
    g("--warmup-steps", type=int, help="steps of linear learning-rate warmup; " + _hyper("warmup_steps"))
    g("--weight-decay", type=float, help="AdamW weight decay of matrices and embeddings; " + _hyper("weight_decay"))
    g("--optimizer", choices=["adamw", "muon"], help="adamw, or muon: Muon (orthogonalized momentum) for the "
      "blocks' matrices and AdamW for the rest; " + _hyper("optimizer"))
    g("--muon-lr-ratio", type=float, help="Muon's learning rate as a multiple of --lr; " + _hyper("muon_lr_ratio"))
    g("--beta1", type=float, help="AdamW beta1; " + _hyper("beta1"))
    g("--beta2", type=float, help="AdamW beta2; " + _hyper("beta2"))
    g("--grad-clip", type=float, help="clip the global gradient norm to this (0: off); " + _hyper("grad_clip"))
    g("--eval-interval", type=int, help="steps between evaluations and checkpoints; " + _hyper("eval_interval"))
    g("--eval-batches", type=int, help="fixed validation batches per evaluation; " + _hyper("eval_batches"))
    g("--ckpt-interval", type=int, help="steps between checkpoints (default: every evaluation)")
    g("--sample-tokens", type=int, help="tokens per sample printed at the end (0: none); " + _hyper("sample_tokens"))
    f = t.add_argument_group("fine-tuning a trained model (tlama_mini/finetune.py)").add_argument
    f("--init-from", metavar="RUN", help="start from this checkpoint (the --out of a training run): its weights, "
      "tokenizer, preset and context; without --lora-rank every weight trains")
    f("--lora-rank", type=int, help="train only LoRA adapters of this rank (the base stays frozen); writes "
      "OUT/adapters/ and the merged model OUT/merged/, which `sample --ckpt OUT` uses")
    f("--lora-alpha", type=float, help="LoRA scale alpha / rank (default: alpha = 2 * rank)")
    f("--lora-targets", type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()), metavar="NAMES",
      help="comma-separated linears to adapt, among Wq,Wk,Wv,Wo,w1,w2,w3,output (default: Wq,Wk,Wv,Wo)")
    c = t.add_argument_group("chat fine-tuning: SFT and DPO (tlama_mini/sft.py, dpo.py)").add_argument
    c("--gguf", metavar="PATH", help="start from a GGUF chat model (e.g. SmolLM2-135M-Instruct): converted once to "
      "OUT/base, then used as --init-from")
    c("--sft", metavar="JSONL", help='supervised fine-tuning on conversations, one {"messages": [...]} per line; '
      "the loss covers only the assistant's tokens")
    c("--dpo", metavar="JSONL", help='DPO on preference pairs, one {"prompt": [...], "chosen": "...", '
      '"rejected": "..."} per line; the reference is the --init-from model')
    c("--dpo-beta", type=float, help="DPO's beta (default 0.1)")
    c("--assistant-only", action=argparse.BooleanOptionalAction, default=None,
      help="SFT: the loss on the assistant's tokens only (default); --no-assistant-only trains on every token")
    m = t.add_argument_group("model overrides (default: from the preset)").add_argument
    for name, kind in MODEL_FLAGS.items():
        m("--" + name.replace("_", "-"), type=kind, help=f"TlamaConfig.{name}")
    m("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None, help="share token_emb and output")
    m("--set", action="append", default=[], metavar="NAME=VALUE", help="any other TlamaConfig field, e.g. --set qk_norm=true")

    from .chat import add_chat_parser
    add_chat_parser(sub)  # `chat`: a real pretrained model from its GGUF file (tlama_mini/chat.py)
    s = sub.add_parser("sample", formatter_class=_Help,
                       help="generate text from a checkpoint", description="Generate text from a trained checkpoint.")
    b = s.add_argument
    b("--ckpt", required=True, help="a run folder (--out of train) or its ckpt/ subfolder")
    b("--prompt", default="\n", help="text to continue (default: a newline)")
    b("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    b("--num-samples", type=int, default=1, help="independent samples")
    b("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy)")
    b("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    b("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this total probability")
    b("--seed", type=int, default=None, help="seed for reproducible samples")
    b("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    return parser


def _finetune_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults of a fine-tune: the saved run's fine-tune options (--resume), the base's preset,
    tokenizer and context, and AdamW for LoRA adapters."""
    from .finetune import base_defaults, saved_finetune
    saved = saved_finetune(args.out) if args.resume else {}
    init_from = args.init_from or saved.get("init_from")
    if not init_from:
        return {}
    out = {**{k: v for k, v in saved.items() if v is not None}, **base_defaults(init_from), "init_from": init_from}
    if args.lora_rank is not None or saved.get("lora_rank") is not None:
        out["optimizer"] = "adamw"
    return out


def cmd_train(args: argparse.Namespace, started: float) -> int:
    from .device import get_device
    if args.gguf:
        if args.init_from:
            print("error: give --gguf or --init-from, not both", file=sys.stderr)
            return 2
        from .sft import gguf_to_checkpoint
        try:
            args.init_from = str(gguf_to_checkpoint(args.gguf, Path(args.out) / "base"))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: --gguf: {err}", file=sys.stderr)
            return 2
    try:
        base = _finetune_defaults(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: --init-from: {err}", file=sys.stderr)
        return 2
    base_preset = base.pop("preset", None)
    preset = args.preset or base_preset or ("char-gpu" if get_device(args.device).type == "cuda" else "char-cpu")
    max_seconds = args.max_seconds if args.max_seconds or args.max_steps else DEFAULT_SECONDS
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {k: v for k, v in vars(args).items() if k in names and k not in ("preset", "max_seconds") and v is not None}
    try:
        cfg = train_config(preset, max_seconds=max_seconds, **{"tokenizer": "char", **base, **given})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overrides = {k: getattr(args, k) for k in [*MODEL_FLAGS, "tie_embeddings"] if getattr(args, k) is not None}
    overrides.update(_parse_set(args.set))
    base = PRESETS[preset]
    if "n_heads" in overrides and "n_kv_heads" not in overrides and base.get("n_kv_heads") in (None, base["n_heads"]):
        overrides["n_kv_heads"] = None  # the preset is plain multi-head attention: keep it so
    try:
        trainer = Trainer(cfg, overrides, resume=args.resume, overwrite=args.overwrite, started=started)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if trainer.master and not cfg.quiet and cfg.init_from:
        from .finetune import parameter_counts
        trainable, total = parameter_counts(trainer.model)
        how = f"LoRA rank {cfg.lora_rank} on {', '.join(cfg.lora_targets)}" if cfg.lora_rank else "every weight"
        print(f"fine-tuning {cfg.init_from}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%, "
              f"{how}); the base model's validation loss on the new data: {trainer.base_val_loss:.4f}", flush=True)
    if trainer.master and not cfg.quiet:
        print(f"training {trainer.model.num_params():,} parameters on {trainer.device} ({trainer.world} process"
              f"{'es' if trainer.world > 1 else ''}), data {trainer.corpus.source}: "
              f"{len(trainer.corpus.train):,} train / {len(trainer.corpus.val):,} val "
              f"{'examples' if trainer.chat else 'tokens'}", flush=True)
    result = trainer.run(TqdmReporter(cfg, trainer.step, trainer.master))
    if trainer.master and result["status"] != "diverged":
        summary = {k: v for k, v in result.items() if k != "history"}
        if cfg.init_from:
            from .finetune import parameter_counts
            summary.update(zip(("trainable_params", "total_params"), parameter_counts(trainer.model)),
                           base_val_loss=trainer.base_val_loss)
        (trainer.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        t0 = time.perf_counter()
        plot = plot_metrics(trainer.out)
        if cfg.sample_tokens > 0 and not cfg.quiet and trainer.chat:  # a reply to the first validation prompt
            from .sft import reply_to
            prompt = trainer.corpus.first_prompt
            reply = reply_to(trainer.model.eval(), trainer.corpus.tokenizer, prompt, min(cfg.sample_tokens, 64))
            text = trainer.corpus.tokenizer.decode(prompt) + reply
            (trainer.out / "samples.txt").write_text(text, encoding="utf-8")
            print("\n" + text + "\n")
        elif cfg.sample_tokens > 0 and not cfg.quiet:
            texts = generate_text(trainer.model.eval(), trainer.corpus.tokenizer, "\n", cfg.sample_tokens,
                                  num_samples=cfg.num_samples, seed=cfg.seed)
            (trainer.out / "samples.txt").write_text("\n\n---\n\n".join(texts), encoding="utf-8")
            print("\n" + "\n\n---\n\n".join(texts) + "\n")
        if not cfg.quiet:
            print(f"done: step {result['step']}, val loss (whole split) {result['val_loss']:.4f}, "
                  f"{result['tokens_per_s']:,.0f} tok/s; run folder {trainer.out}"
                  f"{' (plot: ' + str(plot) + ')' if plot else ''}; wrap-up {time.perf_counter() - t0:.1f} s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {"done": 0, "interrupted": 130, "diverged": 3}[result["status"]]


def cmd_sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_for_inference
    from .device import get_device
    try:
        model, tokenizer, _ = load_for_inference(args.ckpt, get_device(args.device))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.ckpt} has no tokenizer.json", file=sys.stderr)
        return 2
    texts = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, num_samples=args.num_samples,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print("\n\n---\n\n".join(texts))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command. From the command line (argv None) --max-seconds counts from the process launch,
    from Python (argv given, e.g. a notebook) from this call."""
    started = time.perf_counter() - (seconds_since_launch() if argv is None else 0.0)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "chat":
            from .chat import cmd_chat
            return cmd_chat(args)
        return cmd_train(args, started) if args.command == "train" else cmd_sample(args)
    except KeyboardInterrupt:  # outside the training loop (which saves and exits cleanly by itself)
        print("\ninterrupted", file=sys.stderr)
        return 130
