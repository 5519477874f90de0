"""Training checkpoints: one folder that a crash can never leave half-written.

    OUT/ckpt/config.json        {"format": "tlama-mini-checkpoint", "model": TlamaConfig, "train": ..., "step": ...}
    OUT/ckpt/model.safetensors  the weights (safetensors: plain tensors, no code, memory-mappable)
    OUT/ckpt/state.pt           optimizer, step, RNG states, data position (tensors and plain containers
                                only, read back with torch.load(weights_only=True): a pickle holding
                                code is refused)
    OUT/ckpt/tokenizer.json     the tokenizer, so sampling needs nothing but this folder

A LoRA fine-tune also writes OUT/adapters/ and OUT/merged/ (see finetune.py). This module is the folder
format only (torch, safetensors and the standard library); `sample.load_for_inference` builds a model
ready to generate from such a folder.

Atomic replacement: everything is written (and fsync'ed) into OUT/ckpt.tmp; then the old folder is
renamed to OUT/ckpt.old, the new one to OUT/ckpt, and the old one is deleted. A rename is atomic, so
at every instant either ckpt/ or, between the two renames, ckpt.old/ holds a complete checkpoint, and
`find_checkpoint` looks at both.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "tlama-mini-checkpoint"
VERSION = 1
FILES = ("config.json", "model.safetensors", "state.pt")


def _fsync(path: Path) -> None:
    """Flush a file (or folder entry) to disk, so a power cut cannot undo a rename that followed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder_atomically(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create `folder` (replacing an old one) atomically: `fill(tmp)` writes the files into FOLDER.tmp,
    which is fsync'ed and renamed into place (the old folder goes to FOLDER.old first, then away)."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash in the middle of a save
    tmp.mkdir(parents=True)
    fill(tmp)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)  # from here on the new folder is the one
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_checkpoint(ckpt_dir: str | Path, model: nn.Module, state: dict[str, Any], config: dict[str, Any],
                    tokenizer: Any = None) -> Path:
    """Write a checkpoint atomically to `ckpt_dir` (e.g. OUT/ckpt). `model` is the bare module (not
    DDP- or compile-wrapped); `state` holds tensors and plain containers; `config` is JSON-able."""
    def fill(tmp: Path) -> None:
        meta = {"format": FORMAT, "version": VERSION, **config}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        # a tied matrix (token_emb = output) is stored once; load_weights restores the tie
        save_file(_unique_tensors(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        torch.save(state, tmp / "state.pt")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
    return write_folder_atomically(ckpt_dir, fill)


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in FILES)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for `path`: the folder itself, or for a run folder OUT its OUT/merged (a
    LoRA fine-tune's merged model, see finetune.py) or else OUT/ckpt; falls back to the `.old` copy a
    crash between two renames can leave. Raises a clear error otherwise."""
    path = Path(path).expanduser()
    for candidate in (path, path / "merged", path / "ckpt"):
        if _is_checkpoint(candidate):
            return candidate
        backup = candidate.with_name(candidate.name + ".old")
        if _is_checkpoint(backup):
            return backup
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist (pass the --out folder "
                                "of a training run, or its ckpt/ subfolder)")
    raise ValueError(f"{path} is not a tlama-mini checkpoint: expected a folder with {', '.join(FILES)} "
                     "(written by `python -m tlama_mini train`), or a run folder containing ckpt/")


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, checked to be ours."""
    path = Path(ckpt_dir) / "config.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable tlama-mini checkpoint config ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tlama-mini checkpoint config (its 'format' is "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer tlama-mini (checkpoint version {meta['version']} > "
                         f"{VERSION}); upgrade tlama-mini to read it")
    return meta


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """['d_model: checkpoint 192, now 128', ...] for every field whose value differs."""
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {wanted.get(k)!r}" for k in keys
            if json.dumps(saved.get(k), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)]


def check_model_config(ckpt_dir: str | Path, wanted: dict[str, Any]) -> None:
    """Raise if the checkpoint's model config differs from `wanted` (a TlamaConfig.to_dict())."""
    saved = read_config(ckpt_dir).get("model", {})
    diffs = config_differences(saved, json.loads(json.dumps(wanted)))
    if diffs:
        raise ValueError(f"the checkpoint in {ckpt_dir} does not match this model's config:\n  "
                         + "\n  ".join(diffs)
                         + "\nUse the same --preset and model options as the run that wrote it, or a new --out.")


def check_resumable(ckpt_dir: str | Path, model: dict[str, Any], data_sha256: str, tokenizer: str) -> dict[str, Any]:
    """Raise unless the checkpoint was written for this model config, data and tokenizer; return its config."""
    check_model_config(ckpt_dir, model)
    saved = read_config(ckpt_dir)
    data, train = saved.get("data", {}), saved.get("train", {})
    if data.get("sha256") != data_sha256 or train.get("tokenizer") != tokenizer:
        raise ValueError(f"the checkpoint in {ckpt_dir} was trained on other data or with another tokenizer "
                         f"({data.get('source')}, tokenizer {train.get('tokenizer')!r}); resume with the same "
                         "--data and --tokenizer, or start a new --out")
    return saved


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a training step can draw from (dropout: torch's CPU or CUDA generator)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], device)


def _shared_groups(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """The state dict and its names grouped by the tensor they name (tied weights share one group)."""
    sd = model.state_dict()
    groups: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else (name,)
        groups.setdefault(key, []).append(name)
    return sd, list(groups.values())


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under the first of its names in sorted order (as
    safetensors' save_model names it), contiguous (the LM head's weight is stored transposed)."""
    sd, groups = _shared_groups(model)
    return {min(names): sd[names[0]].detach().contiguous() for names in groups}


def load_weights(model: nn.Module, ckpt_dir: str | Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` (strict: every tensor present, shapes equal; a tied matrix
    stored once under either of its names)."""
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        tensors = load_file(str(path), device=str(device))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise ValueError(f"cannot load the weights in {path}: {err}") from None
    _, groups = _shared_groups(model)
    tied_loaded = {n for names in groups if any(m in tensors for m in names) for n in names}
    missing = [n for n in missing if n not in tied_loaded]
    if missing or unexpected:
        raise ValueError(f"cannot load the weights in {path}: they do not match the model "
                         f"(missing: {missing[:5]}, unexpected: {list(unexpected)[:5]}); was the checkpoint "
                         f"written for another config?")


def load_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read state.pt with weights_only=True: tensors and plain containers only, never code."""
    path = Path(ckpt_dir) / "state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                         f"containers, which a checkpoint never does (it may be tampered with). ({err})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable checkpoint state ({err})") from None
