"""Autoregressive generation: one prefill pass over the prompt fills the KV cache, then each decode
step feeds only the newest token at its position (`start_pos`) and reads the past from the cache.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, optionally keep only
the top_k most likely tokens and/or the smallest set whose probability reaches top_p (nucleus
sampling, Holtzman et al. 2019), then draw from the softmax with a seedable generator.

Stopping: by default (`stop_token="eos"`) a row stops at its model's end-of-turn / end-of-text tokens,
`model.config.eos_token_id` (set by `gguf.load_gguf` from the file, e.g. SmolLM2's <|im_end|>; None for
a model that has none, which then never stops early). An explicit id, or a sequence of ids, replaces
them; `stop_token=None` never stops early. A row that has stopped keeps emitting the stop token it
produced (its padding), and generation ends as soon as every row has stopped.

From a training run: `load_for_inference(run folder)` builds the model and tokenizer, `generate_text`
continues a prompt as text, past the model's context if asked (`python -m tlama_mini sample` runs both).
Legend: B batch, T prompt length, V vocab_size.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import find_checkpoint, load_weights, read_config
from .config import TlamaConfig
from .lora import apply_lora, merge_lora, resolve_alpha
from .model import Transformer
from .tokenizer import load_tokenizer


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf. (B, V) -> (B, V)."""
    if k <= 0:
        raise ValueError(f"top_k ({k}) must be a positive integer")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (always at
    least the most likely one); set the rest to -inf. (B, V) -> (B, V)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p ({p}) must be in (0, 1]")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= p                      # the first token always has before = 0 < p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits of the last position (B, V) -> next token ids (B,)."""
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 means greedy)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


StopToken = int | Sequence[int] | Literal["eos"] | None


def stop_token_ids(model: Transformer, stop_token: StopToken) -> tuple[int, ...]:
    """The ids that end a row: "eos" -> model.config.eos_token_id; None -> none; an id or ids as given."""
    if isinstance(stop_token, str):
        if stop_token != "eos":
            raise ValueError(f"stop_token ({stop_token!r}) must be 'eos' (the model's eos_token_id), a token id, "
                             "a sequence of ids, or None (never stop early)")
        stop_token = model.config.eos_token_id
    if stop_token is None:
        return ()
    ids = (stop_token,) if isinstance(stop_token, int) else tuple(stop_token)
    V = model.config.vocab_size
    if not ids or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V for t in ids):
        raise ValueError(f"stop_token ({stop_token!r}) must be token ids in [0, {V}) (vocab_size)")
    return ids


@torch.inference_mode()  # no_grad, and no version counters or view tracking: less work per op
def generate_stream(model: Transformer, tokens: torch.Tensor, max_new_tokens: int, *,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop_token: StopToken = "eos",
                    use_cache: bool = True, images: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) step by step (for printing as text appears).
    stop_token: "eos" (default) = model.config.eos_token_id, or an id, or ids, or None = never stop
    early. A row that produced a stop token keeps yielding it; the stream ends when all rows have stopped.
    use_cache=False recomputes the whole sequence every step (the slow reference). images: for a vision
    model, the images whose features fill the prompt's image tokens (read in the prefill)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
    B, T = tokens.shape
    cfg = model.config
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
                         f"exceeds max_seq_len ({cfg.max_seq_len}); shorten the prompt or generate fewer tokens")
    use_cache = use_cache and cfg.kv_cache
    stops = stop_token_ids(model, stop_token)
    stop_ids = torch.tensor(stops, device=tokens.device)  # (N,)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    with torch.inference_mode(False):  # tensors the model caches for later calls (RoPE angles) must be
        model.freq_cis                  # normal ones: a training step could not save inference tensors
        if model.vision is not None:
            model.vision.freqs_cis(tokens.device)
    was_training = model.training
    model.eval()
    try:
        seq = tokens
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        last = torch.zeros(B, dtype=torch.long, device=tokens.device)  # each row's last token
        if use_cache:  # sized to this request, never max_batch_size x max_seq_len
            model.setup_cache(B, T + max_new_tokens)
        logits, _ = model(tokens, 0, kv_cache=use_cache, images=images, last_only=True)  # prefill: (B, 1, V)
        for step in range(max_new_tokens):
            nxt = sample_next_token(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator)  # (B,)
            if stops:  # a finished row repeats the stop token it produced (done is all False at step 0)
                nxt = last = torch.where(done, last, nxt)
                done |= torch.isin(nxt, stop_ids)
            yield nxt
            if step == max_new_tokens - 1 or (stops and bool(done.all())):
                return
            if use_cache:  # decode: only the new token, at its position
                logits, _ = model(nxt[:, None], T + step, kv_cache=True)  # (B, 1, V)
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits, _ = model(seq, 0, kv_cache=False, images=images, last_only=True)  # (B, 1, V)
    finally:
        if use_cache:
            model.reset_cache()  # free it: the next plain forward allocates nothing
        model.train(was_training)


def generate(model: Transformer, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_token: StopToken = "eos", use_cache: bool = True,
             images: torch.Tensor | None = None) -> torch.Tensor:
    """Continue each row of `tokens` (B, T): returns (B, T + n) with n <= max_new_tokens (fewer when
    every row has emitted a stop token: by default the model's config.eos_token_id, see
    `generate_stream`; rows that stopped early are padded with the stop token they produced)."""
    new = list(generate_stream(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, stop_token=stop_token, use_cache=use_cache,
                               images=images))
    if not new:
        return tokens
    return torch.cat([tokens, torch.stack(new, dim=1)], dim=1)


# --- from a training run ------------------------------------------------------------------------
def generate_text(model: Transformer, tokenizer: Any, prompt: str, max_new_tokens: int, *, num_samples: int = 1,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None) -> list[str]:
    """Continue `prompt` num_samples times. Longer than the model's context: generate in windows,
    each re-reading the last half context of text (the positions restart at 0, which RoPE allows)."""
    device = next(model.parameters()).device
    T = model.config.max_seq_len
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")
    x = torch.tensor([ids[-(T - 1):]] * num_samples, device=device)  # (B, t)
    produced, window = 0, 0
    while produced < max_new_tokens:
        ctx = x if x.shape[1] <= T // 2 or produced == 0 else x[:, -(T // 2):]  # (B, t')
        n = min(max_new_tokens - produced, T - ctx.shape[1])
        new = generate(model, ctx, n, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=None if seed is None else seed + window)[:, ctx.shape[1]:]  # (B, n)
        x, produced, window = torch.cat([x, new], dim=1), produced + n, window + 1
        if new.shape[1] < n:  # every row reached the model's end-of-text token (config.eos_token_id)
            break
    return [prompt + tokenizer.decode(row[len(ids[-(T - 1):]):].tolist()) for row in x]


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Any, dict]:
    """(model in eval mode, tokenizer or None, config dict) from a checkpoint or run folder. The training
    checkpoint of a LoRA run holds the base weights and the adapters: they are merged here, with the
    resolved settings (targets, rank, alpha) that the run wrote into its config under "lora"."""
    ckpt = find_checkpoint(path)
    meta = read_config(ckpt)
    model = Transformer(TlamaConfig.from_dict(meta["model"]))
    lora, train = meta.get("lora"), meta.get("train", {})
    if lora is None and train.get("lora_rank"):  # a run written before the settings were saved resolved:
        rank = train["lora_rank"]                # its train section and lora.py's one alpha rule say them
        lora = {"targets": train["lora_targets"], "rank": rank, "alpha": resolve_alpha(rank, train.get("lora_alpha"))}
    if lora:  # base + adapters, merged here
        load_weights(apply_lora(model, tuple(lora["targets"]), lora["rank"], lora["alpha"]), ckpt, device)
        merge_lora(model)
    else:
        load_weights(model, ckpt, device)
    tok_path = ckpt / "tokenizer.json"
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    return model.to(device).eval(), tokenizer, meta
