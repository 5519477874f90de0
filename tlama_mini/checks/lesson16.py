"""Checks for lesson 16 (from a base model to an assistant). Each check_<name>(fn) calls the learner's fn on
fresh random inputs, compares with tlama_mini (`chat_data.render_conversation`, `dpo.sequence_logps`,
`dpo.dpo_loss`) and names the mistake when it can: a mask on the role header or without the end-of-turn
token, targets read one position off, a mean where DPO sums, the margin's sign, beta or the reference.

Legend: B batch, T sequence length, V vocabulary size.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..chat_data import IGNORE_INDEX, render_conversation
from ..chat_tasks import make_examples, small_chat_tokenizer
from ..dpo import dpo_loss as tlama_dpo_loss
from ..dpo import sequence_logps as tlama_sequence_logps
from .common import attributes_stubs, call, compare, fail, passed

__all__ = ["check_assistant_mask", "check_sequence_logp", "check_dpo_loss"]


# ---------------------------------------------------------------------------------------------- assistant_mask
@functools.lru_cache(maxsize=1)
def chat_tokenizer() -> Any:
    """The lesson's small ChatML tokenizer (SmolLM2's template), trained once per process."""
    return small_chat_tokenizer()


def _conversation(turns: int, system: bool) -> list[dict[str, str]]:
    """A letter-counting chat of `turns` question/answer rounds, with or without a system message."""
    examples = make_examples(turns, random.choice(["train", "held_out"]), seed=random.randrange(10**6))
    msgs = [{"role": "system", "content": random.choice(["You count letters.", "Be brief.", "Spell, then count."])}
            ] if system else []
    for e in examples:
        msgs += [{"role": "user", "content": e.question}, {"role": "assistant", "content": e.answer}]
    return msgs


def _segments(tokenizer: Any, messages: list[dict[str, str]], ids: list[int]) -> dict[str, list[int]]:
    """Token positions of each reply's role header, its end-of-turn token and the newline after it (from the
    reference's mask): what the typical wrong masks add or drop."""
    _, mask = render_conversation(tokenizer, messages)
    eot = tokenizer.eos_token_id
    header = tokenizer.encode("<|im_start|>assistant\n", allowed_special="all")
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    return {"header": [s - len(header) + k for s in starts for k in range(len(header))],
            "eot": [e for e in ends if ids[e] == eot],
            "after": [e + 1 for e in ends if e + 1 < len(ids)],
            "starts": starts, "ends": ends}


def _variant(mask: list[int], on: list[int] = (), off: list[int] = ()) -> list[int]:
    out = list(mask)
    for i in on:
        out[i] = 1
    for i in off:
        out[i] = 0
    return out


def _describe(tokenizer: Any, ids: list[int], mask: list[int], want: list[int]) -> str:
    """Where the first wrong bit is: which token, and whose text it is."""
    i = next(k for k, (a, b) in enumerate(zip(mask, want)) if a != b)
    piece = tokenizer.decode([ids[i]])
    if want[i]:
        return f"token {i} ({piece!r}) is the assistant's but the mask is 0 there"
    return f"token {i} ({piece!r}) is not written by the assistant (prompt, header or template) but the mask is 1 there"


def _check_mask_once(name: str, fn: Callable, tokenizer: Any, messages: list[dict[str, str]]) -> None:
    want_ids, want = render_conversation(tokenizer, messages)
    out = call(name, fn, tokenizer, [dict(m) for m in messages],
               hint="render with tokenizer.apply_chat_template(messages, add_generation_prompt=False), encode with "
                    "allowed_special='all'; reply k starts where the rendering of messages[:k] with "
                    "add_generation_prompt=True ends")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(name, f"returned {type(out).__name__}, expected a tuple (ids, mask)", "did you forget a `return`?")
    ids, mask = (list(x.tolist()) if isinstance(x, torch.Tensor) else list(x) for x in out)
    if len(ids) != len(mask):
        fail(name, f"ids has {len(ids)} tokens but mask {len(mask)} bits: one bit per token",
             "loop over the ids of the whole rendered text and give each one a bit")
    if ids != want_ids:
        with_prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                       allowed_special="all")
        if ids == with_prompt:
            fail(name, "the ids end with an extra `<|im_start|>assistant\\n`: the whole conversation was rendered "
                 "with add_generation_prompt=True", "a training conversation already ends with the assistant's "
                 "reply: render it with add_generation_prompt=False")
        fail(name, f"the ids are not the encoding of the template's rendering ({len(ids)} tokens, expected "
             f"{len(want_ids)})", "ids = tokenizer.encode(tokenizer.apply_chat_template(messages, "
             "add_generation_prompt=False), allowed_special='all')")
    if any(b not in (0, 1) for b in mask):
        fail(name, "the mask has values other than 0 and 1", "one bit per token: 1 on the assistant's tokens")
    if mask == want:
        return
    seg = _segments(tokenizer, messages, ids)
    last = max(seg["starts"])
    variants = {
        "the mask is 1 on every token: the loss would cover the system and user messages and the template too "
        "(training without an assistant mask)": [1] * len(ids),
        "the mask is inverted: 1 on the prompt, 0 on the assistant's replies": [1 - b for b in want],
        "the mask includes the role header `<|im_start|>assistant\\n` before a reply: the template writes that "
        "(the generation prompt at inference), not the model": _variant(want, on=seg["header"]),
        "the mask misses the end-of-turn token `<|im_end|>` after a reply: without it the model never learns to "
        "stop": _variant(want, off=seg["eot"]),
        "the mask includes the newline after `<|im_end|>`: the template writes it between turns, it is not part "
        "of the reply": _variant(want, on=seg["after"]),
        "the mask covers only the last assistant reply: every assistant turn of the conversation is trained on":
            _variant(want, off=[i for i in range(last) if want[i]]),
        "the mask is shifted one token to the left (mask[t] = the bit of token t + 1, as for targets): here the "
        "mask belongs to the ids themselves; the shift comes later, with the targets": want[1:] + [0],
        "the mask is shifted one token to the right: reply k starts at the length of the rendering of "
        "messages[:k] with the generation prompt, not one token later": [0] + want[:-1],
    }
    for mistake, value in variants.items():
        if value != want and mask == value:
            fail(name, f"{mistake} ({_describe(tokenizer, ids, mask, want)})")
    fail(name, f"the mask differs from the reference: {_describe(tokenizer, ids, mask, want)}",
         "1 exactly on each reply's text and its `<|im_end|>`; 0 on the system and user turns, the role headers "
         "and the newline after each turn")


@attributes_stubs
def check_assistant_mask(fn: Callable) -> None:
    """fn(tokenizer, messages) -> (ids, mask): ids the encoding of the template's rendering of the whole
    conversation, mask 1 exactly on the assistant's tokens and its end-of-turn token. Three conversations
    per call: one turn, several turns with a system message, several without."""
    name = "assistant_mask"
    tokenizer = chat_tokenizer()
    cases = [(1, False), (random.randint(2, 3), True), (random.randint(2, 3), False)]
    for turns, system in cases:
        _check_mask_once(name, fn, tokenizer, _conversation(turns, system))
    passed(name, f"1 turn, {cases[1][0]} turns with a system message, {cases[2][0]} turns without")


# ---------------------------------------------------------------------------------------------- sequence_logp
def _reply_batch(B: int, T: int, V: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, T), mask (B, T): each row a prompt, a reply of its own length (1 on it), then padding."""
    ids = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    lengths = random.sample(range(2, T - 1), B) if T - 3 >= B else [random.randint(2, T - 2) for _ in range(B)]
    for b, n in enumerate(lengths):
        start = random.randint(1, T - n)  # a prompt of at least one token
        mask[b, start:start + n] = 1
    return ids, mask, torch.tensor(lengths)


@attributes_stubs
def check_sequence_logp(fn: Callable) -> None:
    """fn(logits (B, T, V), ids (B, T), mask (B, T)) -> (B,): for each row, the sum over the reply's tokens
    (mask 1) of log p(token), where the logits at position t - 1 predict the token at t."""
    name = "sequence_logp"
    B, V = random.randint(2, 4), random.randint(7, 20)
    T = random.choice([t for t in range(6, 13) if t not in (V, B)])  # T != V, T != B: transposes show
    ids, mask, lengths = _reply_batch(B, T, V)
    logits = torch.randn(B, T, V) * 2
    targets = torch.where(mask[:, 1:] == 1, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    want = tlama_sequence_logps(logits[:, :-1].double(), targets)  # (B,)
    args = (logits.clone(), ids.clone(), mask.clone())
    out = call(name, fn, *args, hint="logits[:, :-1] predict ids[:, 1:]; keep the positions where mask[:, 1:] is 1")
    if isinstance(out, torch.Tensor) and out.shape == ():
        fail(name, "returned one number for the whole batch: DPO needs one log-probability per sequence, shape (B,)",
             "sum over the time axis only: .sum(-1) (or .sum(dim=1))")
    lp = logits.double().log_softmax(-1)
    shifted = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log p(ids[t+1])
    m1, m0 = mask[:, 1:].double(), mask[:, :-1].double()
    same = lp.gather(-1, ids[:, :, None]).squeeze(-1)  # (B, T): position t scored with its own logits
    raw = logits.double()[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    probs = logits.double().softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    time_softmax = logits.double().log_softmax(1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    compare(name, out.double() if isinstance(out, torch.Tensor) and out.is_floating_point() else out, want,
            atol=1e-4, mistakes={
        "no shift: the logits at position t were scored against the token at t, but they predict the token "
        "at t + 1": lambda: (same * mask).sum(-1),
        "shifted the wrong way: the logits at position t + 1 were scored against the token at t; the logits at "
        "t predict the token at t + 1 (logits[:, :-1] with ids[:, 1:])":
            lambda: (lp[:, 1:].gather(-1, ids[:, :-1, None]).squeeze(-1) * m0).sum(-1),
        "the targets are shifted but the mask is not: mask[:, :-1] picks the positions one token early (the "
        "prompt's last token in, the reply's end-of-turn token out); use mask[:, 1:] with ids[:, 1:]":
            lambda: (shifted * m0).sum(-1),
        "the mean over the reply's tokens instead of the sum: log p(reply) is the sum of its tokens' "
        "log-probabilities": lambda: (shifted * m1).sum(-1) / m1.sum(-1),
        "the mask was ignored: every position (prompt and padding too) was summed": lambda: shifted.sum(-1),
        "the raw logits were summed, not log-probabilities: take log_softmax over the vocabulary first":
            lambda: (raw * m1).sum(-1),
        "probabilities (softmax) were summed, not log-probabilities": lambda: (probs * m1).sum(-1),
        "log_softmax over the time axis (dim=1): normalise over the vocabulary, dim=-1":
            lambda: (time_softmax * m1).sum(-1),
    }, hint="gather log_softmax(logits[:, :-1], -1) at ids[:, 1:], multiply by mask[:, 1:], sum over time")
    if not (torch.equal(args[0], logits) and torch.equal(args[1], ids) and torch.equal(args[2], mask)):
        fail(name, "an input tensor was changed in place", "compute new tensors; the caller reuses its inputs")
    passed(name, f"B={B}, T={T}, V={V}, reply lengths {lengths.tolist()}")


# ---------------------------------------------------------------------------------------------- dpo_loss
def _dpo_inputs(B: int, spread: float) -> tuple[torch.Tensor, ...]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probabilities (B,) each:
    negative sums of many tokens, the policy moved away from the reference by up to `spread` nats."""
    ref_c, ref_r = -torch.empty(B).uniform_(5, 60), -torch.empty(B).uniform_(5, 60)
    return ref_c + torch.randn(B) * spread, ref_r + torch.randn(B) * spread, ref_c, ref_r


def _check_dpo_once(name: str, fn: Callable, inputs: tuple[torch.Tensor, ...], beta: float) -> None:
    pc, pr, rc, rr = inputs
    want = tlama_dpo_loss(*(t.double() for t in inputs), beta=beta)
    out = call(name, fn, *(t.clone() for t in inputs), beta,
               hint="loss = -logsigmoid(beta * ((pc - rc) - (pr - rr))).mean() (log 2 when the policy is the reference)")
    if isinstance(out, torch.Tensor) and out.shape == pc.shape and out.ndim == 1 and out.is_floating_point():
        per_pair = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)).double())
        if torch.allclose(out.double(), per_pair, atol=1e-5, rtol=1e-5):
            fail(name, "returned one loss per pair (B,): the loss is their mean, a single number", ".mean()")
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() == 1 and torch.isinf(out).any():
        fail(name, "the loss is inf for a pair whose margin is very negative: log(sigmoid(x)) underflows to log(0) "
             "in float32", "use F.logsigmoid(x), which is exact for any x")
    p, r, c, d = (t.double() for t in inputs)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(z).mean()

    m = (p - c) - (r - d)  # (B,) the margin
    compare(name, out.double().reshape(()) if isinstance(out, torch.Tensor) and out.is_floating_point()
            and out.numel() == 1 else out, want, atol=1e-5, mistakes={
        "the margin has the wrong sign: chosen and rejected (or policy and reference) are swapped, so the loss "
        "pushes the rejected reply up; margin = (pi_c - ref_c) - (pi_r - ref_r)": lambda: loss(-beta * m),
        "the reference was forgotten: the margin is pi_c - pi_r; DPO measures each reply against the frozen "
        "reference: (pi_c - ref_c) - (pi_r - ref_r)": lambda: loss(beta * (p - r)),
        "the reference log-probabilities were added instead of subtracted": lambda: loss(beta * ((p + c) - (r + d))),
        f"beta is missing: the margin must be multiplied by beta (here {beta})": lambda: loss(m),
        "beta multiplies the loss instead of the margin: -logsigmoid(beta * margin), not -beta * logsigmoid(margin)":
            lambda: beta * loss(m),
        "the margin was divided by beta: multiply it, -logsigmoid(beta * margin)": lambda: loss(m / beta),
        "the sum over the pairs instead of the mean": lambda: -F.logsigmoid(beta * m).sum(),
        "the minus sign is missing: logsigmoid is negative, the loss is -logsigmoid(...)":
            lambda: F.logsigmoid(beta * m).mean(),
        "sigmoid instead of logsigmoid: the loss is -log sigmoid(beta * margin)": lambda: -torch.sigmoid(beta * m).mean(),
    }, hint="-F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()")


@attributes_stubs
def check_dpo_loss(fn: Callable) -> None:
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> the mean DPO loss (a 0-dim
    tensor); every input is (B,). Three calls: policy = reference (the loss is log 2), a moved policy, and
    one pair with a margin so negative that log(sigmoid(.)) underflows in float32."""
    name = "dpo_loss"
    B = random.randint(3, 6)
    beta = random.choice([0.05, 0.1, 0.2, 0.5])
    _, _, rc, rr = _dpo_inputs(B, 0.0)
    _check_dpo_once(name, fn, (rc.clone(), rr.clone(), rc, rr), beta)  # policy = reference: log 2
    _check_dpo_once(name, fn, _dpo_inputs(B, random.uniform(2, 8)), beta)
    extreme = [t.clone() for t in _dpo_inputs(B, 3.0)]
    extreme[0][0] -= 4000.0 / beta  # the policy made the chosen reply far less likely than the reference did
    _check_dpo_once(name, fn, tuple(extreme), beta)
    passed(name, f"B={B}, beta={beta}: log 2 at the start, a moved policy, a margin of -4000 / beta")
