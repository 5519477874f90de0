"""Tokenizers: text <-> lists of integer token ids (no tensors here).

- `CharTokenizer`: one token per character of a training text (char-rnn, nanoGPT's Shakespeare).
- `BPETokenizer`: byte-level byte-pair encoding (Gage 1994; Sennrich et al. 2016, "Neural Machine
  Translation of Rare Words with Subword Units"; byte-level as in GPT-2, Radford et al. 2019).
  Start from the 256 byte values, so any text can be encoded; repeatedly replace the most frequent
  adjacent pair of ids with a new id (a "merge"). Text is first split into chunks (words, numbers,
  punctuation, whitespace) by a regex, and merges never cross chunks, so " dog" and "dog." share " dog".
- `BPETokenizer.from_gpt2()`: GPT-2's own merges, giving exactly tiktoken's "gpt2" ids.
- `BPETokenizer.from_vocab(tokens, merges, ...)`: any GPT-2-style vocabulary whose ids are not laid out
  as bytes-then-merges (a GGUF file's, `tlama_mini.gguf`), with optional digit splitting (SmolLM).

Encoding applies the learned merges in the order they were learned: in each chunk, merge the adjacent
pair that was learned earliest, again and again, until no adjacent pair is a known merge.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import AbstractSet, Literal

import regex  # like `re`, plus the Unicode classes \p{L} (letters) and \p{N} (numbers)

from .chat_template import render_chat_template
from .paths import find_data_file

# GPT-2's pre-tokenizer (openai/gpt-2, src/encoder.py): common English contractions, an optional space
# plus letters, an optional space plus numbers, an optional space plus other symbols, whitespace
# runs (leaving the last space of a run before a word to that word), and any leftover whitespace.
# tiktoken's r50k/gpt2 pattern is written differently (possessive quantifiers) but splits the same way.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM (llama.cpp's "smollm" pre-tokenizer, HF's Digits(individual_digits=True) before ByteLevel):
# every digit is its own chunk first, then the GPT-2 pattern splits the text between digits. So numbers
# are read digit by digit (arithmetic sees the same token for a "7" anywhere), and a whitespace run
# before a digit stays one chunk (one sequence of pieces cannot be written as one regex alternation:
# "x  1" gives "x", "  ", "1", not "x", " ", " ", "1").
DIGIT_PATTERN = r"\p{N}"
ENDOFTEXT = "<|endoftext|>"


def get_pair_counts(ids: Sequence[int], counts: Counter | None = None, weight: int = 1) -> Counter:
    """Count adjacent pairs: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}.
    Adds `weight` per occurrence into `counts` when given (a chunk that appears `weight` times)."""
    counts = Counter() if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] += weight
    return counts


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair`, left to right, by `new_id`: ([1, 2, 3, 1, 2], (1, 2), 9) -> [9, 3, 9]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used to store byte tokens as text in
    encoder.json/vocab.bpe. Printable bytes map to themselves; the other 68 (control characters,
    space, ...) map to unused characters from chr(256) on, in byte order (so space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return mapping


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters of a text."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer needs a non-empty collection of single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            i = next(i for i, c in enumerate(text) if c not in self.stoi)
            raise ValueError(f"character {text[i]!r} (U+{ord(text[i]):04X}) at index {i} is not in this "
                             f"CharTokenizer's {self.vocab_size} characters; build it from a text that "
                             "contains it, or use a byte-level tokenizer ('bpe' or 'gpt2'), which "
                             "can encode any text") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"token id {bad[0]} is out of range for a CharTokenizer of vocab_size {self.vocab_size}")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")


class BPETokenizer:
    """Byte-level BPE. ids 0..255 are single bytes (`byte_order[i]` is the byte of id i), merge k
    creates id 256 + k from `merges[k]`, and special tokens (e.g. "<|endoftext|>") come last.
    A tokenizer read from a model file (`tlama_mini.gguf`) also has a chat template and its end
    tokens: `chat_template`, `eos_token_id`, `bos_token_id` (None otherwise)."""

    chat_template: str | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def __init__(self, merges: Sequence[tuple[int, int]] = (), *, special_tokens: dict[str, int] | None = None,
                 pattern: str | None = GPT2_SPLIT_PATTERN, byte_order: Sequence[int] = range(256),
                 byte_ids: Sequence[int] | None = None, merge_ids: Sequence[int] | None = None,
                 split_digits: bool = False):
        """Default layout: id i < 256 is byte byte_order[i], merge k creates id 256 + k. Other layouts
        (a GGUF vocabulary): byte_ids[b] is the id of byte b and merge k creates merge_ids[k] (two merges
        may create the same token). Merge k has priority k either way; split_digits: SmolLM's rule."""
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order must be a permutation of the 256 byte values")
        self.pattern = pattern
        self._split = regex.compile(pattern) if pattern else None
        self.split_digits = split_digits
        self._digits = regex.compile(f"({DIGIT_PATTERN})") if split_digits else None
        self.byte_order = list(byte_order)
        if byte_ids is None:
            byte_ids = [0] * 256
            for i, b in enumerate(self.byte_order):
                byte_ids[b] = i
        elif len(byte_ids) != 256 or len({i for i in byte_ids if i is not None}) != sum(i is not None for i in byte_ids):
            raise ValueError("byte_ids must give 256 distinct ids (or None), one per byte value")
        # None: a byte with no token (SmolLM's vocabulary lacks 0x04 and bytes UTF-8 text rarely or never
        # uses); encoding drops it, like HF's `tokenizers` BPE without an unknown token
        self.byte_to_id = list(byte_ids)
        self.vocab: dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(self.byte_to_id) if i is not None}
        merge_ids = range(256, 256 + len(merges)) if merge_ids is None else merge_ids
        if len(merge_ids) != len(merges):
            raise ValueError(f"{len(merges)} merges but {len(merge_ids)} merge_ids")
        # merges: pair -> the id it creates; _rank: pair -> priority (the merge learned earliest wins)
        self.merges: dict[tuple[int, int], int] = {}
        self._rank: dict[tuple[int, int], int] = {}
        for k, ((a, b), new_id) in enumerate(zip(merges, merge_ids)):
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merge {k} ({a}, {b}) uses an id that does not exist yet")
            if (a, b) in self.merges:
                continue  # a repeated merge keeps its first (highest) priority
            self.merges[(a, b)] = new_id
            self._rank[(a, b)] = k
            if self.vocab.setdefault(new_id, self.vocab[a] + self.vocab[b]) != self.vocab[a] + self.vocab[b]:
                raise ValueError(f"merge {k} ({a}, {b}) creates id {new_id}, which already stands for "
                                 f"{self.vocab[new_id]!r}")
        self.special_tokens = dict(special_tokens or {})
        for token, i in self.special_tokens.items():
            if i in self.vocab:
                raise ValueError(f"special token {token!r} has id {i}, already used by {self.vocab[i]!r}")
            self.vocab[i] = token.encode("utf-8")
        self._cache: dict[str, list[int]] = {}  # chunk -> ids; text repeats its words a lot

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, text: str, vocab_size: int, *, pattern: str | None = GPT2_SPLIT_PATTERN,
              special_tokens: Sequence[str] = ()) -> BPETokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`. Ties between equally
        frequent pairs go to the smallest pair of ids, so training is deterministic."""
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size ({vocab_size}) must be at least 256 bytes + {len(special_tokens)} special tokens")
        split = regex.compile(pattern) if pattern else None
        # Special tokens are never learned from: cut the text at them first.
        parts = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
        chunks = Counter(c for part in parts for c in (split.findall(part) if split else [part]))
        words = [list(chunk.encode("utf-8")) for chunk in chunks]  # unique chunks as byte ids
        freqs = list(chunks.values())                               # how often each chunk occurs

        counts = Counter()
        for ids, freq in zip(words, freqs):
            get_pair_counts(ids, counts, freq)
        merges = []
        for new_id in range(256, 256 + n_merges):
            if not counts:
                warnings.warn(f"text has no pairs left to merge: stopping at vocab_size {new_id + len(special_tokens)}")
                break
            pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent, then smallest
            merges.append(pair)
            # Update the counts only for the chunks that contain the pair (much faster than recounting).
            for j, ids in enumerate(words):
                if pair[0] not in ids:
                    continue
                merged = merge_pair(ids, pair, new_id)
                if len(merged) != len(ids):
                    get_pair_counts(ids, counts, -freqs[j])
                    get_pair_counts(merged, counts, freqs[j])
                    words[j] = merged
            counts = +counts  # drop pairs whose count fell to zero
        specials = {tok: 256 + len(merges) + k for k, tok in enumerate(special_tokens)}
        return cls(merges, special_tokens=specials, pattern=pattern)

    # ---------------------------------------------------------------- encoding
    def _encode_chunk(self, chunk: str) -> list[int]:
        if (cached := self._cache.get(chunk)) is not None:
            return cached
        # A byte with no token is dropped, as HF's `tokenizers` BPE does without an unknown token.
        ids = [i for i in (self.byte_to_id[b] for b in chunk.encode("utf-8")) if i is not None]
        while len(ids) >= 2:
            # The pair learned earliest; pairs that are no merge rank last (infinity).
            pair = min(zip(ids, ids[1:]), key=lambda p: self._rank.get(p, float("inf")))
            if pair not in self.merges:
                break
            ids = merge_pair(ids, pair, self.merges[pair])
        if len(self._cache) > 100_000:  # keep memory bounded on huge corpora
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating special-token strings as ordinary text."""
        pieces = [p for p in self._digits.split(text) if p] if self._digits else [text]
        chunks = [c for piece in pieces for c in (self._split.findall(piece) if self._split else [piece])]
        return [i for chunk in chunks for i in self._encode_chunk(chunk)]

    def encode(self, text: str, *, allowed_special: AbstractSet[str] | Literal["all"] = frozenset(),
               disallowed_special: AbstractSet[str] | Literal["all"] = "all") -> list[int]:
        """Encode `text` like tiktoken: special tokens in `allowed_special` become their ids; by
        default, text containing any other special token raises (it may be a prompt injection)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if unknown := allowed - set(self.special_tokens):
            raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if found := sorted(t for t in disallowed if t in text):
            raise ValueError(f"text contains the special token {found[0]!r}; pass allowed_special={{{found[0]!r}}} "
                             "to encode it as its special id, or disallowed_special=set() to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        # Capturing group: split() keeps the special tokens themselves in the list.
        special = "(" + "|".join(regex.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")"
        ids = []
        for k, part in enumerate(regex.split(special, text)):
            ids.extend([self.special_tokens[part]] if k % 2 else self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]} is not in this tokenizer (vocab_size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """ids -> text. A token can end in the middle of a UTF-8 character; such bytes become '�'."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A conversation [{"role": "user", "content": "..."}, ...] -> the prompt text, rendered with
        this tokenizer's chat template exactly as transformers' `apply_chat_template` renders it."""
        names = {i: t for t, i in self.special_tokens.items()}
        return render_chat_template(self.chat_template or "", messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=names.get(self.bos_token_id, ""), eos_token=names.get(self.eos_token_id, ""))

    # ---------------------------------------------------------------- saving and loading
    def to_dict(self) -> dict:
        merges = sorted(self.merges, key=self._rank.get)
        return {"type": "bpe", "pattern": self.pattern, "byte_order": self.byte_order,
                "merges": [list(p) for p in merges], "special_tokens": self.special_tokens,
                "byte_ids": self.byte_to_id, "merge_ids": [self.merges[p] for p in merges],
                "split_digits": self.split_digits, "chat_template": self.chat_template,
                "eos_token_id": self.eos_token_id, "bos_token_id": self.bos_token_id}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        tok = cls([tuple(p) for p in d["merges"]], special_tokens=d["special_tokens"], pattern=d["pattern"],
                  byte_order=d["byte_order"], byte_ids=d.get("byte_ids"), merge_ids=d.get("merge_ids"),
                  split_digits=d.get("split_digits", False))
        # a model file's chat template and end tokens (tlama_mini.gguf) survive a save: `train --sft` needs them
        tok.chat_template, tok.eos_token_id, tok.bos_token_id = (d.get("chat_template"), d.get("eos_token_id"),
                                                                 d.get("bos_token_id"))
        return tok

    @classmethod
    def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str], special_tokens: dict[str, int], *,
                   pattern: str | None = GPT2_SPLIT_PATTERN, split_digits: bool = False) -> BPETokenizer:
        """A GPT-2-style vocabulary as GGUF and HF's tokenizer.json store it: `tokens[i]` is token i spelled
        with `bytes_to_unicode` ("Ġthe"), `merges[k]` is "a b" (two token strings, priority k), and
        `special_tokens` maps text to id ("<|im_end|>": 2); those are matched in text, never merged."""
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        ids = {}
        for i, tok in enumerate(tokens):
            if i not in special_tokens.values():
                ids.setdefault(tok, i)
        byte_ids = [ids.get(bytes_to_unicode()[b]) for b in range(256)]
        if sum(i is None for i in byte_ids) > 128:
            raise ValueError("the vocabulary has no token for most single bytes: not a byte-level BPE vocabulary")
        pairs, merge_ids = [], []
        for k, line in enumerate(merges):
            a, sep, b = line.partition(" ")
            if not sep or a not in ids or b not in ids or a + b not in ids:
                raise ValueError(f"merge {k} {line!r} names a token that is not in the vocabulary")
            pairs.append((ids[a], ids[b]))
            merge_ids.append(ids[a + b])
        tok = cls(pairs, special_tokens=special_tokens, pattern=pattern, byte_ids=byte_ids,
                  merge_ids=merge_ids, split_digits=split_digits)
        for i, t in enumerate(tokens):  # tokens no merge creates can still be decoded
            if i not in tok.vocab:
                tok.vocab[i] = bytes(byte_of[c] for c in t) if all(c in byte_of for c in t) else t.encode("utf-8")
        return tok

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def from_gpt2(cls, data_dir: str | Path | None = None) -> BPETokenizer:
        """GPT-2's tokenizer from its `encoder.json` (token -> id) and `vocab.bpe` (merges, in order),
        found with `paths.find_data_file` under `tiktoken/`. Gives exactly tiktoken's "gpt2" ids."""
        encoder = json.loads(find_data_file("tiktoken/encoder.json", data_dir).read_text(encoding="utf-8"))
        lines = find_data_file("tiktoken/vocab.bpe", data_dir).read_text(encoding="utf-8").splitlines()
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        # encoder.json spells tokens with bytes_to_unicode; ids 0..255 are the single bytes, in its order.
        byte_order = [byte_of[token] for token, i in sorted(encoder.items(), key=lambda kv: kv[1])[:256]]
        merges = []
        for rank, line in enumerate(line for line in lines[1:] if line):  # line 0 is "#version: 0.2"
            a, b = line.split(" ")
            if encoder[a + b] != 256 + rank:
                raise ValueError(f"vocab.bpe merge {rank} {line!r} has id {encoder[a + b]} in encoder.json, "
                                 f"expected {256 + rank}: the two files do not belong together")
            merges.append((encoder[a], encoder[b]))
        return cls(merges, special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]}, byte_order=byte_order)


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    """Load a tokenizer saved with `.save(path)` (either kind)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    kinds = {"char": CharTokenizer, "bpe": BPETokenizer}
    if d.get("type") not in kinds:
        raise ValueError(f"{path} is not a saved tokenizer: its 'type' is {d.get('type')!r}, expected 'char' or 'bpe'")
    return kinds[d["type"]].from_dict(d)


def get_tokenizer(name: str, text: str | None = None, *, vocab_size: int = 512,
                  data_dir: str | Path | None = None) -> CharTokenizer | BPETokenizer:
    """"char" (built from `text`), "bpe" (trained on `text` to `vocab_size`), "gpt2" (GPT-2's, same ids
    as tiktoken), or the path of a tokenizer saved as .json."""
    if name.endswith(".json"):
        return load_tokenizer(name)
    if name == "gpt2":
        return BPETokenizer.from_gpt2(data_dir)
    if name in ("char", "bpe"):
        if text is None:
            raise ValueError(f"the {name!r} tokenizer is built from a training text: pass text=...")
        return CharTokenizer.from_text(text) if name == "char" else BPETokenizer.train(text, vocab_size)
    raise ValueError(f"unknown tokenizer {name!r}: choose 'char', 'bpe', 'gpt2' or a saved .json file")
