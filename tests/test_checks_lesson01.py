"""The lesson-01 checks accept correct answers and reject typical wrong ones with the right diagnosis."""
from collections import Counter

import pytest

from tlama_mini.checks import ExerciseFailed
from tlama_mini.checks import lesson01 as checks


def expect_failure(check, fn, *words):
    with pytest.raises(ExerciseFailed) as info:
        check(fn)
    for w in words:
        assert w in str(info.value), str(info.value)


# ----------------------------------------------------------------- correct implementations, written independently
def pair_counts(ids):
    counts = {}
    for i in range(len(ids) - 1):
        counts[ids[i], ids[i + 1]] = counts.get((ids[i], ids[i + 1]), 0) + 1
    return counts


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i:i + 2]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train(text, n_merges):
    ids, merges = list(text.encode("utf-8")), {}
    for k in range(n_merges):
        counts = pair_counts(ids)
        pair = max(counts, key=counts.get)
        merges[pair] = 256 + k
        ids = merge(ids, pair, 256 + k)
    return merges


def encode(text, merges):
    ids = list(text.encode("utf-8"))
    for pair, new_id in sorted(merges.items(), key=lambda kv: kv[1]):  # by rank: one pass is enough
        ids = merge(ids, pair, new_id)
    return ids


def vocab_of(merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), new_id in merges.items():
        vocab[new_id] = vocab[a] + vocab[b]
    return vocab


def decode(ids, merges):
    vocab = vocab_of(merges)
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------- the checks
def test_get_pair_counts():
    checks.check_get_pair_counts(pair_counts)
    checks.check_get_pair_counts(lambda ids: Counter(zip(ids, ids[1:])))
    expect_failure(checks.check_get_pair_counts, lambda ids: Counter(zip(ids[::2], ids[1::2])), "steps of 2")
    expect_failure(checks.check_get_pair_counts, lambda ids: Counter(zip(ids[:-2], ids[1:-1])), "last pair")
    expect_failure(checks.check_get_pair_counts, lambda ids: Counter(zip(ids[1:], ids)), "reversed")
    expect_failure(checks.check_get_pair_counts,
                   lambda ids: {p: len(ids) - len(merge(ids, p, -1)) for p in pair_counts(ids)}, "overlapping")
    expect_failure(checks.check_get_pair_counts, lambda ids: list(zip(ids, ids[1:])), "expected a dict")
    expect_failure(checks.check_get_pair_counts, lambda ids: Counter(ids), "not a pair")

    def skips_after_a_repeat(ids):  # steps over the next position after a pair (x, x), like merge_pair does
        counts, i = {}, 0
        while i < len(ids) - 1:
            counts[ids[i], ids[i + 1]] = counts.get((ids[i], ids[i + 1]), 0) + 1
            i += 2 if ids[i] == ids[i + 1] else 1
        return counts

    with pytest.raises(ExerciseFailed) as info:  # named as an overlap mistake, or shown on [7, 7, 7]; on rare
        checks.check_get_pair_counts(skips_after_a_repeat)  # draws where all its counts are 1: "counted once"
    assert "overlapping" in str(info.value) or "counted once" in str(info.value), str(info.value)


def test_merge_pair():
    def no_skip(ids, pair, new_id):
        return [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:])] + ids[-1:]

    def in_place(ids, pair, new_id):
        ids[:] = merge(ids, pair, new_id)
        return ids

    def first_only(ids, pair, new_id):
        for i in range(len(ids) - 1):
            if (ids[i], ids[i + 1]) == pair:
                return ids[:i] + [new_id] + ids[i + 2:]
        return list(ids)

    checks.check_merge_pair(merge)
    expect_failure(checks.check_merge_pair, no_skip, "skipped")
    expect_failure(checks.check_merge_pair, in_place, "in place")
    expect_failure(checks.check_merge_pair, first_only, "first occurrence")
    expect_failure(checks.check_merge_pair, lambda ids, p, n: merge(ids[::-1], p[::-1], n)[::-1], "from the right")


def test_train_bpe():
    def stale_counts(text, n_merges):  # counts once and never merges: takes the top-n pairs of the bytes
        counts = pair_counts(list(text.encode("utf-8")))
        return {p: 256 + k for k, p in enumerate(sorted(counts, key=counts.get, reverse=True)[:n_merges])}

    def least_frequent(text, n_merges):
        ids, merges = list(text.encode("utf-8")), {}
        for k in range(n_merges):
            counts = pair_counts(ids)
            pair = min(counts, key=counts.get)
            merges[pair] = 256 + k
            ids = merge(ids, pair, 256 + k)
        return merges

    def from_chars(text, n_merges):  # code points: right on ASCII text, and é (233) even passes as a byte
        ids, merges = [ord(c) for c in text], {}
        for k in range(n_merges):
            counts = pair_counts(ids)
            pair = max(counts, key=counts.get)
            merges[pair] = 256 + k
            ids = merge(ids, pair, 256 + k)
        return merges

    checks.check_train_bpe(train)
    expect_failure(checks.check_train_bpe, stale_counts, "recount")
    expect_failure(checks.check_train_bpe, least_frequent, "most frequent")
    expect_failure(checks.check_train_bpe, lambda t, n: {p: i - 1 for p, i in train(t, n).items()}, "256 + k")
    expect_failure(checks.check_train_bpe, lambda t, n: list(train(t, n)), "return a dict")
    expect_failure(checks.check_train_bpe, from_chars, "code point of 'ω'", "UTF-8 bytes")


def test_bpe_encode():
    def by_frequency(text, merges):
        ids = list(text.encode("utf-8"))
        while True:
            counts = {p: c for p, c in pair_counts(ids).items() if p in merges}
            if not counts:
                return ids
            pair = max(counts, key=lambda p: (counts[p], -merges[p]))
            ids = merge(ids, pair, merges[pair])

    checks.check_bpe_encode(encode)
    expect_failure(checks.check_bpe_encode, lambda t, m: t.encode("utf-8"), "returned bytes")
    expect_failure(checks.check_bpe_encode, lambda t, m: list(t.encode("utf-8")), "no merge")
    expect_failure(checks.check_bpe_encode, lambda t, m: [vocab_of(m)[i] for i in encode(t, m)], "not token ids")
    def most_frequent_first_seen(text, merges):  # by frequency, ties to the pair seen first
        ids = list(text.encode("utf-8"))
        while True:
            counts = Counter(p for p in zip(ids, ids[1:]) if p in merges)
            if not counts:
                return ids
            pair = counts.most_common(1)[0][0]
            ids = merge(ids, pair, merges[pair])

    # on random text, frequency order often equals rank order; the check's second text tells them apart
    expect_failure(checks.check_bpe_encode, by_frequency, "by frequency", "by rank")
    expect_failure(checks.check_bpe_encode, most_frequent_first_seen, "by frequency")

    def latest_first(text, merges):  # max instead of min: the latest merge first
        ids = list(text.encode("utf-8"))
        while True:
            pairs = [p for p in zip(ids, ids[1:]) if p in merges]
            if not pairs:
                return ids
            pair = max(pairs, key=merges.get)
            ids = merge(ids, pair, merges[pair])

    expect_failure(checks.check_bpe_encode, latest_first, "latest merge is applied first")


def test_bpe_decode():
    def per_token(ids, merges):
        vocab = vocab_of(merges)
        return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)

    def strict(ids, merges):
        vocab = vocab_of(merges)
        return b"".join(vocab[i] for i in ids).decode("utf-8")

    checks.check_bpe_decode(decode)
    expect_failure(checks.check_bpe_decode, lambda ids, m: decode(ids, m).encode("utf-8"), "returned bytes")
    expect_failure(checks.check_bpe_decode, per_token, "join")
    expect_failure(checks.check_bpe_decode, strict, "errors='replace'")

    def zero_bytes(ids, merges):  # bytes(i) is i zero bytes, not the byte i
        vocab = {i: bytes(i) for i in range(256)}
        for (a, b), new_id in merges.items():
            vocab[new_id] = vocab[a] + vocab[b]
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    with pytest.raises(ExerciseFailed) as info:
        checks.check_bpe_decode(zero_bytes)
    assert "bytes([i])" in str(info.value) and len(str(info.value)) < 300, str(info.value)[:1000]
    with pytest.raises(ExerciseFailed) as info:  # any wrong text is shown shortened, not thousands of characters
        checks.check_bpe_decode(lambda ids, m: decode(ids, m) * 200)
    assert "characters)" in str(info.value) and len(str(info.value)) < 600, str(info.value)[:1000]
