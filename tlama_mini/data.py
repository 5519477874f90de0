"""Training data: read a corpus, tokenize it once (cached), split it, and cut it into batches.

- `load_text("shakespeare" | file.txt | folder/)`: a named corpus (found with `paths.find_data_file`:
  $TLAMA_DATA_DIR, the copy packaged with tlama_mini, ...), one text file, or every `*.txt` in a folder.
- `prepare_data(...)`: tokenizer + token ids, cached in the user cache under the sha256 of the text and
  of the tokenizer, so the second run skips the (slow, for BPE) encoding.
- The split is nanoGPT's: the first 90% of the tokens train, the last 10% validate, so losses compare.
- `BatchSampler`: random windows drawn from a seeded `torch.Generator`. Its state *is* the data position:
  checkpoint it and a resumed run draws exactly the batches the uninterrupted run would have drawn.
  With several processes (DDP) every rank draws the same *global* batch and keeps its own slice, so the
  samples seen do not depend on the number of processes.
- `full_split_batches`: non-overlapping windows covering a whole split, for the final evaluation.

Legend: N tokens in a split, B batch (rows), T sequence length (window).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .paths import find_data_file, user_cache_dir
from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

# Named corpora: name -> path relative to the data folder (see paths.KNOWN_FILES).
CORPORA = {"shakespeare": "tinyshakespeare/input.txt", "tinyshakespeare": "tinyshakespeare/input.txt"}
VAL_FRACTION = 0.1


def load_text(data: str) -> tuple[str, str]:
    """Return (text, description) for a corpus name, a text file, or a folder of `*.txt` files
    (read recursively in sorted order and joined by blank lines)."""
    if data in CORPORA:
        path = find_data_file(CORPORA[data])
        return path.read_text(encoding="utf-8"), f"{data} ({path})"
    path = Path(data).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"--data {data}: the folder has no *.txt files")
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files), f"{path} ({len(files)} .txt files)"
    raise FileNotFoundError(f"--data {data!r} is neither a named corpus ({', '.join(sorted(CORPORA))}) "
                            "nor an existing text file or folder")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_cache_dir() -> Path:
    """Where encoded corpora are kept: $TLAMA_TOKEN_CACHE, else <user cache>/tokens."""
    if env := os.environ.get("TLAMA_TOKEN_CACHE"):
        return Path(env)
    return user_cache_dir() / "tokens"


def _save_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def build_tokenizer(kind: str, text: str, text_sha: str, *, bpe_vocab_size: int = 512):
    """'char' (the characters of `text`), 'bpe' (trained on `text`, cached) or 'gpt2'."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "gpt2":
        return BPETokenizer.from_gpt2()
    if kind == "bpe":  # training BPE in pure Python takes a while: do it once per (text, size)
        path = token_cache_dir() / f"bpe-{text_sha[:16]}-{bpe_vocab_size}.json"
        try:
            return load_tokenizer(path)
        except (OSError, ValueError, KeyError):
            tok = BPETokenizer.train(text, bpe_vocab_size)
            _save_atomic(path, lambda p: tok.save(p))
            return tok
    raise ValueError(f"unknown tokenizer {kind!r}: choose 'char', 'bpe' or 'gpt2'")


def tokenizer_sha(tokenizer: Any) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def encode_cached(text: str, text_sha: str, tokenizer: Any) -> np.ndarray:
    """Token ids of `text` (N,) as uint16 (vocab <= 65536) or int32, cached on disk."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    path = token_cache_dir() / f"{text_sha[:16]}-{tokenizer_sha(tokenizer)[:16]}.npy"
    try:
        ids = np.load(path)
        if ids.dtype == dtype:
            return ids
    except (OSError, ValueError):
        pass
    ids = np.asarray(tokenizer.encode(text), dtype=dtype)  # (N,)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, ids)
    _save_atomic(path, write)
    return ids


@dataclass
class Corpus:
    """A tokenized corpus, split into train and validation ids (1-D int64 tensors)."""

    tokenizer: Any
    train: torch.Tensor  # (N_train,)
    val: torch.Tensor    # (N_val,)
    source: str
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "vocab_size": self.tokenizer.vocab_size,
                "train_tokens": len(self.train), "val_tokens": len(self.val)}


def split_ids(ids: torch.Tensor, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) for training, the rest for validation (nanoGPT's split). (N,) -> two 1-D."""
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:]


def prepare_data(data: str, tokenizer: str, *, bpe_vocab_size: int = 512) -> Corpus:
    """Load, tokenize (cached) and split a corpus."""
    text, source = load_text(data)
    sha = sha256_text(text)
    tok = build_tokenizer(tokenizer, text, sha, bpe_vocab_size=bpe_vocab_size)
    ids = torch.from_numpy(encode_cached(text, sha, tok).astype(np.int64))  # (N,)
    train, val = split_ids(ids)
    return Corpus(tok, train, val, source, sha)


class BatchSampler:
    """Random (x, y) windows of a split; y is x shifted by one token. Draws the global batch of
    `batch_size` rows from its own generator, then keeps rows [rank * b, (rank + 1) * b), b = B / world."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int, *,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(ids) < seq_len + 1:
            raise ValueError(f"the split has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             "use a shorter --seq-len or more data")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes "
                             f"({world_size}): it is the global batch, split evenly across them")
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(seq_len + 1)  # (T + 1,)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns x, y: (B / world, T) each, int64, on the CPU."""
        starts = torch.randint(len(self.ids) - self.seq_len, (self.batch_size,), generator=self.generator)  # (B,)
        per_rank = self.batch_size // self.world_size
        starts = starts[self.rank * per_rank:(self.rank + 1) * per_rank]  # (b,)
        windows = self.ids[starts[:, None] + self.offsets]  # (b, T + 1)
        return windows[:, :-1], windows[:, 1:]  # (b, T), (b, T)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def fixed_batches(ids: torch.Tensor, n_batches: int, batch_size: int, seq_len: int, seed: int = 0
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n_batches` random batches every time (for comparable periodic evaluations)."""
    sampler = BatchSampler(ids, batch_size, seq_len, seed)
    return [sampler.next() for _ in range(n_batches)]


def full_split_batches(ids: torch.Tensor, seq_len: int, batch_size: int, *, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows that predict every token of the split after the first exactly once.
    The windows are dealt round-robin to ranks; the last, shorter window comes as its own batch.
    Yields x, y of shape (b, T) (b <= batch_size), then maybe one (1, T') with T' < T."""
    n_windows = (len(ids) - 1) // seq_len
    full = ids[:n_windows * seq_len + 1]
    x_all = full[:-1].view(n_windows, seq_len)  # (W, T)
    y_all = full[1:].view(n_windows, seq_len)   # (W, T)
    mine = torch.arange(rank, n_windows, world_size)
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        yield x_all[rows], y_all[rows]
    rest = len(ids) - 1 - n_windows * seq_len
    if rest > 0 and rank == (n_windows % world_size):
        tail = ids[n_windows * seq_len:]
        yield tail[None, :-1], tail[None, 1:]  # (1, T'), (1, T')
