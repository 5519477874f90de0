"""tiktoken's encodings built from the packaged rank files: no tiktoken cache, no network.

`tiktoken.get_encoding("gpt2")` downloads its files on first use (or reads `$TIKTOKEN_CACHE_DIR`), so a
lesson or test that compares with it fails offline. `tiktoken_encoding("gpt2")` builds the same
`tiktoken.Encoding` from `tlama_mini/data_files/tiktoken/*.tiktoken` (found with `paths.find_data_file`, so
`$TLAMA_DATA_DIR`, the user cache and a checked download work too), checked against the sha256 tiktoken
itself expects. The split patterns and special tokens are tiktoken's, copied from
`tiktoken_ext/openai_public.py` (tiktoken 0.14); tests/test_tokenizer.py checks that every encoding here
equals the one tiktoken's own constructor builds from the same files.

The reference is independent of our own `BPETokenizer.from_gpt2()`: that reads GPT-2's `encoder.json` and
`vocab.bpe`, this reads the separately published `r50k_base.tiktoken` (the same ranks as `gpt2`).
"""
from __future__ import annotations

import base64
import functools
import hashlib
from typing import NamedTuple

import tiktoken

from .paths import KNOWN_FILES, find_data_file

ENDOFTEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, ENDOFPROMPT = (
    "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")

# tiktoken's r50k/gpt2 pattern (GPT-2's, with possessive quantifiers) and its cl100k_base pattern.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


class EncodingSpec(NamedTuple):
    ranks_file: str  # relative to the data folder (see paths.KNOWN_FILES)
    pat_str: str
    special_tokens: dict[str, int]
    explicit_n_vocab: int | None


ENCODINGS: dict[str, EncodingSpec] = {
    "gpt2": EncodingSpec("tiktoken/r50k_base.tiktoken", R50K_PATTERN, {ENDOFTEXT: 50256}, 50257),
    "r50k_base": EncodingSpec("tiktoken/r50k_base.tiktoken", R50K_PATTERN, {ENDOFTEXT: 50256}, 50257),
    "cl100k_base": EncodingSpec("tiktoken/cl100k_base.tiktoken", CL100K_PATTERN,
                                {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260,
                                 ENDOFPROMPT: 100276}, None),
}


def load_ranks(relative: str) -> dict[bytes, int]:
    """A `.tiktoken` rank file (one `base64(token) rank` per line) -> {token bytes: rank}, after checking
    its sha256 (a corrupt or different file would give silently different ids)."""
    path = find_data_file(relative)
    contents = path.read_bytes()
    expected = KNOWN_FILES[relative].sha256
    if (actual := hashlib.sha256(contents).hexdigest()) != expected:
        raise ValueError(f"{path} has sha256 {actual}, expected {expected}: it is not the file tiktoken "
                         f"publishes ({KNOWN_FILES[relative].url}); replace it with that download")
    ranks = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def tiktoken_encoding(name: str):
    """`tiktoken.get_encoding(name)` without cache or network, for "gpt2", "r50k_base" and "cl100k_base".
    Returns a `tiktoken.Encoding` (built once per process)."""
    if name not in ENCODINGS:
        raise ValueError(f"no packaged files for the tiktoken encoding {name!r}: choose one of {sorted(ENCODINGS)} "
                         f"(or use tiktoken.get_encoding({name!r}), which downloads its files)")
    spec = ENCODINGS[name]
    return tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=load_ranks(spec.ranks_file),
                             special_tokens=dict(spec.special_tokens), explicit_n_vocab=spec.explicit_n_vocab)
