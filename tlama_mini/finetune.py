"""Fine-tuning a trained checkpoint: every weight, or only LoRA adapters (`lora.py`).

    python -m tlama_mini train --init-from out/base --data romeo.txt --max-steps 200 --out out/full
    python -m tlama_mini train --init-from out/base --data romeo.txt --lora-rank 8 --max-steps 200 --out out/lora
    python -m tlama_mini sample --ckpt out/lora --prompt "ROMEO:"

The model (its shape and weights) and the tokenizer come from the checkpoint: the new data is encoded
with the base's tokenizer, and text that it cannot encode (a character-level base meeting a character it
never saw) is refused with the reason. With `lora_rank`, `apply_lora` freezes every base weight (they end
bit-identical) and only the adapters train, with AdamW; without it every weight trains, as in a normal
run. A LoRA run writes, at every checkpoint, besides OUT/ckpt (base + adapters + optimizer + RNG states:
what `--resume` continues from, exactly):

    OUT/adapters/   adapters.safetensors (only lora_A, lora_B: r * (in + out) numbers per matrix) and
                    adapter_config.json (rank, alpha, targets, and the base checkpoint with its sha256);
                    `load_adapters(base_model, OUT/adapters)` puts them on a base model again
    OUT/merged/     a plain checkpoint with the adapters folded in (W + (alpha / r) B A): what
                    `sample --ckpt OUT` reads, and what `--init-from OUT` fine-tunes further
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import checkpoint as ckpt
from .config import TlamaConfig
from .data import Corpus, encode_cached, load_text, sha256_text, split_ids
from .lora import apply_lora, merge_lora, resolve_alpha
from .model import Transformer
from .sample import load_for_inference
from .sft import add_reference_logps, load_chat_corpus

ADAPTER_FORMAT = "tlama-mini-lora"
LORA_TARGETS = ("Wq", "Wk", "Wv", "Wo", "w1", "w2", "w3", "output")  # the nn.Linear names of Transformer
# TrainConfig fields of a fine-tune (`--resume --out OUT` takes them from the saved run)
FINETUNE_FIELDS = ("init_from", "lora_rank", "lora_alpha", "lora_targets", "sft", "dpo", "dpo_beta", "assistant_only")
# what may differ from the base model's config when fine-tuning (the rest is the checkpoint's shape)
CHANGEABLE = ("dropout",)


def lora_settings(train: Any) -> tuple[tuple[str, ...], int, float]:
    """(targets, rank, alpha) of a TrainConfig or its dict, alpha by lora.py's one rule (None: 2 * rank,
    the rule every run saved with lora_alpha None was trained with)."""
    get = train.get if isinstance(train, dict) else lambda k: getattr(train, k)
    rank = get("lora_rank")
    return tuple(get("lora_targets")), rank, resolve_alpha(rank, get("lora_alpha"))


def check_config(cfg: Any) -> None:
    """Raise a clear error for fine-tune settings that cannot work (cfg: a TrainConfig)."""
    if not cfg.init_from:
        raise ValueError(f"lora_rank ({cfg.lora_rank}) needs init_from: LoRA adapts a trained model; "
                         "pass --init-from with the --out folder of a training run")
    if cfg.lora_rank is None:
        return
    if cfg.lora_rank <= 0:
        raise ValueError(f"lora_rank ({cfg.lora_rank}) must be a positive integer (leave it out to "
                         "fine-tune every weight)")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ValueError(f"lora_alpha ({cfg.lora_alpha}) must be positive")
    if not cfg.lora_targets or (bad := [t for t in cfg.lora_targets if t not in LORA_TARGETS]):
        raise ValueError(f"lora_targets {list(cfg.lora_targets)}: {bad if cfg.lora_targets else 'none given'}; "
                         f"choose among {', '.join(LORA_TARGETS)}")
    if cfg.optimizer != "adamw":
        raise ValueError(f"--optimizer {cfg.optimizer} does not train LoRA adapters here: they train with "
                         "AdamW (Muon orthogonalises whole matrices; an adapter's update is low-rank by design)")


def base_defaults(init_from: str | Path) -> dict[str, Any]:
    """Training defaults taken from the base run: its preset, tokenizer kind and context length."""
    meta = ckpt.read_config(ckpt.find_checkpoint(init_from))
    train = meta.get("train", {})
    return {"preset": train.get("preset"), "tokenizer": train.get("tokenizer"),
            "seq_len": meta["model"]["max_seq_len"]}


def finetune_defaults(init_from: str | None, out: str | Path, resume: bool, lora_rank: int | None) -> dict[str, Any]:
    """TrainConfig defaults of a fine-tune ({} for a run from scratch): the saved run's fine-tune options
    (resume), the base's preset, tokenizer and context, and AdamW for LoRA adapters (`check_config`)."""
    saved = saved_finetune(out) if resume else {}
    init_from = init_from or saved.get("init_from")
    if not init_from:
        return {}
    defaults = {**{k: v for k, v in saved.items() if v is not None}, **base_defaults(init_from), "init_from": init_from}
    if lora_rank is not None or saved.get("lora_rank") is not None:
        defaults["optimizer"] = "adamw"
    return defaults


def saved_finetune(out: str | Path) -> dict[str, Any]:
    """The fine-tune fields of the run in `out` ({} when it holds no fine-tune), so `--resume` needs
    only --out."""
    try:
        train = ckpt.read_config(ckpt.find_checkpoint(Path(out) / "ckpt")).get("train", {})
    except (FileNotFoundError, ValueError):
        return {}
    older = {"dpo_beta": 0.1, "assistant_only": True}  # runs saved before these fields existed had these
    return {k: train.get(k, older.get(k)) for k in FINETUNE_FIELDS} if train.get("init_from") else {}


def encode_with(tokenizer: Any, data: str) -> Corpus:
    """Load `data` and encode it with the checkpoint's tokenizer (cached), split as a normal run splits."""
    text, source = load_text(data)
    sha = sha256_text(text)
    try:
        ids = encode_cached(text, sha, tokenizer)
    except ValueError as err:
        reason = str(err).split(";")[0]
        raise ValueError(f"--data {source} does not fit the checkpoint's tokenizer ({type(tokenizer).__name__}, "
                         f"{tokenizer.vocab_size} tokens): {reason}. A fine-tuned model keeps its base's "
                         "vocabulary, so fine-tune on text written with the base's characters, or train the "
                         "base with --tokenizer bpe or gpt2 (byte-level: they encode any text)") from None
    train, val = split_ids(torch.from_numpy(ids.astype(np.int64)))
    return Corpus(tokenizer, train, val, source, sha)


def build(cfg: Any, model_overrides: dict[str, Any], device: torch.device, resume: bool
          ) -> tuple[Corpus, TlamaConfig, Transformer]:
    """(corpus, model config, model on `device`) for a fine-tune run: the base model from
    cfg.init_from, LoRA applied when cfg.lora_rank is set. Called by `Trainer`."""
    check_config(cfg)
    where = ckpt.find_checkpoint(cfg.init_from)
    meta = ckpt.read_config(where)
    if fixed := [k for k in model_overrides if k not in CHANGEABLE]:
        raise ValueError(f"{', '.join(fixed)}: the model's shape comes from the checkpoint {where} when "
                         "fine-tuning; leave out the model options (only dropout can change)")
    kind = meta.get("train", {}).get("tokenizer")
    if cfg.tokenizer != kind:
        raise ValueError(f"tokenizer {cfg.tokenizer!r} differs from the checkpoint's ({kind!r}): a fine-tune "
                         "uses its base's tokenizer; leave out --tokenizer")
    base, tokenizer, _ = load_for_inference(where)
    if tokenizer is None or tokenizer.vocab_size != base.config.vocab_size:
        raise ValueError(f"{where} has no tokenizer.json matching its vocab_size ({base.config.vocab_size}): "
                         "fine-tune a checkpoint written by `python -m tlama_mini train`")
    config = TlamaConfig.from_dict({**base.config.to_dict(), **model_overrides})
    if cfg.seq_len > config.max_seq_len:
        raise ValueError(f"seq_len ({cfg.seq_len}) is longer than the base model's context "
                         f"({config.max_seq_len}); use --seq-len {config.max_seq_len} or less")
    if resume and (saved := saved_finetune(cfg.out)):
        wanted = json.loads(json.dumps({k: getattr(cfg, k) for k in FINETUNE_FIELDS}))
        if diffs := ckpt.config_differences(saved, wanted):
            raise ValueError(f"the run in {cfg.out} is another fine-tune ({'; '.join(diffs)}); resume it with "
                             "its own --init-from and LoRA options (or only --resume --out), or use a new --out")
    model = Transformer(config)
    model.load_state_dict(base.state_dict())
    if cfg.lora_rank is not None:
        targets, rank, alpha = lora_settings(cfg)
        if "output" in targets and config.tie_embeddings:
            raise ValueError("lora_targets includes 'output', but this model ties it to token_emb: merging "
                             "the adapter would change the embeddings too; leave 'output' out")
        torch.manual_seed(cfg.seed)  # the adapters' initial A
        apply_lora(model, targets, rank, alpha)
    if cfg.sft or cfg.dpo:  # conversations or preference pairs, rendered with the model's chat template
        corpus = load_chat_corpus(cfg.sft or cfg.dpo, "sft" if cfg.sft else "dpo", tokenizer, cfg.seq_len,
                                  assistant_only=cfg.assistant_only)
        if cfg.dpo:  # the reference is the starting model (LoRA's B = 0: the adapters change nothing yet)
            add_reference_logps(corpus, model.to(device), device, cfg.batch_size)
        return corpus, config, model.to(device)
    return encode_with(tokenizer, cfg.data), config, model.to(device)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_adapters_and_merged(out: Path, model: nn.Module, tokenizer: Any, config: dict[str, Any]) -> None:
    """OUT/adapters/ and OUT/merged/ of a LoRA run (both written atomically); `config` is the run's
    checkpoint config (model, train, data, step)."""
    targets, rank, alpha = lora_settings(config["train"])
    base = ckpt.find_checkpoint(config["train"]["init_from"])
    adapter_config = {"format": ADAPTER_FORMAT, "rank": rank, "alpha": alpha, "targets": list(targets),
                      "base": str(base.resolve()), "base_sha256": _sha256(base / "model.safetensors"),
                      "model": config["model"], "step": config["step"]}
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapters.safetensors"), metadata={"format": ADAPTER_FORMAT})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    ckpt.write_folder_atomically(out / "adapters", fill)
    merged = merge_lora(copy.deepcopy(model))
    train = {**config["train"], "lora_rank": None, "merged_lora": {"rank": rank, "alpha": alpha, "targets": list(targets)}}
    plain = {k: v for k, v in config.items() if k != "lora"}  # merged: no adapters to apply when loading
    ckpt.save_checkpoint(out / "merged", merged, {}, {**plain, "train": train}, tokenizer)


def load_adapters(model: Transformer, folder: str | Path) -> Transformer:
    """Put the adapters of OUT/adapters on `model` (the base model they were trained on; in place)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "adapters.safetensors"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder} is not a LoRA adapter folder (adapter_config.json + adapters.safetensors): {err}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{folder}/adapter_config.json is not a tlama-mini LoRA adapter config")
    if diffs := ckpt.config_differences(meta["model"], json.loads(json.dumps(model.config.to_dict()))):
        raise ValueError(f"the adapters in {folder} were trained for another model: {'; '.join(diffs)}")
    apply_lora(model, tuple(meta["targets"]), meta["rank"], meta["alpha"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [n for n in missing if n.endswith(("lora_A", "lora_B"))]
    if missing or unexpected:
        raise ValueError(f"the adapters in {folder} do not fit the model (missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    return model
