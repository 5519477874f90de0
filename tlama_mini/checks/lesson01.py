"""Checks for lesson 01 (byte-pair encoding). Each check_<name>(fn) calls the learner's fn on fresh
random inputs, compares with `tlama_mini.tokenizer`, and names the mistake when it can.

Conventions of the exercises: token ids are Python ints; ids 0..255 are the UTF-8 bytes; `merges` is a
dict {(a, b): new_id} in the order the merges were learned, with new ids 256, 257, ... (so a smaller new
id means an earlier merge, a higher priority when encoding). No regex pre-split: the text is one sequence.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..tokenizer import BPETokenizer, get_pair_counts, merge_pair
from .common import ExerciseFailed, attributes_stubs, fail, passed

# Only the checks: `from tlama_mini.checks.lesson01 import *` must not hand the reference solutions to the learner.
__all__ = ["check_bpe_decode", "check_bpe_encode", "check_get_pair_counts", "check_merge_pair", "check_train_bpe"]

_WORDS = ["the", "then", "there", "this", "that", "thé", "aaa", "banana", "bandana", "λόγος", "naïve", "aha"]


def _rand(lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, ()))


def _random_ids(n: int, alphabet: int = 4) -> tuple[list[int], int]:
    """Random ids from a small alphabet (so pairs repeat), with a run of exactly three x x x somewhere
    (an odd run: merging (x, x) from the left and from the right give different results) and a unique
    first and last id (so the pair counts are never symmetric, and the last pair occurs once). Returns (ids, x)."""
    ids = torch.randint(0, alphabet, (n,)).tolist()
    x, at = _rand(0, alphabet - 1), _rand(2, n - 5)
    ids[at - 1:at + 4] = [x + 1, x, x, x, x + 1]  # x + 1 may be a new id: fine, it only has to differ
    ids[0], ids[-1] = alphabet + 1, alphabet + 2
    return ids, x


def _random_text(n_words: int) -> str:
    """Words with repeated letters and multi-byte characters (é, ï: 2 bytes; λόγος: Greek, 2 bytes each)."""
    picks = torch.randint(0, len(_WORDS), (n_words,)).tolist()
    return " ".join(_WORDS[i] for i in picks)


def _train(text: str, n_merges: int) -> dict[tuple[int, int], int]:
    """Reference merges (no pre-split), as the exercises' dict {(a, b): new_id}."""
    return dict(BPETokenizer.train(text, 256 + n_merges, pattern=None).merges)


def _call(name: str, fn: Callable, *args: Any) -> Any:
    """Call fn on copies of list arguments and fail if it modified them."""
    copies = [list(a) if isinstance(a, list) else a for a in args]
    out = fn(*copies)
    if any(isinstance(a, list) and a != c for a, c in zip(args, copies)):
        fail(name, "the input list was modified in place", "build and return a new list; leave `ids` as it was")
    return out


def _compare(name: str, out: Any, expected: Any, mistakes: Mapping[str, Callable[[], Any]], hint: str = "",
             what: str = "") -> None:
    """Fail unless out == expected; name a known mistake whose result equals out."""
    if out == expected:
        return
    for mistake, make in mistakes.items():
        try:
            value = make()
        except Exception:  # a mistake that cannot even be computed on this input does not apply
            continue
        if value != expected and out == value:
            fail(name, f"the output matches a known mistake: {mistake}", hint)
    fail(name, f"wrong result{what}: got {_short(out)}, expected {_short(expected)}", hint)


def _short(x: Any, n: int = 12) -> str:
    if isinstance(x, Mapping):
        items = sorted(x.items(), key=lambda kv: str(kv[0]))
        return "{" + ", ".join(f"{k}: {v}" for k, v in items[:n]) + (", ...}" if len(items) > n else "}")
    if isinstance(x, list) and len(x) > n:
        return repr(x[:n])[:-1] + ", ...]"
    if isinstance(x, str) and len(x) > 6 * n:
        return repr(x[:6 * n]) + f"... ({len(x)} characters)"
    return repr(x)


def _as_counts(name: str, out: Any) -> dict:
    if not isinstance(out, Mapping):
        fail(name, f"returned {type(out).__name__}, expected a dict {{(a, b): count}}",
             "a collections.Counter or a plain dict both work; did you forget a `return`?")
    keys = list(out)
    if keys and not all(isinstance(k, tuple) and len(k) == 2 for k in keys):
        bad = next(k for k in keys if not (isinstance(k, tuple) and len(k) == 2))
        fail(name, f"the key {bad!r} is not a pair; keys must be tuples (a, b) of adjacent ids",
             "count single tokens? count zip(ids, ids[1:]) instead")
    return {k: v for k, v in out.items() if v != 0}


# ---------------------------------------------------------------------------------------------- exercises
@attributes_stubs
def check_get_pair_counts(fn) -> None:
    """fn(ids: list[int]) -> dict {(a, b): number of positions i with ids[i] == a and ids[i+1] == b}."""
    name = "get_pair_counts"
    ids, _ = _random_ids(_rand(16, 28))
    expected = dict(get_pair_counts(ids))

    def non_overlapping():  # each pair counted like merge_pair would replace it: x x x -> (x, x) once
        return {p: (len(ids) - len(merge_pair(ids, p, -1))) for p in expected}

    mistakes = {
        "pairs are counted in steps of 2, so half of them are missed (count every position i, i+1)":
            lambda: dict(Counter(zip(ids[::2], ids[1::2]))),
        "overlapping pairs are counted once: in x x x the pair (x, x) occurs at positions 0 and 1, so it counts 2 "
        "(only merge_pair skips overlaps)": non_overlapping,
        "the last pair is missed (off by one in the loop bound)": lambda: dict(Counter(zip(ids[:-2], ids[1:-1]))),
        "a pair (last, first) wraps around the end": lambda: dict(Counter(zip(ids, ids[1:] + ids[:1]))),
        "the pairs are reversed: (ids[i+1], ids[i]) instead of (ids[i], ids[i+1])":
            lambda: dict(Counter(zip(ids[1:], ids))),
        "every pair is counted once, not as often as it occurs": lambda: {p: 1 for p in expected},
    }
    try:
        _compare(name, _as_counts(name, _call(name, fn, ids)), expected, mistakes, what=f" for ids={ids}")
    except ExerciseFailed as e:
        if "known mistake" in str(e):
            raise
        for example, want in (([1, 2, 3, 1, 2], {(1, 2): 2, (2, 3): 1, (3, 1): 1}), ([7, 7, 7], {(7, 7): 2})):
            got = _as_counts(name, _call(name, fn, example))
            if got != want:  # the instructions' own examples are easier to follow than 20 random ids
                fail(name, f"get_pair_counts({example}) = {_short(got)}, expected {want}",
                     "count the pair (ids[i], ids[i + 1]) at every position i = 0 .. len(ids) - 2; overlapping "
                     "pairs count at every position, so [7, 7, 7] has (7, 7) twice")
        raise
    for short in ([], [7]):
        if _as_counts(name, _call(name, fn, short)) != {}:
            fail(name, f"ids={short} has no pairs, but the result is not empty")
    passed(name, f"{len(expected)} distinct pairs in {len(ids)} random ids, and the empty cases")


@attributes_stubs
def check_merge_pair(fn) -> None:
    """fn(ids, pair, new_id) -> a new list with every non-overlapping occurrence of pair, scanned left
    to right, replaced by new_id."""
    name = "merge_pair"
    new_id = _rand(256, 400)
    while True:  # a pair of two different ids that occurs at least twice
        ids, x = _random_ids(_rand(18, 30))
        counts = get_pair_counts(ids)
        other = max((p for p in counts if p[0] != p[1]), key=counts.get)
        if counts[other] >= 2:
            break

    for pair in (other, (x, x)):
        expected = merge_pair(ids, pair, new_id)

        def right_to_left(pair=pair):
            return merge_pair(ids[::-1], pair[::-1], new_id)[::-1]

        def no_skip(pair=pair, keep_last=True):  # replaces at i but then still looks at i + 1
            out = [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:])]
            return out + [ids[-1]] if keep_last else out

        def first_only(pair=pair):
            for i in range(len(ids) - 1):
                if (ids[i], ids[i + 1]) == pair:
                    return ids[:i] + [new_id] + ids[i + 2:]
            return list(ids)

        mistakes = {
            "after a match, the second id of the pair must be skipped (i += 2), otherwise it is kept and "
            "compared again": no_skip,
            "after a match the second id is not skipped, and the last id is dropped": lambda: no_skip(keep_last=False),
            "the last id is dropped when it is not part of a match (append the leftover id after the loop)":
                lambda: expected[:-1],
            "only the first occurrence is replaced; replace every one": first_only,
            "overlaps are resolved from the right: scan left to right, so x x x -> [new, x], not [x, new]":
                right_to_left,
        }
        out = _call(name, fn, ids, pair, new_id)
        if not isinstance(out, list):
            fail(name, f"returned {type(out).__name__}, expected a list of ints", "did you forget a `return`?")
        _compare(name, out, expected, mistakes, what=f" for ids={ids}, pair={pair}, new_id={new_id}")
    for short in ([], [other[0]]):
        if _call(name, fn, short, other, new_id) != short:
            fail(name, f"merging in ids={short} must return {short} unchanged")
    passed(name, f"pairs {other} and {(x, x)} (with an overlapping run) in {len(ids)} random ids")


def _merges_of(name: str, merges: Any, n_merges: int) -> Mapping:
    if isinstance(merges, list):
        fail(name, "returned a list; return a dict {(a, b): new_id}", "merges[pair] = new_id inside your loop")
    if not isinstance(merges, Mapping):
        fail(name, f"returned {type(merges).__name__}, expected a dict {{(a, b): new_id}}",
             "did you forget a `return`?")
    if len(merges) != n_merges:
        fail(name, f"returned {len(merges)} merges, expected n_merges = {n_merges}")
    return merges


def _check_merges(name: str, text: str, merges: Mapping) -> None:
    """Replay the learner's merges on text's UTF-8 bytes: each must be a most frequent pair at its step."""
    ids = list(text.encode("utf-8"))
    for k, (pair, new_id) in enumerate(merges.items()):
        if new_id != 256 + k:
            fail(name, f"merge {k} {pair} got the new id {new_id}, expected {256 + k}",
                 "ids 0..255 are the bytes; merge k creates the id 256 + k")
        if unknown := [i for i in pair if not (0 <= i < 256 + k)]:
            chars = {ord(c): c for c in text if ord(c) > 255}
            if unknown[0] in chars:
                fail(name, f"merge {k} {pair} uses {unknown[0]}, the code point of {chars[unknown[0]]!r}, not a byte",
                     "start from the UTF-8 bytes: ids = list(text.encode('utf-8')), not [ord(c) for c in text]")
            fail(name, f"merge {k} {pair} uses the id {unknown[0]}, which does not exist yet at that step")
        counts = get_pair_counts(ids)
        best = max(counts.values())
        if pair not in counts:
            fail(name, f"merge {k} {pair} does not occur in the text any more at step {k}",
                 "after choosing a pair, replace it in the ids (ids = merge_pair(ids, pair, new_id)), "
                 "then recount the pairs for the next step")
        if counts[pair] != best:
            top = max(counts, key=counts.get)
            fail(name, f"merge {k} {pair} occurs {counts[pair]} times, but {top} occurs {best} times at that step",
                 "pick the most frequent pair: max(counts, key=counts.get); and recount after each merge")
        ids = merge_pair(ids, pair, new_id)


@attributes_stubs
def check_train_bpe(fn) -> None:
    """fn(text, n_merges) -> dict {(a, b): new_id} of n_merges merges, new ids 256, 257, ... in the
    order learned, each the most frequent adjacent pair at its step (ties: any of the most frequent)."""
    name = "train_bpe"
    # First a Greek text: its letters are 2 bytes each, so code points (ord) instead of bytes show at once in the
    # first merge, (969, 969); on mostly-ASCII text they would surface later, as a confusing other diagnosis.
    greek = "ωω ωω ωω ωω"
    _check_merges(name + f" on {greek!r}", greek, _merges_of(name, fn(greek, 2), 2))
    text, n_merges = _random_text(_rand(60, 90)), _rand(8, 14)
    merges = _merges_of(name, fn(text, n_merges), n_merges)
    _check_merges(name, text, merges)
    same = list(merges) == list(_train(text, n_merges))
    passed(name, f"{n_merges} merges on {len(text)} chars, each the most frequent pair at its step, and a Greek "
                 "text" + ("" if same else "; ties broken differently from tlama_mini, which is fine"))


def _encode_mistakes(text: str, merges: Mapping[tuple[int, int], int]) -> dict[str, Callable[[], list[int]]]:
    """What typical wrong encoders return for text."""
    raw = list(text.encode("utf-8"))

    def greedy(pick: Callable[[Counter], tuple[int, int]], once: bool = False) -> list[int]:
        ids = list(raw)
        while True:
            counts = Counter({p: c for p, c in get_pair_counts(ids).items() if p in merges})
            if not counts:
                return ids
            pair = pick(counts)
            ids = merge_pair(ids, pair, merges[pair])
            if once:
                return ids

    return {
        "no merge was applied: these are just the UTF-8 bytes": lambda: raw,
        "merges are applied by frequency in this text; apply them by rank (lowest new id first), as learned":
            lambda: greedy(lambda c: max(c, key=lambda p: (c[p], -merges[p]))),
        "the latest merge is applied first; apply the earliest learned (lowest new id) first":
            lambda: greedy(lambda c: max(c, key=merges.get)),
        "only one merge is applied; loop until no adjacent pair is in merges":
            lambda: greedy(lambda c: min(c, key=merges.get), once=True),
    }


def _check_encoding(name: str, out: Any, expected: list[int], text: str, merges: Mapping[tuple[int, int], int]) -> None:
    if isinstance(out, (bytes, bytearray)):
        fail(name, "returned bytes; return the list of token ids", "list(text.encode('utf-8')) gives the byte ids")
    if not isinstance(out, list):
        fail(name, f"returned {type(out).__name__}, expected a list of ints", "did you forget a `return`?")
    if out and not all(isinstance(i, int) for i in out):
        bad = next(i for i in out if not isinstance(i, int))
        fail(name, f"the list holds {type(bad).__name__} ({bad!r}), not token ids (ints)",
             "return the ids, e.g. [256, 101], not the bytes or strings they stand for")
    if any(i > 255 and i - 256 >= len(merges) for i in out):
        fail(name, "some ids are neither bytes nor merges (code points?)",
             "start from the UTF-8 bytes: list(text.encode('utf-8')), not [ord(c) for c in text]")
    _compare(name, out, expected, _encode_mistakes(text, merges), what=f" for {text!r}")


@attributes_stubs
def check_bpe_encode(fn) -> None:
    """fn(text, merges) -> list of ids: the UTF-8 bytes of text, then, repeatedly, the adjacent pair
    with the lowest new id in `merges` replaced, until no adjacent pair is in `merges`."""
    name = "bpe_encode"
    # First a text whose most frequent pair, (b, c), was learned after (a, b): merges learned from similar text
    # rank pairs much as the text's own frequencies do, so on random text a frequency-ordered encoder often
    # agrees with the ranks, or shows up as another mistake.
    # Then one in which the latest merge, (b, c), would block the earliest, (a, b): both can apply to "abc".
    for crafted, crafted_text in (({(97, 98): 256, (98, 99): 257, (99, 100): 258}, "abcd bc bc bc"),
                                  ({(97, 98): 256, (99, 100): 257, (98, 99): 258}, "abc cd cd")):
        _check_encoding(name, fn(crafted_text, dict(crafted)),
                        BPETokenizer(list(crafted), pattern=None).encode_ordinary(crafted_text), crafted_text, crafted)
    merges = _train(_random_text(120), _rand(20, 40))
    text = _random_text(_rand(15, 25))
    out = fn(text, merges)
    _check_encoding(name, out, BPETokenizer(list(merges), pattern=None).encode_ordinary(text), text, merges)
    passed(name, f"{len(text)} chars -> {len(out)} tokens with {len(merges)} merges, and two texts where the "
           "frequency or the latest merge would choose differently")


@attributes_stubs
def check_bpe_decode(fn) -> None:
    """fn(ids, merges) -> str: the bytes of all tokens joined, decoded as UTF-8 with errors="replace"."""
    name = "bpe_decode"
    merges = _train(_random_text(120), _rand(20, 40))
    tok = BPETokenizer(list(merges), pattern=None)
    text = _random_text(_rand(10, 20))
    ids = tok.encode_ordinary(text)

    def per_token():
        return "".join(tok.vocab[i].decode("utf-8", errors="replace") for i in ids)

    def swapped():
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new in merges.items():
            vocab[new] = vocab[b] + vocab[a]
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    out = fn(ids, merges)
    if isinstance(out, (bytes, bytearray)):
        fail(name, "returned bytes; return a str", "b''.join(...).decode('utf-8', errors='replace')")
    if not isinstance(out, str):
        fail(name, f"returned {type(out).__name__}, expected a str", "did you forget a `return`?")
    def zero_bytes():  # bytes(i) is i zero bytes; a single byte is bytes([i])
        vocab = {i: bytes(i) for i in range(256)}
        for (a, b), new in merges.items():
            vocab[new] = vocab[a] + vocab[b]
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    mistakes = {"each token is decoded on its own: join the bytes of all tokens first, then decode once": per_token,
                "a merged token's bytes are vocab[b] + vocab[a]; they are vocab[a] + vocab[b]": swapped,
                "the text is all '\\x00': bytes(i) makes i zero bytes; the byte with value i is bytes([i])": zero_bytes}
    _compare(name, out, text, mistakes, what=f" for ids={_short(ids)}")
    # "é" as two separate byte tokens: only joining before decoding gives the character back.
    split = list("é".encode("utf-8"))  # [195, 169]
    out = fn(split, merges)
    if out != "é":
        fail(name, f"ids {split} (the two UTF-8 bytes of 'é', as two tokens) gave {out!r}, expected 'é'",
             "a character's bytes can be spread over several tokens: join all bytes, then decode once")
    try:
        out = fn([255, 104, 105], merges)  # 0xFF never occurs in UTF-8
    except UnicodeDecodeError:
        fail(name, "ids [255, 104, 105] (an invalid UTF-8 byte, then 'hi') raised UnicodeDecodeError",
             "a model can generate any ids, so decode with errors='replace' (gives '\\ufffd' for bad bytes)")
    if out != "\ufffdhi":
        fail(name, f"ids [255, 104, 105] gave {out!r}, expected '\\ufffdhi' (errors='replace')")
    passed(name, f"{len(ids)} tokens -> {len(text)} chars, a split 'é', and an invalid byte")
