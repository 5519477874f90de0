"""training.py's pure functions: the schedule, one optimizer step (accumulation, clipping, non-finite loss)
and the evaluation, each against a reference written here from its definition."""
import copy
import math
import random

import pytest
import torch

from tlama_mini import TlamaConfig, Transformer
from tlama_mini.training import evaluate, get_lr_scheduler, lr_at, set_lr, train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_model(seed: int, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TlamaConfig.from_preset("tiny", vocab_size=31, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  max_seq_len=16, dropout=dropout)
    return Transformer(cfg).train()


def batches(seed: int, shapes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 31, (b, t), generator=g), torch.randint(0, 31, (b, t), generator=g)) for b, t in shapes]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("seed", range(5))
def test_lr_at_is_warmup_then_cosine_then_floor(seed):
    rng = random.Random(seed)
    max_lr, warmup = rng.uniform(1e-4, 1e-2), rng.randint(0, 10)
    min_lr, max_steps = max_lr * rng.uniform(0, 0.5), warmup + rng.randint(1, 50)
    for step in range(max_steps + 5):
        if step < warmup:
            want = max_lr * (step + 1) / warmup
        elif step >= max_steps:
            want = min_lr
        else:
            cos = math.cos(math.pi * (step - warmup) / (max_steps - warmup))
            want = min_lr + (max_lr - min_lr) * (1 + cos) / 2
        assert lr_at(step, max_lr, min_lr, warmup, max_steps) == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert get_lr_scheduler(max_lr, min_lr, warmup, max_steps)(step) == lr_at(step, max_lr, min_lr, warmup,
                                                                                   max_steps)
    # the time budget's form: progress 0 -> 1 goes from max_lr to min_lr
    assert lr_at(0.0, max_lr, min_lr, 0, 1) == max_lr and lr_at(1.0, max_lr, min_lr, 0, 1) == min_lr
    assert lr_at(0.5, max_lr, min_lr, 0, 1) == pytest.approx((max_lr + min_lr) / 2)


def test_lr_at_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, 0.1, 1.0, 0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        get_lr_scheduler(1.0, 0.1, 20, 10)


def test_set_lr_keeps_each_groups_ratio():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr_ratio": 5.0}, {"params": [q]}], lr=1.0)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.05), 0.01]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clip", [0.05, 0.0])  # clipping active; off (0), where a gradient k times too big shows
def test_train_step_accumulates_the_mean_gradient_then_clips_then_steps(seed, clip):
    model = tiny_model(seed)
    k, lr = 3, 0.3
    micro = batches(seed, [(2, 8)] * k)
    ref = copy.deepcopy(model)  # reference: one batch of all rows, clipped by hand, plain SGD
    x, y = torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro])
    loss = ref(x, targets=y)[1]
    loss.backward()
    grads = [p.grad for p in ref.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert clip == 0 or norm > clip, "the test needs clipping to be active"
    scale = clip / norm if clip else 1.0
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p -= lr * g * scale
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    got = train_step(model, opt, micro, grad_clip=clip)
    assert got == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_train_step_without_clipping_and_with_a_nonfinite_loss():
    model = tiny_model(0)
    micro = batches(0, [(2, 8)])
    ref = copy.deepcopy(model)
    ref(micro[0][0], targets=micro[0][1])[1].backward()
    want = torch.cat([(p - 0.1 * p.grad).detach().flatten() for p in ref.parameters()])
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), micro, grad_clip=0.0)  # 0: no clipping
    torch.testing.assert_close(flat(model), want, rtol=1e-5, atol=1e-6)
    before = flat(model)
    nan = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), micro,
                     loss_fn=lambda m, b: m(b[0], targets=b[1])[1] * float("nan"))
    assert math.isnan(nan) and torch.equal(flat(model), before)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="micro-batch"):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [])


def test_evaluate_is_the_token_weighted_mean_in_eval_mode():
    model = tiny_model(1, dropout=0.5)
    data = batches(1, [(4, 12), (4, 12), (1, 5)])
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        sums = [torch.nn.functional.cross_entropy(ref(x, kv_cache=False)[0].flatten(0, 1), y.flatten(), reduction="sum").item()
                for x, y in data]
    want = sum(sums) / sum(y.numel() for _, y in data)
    assert evaluate(model, data) == pytest.approx(want, rel=1e-5)
    assert model.training  # back in train mode
