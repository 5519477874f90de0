"""Tokenizers and data-file lookup. References: tiktoken's "gpt2" encoding (ids must be identical),
a naive from-scratch BPE trainer written here with collections.Counter, and hand-worked examples.
tiktoken's encodings are built from the packaged rank files (tlama_mini.tiktoken_local), so nothing here
needs a tiktoken cache or the network; one test checks they equal what tiktoken's own constructors build."""
import hashlib
import json
import random
import shutil
import urllib.error
from collections import Counter

import pytest
import regex

from tlama_mini import paths
from tlama_mini.paths import find_data_file
from tlama_mini.tiktoken_local import ENCODINGS, load_ranks, tiktoken_encoding
from tlama_mini.tokenizer import (GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer, bytes_to_unicode, get_pair_counts,
                                  get_tokenizer, load_tokenizer, merge_pair)

tiktoken = pytest.importorskip("tiktoken")

TEXT = ("The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't.\n"
        "She sells sea shells by the sea shore, and the shells she sells are sea shells, I'm sure.\n"
        "In 2024 there were 1,234 foxes and 56789 dogs -- or so they'll tell you.\n\n") * 3


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def reference():
    return tiktoken_encoding("gpt2")  # tiktoken's gpt2, from the packaged r50k_base.tiktoken


# ------------------------------------------------------------------ GPT-2 against tiktoken
def test_gpt2_matches_tiktoken_on_tiny_shakespeare(gpt2, reference):
    text = find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    ours, theirs = gpt2.encode(text), reference.encode(text)
    mismatches = sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))
    print(f"Tiny Shakespeare: {len(theirs)} tiktoken tokens, {len(ours)} ours, {mismatches} mismatches")
    assert len(ours) == len(theirs) and mismatches == 0
    assert gpt2.decode(ours) == text


HARD_CASES = [
    "Hello world", "", " ", "   \n\n\t  x", "trailing spaces   ", "trailing newlines\n\n\n", "\r\n\r\n  \t",
    "I'm, you'll, they've, she's, we'd, it't, 'RE 'Ll I’m", "don't   'tis ''quoted''",
    "3.14159 1,000,000 2024-01-01 0x1F 12345678901234567890 ١٢٣ ½",
    "café naïve résumé Ångström Straße", "e\u0301 a\u0308 n\u0303 (combining marks)", "日本語のテキスト 中文 한국어",
    "مرحبا بالعالم", "שלום עולם", "Ελληνικά Кириллица", "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🧑🏿‍💻",
    "\x00\x01\x1c\x7f control \u200b\u00a0\u3000\u2028 spaces", "a" * 300, " " * 50 + "word", "<|endoftext",
    "snake_case_name abc123 x2y __init__ v1.2.3", "def f(x):\n    return x**2  # code\n",
]


@pytest.mark.parametrize("text", HARD_CASES)
def test_gpt2_matches_tiktoken_on_hard_cases(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]  # as in tiktoken's docs


def test_special_token(gpt2, reference):
    text = "The end.<|endoftext|>A new document <|endoftext|>"
    with pytest.raises(ValueError, match="endoftext"):  # tiktoken also refuses by default
        gpt2.encode(text)
    with pytest.raises(ValueError):
        reference.encode(text)
    for allowed in ({"<|endoftext|>"}, "all"):
        ids = gpt2.encode(text, allowed_special=allowed)
        assert ids == reference.encode(text, allowed_special=allowed)
        assert ids.count(50256) == 2
    as_text = gpt2.encode(text, disallowed_special=set())
    assert as_text == reference.encode(text, disallowed_special=()) and 50256 not in as_text
    assert gpt2.decode(ids) == gpt2.decode(as_text) == text
    with pytest.raises(ValueError, match="unknown special"):
        gpt2.encode("x", allowed_special={"<|im_start|>"})


def random_unicode(rng: random.Random, n: int) -> str:
    """Seeded mix of ASCII, whitespace, accents, CJK, RTL, emoji and arbitrary non-surrogate code points."""
    pools = ["abcdefghijklmnopqrstuvwxyz ", "ABCXYZ0123456789", " \n\t\r  ", "'.,;:!?-()\"’", "éèàüñçÅß\u0301\u0308",
             "日本語中文한국어", "مرحبا שלום", "😀👍🏽\u200d👨👩👧🇫🇷"]
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            cp = rng.randrange(0x110000)
            out.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "?")
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


def test_random_unicode_round_trip_and_matches_tiktoken(gpt2, reference):
    rng = random.Random(0)
    for _ in range(200):
        text = random_unicode(rng, rng.randrange(1, 80))
        ids = gpt2.encode(text, disallowed_special=set())
        assert gpt2.decode(ids) == text
        assert ids == reference.encode(text, disallowed_special=())


def test_decode_random_ids_like_tiktoken(gpt2, reference):
    # Random tokens often cut UTF-8 characters in half: both decode those bytes to '\ufffd'.
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(50257) for _ in range(rng.randrange(1, 10))]
        assert gpt2.decode_bytes(ids) == reference.decode_bytes(ids)
        assert gpt2.decode(ids) == reference.decode(ids)
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([50257])


def test_gpt2_save_load_round_trip(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2.json")
    loaded = load_tokenizer(tmp_path / "gpt2.json")
    assert loaded.encode(TEXT) == gpt2.encode(TEXT) and loaded.vocab == gpt2.vocab


def test_from_gpt2_finds_files_through_tlama_data_dir(monkeypatch, tmp_path, gpt2):
    # A data folder of one's own beats the packaged copy: here GPT-2's files with only its first 100 merges.
    (tmp_path / "tiktoken").mkdir()
    shutil.copy(find_data_file("tiktoken/encoder.json"), tmp_path / "tiktoken" / "encoder.json")
    lines = find_data_file("tiktoken/vocab.bpe").read_text(encoding="utf-8").splitlines()
    (tmp_path / "tiktoken" / "vocab.bpe").write_text("\n".join(lines[:101]) + "\n", encoding="utf-8")
    monkeypatch.setenv("TLAMA_DATA_DIR", str(tmp_path))
    mine = get_tokenizer("gpt2")
    assert len(mine.merges) == 100 and len(gpt2.merges) == 50_000
    assert mine.merges == {pair: i for pair, i in gpt2.merges.items() if i < 256 + 100}


# ------------------------------------------------------------------ the small helpers
def test_helpers_by_hand():
    assert get_pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_pair_counts([5, 5, 5], Counter({(5, 5): 1}), weight=10) == {(5, 5): 21}
    assert get_pair_counts([7]) == {}
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]  # left to right, no overlap
    assert merge_pair([1, 3], (1, 2), 9) == [1, 3]


def test_bytes_to_unicode_matches_gpt2_files():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in mapping.values())
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ" and mapping[ord("A")] == "A"
    encoder = json.loads(find_data_file("tiktoken/encoder.json").read_text(encoding="utf-8"))
    assert {tok for tok, i in encoder.items() if i < 256} == set(mapping.values())


# ------------------------------------------------------------------ training
def naive_train(parts: list[str], n_merges: int, pattern: str | None) -> list[tuple[int, int]]:
    """The textbook loop, recounting every pair of every chunk occurrence after each merge."""
    chunks = [list(c.encode()) for p in parts for c in (regex.findall(pattern, p) if pattern else [p])]
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = Counter(pair for ids in chunks for pair in zip(ids, ids[1:]))
        if not counts:
            break
        best = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best)  # ties: the smallest pair
        merges.append(pair)
        chunks = [merge_pair(ids, pair, new_id) for ids in chunks]
    return merges


@pytest.mark.parametrize("pattern", [GPT2_SPLIT_PATTERN, None])
def test_train_learns_the_naive_merges(pattern):
    n = 40
    tok = BPETokenizer.train(TEXT, 256 + n, pattern=pattern)
    assert len(tok.merges) == n and tok.vocab_size == 256 + n
    merges = sorted(tok.merges, key=tok.merges.get)
    assert merges == naive_train([TEXT], n, pattern)
    # The first merge is the most frequent adjacent byte pair (inside chunks when splitting).
    chunks = regex.findall(pattern, TEXT) if pattern else [TEXT]
    pairs = Counter(p for c in chunks for p in zip(c.encode(), c.encode()[1:]))
    assert pairs[merges[0]] == max(pairs.values())
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())


def test_train_with_special_tokens():
    docs = ["first document, the fox", "second document: the dog", "third: the fox and the dog"]
    text = "<|endoftext|>".join(docs)
    tok = BPETokenizer.train(text, 256 + 20 + 1, special_tokens=["<|endoftext|>"])
    assert len(tok.merges) == 20 and tok.special_tokens == {"<|endoftext|>": 276} and tok.vocab_size == 277
    # Specials cut the text: merges are learned from the documents only, never across a special.
    assert sorted(tok.merges, key=tok.merges.get) == naive_train(docs, 20, GPT2_SPLIT_PATTERN)
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(276) == 2 and tok.decode(ids) == text


def test_train_edge_cases(tmp_path):
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train(TEXT, 256, special_tokens=["<|endoftext|>"])
    with pytest.warns(UserWarning, match="no pairs left"):
        tok = BPETokenizer.train("ab ab", 300)
    assert sorted(tok.merges, key=tok.merges.get) == [(97, 98), (32, 256)]  # "ab", then " ab"
    tok = BPETokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "bpe.json")
    loaded = load_tokenizer(tmp_path / "bpe.json")
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert loaded.encode(TEXT + "<|endoftext|>", allowed_special="all") == tok.encode(
        TEXT + "<|endoftext|>", allowed_special="all")
    bpe = get_tokenizer("bpe", TEXT, vocab_size=300)  # no special token: one more merge, the same first 43
    assert len(bpe.merges) == 44 and {p: i for p, i in bpe.merges.items() if i < 299} == tok.merges
    assert get_tokenizer(str(tmp_path / "bpe.json")).merges == tok.merges


# ------------------------------------------------------------------ characters
def test_char_tokenizer(tmp_path):
    tok = CharTokenizer.from_text("hello world!")
    assert tok.chars == sorted(set("hello world!")) and tok.vocab_size == 9
    ids = tok.encode("hello world")
    assert ids == [tok.chars.index(c) for c in "hello world"] and tok.decode(ids) == "hello world"
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at index 1"):
        tok.encode("hé")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([9])
    tok.save(tmp_path / "char.json")
    assert load_tokenizer(tmp_path / "char.json").chars == tok.chars
    assert get_tokenizer("char", "abc").vocab_size == 3
    with pytest.raises(ValueError, match="pass text"):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


# ------------------------------------------------------------------ finding data files
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty TLAMA_DATA_DIR, packaged folder and user cache, and a downloader that fails as it does
    without network."""
    monkeypatch.setenv("TLAMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(paths, "PACKAGED_DATA_DIR", tmp_path / "packaged")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url, dest, timeout=30.0):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(paths, "fetch_url", no_network)
    return tmp_path


def put(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_find_data_file_search_order(offline):
    rel = "tinyshakespeare/input.txt"
    cached = put(offline / "cache" / "tlama_mini" / rel)
    assert paths.find_data_file(rel) == cached
    packaged = put(offline / "packaged" / rel)
    assert paths.find_data_file(rel) == packaged  # the packaged copy beats the cache
    in_data_dir = put(offline / "data" / rel)
    assert paths.find_data_file(rel) == in_data_dir  # TLAMA_DATA_DIR beats the packaged copy
    explicit = put(offline / "mine.txt")
    assert paths.find_data_file(rel, explicit) == explicit  # an explicit file beats everything
    assert paths.find_data_file(rel, offline / "data") == in_data_dir  # an explicit folder is a data root
    with pytest.raises(FileNotFoundError, match="explicit path"):
        paths.find_data_file(rel, offline / "missing.txt")


def test_find_data_file_offline_message(offline):
    with pytest.raises(FileNotFoundError) as err:
        paths.find_data_file("tiktoken/vocab.bpe")
    message = str(err.value)
    assert "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe" in message
    assert "$TLAMA_DATA_DIR/tiktoken/vocab.bpe" in message
    assert str(offline / "packaged" / "tiktoken" / "vocab.bpe") in message
    assert str(offline / "cache" / "tlama_mini" / "tiktoken" / "vocab.bpe") in message
    assert not list((offline / "cache").rglob("*.part"))
    with pytest.raises(FileNotFoundError, match="no download URL"):
        paths.find_data_file("unknown/file.txt")


def test_find_data_file_download_is_checked(offline, monkeypatch):
    import hashlib
    monkeypatch.setattr(paths, "fetch_url", lambda url, dest, timeout=30.0: dest.write_bytes(b"payload"))
    good = hashlib.sha256(b"payload").hexdigest()
    path = paths.find_data_file("some/file.txt", url="https://example.invalid/f", sha256=good)
    assert path == offline / "cache" / "tlama_mini" / "some" / "file.txt" and path.read_bytes() == b"payload"
    with pytest.raises(ValueError, match="sha256"):
        paths.find_data_file("other/file.txt", url="https://example.invalid/f", sha256="0" * 64)
    assert not (offline / "cache" / "tlama_mini" / "other" / "file.txt").exists()
    assert not list((offline / "cache").rglob("*.part"))


# ------------------------------------------------------------------ what ships inside the package
def test_every_known_file_ships_in_the_package_unchanged(monkeypatch, tmp_path):
    monkeypatch.delenv("TLAMA_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url, dest, timeout=30.0):
        raise AssertionError(f"tried to download {url}")
    monkeypatch.setattr(paths, "fetch_url", no_network)
    for relative, known in paths.KNOWN_FILES.items():
        path = paths.find_data_file(relative)
        assert path == paths.PACKAGED_DATA_DIR / relative
        assert hashlib.sha256(path.read_bytes()).hexdigest() == known.sha256, relative
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_packaged_encodings_equal_tiktokens_own(name, monkeypatch):
    """tiktoken's own constructor (tiktoken_ext.openai_public), fed the packaged files instead of its
    downloads and with its cache off, builds the encoding tiktoken_encoding(name) builds: the same ranks and
    special tokens, and the same ids (older tiktoken releases spell the same split pattern differently)."""
    from tiktoken import load
    from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS
    by_url = {known.url: relative for relative, known in paths.KNOWN_FILES.items()}

    def read_packaged(blobpath):
        return (paths.PACKAGED_DATA_DIR / by_url[blobpath]).read_bytes()
    monkeypatch.setattr(load, "read_file", read_packaged)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" turns tiktoken's cache off
    theirs = tiktoken.Encoding(**ENCODING_CONSTRUCTORS[name]())
    ours = tiktoken_encoding(name)
    assert ours.name == theirs.name == name and ours.n_vocab == theirs.n_vocab
    assert ours._special_tokens == theirs._special_tokens and ours._mergeable_ranks == theirs._mergeable_ranks
    rng = random.Random(2)
    for text in [TEXT, *HARD_CASES, *(random_unicode(rng, rng.randrange(1, 80)) for _ in range(200))]:
        assert ours.encode(text, disallowed_special=()) == theirs.encode(text, disallowed_special=())


def test_packaged_encodings_known_ids_and_errors(tmp_path, monkeypatch):
    assert tiktoken_encoding("gpt2").encode("Hello world") == [15496, 995]  # as in tiktoken's docs
    assert tiktoken_encoding("cl100k_base").encode("Hello world") == [9906, 1917]
    assert tiktoken_encoding("cl100k_base").n_vocab == 100_277
    assert tiktoken_encoding("gpt2") is tiktoken_encoding("gpt2")  # built once
    with pytest.raises(ValueError, match="o200k_base"):
        tiktoken_encoding("o200k_base")
    # A rank file that is not tiktoken's (here one rank changed) is refused, naming the download.
    rel = "tiktoken/r50k_base.tiktoken"
    lines = find_data_file(rel).read_bytes().splitlines()
    token, rank = lines[1000].split()
    lines[1000] = token + b" " + str(int(rank) + 1).encode()
    (tmp_path / "tiktoken").mkdir()
    (tmp_path / rel).write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setenv("TLAMA_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="sha256.*" + paths.KNOWN_FILES[rel].url):
        load_ranks(rel)
