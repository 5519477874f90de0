"""The lesson 10 (training a GPT) checks accept a correct solution and reject each typical mistake by name on
every draw: every wrong solution runs through its check over many seeds (fewer for the checks that train a model)."""
import math
import random

import pytest
import torch

from tlama_mini.checks.common import expect_failure_on_every_draw
from tlama_mini.checks.lesson10 import check_bits_per_char, check_evaluate, check_lr_at, check_train_step

SEEDS = range(30)
SEEDS_MODEL = range(6)  # check_train_step and check_evaluate build and train a model on every call


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def fails_with(check, fn, *words):
    """`check` rejects `fn` with a message that names the mistake (contains every one of `words`) on every seed;
    returns the last message."""
    seeds = SEEDS_MODEL if check in (check_train_step, check_evaluate) else SEEDS
    return expect_failure_on_every_draw(check, fn, *words, seeds=seeds)


# --- correct implementations, written from the definitions (not from tlama_mini)
def bits_per_char(loss):
    return loss / math.log(2)


def lr_at(step, max_lr, min_lr, warmup_steps, max_steps, *, first=1, floor=True, offset=True, clamp=True):
    if step < warmup_steps:
        return max_lr * (step + first) / warmup_steps
    if step >= max_steps and clamp:
        return min_lr if floor else 0.0
    start = warmup_steps if offset else 0
    progress = (step - start) / max(1, max_steps - start)
    low = min_lr if floor else 0.0
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - low)


def train_step(model, optimizer, batches, grad_accum, clip, *, divide=True, zero_inside=False, clip_when="before",
               zero=True):
    if zero:
        optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in batches:
        if zero_inside:
            optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, targets=y)
        (loss / grad_accum if divide else loss).backward()
        total += loss.item()
    if clip > 0 and clip_when == "before":
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if clip_when == "always":  # forgets that clip=0 means "no clipping"
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if clip > 0 and clip_when == "after":
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return total / grad_accum


def evaluate(model, batches):
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            _, loss = model(x, targets=y)
            total += loss.item() * y.numel()
            count += y.numel()
    model.train()
    return total / count


def test_correct_solutions_pass_on_every_draw(capsys):
    for seed in SEEDS:
        random.seed(seed)
        torch.manual_seed(seed)
        check_bits_per_char(bits_per_char)
        check_lr_at(lr_at)
        if seed in SEEDS_MODEL:
            check_train_step(train_step)
            check_evaluate(evaluate)
    assert capsys.readouterr().out.count("✓") == 2 * len(SEEDS) + 2 * len(SEEDS_MODEL)


def test_equivalent_variants_pass(capsys):
    def zero_at_end(model, optimizer, batches, grad_accum, clip):  # like tlama_mini's Trainer
        loss = train_step(model, optimizer, batches, grad_accum, clip, zero=False)
        optimizer.zero_grad(set_to_none=True)
        return torch.tensor(loss)  # a 0-d tensor is accepted as a float

    def inference_mode(model, batches):
        was = model.training
        model.eval()
        with torch.inference_mode():
            losses = [(model(x, targets=y)[1] * y.numel(), y.numel()) for x, y in batches]
        model.train(was)
        return sum(l for l, _ in losses) / sum(n for _, n in losses)

    check_train_step(zero_at_end)
    check_evaluate(inference_mode)
    check_bits_per_char(lambda loss: torch.tensor(loss) / math.log(2))
    assert capsys.readouterr().out.count("✓") == 3




def test_bits_per_char_mistakes():
    fails_with(check_bits_per_char, lambda loss: loss * math.log(2), "multiplied by ln 2")
    fails_with(check_bits_per_char, lambda loss: math.log2(loss), "log2 of the loss")
    fails_with(check_bits_per_char, lambda loss: math.exp(loss), "perplexity")
    fails_with(check_bits_per_char, lambda loss: loss, "expected")
    fails_with(check_bits_per_char, lambda loss: None, "returned NoneType")
    fails_with(check_bits_per_char, lambda loss: loss / math.log(10), "ln 10")
    fails_with(check_bits_per_char, lambda loss: loss / math.log2(math.e), "multiplied by ln 2")  # = loss * ln 2
    fails_with(check_bits_per_char, lambda loss: loss / torch.log(2), "crashed with TypeError", "math.log(2)")


def test_lr_at_mistakes():
    def no_warmup(step, max_lr, min_lr, warmup_steps, max_steps):
        return lr_at(max(step, warmup_steps), max_lr, min_lr, warmup_steps, max_steps)

    def divides_by_zero(step, max_lr, min_lr, warmup_steps, max_steps):
        ramp = max_lr * (step + 1) / warmup_steps  # computed even when there is no warmup
        return ramp if step < warmup_steps else lr_at(step, max_lr, min_lr, warmup_steps, max_steps)

    def unclamped_formula(step, max_lr, min_lr, warmup_steps, max_steps):
        return lr_at(step, max_lr, min_lr, warmup_steps, max_steps, clamp=False)

    def raw_cosine(step, max_lr, min_lr, warmup_steps, max_steps):
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        return min_lr + math.cos(math.pi * progress) * (max_lr - min_lr)

    fails_with(check_lr_at, lambda *a: lr_at(*a, first=0), "off by one", "step 0 gets lr 0")
    fails_with(check_lr_at, lambda *a: lr_at(*a, floor=False), "decays to 0, not to min_lr")
    fails_with(check_lr_at, lambda *a: lr_at(*a, offset=False), "starts at step 0 instead of after the warmup")
    fails_with(check_lr_at, no_warmup, "no warmup")
    fails_with(check_lr_at, divides_by_zero, "division by zero", "warmup_steps=0")
    fails_with(check_lr_at, unclamped_formula, "after max_steps")
    fails_with(check_lr_at, raw_cosine, "0.5 * (1 + cos")
    fails_with(check_lr_at, lambda *a: lr_at(*a) * 1.01, "(warmup)", "the largest difference", "steps differ, the "
               "first is step 0")

    def no_floor_in_decay(step, max_lr, min_lr, warmup_steps, max_steps):  # min_lr only after max_steps
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        if step >= max_steps:
            return min_lr
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps))) * max_lr

    def floor_not_subtracted(step, max_lr, min_lr, warmup_steps, max_steps):
        return lr_at(step, max_lr, min_lr, warmup_steps, max_steps) + (
            0 if step < warmup_steps or step >= max_steps else min_lr * 0.5 * (1 + math.cos(
                math.pi * (step - warmup_steps) / (max_steps - warmup_steps))))

    message = fails_with(check_lr_at, no_floor_in_decay, "(cosine decay)", "min_lr is missing", "about 0")
    step = int(message.split("at step ")[1].split(" ")[0])
    max_steps = int(message.split("max_steps=")[1].split(")")[0])
    assert step == max_steps - 1, f"the last decay step differs most, not step {step}: {message}"
    fails_with(check_lr_at, floor_not_subtracted, "scales max_lr instead of (max_lr - min_lr)")

    def cosine_of_a_tensor_list(step, max_lr, min_lr, warmup_steps, max_steps):  # a crash inside the learner's code
        return lr_at(step, max_lr, min_lr, warmup_steps, max_steps) if step < warmup_steps else math.cos([step])

    fails_with(check_lr_at, cosine_of_a_tensor_list, "crashed with TypeError", "math.cos")


def test_train_step_mistakes():
    def no_step(model, optimizer, batches, grad_accum, clip):
        for x, y in batches:
            (model(x, targets=y)[1] / grad_accum).backward()
        return 0.0

    def returns_sum(model, optimizer, batches, grad_accum, clip):
        return train_step(model, optimizer, batches, grad_accum, clip) * grad_accum

    fails_with(check_train_step, lambda *a: train_step(*a, divide=False), "not divided by grad_accum")
    fails_with(check_train_step, lambda *a: train_step(*a, zero_inside=True), "inside the micro-batch loop")
    fails_with(check_train_step, lambda *a: train_step(*a, zero=False), "never zeroed")
    fails_with(check_train_step, lambda *a: train_step(*a, clip_when="after"), "clipped after optimizer.step()")
    fails_with(check_train_step, lambda *a: train_step(*a, clip_when="never"), "not clipped")
    fails_with(check_train_step, lambda *a: train_step(*a, clip_when="always"), "clip=0 means 'no clipping'")
    fails_with(check_train_step, no_step, "did not change")
    fails_with(check_train_step, returns_sum, "sum of the")

    def targets_by_position(model, optimizer, batches, grad_accum, clip):  # model(x, y): y lands in start_pos
        optimizer.zero_grad()
        for x, y in batches:
            (model(x, y)[1] / grad_accum).backward()
        optimizer.step()
        return 0.0

    fails_with(check_train_step, targets_by_position, "crashed", "targets=y")


def test_evaluate_mistakes():
    def train_mode(model, batches):
        with torch.no_grad():
            total = sum(model(x, targets=y)[1].item() * y.numel() for x, y in batches)
            return total / sum(y.numel() for _, y in batches)

    def with_grad(model, batches):
        model.eval()
        out = sum(model(x, targets=y)[1] * y.numel() for x, y in batches) / sum(y.numel() for _, y in batches)
        model.train()
        return out.item()

    def stays_eval(model, batches):
        out = evaluate(model, batches)
        model.eval()
        return out

    def unweighted(model, batches):
        return sum(evaluate(model, [b]) for b in batches) / len(batches)

    def by_rows(model, batches):
        return sum(evaluate(model, [(x, y)]) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)

    fails_with(check_evaluate, train_mode, "training mode", "dropout")
    fails_with(check_evaluate, with_grad, "gradients were tracked")
    fails_with(check_evaluate, lambda m, b: torch.tensor(evaluate(m, b), requires_grad=True), "requires grad")
    fails_with(check_evaluate, stays_eval, "left in eval mode")
    fails_with(check_evaluate, unweighted, "without weights")
    fails_with(check_evaluate, by_rows, "weighted by rows")
    fails_with(check_evaluate, lambda m, b: evaluate(m, b[-1:]), "last batch only")

    def targets_by_position(model, batches):
        model.eval()
        with torch.no_grad():
            losses = [model(x, y)[1].item() for x, y in batches]
        model.train()
        return sum(losses) / len(losses)

    fails_with(check_evaluate, targets_by_position, "crashed", "targets=y")
    fails_with(check_evaluate, lambda m, b: sum(evaluate(m, [bb]) for bb in b), "sum of the batch losses")
