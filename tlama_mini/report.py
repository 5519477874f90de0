"""How a training run reports: `Reporter`, what `Trainer.run` calls with its progress (silent but for
messages), a progress bar while it trains (`TqdmReporter`, the command line's) and the loss plot
OUT/loss.png from OUT/metrics.jsonl (`plot_metrics`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .training import TrainConfig


class Reporter:
    """Receives progress from `Trainer.run`: silent here except for messages; cli.py shows a bar."""

    def update(self, step: int, train_seconds: float, elapsed: float, loss: float, tokens_per_s: float,
               lr: float) -> None: ...

    def evaluated(self, row: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None: ...


class TqdmReporter(Reporter):
    """A progress bar (loss, tokens/s, time left) on a terminal; one line per evaluation otherwise."""

    def __init__(self, cfg: TrainConfig, start_step: int, master: bool) -> None:
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
    try:  # lazy: matplotlib is an optional extra (notebooks); training works without it
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
