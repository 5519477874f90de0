"""Direct Preference Optimization (Rafailov et al. 2023): learn from pairs (a prompt, a chosen reply, a
rejected reply) without a reward model. With pi the policy being trained and ref a frozen copy of where
it started, and log p(reply | prompt) summed over the reply's tokens,

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

It rises the chosen reply's probability relative to the reference and lowers the rejected one's; beta
sets how far the policy may drift from the reference. At the start (pi = ref) every margin is 0 and the
loss is log 2; it falls as the margin grows.

    logps = sequence_logps(logits, y)            # (B,) summed log-probs of the reply tokens (y != -100)
    loss = dpo_loss(pc, pr, rc, rr, beta=0.1)    # mean over the batch
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .chat_data import IGNORE_INDEX, collate, render_conversation


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Mean DPO loss over a batch; every argument has shape (B,)."""
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probability tensors must share one shape (B,), got {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"beta ({beta}) must be positive")
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return -F.logsigmoid(beta * margin).mean()


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) with IGNORE_INDEX off the reply -> (B,) sum of log p(target)
    over the reply's positions (computed in float32 at least)."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    keep = targets != IGNORE_INDEX  # (B, T)
    logp = logits.float().log_softmax(-1) if logits.dtype in (torch.float16, torch.bfloat16) else logits.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * keep).sum(-1)


def sequence_logps_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The slow reference: a loop over rows and positions, float64."""
    out = []
    for b in range(targets.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(targets.shape[1]):
            if targets[b, t] != IGNORE_INDEX:
                row = logits[b, t].double()
                total = total + row[targets[b, t]] - torch.logsumexp(row, 0)
        out.append(total)
    return torch.stack(out)


def pair_examples(tokenizer: Any, pair: dict[str, Any]) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """A DPO row {"prompt": [messages], "chosen": text, "rejected": text} -> the (ids, mask) of the
    conversation ending with each reply (the same prompt tokens, the same template)."""
    prompt = list(pair["prompt"])
    return tuple(render_conversation(tokenizer, prompt + [{"role": "assistant", "content": pair[k]}])
                 for k in ("chosen", "rejected"))  # type: ignore[return-value]


def pair_batch(examples: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]], pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[(chosen, rejected), ...] -> x (2B, T), y (2B, T): the B chosen rows first, then the B rejected."""
    return collate([c for c, _ in examples] + [r for _, r in examples], pad_id)


def policy_logps(model: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen logps (B,), rejected logps (B,)) of a pair batch from `pair_batch` under `model`."""
    logits, _ = model(x)  # (2B, T, V)
    logps = sequence_logps(logits, y)  # (2B,)
    half = x.shape[0] // 2
    return logps[:half], logps[half:]
