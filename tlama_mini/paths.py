"""Finding data files (Tiny Shakespeare, GPT-2's tokenizer files) without surprises.

`find_data_file("tiktoken/vocab.bpe")` looks, in this order, at:

1. an explicit path you pass (a file, or a data folder laid out like `tlama_mini/data_files/`);
2. `$TLAMA_DATA_DIR/<relative>` (your own copy, e.g. a bigger corpus under the same name);
3. the packaged copy, `tlama_mini/data_files/<relative>`: the small files every lesson and test needs
   (Tiny Shakespeare, GPT-2's BPE files, tiktoken's rank files) ship inside the package;
4. the user cache, `$XDG_CACHE_HOME/tlama_mini/<relative>` or `~/.cache/tlama_mini/<relative>`;
5. a download into the user cache, checked against a known sha256 (for larger optional files).

When the download is impossible (no network) it raises FileNotFoundError saying exactly which URL to
fetch and where to put it, so the offline fix is one command.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.request
from pathlib import Path
from typing import NamedTuple


class KnownFile(NamedTuple):
    url: str
    sha256: str


# The small files that ship inside the package (see data_files/README.md for sources and licences).
PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "data_files"

# The canonical downloads and their sha256 (the packaged copies are these files, byte for byte).
KNOWN_FILES: dict[str, KnownFile] = {
    "tinyshakespeare/input.txt": KnownFile(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "tiktoken/vocab.bpe": KnownFile(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "tiktoken/encoder.json": KnownFile(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "tiktoken/r50k_base.tiktoken": KnownFile(
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "tiktoken/cl100k_base.tiktoken": KnownFile(
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tlama_mini`, or `~/.cache/tlama_mini` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tlama_mini"


def fetch_url(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download `url` to `dest` (raises OSError, e.g. urllib.error.URLError, when offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_data_file(relative: str, explicit: str | Path | None = None, url: str | None = None,
                   sha256: str | None = None) -> Path:
    """Return the path of data file `relative` (e.g. "tinyshakespeare/input.txt"); see the module doc
    for the search order. `url`/`sha256` default to the entry in KNOWN_FILES."""
    if explicit is not None:
        # An explicit choice is never silently replaced by another copy.
        path = Path(explicit).expanduser()
        path = path / relative if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{relative}: the explicit path {path} does not exist")
        return path

    data_dir = os.environ.get("TLAMA_DATA_DIR")
    if data_dir and (Path(data_dir) / relative).is_file():
        return Path(data_dir) / relative

    packaged = PACKAGED_DATA_DIR / relative
    if packaged.is_file():
        return packaged

    cached = user_cache_dir() / relative
    if cached.is_file():
        return cached

    known = KNOWN_FILES.get(relative)
    url = url or (known.url if known else None)
    sha256 = sha256 or (known.sha256 if known else None)
    searched = f"$TLAMA_DATA_DIR/{relative} (TLAMA_DATA_DIR={data_dir or 'unset'}), {packaged} and {cached}"
    if url is None:
        raise FileNotFoundError(f"{relative} not found in {searched}, and no download URL is known for it")

    # Download next to the final name, check, then rename: an interrupted or tampered download
    # never leaves a file that a later run would trust.
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".part")
    try:
        fetch_url(url, partial)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"{relative} not found in {searched}, and downloading it failed ({err}).\n"
            f"Download {url}\nand save it as either\n"
            f"  $TLAMA_DATA_DIR/{relative}   (then `export TLAMA_DATA_DIR=/path/to/that/data/folder`)\n"
            f"or\n  {cached}") from err
    if sha256 is not None and (actual := sha256_of(partial)) != sha256:
        partial.unlink(missing_ok=True)
        raise ValueError(f"downloaded {url} has sha256 {actual}, expected {sha256}: the file is corrupt or "
                         "has changed upstream; nothing was saved")
    partial.replace(cached)
    return cached
