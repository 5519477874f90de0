"""Checks for lesson 10 (training a GPT). Each check_<name>(fn) calls the learner's fn on fresh random
inputs, compares with tlama_mini's own functions (`training.lr_at`, and `training.train_step` and
`training.evaluate` run on a deep copy of a tiny `Transformer`: what `trainer.Trainer` runs), and names
the mistake when it can.

Legend: B batch (rows), T sequence length, k = grad_accum micro-batches per optimizer step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterator

import torch

from ..config import TlamaConfig
from ..model import Transformer
from ..training import evaluate, lm_loss, lr_at, train_step
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_bits_per_char", "check_lr_at", "check_train_step", "check_evaluate"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _as_float(name: str, out: object) -> float:
    """A Python float, or a one-element tensor, as a float; anything else fails."""
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return float(out.detach())
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        return float(out)
    fail(name, f"returned {type(out).__name__}, expected a float", "did you forget a `return`?")
    raise AssertionError  # unreachable: fail raises


# ---------------------------------------------------------------------------------------------- bits_per_char
@attributes_stubs
def check_bits_per_char(fn: Callable[[float], float]) -> None:
    """fn(loss) -> the same cross-entropy in bits: loss (nats per character) / ln 2."""
    name = "bits_per_char"
    losses = [math.log(65), *(random.uniform(0.3, 5.0) for _ in range(4))]
    mistakes: dict[str, Callable[[float], float]] = {
        "multiplied by ln 2 instead of dividing (1 bit = ln 2 nats, so there are more bits than nats)":
            lambda x: x * math.log(2),
        "took log2 of the loss: the loss is already a logarithm (in base e); change the base by dividing "
        "by ln 2": lambda x: math.log2(x),
        "divided by ln 10: that gives decimal digits (bans), not bits": lambda x: x / math.log(10),
        "returned exp(loss), the perplexity, not bits per character": lambda x: math.exp(x),
        "returned 2 ** loss": lambda x: 2.0 ** x,
    }
    for loss in losses:
        got = _as_float(name, call(name, fn, loss, hint="loss is a Python float: math.log(2) (torch.log wants a "
                                   "tensor); bits = loss / math.log(2)"))
        want = loss / math.log(2)
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        for mistake, wrong in mistakes.items():
            if math.isclose(got, wrong(loss), rel_tol=1e-6):
                fail(name, f"bits_per_char({loss:.4f}) = {got:.4f}: {mistake}", "bits = nats / ln 2")
        fail(name, f"bits_per_char({loss:.4f}) = {got:.4f}, expected {want:.4f}", "bits = nats / ln 2")
    passed(name, f"ln(65) nats = {losses[0] / math.log(2):.3f} bits, and {len(losses) - 1} random losses")


# ---------------------------------------------------------------------------------------------- lr_at
def _schedule(steps: range, max_lr: float, min_lr: float, warmup: int, max_steps: int, *,
              warmup_from_zero: bool = False, no_warmup: bool | str = False, floor: bool = True,
              decay_from_zero: bool = False, clamp: bool = True, half: bool = True) -> torch.Tensor:
    """The schedule with one or more typical mistakes switched on (all off: training.lr_at's)."""
    out = []
    low = min_lr if floor else 0.0
    for s in steps:
        if s < warmup and no_warmup == "max_lr":
            out.append(max_lr)
            continue
        if s < warmup and not no_warmup:
            out.append(max_lr * (s if warmup_from_zero else s + 1) / warmup)
            continue
        if s >= max_steps and clamp:
            out.append(low)
            continue
        progress = s / max_steps if decay_from_zero else (s - warmup) / max(1, max_steps - warmup)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if half else math.cos(math.pi * progress)
        out.append(low + shape * (max_lr - low))
    return torch.tensor(out, dtype=torch.float64)


@attributes_stubs
def check_lr_at(fn: Callable[[int, float, float, int, int], float]) -> None:
    """fn(step, max_lr, min_lr, warmup_steps, max_steps) -> learning rate: linear warmup to max_lr over
    warmup_steps (step 0 gets max_lr / warmup_steps), cosine decay to min_lr at max_steps, then min_lr.
    Compared with tlama_mini.training.lr_at at every step 0 .. max_steps + 5."""
    name = "lr_at"
    max_lr = 10 ** random.uniform(-3.5, -2.0)
    min_lr = max_lr * random.uniform(0.05, 0.2)
    warmup = random.randint(4, 10)
    max_steps = warmup + random.randint(20, 40)
    diff = 0.0
    for w in (warmup, 0):  # 0: no warmup at all (the decay starts at step 0)
        steps = range(max_steps + 6)
        label = f"{name}(step, {max_lr:.2e}, {min_lr:.2e}, warmup_steps={w}, max_steps={max_steps})"
        try:
            got = torch.tensor([_as_float(name, call(label, fn, s, max_lr, min_lr, w, max_steps, hint=(
                "every argument is a Python number: use math.cos and math.pi; return a float")))
                for s in steps], dtype=torch.float64)
        except ZeroDivisionError:
            fail(label, "division by zero", "with warmup_steps=0 there is no warmup: only divide by "
                 "warmup_steps when step < warmup_steps, and by max(1, max_steps - warmup_steps) in the decay")
        expected = torch.tensor([lr_at(s, max_lr, min_lr, w, max_steps) for s in steps], dtype=torch.float64)
        kw = dict(steps=steps, max_lr=max_lr, min_lr=min_lr, warmup=w, max_steps=max_steps)
        mistakes = {
            "the warmup is off by one: step 0 gets lr 0 (that step is wasted) and max_lr is reached one step "
            "late; use max_lr * (step + 1) / warmup_steps": _schedule(**kw, warmup_from_zero=True),
            "there is no warmup: the cosine formula is used from step 0 (with a negative progress)":
                _schedule(**kw, no_warmup=True),
            "there is no warmup: the lr starts at max_lr": _schedule(**kw, no_warmup="max_lr"),
            "the cosine decays to 0, not to min_lr: lr = min_lr + 0.5 * (1 + cos(pi * progress)) * "
            "(max_lr - min_lr)": _schedule(**kw, floor=False),
            "the decay starts at step 0 instead of after the warmup: progress = (step - warmup_steps) / "
            "(max_steps - warmup_steps)": _schedule(**kw, decay_from_zero=True),
            "after max_steps the lr goes back up (the cosine continues): return min_lr for step >= max_steps":
                _schedule(**kw, clamp=False),
            "the cosine is cos(pi * progress), which goes from +1 to -1: use 0.5 * (1 + cos(pi * progress)), "
            "from 1 to 0": _schedule(**kw, half=False),
        }
        for mistake, wrong in list(mistakes.items()):  # some mistakes change nothing without warmup
            if torch.allclose(wrong, expected, rtol=1e-9, atol=0):
                del mistakes[mistake]
        if not torch.allclose(got, expected, rtol=1e-6, atol=1e-12):
            for mistake, wrong in mistakes.items():
                if torch.allclose(got, wrong, rtol=1e-6, atol=1e-12):
                    fail(label, f"the schedule matches a known mistake: {mistake}")
            wrong_steps = (~torch.isclose(got, expected, rtol=1e-6, atol=1e-12)).nonzero().flatten().tolist()
            bad = int((got - expected).abs().argmax())  # the largest difference, not a rounding-sized first one
            phase = "warmup" if bad < w else "cosine decay" if bad < max_steps else "after max_steps"
            at = f"at step {bad} ({phase}) got {got[bad].item():.6g}, expected {expected[bad].item():.6g}"
            floorless = _schedule(**kw, floor=False)[w:max_steps]  # the decay written as if min_lr were 0
            for mistake, wrong in {
                "min_lr is missing from the cosine decay, which goes down to about 0 instead of to min_lr":
                    floorless,
                "the cosine scales max_lr instead of (max_lr - min_lr), so the decay starts at max_lr + min_lr":
                    floorless + min_lr,
            }.items():
                if max_steps > w and torch.allclose(got[w:max_steps], wrong, rtol=1e-6, atol=1e-12):
                    fail(label, f"{at}: {mistake}", "lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)")
            fail(label, f"{at}, the largest difference ({len(wrong_steps)} steps differ, the first is step "
                 f"{wrong_steps[0]})",
                 "warmup: max_lr * (step + 1) / warmup_steps for step < warmup_steps; then progress = "
                 "(step - warmup_steps) / (max_steps - warmup_steps) and min_lr + 0.5 * (1 + cos(pi * progress)) "
                 "* (max_lr - min_lr); min_lr from max_steps on")
        diff = max(diff, (got - expected).abs().max().item())
    passed(name, f"equal to training.lr_at at every step (max abs diff {diff:.1e}), with warmup_steps="
           f"{warmup} and 0")


# ---------------------------------------------------------------------------------------------- train_step
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one CPU thread, then restore the count: these models are so small that several threads only
    wait on each other, and on a busy machine their spin-waiting made a check 100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tiny_model(dropout: float = 0.0) -> Transformer:
    cfg = TlamaConfig.from_preset("tiny", vocab_size=random.randint(20, 40), d_model=32, n_layers=2, n_heads=4,
                                  n_kv_heads=2, max_seq_len=16, dropout=dropout)
    return Transformer(cfg).train()


def _batches(model: Transformer, shapes: list[tuple[int, int]]) -> list[Batch]:
    V = model.config.vocab_size
    return [(torch.randint(0, V, (b, t)), torch.randint(0, V, (b, t))) for b, t in shapes]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _reference(model: Transformer, steps: list[list[Batch]], clip: float, lr: float, *, scale: float = 1.0,
               last_only: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """tlama_mini.training.train_step, step after step, on a deep copy with SGD (whose update is -lr * gradient,
    so a gradient of the wrong size shows; Adam would hide a constant factor). Returns the weights before and
    after every step, and the losses. Two mistakes are the same step on other inputs: `scale` multiplies
    each micro-batch's loss (k: the loss not divided by k), `last_only` keeps only the last micro-batch with
    its loss / k (the gradients zeroed inside the micro-batch loop)."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    weights, losses = [_flat(m)], []
    for batches in steps:
        k = len(batches)
        loss_fn = (lambda mod, b: lm_loss(mod, b) / k) if last_only else (lambda mod, b: lm_loss(mod, b) * scale)
        losses.append(train_step(m, opt, batches[-1:] if last_only else batches, grad_clip=clip, loss_fn=loss_fn))
        weights.append(_flat(m))
    return weights, losses


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else 0.0


class _WatchedSGD(torch.optim.SGD):
    """SGD that records, at each step(), the global norm of the gradients it is about to apply."""

    def __init__(self, params, lr: float, events: list[str]) -> None:
        self.params_list = list(params)
        super().__init__(self.params_list, lr=lr)
        self.events, self.norms = events, []

    def step(self, closure=None):  # noqa: D102
        self.events.append("step")
        self.norms.append(_grad_norm(self.params_list))
        return super().step(closure)


@contextlib.contextmanager
def _watch_clipping(events: list[str]) -> Iterator[None]:
    """Record calls of torch.nn.utils.clip_grad_norm_ (as 'clip') while the learner's step runs."""
    original = torch.nn.utils.clip_grad_norm_

    def watched(*args, **kwargs):
        events.append("clip")
        return original(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = watched
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def _run_learner(fn, model: Transformer, steps: list[list[Batch]], clip: float, lr: float
                 ) -> tuple[torch.Tensor, list[float], _WatchedSGD, list[str]]:
    m = copy.deepcopy(model)
    events: list[str] = []
    opt = _WatchedSGD(m.parameters(), lr, events)
    losses = []
    with _watch_clipping(events):
        for batches in steps:
            losses.append(_as_float("train_step", call("train_step", fn, m, opt, batches, len(batches), clip,
                                                       hint=_CALL_HINT)))
    return _flat(m), losses, opt, events


_CALL_HINT = ("_, loss = model(x, targets=y): the targets go by keyword (the second positional argument of the "
              "model is start_pos); `batches` is a list of (x, y) pairs")
_ACCUM_HINT = ("for each micro-batch: loss = model(x, targets=y)[1]; (loss / grad_accum).backward(); then clip "
               "the gradient norm, optimizer.step(), optimizer.zero_grad()")


@attributes_stubs
def check_train_step(fn) -> None:
    """fn(model, optimizer, batches, grad_accum, clip) -> float: one optimizer step over the grad_accum
    micro-batches (x, y) of `batches`, gradients clipped to a global norm of `clip` (0: no clipping);
    returns the mean loss of the micro-batches. Compared with the same step on a deep copy of the model."""
    with _one_thread():
        _check_train_step(fn)


def _check_train_step(fn) -> None:
    name = "train_step"
    model = _tiny_model()
    lr = 0.5
    k = random.randint(2, 4)
    B, T = random.randint(2, 3), random.randint(6, 12)
    two_steps = [_batches(model, [(B, T)] * k), _batches(model, [(B, T)] * k)]
    start = _flat(model)

    # 1. clipping inactive (a huge clip): is the accumulated gradient the mean over the micro-batches?
    got, losses, opt, events = _run_learner(fn, model, two_steps, 1e6, lr)
    if torch.equal(got, start):
        fail(name, "the weights did not change", "call optimizer.step() after the backward passes (and do not "
             "zero the gradients between backward() and step())")
    ref, ref_losses = _reference(model, two_steps, 1e6, lr)
    expected = ref[-1]
    mistakes = {
        "the loss is not divided by grad_accum, so the gradient is the *sum* over the micro-batches, "
        "grad_accum times too large: (loss / grad_accum).backward()":
            _reference(model, two_steps, 1e6, lr, scale=k)[0][-1],
        "the gradients are zeroed inside the micro-batch loop, so only the last micro-batch's gradient is used: "
        "zero them once per optimizer step": _reference(model, two_steps, 1e6, lr, last_only=True)[0][-1],
        # SGD: the second step also applies the first step's update -lr * g1 = ref[1] - ref[0]
        "the gradients are never zeroed, so the second step also applies the first step's gradient: call "
        "optimizer.zero_grad() once per step (before the micro-batches or after optimizer.step())":
            ref[2] + (ref[1] - ref[0]),
    }
    diff = check_tensor(name + " (weights after two steps)", got, expected, atol=1e-5, mistakes=mistakes,
                        hint=_ACCUM_HINT)
    for got_loss, want in zip(losses, ref_losses):
        if abs(got_loss - want) > 1e-5:
            problem = f"returned loss {got_loss:.5f}, expected the mean micro-batch loss {want:.5f}"
            if abs(got_loss - want * k) < 1e-4:
                problem = f"returned the sum of the {k} micro-batch losses ({got_loss:.4f}), expected their mean"
            fail(name, problem, "return the mean of the micro-batch losses, e.g. sum of loss.item() / grad_accum")

    # 2. clipping active: the gradients must be clipped before the optimizer applies them
    one_step = two_steps[:1]
    probe = copy.deepcopy(model)
    for x, y in one_step[0]:
        (probe(x, targets=y)[1] / k).backward()
    clip = _grad_norm(list(probe.parameters())) / 4
    got, _, opt, events = _run_learner(fn, model, one_step, clip, lr)
    if opt.norms and opt.norms[0] > clip * 1.001:
        if "clip" in events and events.index("clip") > events.index("step"):
            fail(name, "the gradients are clipped after optimizer.step(): the step already used the raw gradients",
                 "clip between the backward passes and optimizer.step()")
        fail(name, f"the gradients reached optimizer.step() with norm {opt.norms[0]:.3g} > clip = {clip:.3g}: "
             "they were not clipped (or clipped after the step)",
             "torch.nn.utils.clip_grad_norm_(model.parameters(), clip) between backward() and optimizer.step()")
    expected = _reference(model, one_step, clip, lr)[0][-1]
    mistakes = {"the gradients are zeroed inside the micro-batch loop: zero them once per optimizer step":
                _reference(model, one_step, clip, lr, last_only=True)[0][-1]}
    check_tensor(name + f" (clip={clip:.3g}, below the gradient norm {4 * clip:.3g})", got, expected, atol=1e-5,
                 mistakes=mistakes, hint="clip the global norm over all parameters, "
                 "clip_grad_norm_(model.parameters(), clip), once, after all micro-batches")

    # 3. clip = 0 means: do not clip
    got, _, _, _ = _run_learner(fn, model, one_step, 0.0, lr)
    if torch.equal(got, start):
        fail(name + " (clip=0)", "with clip=0 the weights did not change: clip=0 means 'no clipping', but "
             "clip_grad_norm_(params, 0) scales every gradient to 0", "clip only when clip > 0")
    check_tensor(name + " (clip=0)", got, _reference(model, one_step, 0.0, lr)[0][-1], atol=1e-5,
                 hint="clip=0 means no clipping")
    passed(name, f"max abs diff {diff:.1e} in the weights after two steps of {k} micro-batches; clipping "
           "before the step; clip=0 leaves the gradients alone")


# ---------------------------------------------------------------------------------------------- evaluate
@attributes_stubs
def check_evaluate(fn) -> None:
    """fn(model, batches) -> float: the mean loss per token over all (x, y) batches (of different sizes),
    computed in eval mode without tracking gradients; the model is back in train mode afterwards."""
    with _one_thread():
        _check_evaluate(fn)


def _check_evaluate(fn) -> None:
    name = "evaluate"
    model = _tiny_model(dropout=0.3)  # dropout: a model left in train mode gives a different, noisy loss
    with torch.no_grad():  # larger weights than the init: batch losses then differ, and so do wrong averages
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    T = random.randint(8, 14)
    shapes = [(4, T), (4, T), (1, random.randint(3, T - 2))]  # the last one short, like full_split_batches' tail
    batches = _batches(model, shapes)
    ref = copy.deepcopy(model)
    expected = evaluate(ref, batches)  # tlama_mini.training.evaluate
    per_batch = [evaluate(ref, [batch]) for batch in batches]

    calls: list[tuple[bool, bool]] = []  # (training, grad enabled) at each forward
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append((mod.training, torch.is_grad_enabled())))
    try:
        out = call(name, fn, model, [(x.clone(), y.clone()) for x, y in batches], hint=_CALL_HINT)
    finally:
        handle.remove()
    if isinstance(out, torch.Tensor) and out.requires_grad:
        fail(name, "the result requires grad: gradients were tracked during evaluation",
             "wrap the loop in `with torch.no_grad():` (memory and time saved; nothing is learned here)")
    got = _as_float(name, out)
    if any(training for training, _ in calls):
        fail(name, "the model was in training mode while evaluating, so dropout was active and the loss is "
             "noisy and too high", "call model.eval() before the loop")
    if any(grad for _, grad in calls):
        fail(name, "gradients were tracked during evaluation (autograd kept every activation)",
             "wrap the loop in `with torch.no_grad():`")
    if not model.training:
        fail(name, "the model is left in eval mode: training would continue without dropout",
             "call model.train() after evaluating")
    if math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6):
        passed(name, f"{got:.4f} = reference {expected:.4f} over batches {shapes}")
        return
    mean_of_means = sum(per_batch) / len(per_batch)
    by_rows = sum(l * y.shape[0] for l, (_, y) in zip(per_batch, batches)) / sum(y.shape[0] for _, y in batches)
    mistakes = {
        "the batch losses are averaged without weights, so the short last batch counts as much as a full one: "
        "weight each batch's mean loss by its number of tokens, y.numel()": mean_of_means,
        "the batch losses are weighted by rows (y.shape[0]); the last batch has shorter rows: weight by the "
        "number of tokens, y.numel()": by_rows,
        "returned the sum of the batch losses, not the mean": sum(per_batch),
        "returned the loss of the last batch only": per_batch[-1],
    }
    for mistake, value in mistakes.items():
        if math.isclose(got, value, rel_tol=1e-5, abs_tol=1e-6):
            fail(name, f"returned {got:.4f}, expected {expected:.4f}: {mistake}")
    called = f"; the model was called {len(calls)} times for {len(batches)} batches" if calls and \
        len(calls) != len(batches) else ""
    fail(name, f"returned {got:.4f}, expected {expected:.4f} (the mean loss per token over all batches){called}",
         "total += loss.item() * y.numel(); count += y.numel(); return total / count")
