"""Data: corpus loading, nanoGPT's split, the token cache, batch sampling and its state, full-split windows."""
import numpy as np
import pytest
import torch

from tlama_mini import data
from tlama_mini.paths import find_data_file


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLAMA_TOKEN_CACHE", str(tmp_path / "tokens"))


def test_named_corpus_file_and_folder(tmp_path):
    text, source = data.load_text("shakespeare")
    assert len(text) == 1_115_394 and text.startswith("First Citizen:") and "tinyshakespeare" in source
    (tmp_path / "books" / "b").mkdir(parents=True)
    (tmp_path / "books" / "b" / "2.txt").write_text("second")
    (tmp_path / "books" / "1.txt").write_text("first")
    (tmp_path / "books" / "notes.md").write_text("ignored")
    assert data.load_text(str(tmp_path / "books"))[0] == "first\n\nsecond"  # sorted by path, .txt only
    assert data.load_text(str(tmp_path / "books" / "1.txt"))[0] == "first"
    with pytest.raises(FileNotFoundError, match="neither a named corpus"):
        data.load_text("no-such-corpus")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.txt files"):
        data.load_text(str(tmp_path / "nothing"))


def test_shakespeare_split_is_nanogpts():
    corpus = data.prepare_data("shakespeare", "char")
    assert corpus.tokenizer.vocab_size == 65
    assert (len(corpus.train), len(corpus.val)) == (1_003_854, 111_540)  # nanoGPT's shakespeare_char numbers
    text = data.load_text("shakespeare")[0]
    assert corpus.tokenizer.decode(corpus.val[:20].tolist()) == text[1_003_854:1_003_874]


def test_tokens_are_cached_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("hello world, " * 50)
    first = data.prepare_data(str(path), "char")
    files = list((tmp_path / "tokens").glob("*.npy"))
    assert len(files) == 1 and np.load(files[0]).dtype == np.uint16
    from tlama_mini.tokenizer import CharTokenizer

    def no_encoding(self, text):
        raise AssertionError("encoded again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(CharTokenizer, "encode", no_encoding)
        second = data.prepare_data(str(path), "char")
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    path.write_text("other text " * 50)  # other text: other cache entry
    data.prepare_data(str(path), "char")
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2


def test_bpe_tokenizer_is_trained_once(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:5000])
    corpus = data.prepare_data(str(path), "bpe", bpe_vocab_size=270)
    assert corpus.tokenizer.vocab_size == 270
    assert len(corpus.train) + len(corpus.val) < 5000  # merges made the text shorter
    from tlama_mini.tokenizer import BPETokenizer
    monkeypatch.setattr(BPETokenizer, "train", classmethod(lambda *a, **k: pytest.fail("trained again")))
    again = data.prepare_data(str(path), "bpe", bpe_vocab_size=270)
    assert again.tokenizer.merges == corpus.tokenizer.merges


def test_batches_are_shifted_windows_and_resume_from_state():
    ids = torch.arange(1000)
    sampler = data.BatchSampler(ids, batch_size=4, seq_len=16, seed=3)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # ids are positions here: y is x one token later
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(3)]
    other = data.BatchSampler(ids, batch_size=4, seq_len=16, seed=99)
    other.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (other.next() for _ in range(3))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_ranks_split_the_same_global_batch():
    ids = torch.arange(5000)
    whole = data.BatchSampler(ids, batch_size=6, seq_len=8, seed=1)
    ranks = [data.BatchSampler(ids, batch_size=6, seq_len=8, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(2):
        x, _ = whole.next()
        assert torch.equal(x, torch.cat([r.next()[0] for r in ranks]))
    with pytest.raises(ValueError, match="divisible"):
        data.BatchSampler(ids, batch_size=5, seq_len=8, seed=1, world_size=2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.BatchSampler(torch.arange(8), batch_size=2, seq_len=8, seed=1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_full_split_windows_predict_every_token_once(world):
    ids = torch.arange(1, 104)  # 103 tokens: 102 targets = 12 windows of 8 + a tail of 6
    seen = []
    for rank in range(world):
        for x, y in data.full_split_batches(ids, seq_len=8, batch_size=5, rank=rank, world_size=world):
            assert x.shape == y.shape and x.shape[1] <= 8 and x.shape[0] <= 5 and torch.equal(y, x + 1)
            seen.append(y.flatten())
    assert torch.equal(torch.sort(torch.cat(seen)).values, ids[1:])


def test_fixed_batches_are_fixed():
    ids = torch.arange(300)
    a, b = data.fixed_batches(ids, 3, 2, 8), data.fixed_batches(ids, 3, 2, 8)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
