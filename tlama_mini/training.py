"""Training as pure functions: the configuration, the learning-rate schedule, one optimizer step and an
evaluation. `trainer.Trainer` runs them in a loop (time budget, signals, checkpoints, DDP); lesson 10
writes the same step and evaluation by hand and compares them with these.

    lr_at(step, max_lr, min_lr, warmup_steps, max_steps)   warmup + cosine decay (one formula)
    train_step(model, optimizer, batches, grad_clip=...)   grad_accum = len(batches) micro-batches, one step
    evaluate(model, batches)                               mean loss per token, eval mode, no gradients

Legend: B batch (rows), T sequence length, k = grad_accum micro-batches per optimizer step.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]  # (x, y) of (B, T) each; a DPO batch adds the reference's log-probs

# Training defaults per model preset. char-cpu was tuned by measurement (2-core CPU, Tiny Shakespeare,
# 60-300 s budgets): a small model with a 128-token context beat wider and deeper models and shorter
# contexts; Muon (blocks' matrices at 5x the AdamW lr) with a decay to 0 beat AdamW; dropout hurt.
# See the tables in benchmarks/RESULTS.md. char-gpu follows nanoGPT's shakespeare_char recipe.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "char-cpu": dict(batch_size=16, seq_len=128, lr=2e-3, min_lr=0.0, warmup_steps=50, eval_batches=10,
                     optimizer="muon", muon_lr_ratio=5.0),
    "char-gpu": dict(batch_size=64, seq_len=256, lr=1e-3, min_lr=1e-4, warmup_steps=100),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train (the model's shape is a separate `TlamaConfig`). Sizes are per optimizer step:
    tokens/step = batch_size * seq_len * grad_accum, with batch_size summed over all processes."""

    preset: str = "char-cpu"
    data: str = "shakespeare"
    tokenizer: str = "char"
    bpe_vocab_size: int = 512
    out: str = "out"
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    optimizer: str = "adamw"        # adamw | muon (Muon for the blocks' matrices, tlama_mini/muon.py)
    muon_lr_ratio: float = 10.0     # Muon's learning rate / lr
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    eval_interval: int = 250        # steps between evaluations (each also saves a checkpoint)
    eval_batches: int = 20          # fixed validation batches per periodic evaluation
    ckpt_interval: int | None = None  # steps between checkpoints; None: at every evaluation
    max_steps: int | None = None
    max_seconds: float | None = None
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16
    compile: bool = False
    threads: int | None = None      # CPU threads (torch.set_num_threads); None: torch's default
    sample_tokens: int = 300        # reserved for: samples printed at the end (see cli.py)
    num_samples: int = 2
    quiet: bool = False
    init_from: str | None = None    # fine-tune this checkpoint (finetune.py) instead of a fresh model
    lora_rank: int | None = None    # with init_from: train LoRA adapters of this rank only
    lora_alpha: float | None = None  # LoRA scale alpha / r; None: alpha = 2 * rank
    lora_targets: tuple[str, ...] = ("Wq", "Wk", "Wv", "Wo")
    sft: str | None = None          # with init_from: supervised fine-tuning on this conversations JSONL (sft.py)
    dpo: str | None = None          # with init_from: DPO on this preference-pairs JSONL (sft.py, dpo.py)
    dpo_beta: float = 0.1           # DPO's beta
    assistant_only: bool = True     # SFT loss on the assistant's tokens only (False: on every token, to compare)

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps ({self.max_steps}) must be positive")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds ({self.max_seconds}) must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype ({self.dtype!r}) must be auto, float32, bfloat16 or float16")
        if self.sft and self.dpo:
            raise ValueError("give --sft or --dpo, not both (run SFT first, then DPO with --init-from its --out)")
        if (self.sft or self.dpo) and not self.init_from:
            raise ValueError("--sft and --dpo fine-tune a trained chat model: pass --init-from RUN or --gguf PATH")
        if self.dpo_beta <= 0:
            raise ValueError(f"dpo_beta ({self.dpo_beta}) must be positive")


def train_config(preset: str, **overrides: Any) -> TrainConfig:
    """TrainConfig with the preset's defaults (TRAIN_PRESETS), then `overrides` (None = keep)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(preset=preset, **{**TRAIN_PRESETS.get(preset, {}), **given})


# ---------------------------------------------------------------------------------------------- schedule
def lr_at(step: float, max_lr: float, min_lr: float, warmup_steps: int, max_steps: float) -> float:
    """The learning rate of optimizer step `step` (from 0): linear warmup from max_lr / warmup_steps to
    max_lr over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`, then constant `min_lr`.
    A time budget calls it with step = progress in [0, 1], warmup_steps=0, max_steps=1 (trainer.py)."""
    if max_lr < 0 or min_lr < 0 or min_lr > max_lr:
        raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
    if warmup_steps < 0 or max_steps <= 0 or warmup_steps > max_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= max_steps ({max_steps}) and max_steps > 0")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def get_lr_scheduler(max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """The seed's interface to `lr_at`: a function step -> learning rate (arguments checked now)."""
    lr_at(0, max_lr, min_lr, warmup_steps, max_steps)  # raises on bad arguments
    return lambda step: lr_at(step, max_lr, min_lr, warmup_steps, max_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate: lr times the group's `lr_ratio` (Muon's groups), else lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


# ---------------------------------------------------------------------------------------------- one step
def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of (x, y), (B, T) each (targets -100 add nothing), plus the model's
    MoE load-balancing loss when it has MoE layers (`Transformer.forward` adds it)."""
    return model(batch[0], targets=batch[1])[1]


def token_count(batch: Batch) -> int:
    """How much a batch counts in a mean loss: its number of targets."""
    return batch[1].numel()


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` (mixed precision), or nothing when dtype is None (plain float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], *,
               grad_clip: float = 1.0, loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss,
               amp: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
               mean_over_processes: Callable[[float], float] = float) -> float:
    """One optimizer step over k = len(batches) micro-batches (gradient accumulation: each loss / k,
    so the gradient is the mean over the micro-batches). Then, if the mean loss is finite: clip the
    global gradient norm to `grad_clip` (0: no clipping) and step. The gradients are zeroed at the end.
    Returns the mean loss (NaN/inf: the weights are left unchanged, the caller decides what to do).

    amp: autocast dtype (None: float32); scaler: float16's GradScaler. Under DDP: `no_sync` (the DDP
    module's) skips the gradient all-reduce of all but the last micro-batch, and `mean_over_processes`
    averages the loss over the ranks, so that every rank takes the same decision on a non-finite loss."""
    k = len(batches)
    if k == 0:
        raise ValueError("train_step needs at least one micro-batch")
    device = _device_of(model)
    total = torch.zeros((), device=device)
    for micro, batch in enumerate(batches):
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        sync = no_sync is None or micro == k - 1
        with (contextlib.nullcontext() if sync else no_sync()), autocast(device.type, amp):
            loss = loss_fn(model, batch)
        loss = loss / k
        total += loss.detach()
        (scaler.scale(loss) if scaler else loss).backward()  # backward adds into .grad
    loss_value = mean_over_processes(total.item())
    if math.isfinite(loss_value):
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, *, loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss,
             weight_fn: Callable[[Batch], int] = token_count, amp: torch.dtype | None = None,
             sum_over_processes: Callable[[list[float]], list[float]] = list) -> float:
    """Mean loss per token over an iterable of batches (of any sizes: each batch's mean loss weighted by
    its number of targets, `weight_fn`), in eval mode (no dropout) without gradients; the model is in
    train mode afterwards. Under DDP `sum_over_processes` adds up the (total, count) of every rank."""
    device = _device_of(model)
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = weight_fn(batch)
        with autocast(device.type, amp):
            loss = loss_fn(model, tuple(t.to(device) for t in batch))
        total, count = total + loss.item() * n, count + n
    model.train()
    total, count = sum_over_processes([total, count])
    return total / count
