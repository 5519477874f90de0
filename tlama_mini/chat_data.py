"""Conversations to training tensors: the token ids of a chat, and a mask that is 1 exactly on the
tokens the assistant writes (its reply and its end-of-turn token), 0 on everything else (the system and
user messages, the template's role headers like `<|im_start|>assistant\\n`, the newline after a turn).

The text comes from the tokenizer's own `apply_chat_template`, the code `chat` uses at inference, so
training and inference cannot render a conversation differently. Where each assistant reply starts is
found by rendering *prefixes* of the conversation: messages[:k] with the generation prompt is exactly the
text the model sees before it writes reply k. The whole text is encoded once (as inference encodes a
prompt), and each token's byte span decides its mask bit; a token that straddles a boundary, or a
template that does not render prefixes as prefixes, is refused, never silently misaligned.

    ids, mask = render_conversation(tokenizer, messages)      # lists of equal length
    x, y = collate([(ids, mask), ...], pad_id)                # (B, T) inputs, (B, T) targets, -100 off the mask

Long conversations: `render_conversation(..., max_len=T)` raises when the conversation does not fit;
`truncate(ids, mask, T)` keeps the first T tokens (documented choice: the start of the conversation, so
the template's headers stay intact) and refuses when no assistant token survives.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100  # cross_entropy's ignore_index: targets with this value add no loss


def _eot_text(tokenizer: Any) -> str:
    """The text of the end-of-turn token (SmolLM2: <|im_end|>), '' when the tokenizer has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    names = {i: t for t, i in getattr(tokenizer, "special_tokens", {}).items()}
    return names.get(eos, "")


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendered text, [(start, end) character spans of each assistant reply + its end-of-turn
    token]). The spans come from renderings of prefixes of the conversation."""
    if not messages:
        raise ValueError("the conversation has no messages")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"the conversation ends with a {messages[-1].get('role')!r} message; it must end with "
                         "the assistant's reply (the text the model learns to write)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    eot = _eot_text(tokenizer)
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False)
        if not text.startswith(prompt) or not upto.startswith(prompt) or not text.startswith(upto):
            raise ValueError(f"the chat template does not render message {k}'s prefix as a prefix of the "
                             "conversation, so the assistant's tokens cannot be located")
        content = m["content"]
        if not upto[len(prompt):].startswith(content):
            raise ValueError(f"the chat template changes assistant message {k}'s text (it does not appear "
                             "verbatim after the generation prompt)")
        end = len(prompt) + len(content)
        if eot and upto[end:].startswith(eot):
            end += len(eot)  # the end-of-turn token: the model must learn to stop
        spans.append((len(prompt), end))
    return text, spans


def render_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], *,
                        max_len: int | None = None) -> tuple[list[int], list[int]]:
    """messages -> (ids, mask): decode(ids) is the template's rendering of the whole conversation and
    mask[i] == 1 exactly on the assistant's tokens and its end-of-turn token. max_len: refuse a longer
    conversation (use `truncate` to cut one on purpose)."""
    text, spans = assistant_spans(tokenizer, messages)
    ids = tokenizer.encode(text, allowed_special="all")
    # byte offsets of the spans (a character can be several bytes; tokens are byte sequences)
    bounds = [(len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans]
    mask, pos = [], 0
    for i in ids:
        n = len(tokenizer.decode_bytes([i]))
        a, b = pos, pos + n
        inside = [s <= a and b <= e for s, e in bounds]
        if not any(inside) and any(a < e and s < b for s, e in bounds):
            raise ValueError(f"token {i} ({tokenizer.decode([i])!r}) straddles the boundary of an assistant "
                             "reply: the prompt and the reply cannot be separated at a token boundary")
        mask.append(int(any(inside)))
        pos = b
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"the conversation is {len(ids)} tokens, longer than max_len {max_len}; shorten it, "
                         "raise the context, or cut it on purpose with chat_data.truncate")
    return ids, mask


def truncate(ids: Sequence[int], mask: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Keep the first max_len tokens (ids and mask cut at the same place, so they stay aligned). Refuses
    when the cut leaves no assistant token to learn from."""
    if max_len <= 0:
        raise ValueError(f"max_len ({max_len}) must be positive")
    if len(ids) != len(mask):
        raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) differ in length")
    ids, mask = list(ids[:max_len]), list(mask[:max_len])
    if not any(mask[1:]):  # position 0 is never a target
        raise ValueError(f"truncated to {max_len} tokens, the conversation keeps no assistant token to train on")
    return ids, mask


def to_example(ids: Sequence[int], mask: Sequence[int]) -> tuple[list[int], list[int]]:
    """(ids, mask) -> (x, y) for next-token training: x = ids[:-1], y[t] = ids[t + 1] where mask[t + 1]
    is 1, else IGNORE_INDEX."""
    if len(ids) != len(mask) or len(ids) < 2:
        raise ValueError(f"need ids and mask of equal length >= 2 (got {len(ids)} and {len(mask)})")
    return list(ids[:-1]), [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
            length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[(ids, mask), ...] -> x (B, T) padded with pad_id, y (B, T) with IGNORE_INDEX outside the masks and
    on the padding. T: the longest example minus one, or `length` (every example must fit)."""
    pairs = [to_example(i, m) for i, m in examples]
    T = max(len(x) for x, _ in pairs) if length is None else length
    if any(len(x) > T for x, _ in pairs):
        raise ValueError(f"an example is longer than length {T}")
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (xi, yi) in enumerate(pairs):
        x[b, :len(xi)] = torch.tensor(xi, dtype=torch.long)
        y[b, :len(yi)] = torch.tensor(yi, dtype=torch.long)
    return x, y


def pad_id_of(tokenizer: Any) -> int:
    """The id padding uses: the end-of-turn token when there is one (padding is never a target, so any
    id works; this one is always in the vocabulary), else 0."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return 0 if eos is None else int(eos)
