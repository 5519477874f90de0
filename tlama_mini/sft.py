"""Chat fine-tuning data for the training loop: `train --sft data.jsonl` (supervised fine-tuning on
conversations, the loss only on the assistant's tokens) and `train --dpo pairs.jsonl` (DPO, `dpo.py`).

    data.jsonl   one {"messages": [{"role": ..., "content": ...}, ...]} per line, ending with the assistant
    pairs.jsonl  one {"prompt": [messages], "chosen": "reply", "rejected": "reply"} per line

A bad line is refused with its number and the problem. The last `VAL_FRACTION` of the rows (at least
one) is the validation split. `ChatCorpus` stands in for `data.Corpus` in `Trainer` and `ChatSampler`
for `data.BatchSampler`: seeded epochs over the examples, a state that `--resume` restores exactly.
A DPO example carries the frozen reference model's log-probabilities of its two replies, computed
once before training (`add_reference_logps`), so no second model stays in memory.

Batches: SFT (x (b, T), y (b, T)) with y = -100 off the assistant's tokens and on the padding; DPO
(x (2b, T), y (2b, T), ref_chosen (b,), ref_rejected (b,)), the b chosen rows first. T: the batch's
longest example (a conversation longer than the run's --seq-len is refused, naming its line).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .chat_data import collate, pad_id_of, render_conversation
from .dpo import dpo_loss, pair_batch, pair_examples, policy_logps
from .gguf import load_gguf
from .sample import generate_stream

VAL_FRACTION = 0.1
ROLES = ("system", "user", "assistant", "tool")


def _messages(value: Any, where: str, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {what} must be a non-empty list of messages, got {type(value).__name__}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"{where}: {what}[{k}] must be {{\"role\": ..., \"content\": ...}}, got {m!r}"[:300])
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"{where}: {what}[{k}] needs a role among {', '.join(ROLES)} and a string content")
    return value


def read_jsonl(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """The rows of an SFT ("sft") or DPO ("dpo") file, checked; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--{kind} {path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if kind == "sft":
            if "messages" not in row:
                raise ValueError(f"{where}: no \"messages\" key (an SFT row is {{\"messages\": [...]}})")
            msgs = _messages(row["messages"], where, "messages")
            if msgs[-1]["role"] != "assistant":
                raise ValueError(f"{where}: the last message is the {msgs[-1]['role']}'s; a training conversation "
                                 "ends with the assistant's reply")
        else:
            if missing := [k for k in ("prompt", "chosen", "rejected") if k not in row]:
                raise ValueError(f"{where}: missing {', '.join(missing)} (a DPO row is "
                                 "{\"prompt\": [messages], \"chosen\": \"...\", \"rejected\": \"...\"})")
            _messages(row["prompt"], where, "prompt")
            for k in ("chosen", "rejected"):
                if not isinstance(row[k], str) or not row[k]:
                    raise ValueError(f"{where}: {k} must be a non-empty string")
            if row["chosen"] == row["rejected"]:
                raise ValueError(f"{where}: chosen and rejected are the same reply (nothing to prefer)")
        rows.append(row | {"line": n})
    if len(rows) < 2:
        raise ValueError(f"{path} has {len(rows)} row(s); need at least 2 (one is kept for validation)")
    return rows


@dataclass
class ChatCorpus:
    """Encoded chat examples, split into train and validation (the `Corpus` of a chat run)."""
    tokenizer: Any
    kind: str                 # "sft" or "dpo"
    train: list[Any]          # sft: (ids, mask); dpo: [(chosen ids, mask), (rejected ids, mask), ref_c, ref_r]
    val: list[Any]
    source: str
    sha256: str
    pad_id: int = 0
    lines: list[int] = field(default_factory=list)
    first_prompt: list[int] = field(default_factory=list)  # the first validation example's prompt ids


    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "vocab_size": self.tokenizer.vocab_size,
                "kind": self.kind, "train_examples": len(self.train), "val_examples": len(self.val),
                "val_tokens": self.val_tokens}

    @property
    def val_tokens(self) -> int:
        return sum(len(e[0]) if self.kind == "sft" else len(e[0][0]) + len(e[1][0]) for e in self.val)

    def batch(self, examples: list[Any]) -> tuple[torch.Tensor, ...]:
        if self.kind == "sft":
            return collate(examples, self.pad_id)
        x, y = pair_batch([(c, r) for c, r, _, _ in examples], self.pad_id)
        ref = torch.tensor([[rc, rr] for _, _, rc, rr in examples], dtype=torch.float32)  # (b, 2)
        return x, y, ref[:, 0], ref[:, 1]

    def val_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, ...]]:
        """Every validation example once, in batches (this rank's share)."""
        mine = self.val[rank::world_size]
        return [self.batch(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]


def load_chat_corpus(path: str | Path, kind: str, tokenizer: Any, max_len: int, *,
                     assistant_only: bool = True) -> ChatCorpus:
    """Read, check and encode an SFT or DPO file with the model's tokenizer and chat template.
    assistant_only=False (SFT): the mask is 1 on every token, the loss covers the prompt too (the usual
    bug, kept to measure what it costs)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--{kind} needs a model whose tokenizer has a chat template (a GGUF chat model, "
                         "or a run fine-tuned from one); this checkpoint's tokenizer has none")
    rows = read_jsonl(path, kind)
    raw = Path(path).read_bytes()
    examples, prompts = [], []
    for row in rows:
        try:
            if kind == "sft":
                ids, mask = render_conversation(tokenizer, row["messages"])
                prompts.append(ids[:mask.index(1)])
                mask = mask if assistant_only else [1] * len(ids)
                lengths = [len(ids)]
                examples.append((ids, mask))
            else:
                chosen, rejected = pair_examples(tokenizer, row)
                prompts.append(chosen[0][:chosen[1].index(1)])
                lengths = [len(chosen[0]), len(rejected[0])]
                examples.append([chosen, rejected, 0.0, 0.0])
        except ValueError as err:
            raise ValueError(f"{path}, line {row['line']}: {err}") from None
        if max(lengths) - 1 > max_len:
            raise ValueError(f"{path}, line {row['line']}: {max(lengths)} tokens, longer than the context "
                             f"(--seq-len {max_len} + 1); shorten it or raise --seq-len")
        if kind == "sft" and not any(examples[-1][1][1:]):
            raise ValueError(f"{path}, line {row['line']}: the assistant's reply has no token to train on")
    n_val = max(1, round(len(examples) * VAL_FRACTION))
    return ChatCorpus(tokenizer, kind, examples[:-n_val], examples[-n_val:], str(path),
                      hashlib.sha256(raw).hexdigest(), pad_id_of(tokenizer), [r["line"] for r in rows],
                      prompts[-n_val])


@torch.no_grad()
def add_reference_logps(corpus: ChatCorpus, model: Any, device: torch.device, batch_size: int = 8) -> None:
    """Fill each DPO example's reference log-probabilities with `model` (the frozen starting point)."""
    was_training = model.training
    model.eval()
    for examples in (corpus.train, corpus.val):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            x, y, _, _ = corpus.batch(chunk)
            pc, pr = policy_logps(model, x.to(device), y.to(device))
            for e, c, r in zip(chunk, pc.tolist(), pr.tolist()):
                e[2], e[3] = c, r
    model.train(was_training)


class ChatSampler:
    """Global batches of `batch_size` examples in seeded epochs (a fresh permutation per epoch); each rank
    takes its slice. state_dict / load_state_dict: the position, for an exact resume."""

    def __init__(self, corpus: ChatCorpus, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.corpus, self.batch_size, self.seed, self.rank, self.world = corpus, batch_size, seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(len(self.corpus.train), generator=g).tolist()

    def next(self) -> tuple[torch.Tensor, ...]:
        picks = []
        while len(picks) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            picks.append(self._order[self.pos])
            self.pos += 1
        mine = picks[self.rank::self.world]
        return self.corpus.batch([self.corpus.train[i] for i in mine])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


def chat_loss(model: Any, batch: tuple[torch.Tensor, ...], beta: float) -> torch.Tensor:
    """The loss of one batch: SFT (x, y): the masked next-token cross-entropy; DPO (x, y, ref_c, ref_r):
    `dpo.dpo_loss` of the policy's log-probabilities against the stored reference's."""
    if len(batch) == 2:
        return model(batch[0], targets=batch[1])[1]
    x, y, ref_c, ref_r = batch
    pc, pr = policy_logps(model, x, y)
    return dpo_loss(pc, pr, ref_c, ref_r, beta=beta)


def batch_weight(batch: tuple[torch.Tensor, ...]) -> int:
    """How much a batch counts in a mean: its target tokens (SFT, plain text), its pairs (DPO)."""
    return batch[0].shape[0] // 2 if len(batch) == 4 else int((batch[1] != -100).sum())


def gguf_to_checkpoint(path: str | Path, folder: str | Path) -> Path:
    """Write a GGUF chat model (weights dequantized to float32, its tokenizer with the chat template) as
    a tlama-mini checkpoint in `folder`, once: what `train --gguf PATH` fine-tunes (as --init-from)."""
    path, folder = Path(path).expanduser(), Path(folder)
    source = {"gguf": str(path.resolve()), "size": path.stat().st_size}
    try:
        if ckpt.read_config(ckpt.find_checkpoint(folder)).get("source") == source:
            return folder  # converted before
    except (FileNotFoundError, ValueError):
        pass
    model, tokenizer = load_gguf(path)
    config = {"model": model.config.to_dict(), "train": {"preset": None, "tokenizer": "bpe"}, "source": source,
              "step": 0}
    return ckpt.save_checkpoint(folder, model, {}, config, tokenizer)


@torch.no_grad()
def reply_to(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int = 64) -> str:
    """The greedy reply to an already rendered prompt (ending with the generation prompt), up to the
    end-of-turn token (not included)."""
    device = model.token_emb.weight.device
    stop = getattr(tokenizer, "eos_token_id", None)
    room = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    out = []
    for nxt in generate_stream(model, torch.tensor([prompt_ids], device=device), room, temperature=0.0,
                               stop_token=stop):
        if int(nxt[0]) == stop:
            break
        out.append(int(nxt[0]))
    return tokenizer.decode(out)
