"""The training loop: AdamW, warmup + cosine learning rate, gradient accumulation and clipping, mixed
precision, periodic evaluation, atomic checkpoints, exact resume, and DistributedDataParallel.

The pieces are pure functions of training.py (TrainConfig, lr_at, train_step, evaluate); this module
runs them. Budgets: `max_steps` (deterministic: the schedule `training.lr_at`) and/or `max_seconds`,
counted from the launch of the process to its exit. With a time budget the cosine runs over *time*:
progress = training time so far / training time available, where the time available leaves room for
the final full-split evaluation, the checkpoint and the samples (estimated from measured speeds), so
the run ends at min_lr and exits on time. A resumed run continues the step count, the time spent (it
counts against the budget), the data position, the optimizer and every RNG, so on CPU it ends bit for
bit where an uninterrupted run ends.

DDP (`torchrun --nproc_per_node=N -m tlama_mini train ...`): `batch_size` is the *global* batch; each
rank draws the same global batch and trains on its slice, DDP averages the gradients, so the losses
equal a single process's (up to rounding). Only rank 0 writes files.
Legend: B global batch, b = B / world per-rank batch, T seq_len.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import TlamaConfig
from .data import BatchSampler, Corpus, fixed_batches, full_split_batches, prepare_data
from .device import autocast_dtype, get_device, init_distributed
from .finetune import build, lora_settings, save_adapters_and_merged
from .model import Transformer
from .report import Reporter
from .sft import ChatSampler, batch_weight, chat_loss
from .training import (TRAIN_PRESETS, TrainConfig, evaluate, lm_loss, lr_at, set_lr, token_count, train_config,
                       train_step)

__all__ = ["TRAIN_PRESETS", "Reporter", "TrainConfig", "Trainer", "autocast_dtype", "train_config"]  # old import paths


class Trainer:
    """Builds everything from a TrainConfig, then `run()` trains. See the module docstring."""

    def __init__(self, cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, *,
                 resume: bool = False, overwrite: bool = False, started: float | None = None) -> None:
        """started: time.perf_counter() at which the max_seconds budget began (the CLI passes the
        process launch); default now."""
        self.started = time.perf_counter() if started is None else started
        self.cfg, self.resume = cfg, resume
        self.rank, local, self.world = init_distributed()
        self.master = self.rank == 0
        self.device = get_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.amp = autocast_dtype(cfg.dtype, self.device)
        self.out, self.ckpt_dir = Path(cfg.out), Path(cfg.out) / "ckpt"
        if not resume and not overwrite and (self.ckpt_dir.exists() or (self.out / "metrics.jsonl").exists()):
            raise FileExistsError(f"{self.out} already holds a training run: pass --resume to continue it, "
                                  "--overwrite to start again from scratch, or choose another --out")
        self.corpus: Corpus
        if cfg.init_from or cfg.lora_rank is not None:  # the model and tokenizer of a trained checkpoint
            self.corpus, self.model_config, self.model = build(cfg, model_overrides or {}, self.device, resume)
        else:
            self.corpus = prepare_data(cfg.data, cfg.tokenizer, bpe_vocab_size=cfg.bpe_vocab_size)
            overrides = {"vocab_size": self.corpus.tokenizer.vocab_size, "max_seq_len": cfg.seq_len,
                         **(model_overrides or {})}
            self.model_config = TlamaConfig.from_preset(cfg.preset, **overrides)
            torch.manual_seed(cfg.seed)  # the same initial weights on every rank
            self.model = Transformer(self.model_config).to(self.device)
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr, self.device.type,
                                                         master_process=self.master and not cfg.quiet,
                                                         betas=(cfg.beta1, cfg.beta2), optimizer=cfg.optimizer,
                                                         muon_lr_ratio=cfg.muon_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.chat = bool(cfg.sft or cfg.dpo)  # conversations or preference pairs (sft.py), not plain text
        if self.chat:
            self.sampler = ChatSampler(self.corpus, cfg.batch_size, cfg.seed, rank=self.rank, world_size=self.world)
            self.val_batches = self.corpus.val_batches(cfg.batch_size)[:cfg.eval_batches]
        else:
            self.sampler = BatchSampler(self.corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed,
                                        rank=self.rank, world_size=self.world)
            self.val_batches = fixed_batches(self.corpus.val, cfg.eval_batches, cfg.batch_size, cfg.seq_len)
        self.step, self.train_seconds, self.history = 0, 0.0, []
        # a fine-tune's starting point: the base model's loss on the new data
        self.base_val_loss = self.evaluate(self.val_batches[self.rank::self.world]) if cfg.init_from else None
        torch.manual_seed(cfg.seed + self.rank)  # dropout differs across ranks
        if resume:
            self._load()
        self.ddp = self.model
        if self.world > 1:
            self.ddp = DistributedDataParallel(self.model, device_ids=[local] if self.device.type == "cuda" else None)
        self.fwd = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.stop_signal: str | None = None
        self.eval_s_per_token = 0.0  # measured by _time_eval when there is a time budget

    def run_config(self) -> dict[str, Any]:
        config = {"model": self.model_config.to_dict(), "train": dataclasses.asdict(self.cfg),
                  "data": self.corpus.describe(), "world_size": self.world, "device": str(self.device),
                  "torch": torch.__version__}
        if self.cfg.lora_rank is not None:  # resolved (alpha's default applied): loading needs no fine-tuning policy
            targets, rank, alpha = lora_settings(self.cfg)
            config["lora"] = {"targets": list(targets), "rank": rank, "alpha": alpha}
        return config

    def save(self) -> None:
        """Checkpoint (a collective under DDP: every rank's RNG state is gathered; rank 0 writes)."""
        rngs = [ckpt.rng_state(self.device)]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, ckpt.rng_state(self.device))
        state = {"step": self.step, "train_seconds": self.train_seconds, "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else {}, "sampler": self.sampler.state_dict(),
                 "rng": rngs}
        if self.master:
            config = {**self.run_config(), "step": self.step}
            ckpt.save_checkpoint(self.ckpt_dir, self.model, state, config, self.corpus.tokenizer)
            if self.cfg.lora_rank is not None:  # OUT/adapters and OUT/merged (finetune.py)
                save_adapters_and_merged(self.out, self.model, self.corpus.tokenizer, config)

    def _load(self) -> None:
        where = ckpt.find_checkpoint(self.ckpt_dir)
        saved = ckpt.check_resumable(where, self.model_config.to_dict(), self.corpus.sha256, self.cfg.tokenizer)
        changed = ckpt.config_differences(saved["train"], json.loads(json.dumps(dataclasses.asdict(self.cfg))))
        ckpt.load_weights(self.model, where, self.device)
        state = ckpt.load_state(where)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        if len(state["rng"]) == self.world:  # else (other world size): keep the fresh seeds
            ckpt.set_rng_state(state["rng"][self.rank], self.device)
        if self.master and not self.cfg.quiet:
            print(f"resumed from {where} at step {self.step}"
                  + "".join(f"\n  changed: {c}" for c in changed), flush=True)

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _loss(self, model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A batch's loss: next-token cross-entropy on (x, y) (targets -100 add nothing), DPO on a pair batch."""
        return chat_loss(model, batch, self.cfg.dpo_beta) if self.chat else lm_loss(model, batch)

    def evaluate(self, batches) -> float:
        """Mean next-token loss over `batches` (this rank's share), averaged over all ranks."""
        return evaluate(self.model, batches, loss_fn=self._loss, weight_fn=batch_weight if self.chat else token_count,
                        amp=self.amp, sum_over_processes=self._all_sum)

    def _full_split(self):
        if self.chat:
            return iter(self.corpus.val_batches(self.cfg.batch_size, self.rank, self.world))
        rows = max(self.cfg.batch_size, 4096 // self.cfg.seq_len)  # no gradients: bigger batches fit
        return full_split_batches(self.corpus.val, self.cfg.seq_len, rows, rank=self.rank, world_size=self.world)

    def evaluate_full(self) -> float:
        """Loss over the whole validation split (every token predicted once)."""
        return self.evaluate(self._full_split())

    def _time_eval(self) -> None:
        """Seconds per token of the final evaluation, from its first batch (run twice: the first warms up)."""
        batch = [next(self._full_split())]
        for _ in range(2):
            t = time.perf_counter()
            self.evaluate(batch)
            self.eval_s_per_token = (time.perf_counter() - t) / batch[0][1].numel()

    def end_reserve(self) -> float:
        """Seconds to keep for the end of a timed run: final evaluation, checkpoint, samples, plot."""
        val_tokens = self.corpus.val_tokens if self.chat else len(self.corpus.val)
        return 1.2 * self.eval_s_per_token * val_tokens / self.world + 0.003 * self.cfg.sample_tokens + 1.0

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def _start_files(self) -> None:
        """OUT/config.json; a fresh metrics.jsonl unless resuming (rank 0 only)."""
        if not self.master:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.run_config(), indent=2), encoding="utf-8")
        if not self.resume:  # --overwrite: forget the old run
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            for folder in (self.ckpt_dir, self.out / "adapters", self.out / "merged"):
                shutil.rmtree(folder, ignore_errors=True)

    def _schedule(self, progress: float) -> float:
        """Learning rate at this step. Step budget: lr_at(step). Time budget: linear warmup over steps
        times the cosine of lr_at over `progress` (fraction of the training time used, 0 -> 1)."""
        c = self.cfg
        if c.max_seconds is None:
            return lr_at(self.step, c.lr, c.min_lr, min(c.warmup_steps, c.max_steps), c.max_steps)
        warmup = min(1.0, (self.step + 1) / max(1, c.warmup_steps))
        return warmup * lr_at(progress, c.lr, c.min_lr, 0, 1)

    def run(self, reporter: Reporter | None = None) -> dict[str, Any]:
        """Train until a budget is spent, a signal arrives, or the loss is not finite. Returns a summary
        with `status` in {"done", "interrupted", "diverged"}."""
        cfg, rep = self.cfg, reporter or Reporter()
        if cfg.max_steps is None and cfg.max_seconds is None:
            raise ValueError("give max_steps and/or max_seconds")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        self.tokens_fed = 0  # the input tokens the steps really fed (chat batches: padded to their longest row)
        prior, loop_start = self.train_seconds, time.perf_counter()
        launch = self.started
        self._start_files()
        if cfg.max_seconds is not None:
            self._time_eval()
        recent: collections.deque[float] = collections.deque(maxlen=cfg.eval_interval)  # train losses
        status, lr, tok_s, t_window, fed_window = "done", 0.0, 0.0, loop_start, 0
        try:
            while True:
                now = time.perf_counter()
                self.train_seconds = prior + now - loop_start
                progress = self.step / cfg.max_steps if cfg.max_steps else 0.0
                if cfg.max_seconds is not None:  # training time = budget - earlier runs - start-up - end reserve
                    available = prior + (launch + cfg.max_seconds - prior - self.end_reserve()) - loop_start
                    progress = max(progress, self.train_seconds / available if available > 0 else 1.0)
                done, signalled = self._all_sum([float(progress >= 1.0), float(self.stop_signal is not None)])
                if done or signalled:  # decided together, so every rank stops at the same step
                    status = "interrupted" if signalled else status
                    break
                lr = self._schedule(progress)
                set_lr(self.optimizer, lr)
                batches = [self.sampler.next() for _ in range(cfg.grad_accum)]  # x, y (b, T) each
                fed = sum(b[0].numel() for b in batches)  # the input tokens really fed (chat: padded to the longest row)
                self.tokens_fed += int(self._all_sum([float(fed)])[0])  # every rank's tokens
                loss = train_step(self.fwd, self.optimizer, batches, grad_clip=cfg.grad_clip, loss_fn=self._loss,
                                  amp=self.amp, scaler=self.scaler, no_sync=self.ddp.no_sync if self.world > 1 else None,
                                  mean_over_processes=lambda v: self._all_sum([v])[0] / self.world)
                if not math.isfinite(loss):
                    rep.message(f"stopping: the training loss is {loss} at step {self.step + 1} (lr {lr:.3g}); the "
                                f"weights were not updated and the last good checkpoint is in {self.ckpt_dir}. "
                                "Try a lower --lr, a smaller --grad-clip, or --dtype float32.")
                    return {"status": "diverged", "step": self.step}
                self.step += 1
                recent.append(loss)
                if self.step % 10 == 0:
                    tok_s = (self.tokens_fed - fed_window) / (time.perf_counter() - t_window)
                    t_window, fed_window = time.perf_counter(), self.tokens_fed
                rep.update(self.step, self.train_seconds, time.perf_counter() - launch, loss, tok_s, lr)
                t = time.perf_counter()
                if self.step % cfg.eval_interval == 0:
                    val = self.evaluate(self.val_batches[self.rank::self.world])
                    self._record(recent, val, tokens_per_step, launch, lr, rep)
                if self.step % (cfg.ckpt_interval or cfg.eval_interval) == 0:
                    self.save()
                t_window += time.perf_counter() - t  # tokens/s counts training time only
            loop_seconds = time.perf_counter() - loop_start
            rep.close()
            val = self.evaluate_full()
            self._record(recent, val, tokens_per_step, launch, lr, rep, final=True)
            self.save()
            if status == "interrupted":
                rep.message(f"interrupted ({self.stop_signal}) at step {self.step}: checkpoint saved to "
                            f"{self.ckpt_dir}; continue with --resume --out {self.out}")
            return {"status": status, "step": self.step, "val_loss": val, "history": self.history,
                    "tokens": self.tokens_fed, "tokens_per_s": self.tokens_fed / max(loop_seconds, 1e-9)}
        finally:
            rep.close()
            for s, h in handlers.items():
                signal.signal(s, h)

    def _record(self, losses, val: float, tokens_per_step: int, launch: float, lr: float,
                rep: Reporter, final: bool = False) -> None:
        row = {"step": self.step, "tokens": self.step * tokens_per_step,
               "elapsed_s": round(time.perf_counter() - launch, 3),
               "train_loss": sum(losses) / len(losses) if losses else None, "val_loss": val, "lr": lr}
        if final:
            row["final"] = True
        self.history.append(row)
        if self.master:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            rep.evaluated(row)
