"""The lesson 16 (chat templates, the assistant mask, DPO) checks accept correct solutions written in several
styles and reject each typical mistake by name on every draw: every wrong solution runs through its check over
many seeds (the checks draw fresh conversations, sizes and constants on each call)."""
import random

import pytest
import torch
import torch.nn.functional as F

from tlama_mini.checks.common import expect_failure, expect_failure_on_every_draw
from tlama_mini.checks.lesson16 import check_assistant_mask, check_dpo_loss, check_sequence_logp

SEEDS = range(30)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def fails_with(check, fn, *words, seeds=SEEDS):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed."""
    return expect_failure_on_every_draw(check, fn, *words, seeds=seeds)


def passes(check, fn, seeds=range(10)):
    for seed in seeds:
        random.seed(seed)
        torch.manual_seed(seed)
        check(fn)


# --- the assistant mask, written from the lesson's recipe, with switches for the usual mistakes
def assistant_mask(tokenizer, messages, *, header=False, eot=True, newline=False, last_only=False, shift=0,
                   generation_prompt=False, invert=False, every_token=False):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    spans = []
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in assistant[-1:] if last_only else assistant:
        before = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)
        start = len(before.encode()) - (len("<|im_start|>assistant\n") if header else 0)
        end = len(before.encode()) + len(messages[k]["content"].encode()) + (len("<|im_end|>") if eot else 0)
        spans.append((start, end + (1 if newline else 0)))
    ids = tokenizer.encode(text, allowed_special="all")
    mask, pos = [], 0
    for i in ids:
        n = len(tokenizer.decode_bytes([i]))
        mask.append(int(any(s <= pos and pos + n <= e for s, e in spans)))
        pos += n
    if shift > 0:
        mask = mask[shift:] + [0] * shift
    elif shift < 0:
        mask = [0] * -shift + mask[:shift]
    if invert:
        mask = [1 - b for b in mask]
    if every_token:
        mask = [1] * len(ids)
    return ids, mask


def assistant_mask_with_the_package(tokenizer, messages):
    from tlama_mini.chat_data import render_conversation
    ids, mask = render_conversation(tokenizer, messages)
    return torch.tensor(ids), torch.tensor(mask)  # tensors are fine too


def assistant_mask_by_text_search(tokenizer, messages):
    """Another correct style: find each reply's text after its header in the rendered string."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans, at = [], 0
    for m in messages:
        if m["role"] == "assistant":
            head = "<|im_start|>assistant\n"
            start = text.index(head + m["content"], at) + len(head)
            spans.append((start, start + len(m["content"]) + len("<|im_end|>")))
            at = spans[-1][1]
    ids = tokenizer.encode(text, allowed_special="all")
    mask, pos = [], 0
    for i in ids:
        piece = tokenizer.decode([i])
        mask.append(int(any(s <= pos and pos + len(piece) <= e for s, e in spans)))
        pos += len(piece)
    return ids, mask


def test_assistant_mask_accepts_correct_solutions():
    for fn in (assistant_mask, assistant_mask_with_the_package, assistant_mask_by_text_search):
        passes(check_assistant_mask, fn, seeds=range(5))


@pytest.mark.parametrize("kwargs, words", [
    ({"header": True}, ("role header",)),
    ({"eot": False}, ("misses the end-of-turn token",)),
    ({"newline": True}, ("newline after",)),
    ({"last_only": True}, ("only the last assistant reply",)),
    ({"shift": 1}, ("shifted one token to the left",)),
    ({"shift": -1}, ("shifted one token to the right",)),
    ({"generation_prompt": True}, ("add_generation_prompt=True",)),
    ({"invert": True}, ("inverted",)),
    ({"every_token": True}, ("1 on every token",)),
    ({"header": True, "eot": False}, ("differs from the reference", "is not written by the assistant")),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_assistant_mask_rejects_each_mistake_by_name(kwargs, words):
    fails_with(check_assistant_mask, lambda tok, msgs: assistant_mask(tok, msgs, **kwargs), *words)


def test_assistant_mask_diagnoses_a_crash_and_a_wrong_return():
    def forgets_allowed_special(tokenizer, messages):
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False)), []

    def mask_only(tokenizer, messages):
        return assistant_mask(tokenizer, messages)[1]

    def short_mask(tokenizer, messages):
        ids, mask = assistant_mask(tokenizer, messages)
        return ids, mask[:-1]

    random.seed(0)
    message = expect_failure(check_assistant_mask, forgets_allowed_special, "crashed")
    assert "allowed_special" in message
    expect_failure(check_assistant_mask, mask_only, "expected a tuple (ids, mask)")
    expect_failure(check_assistant_mask, short_mask, "one bit per token")


# --- the sequence log-probability
def sequence_logp(logits, ids, mask, *, mistake=None):
    lp = logits.log_softmax(-1)
    if mistake == "no_shift":
        return (lp.gather(-1, ids[..., None]).squeeze(-1) * mask).sum(-1)
    if mistake == "wrong_way":
        return (lp[:, 1:].gather(-1, ids[:, :-1, None]).squeeze(-1) * mask[:, :-1]).sum(-1)
    if mistake == "time_softmax":
        lp = logits.log_softmax(1)
    if mistake == "raw":
        lp = logits
    if mistake == "probs":
        lp = logits.softmax(-1)
    picked = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = {"mask_unshifted": mask[:, :-1], "no_mask": torch.ones_like(mask[:, 1:])}.get(mistake, mask[:, 1:])
    total = (picked * m).sum(-1)
    if mistake == "mean":
        return total / m.sum(-1)
    if mistake == "batch_sum":
        return total.sum()
    return total


def sequence_logp_loops(logits, ids, mask):
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                out[b] += logits[b, t - 1].double().log_softmax(0)[ids[b, t]]
    return out


def sequence_logp_cross_entropy(logits, ids, mask):
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return -F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none").sum(-1)


def test_sequence_logp_accepts_correct_solutions():
    for fn in (sequence_logp, sequence_logp_loops, sequence_logp_cross_entropy):
        passes(check_sequence_logp, fn)


@pytest.mark.parametrize("mistake, words", [
    ("no_shift", ("no shift",)),
    ("wrong_way", ("shifted the wrong way",)),
    ("mask_unshifted", ("the mask is not", "mask[:, 1:]")),
    ("mean", ("mean over the reply's tokens instead of the sum",)),
    ("no_mask", ("mask was ignored",)),
    ("raw", ("raw logits",)),
    ("probs", ("probabilities (softmax)",)),
    ("time_softmax", ("time axis",)),
    ("batch_sum", ("one number for the whole batch",)),
])
def test_sequence_logp_rejects_each_mistake_by_name(mistake, words):
    fails_with(check_sequence_logp, lambda l, i, m: sequence_logp(l, i, m, mistake=mistake), *words)


def test_sequence_logp_catches_in_place_changes_and_crashes():
    def in_place(logits, ids, mask):
        out = sequence_logp(logits, ids, mask)
        mask.zero_()
        return out

    def crashes(logits, ids, mask):
        return logits.log_softmax(-1).gather(-1, ids[:, 1:]).sum(-1)  # ids without the last axis

    fails_with(check_sequence_logp, in_place, "changed in place", seeds=range(5))
    fails_with(check_sequence_logp, crashes, "crashed", seeds=range(5))


# --- the DPO loss
def dpo_loss(pc, pr, rc, rr, beta, *, mistake=None):
    if mistake == "swap":
        pc, pr, rc, rr = pr, pc, rr, rc
    if mistake == "swap_reference":
        pc, rc, pr, rr = rc, pc, rr, pr
    margin = (pc - rc) - (pr - rr)
    if mistake == "no_reference":
        margin = pc - pr
    if mistake == "reference_added":
        margin = (pc + rc) - (pr + rr)
    if mistake == "sign":
        margin = -margin
    z = {"no_beta": margin, "divide_beta": margin / beta}.get(mistake, beta * margin)
    per_pair = -F.logsigmoid(z)
    if mistake == "naive_log":
        per_pair = -torch.log(torch.sigmoid(z))
    if mistake == "no_minus":
        per_pair = F.logsigmoid(z)
    if mistake == "sigmoid":
        per_pair = -torch.sigmoid(z)
    if mistake == "beta_outside":
        per_pair = -beta * F.logsigmoid(margin)
    if mistake == "per_pair":
        return per_pair
    return per_pair.sum() if mistake == "sum" else per_pair.mean()


def dpo_loss_softplus(pc, pr, rc, rr, beta):
    """-log sigmoid(x) = softplus(-x): another exact form."""
    return F.softplus(-beta * ((pc - pr) - (rc - rr))).mean()


def dpo_loss_float64_loop(pc, pr, rc, rr, beta):
    losses = [F.softplus(torch.tensor(-beta * ((a - c) - (b - d)), dtype=torch.float64))
              for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    return torch.stack(losses).mean()


def test_dpo_loss_accepts_correct_solutions():
    for fn in (dpo_loss, dpo_loss_softplus, dpo_loss_float64_loop):
        passes(check_dpo_loss, fn)


@pytest.mark.parametrize("mistake, words", [
    ("swap", ("wrong sign", "swapped")),
    ("swap_reference", ("wrong sign", "swapped")),
    ("sign", ("wrong sign",)),
    ("no_reference", ("reference was forgotten",)),
    ("reference_added", ("added instead of subtracted",)),
    ("no_beta", ("beta is missing",)),
    ("beta_outside", ("beta multiplies the loss",)),
    ("divide_beta", ("divided by beta",)),
    ("sum", ("sum over the pairs",)),
    ("no_minus", ("minus sign is missing",)),
    ("sigmoid", ("sigmoid instead of logsigmoid",)),
    ("naive_log", ("underflows", "F.logsigmoid")),
    ("per_pair", ("one loss per pair",)),
])
def test_dpo_loss_rejects_each_mistake_by_name(mistake, words):
    fails_with(check_dpo_loss, lambda *a: dpo_loss(*a, mistake=mistake), *words)
