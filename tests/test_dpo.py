"""tlama_mini.dpo against direct float64 computations, the known facts of the loss (log 2 at the start,
falling as the margin grows, the gradient's direction), and the letter-counting task (chat_tasks)."""
import math
import random

import pytest
import torch

from tlama_mini import chat_data as D
from tlama_mini import chat_tasks as C
from tlama_mini import dpo


@pytest.mark.parametrize("seed", range(5))
def test_loss_equals_direct_float64(seed):
    g = torch.Generator().manual_seed(seed)
    B = 1 + seed * 3
    pc, pr, rc, rr = (torch.randn(B, generator=g, dtype=torch.float64) * 20 - 40 for _ in range(4))
    beta = [0.05, 0.1, 0.5, 1.0, 2.0][seed]
    want = sum(-math.log(1 / (1 + math.exp(-beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()))) for i in range(B)) / B
    assert dpo.dpo_loss(pc, pr, rc, rr, beta=beta).item() == pytest.approx(want, rel=1e-12)
    got32 = dpo.dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=beta).item()
    assert got32 == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_log2_at_the_start_and_falls_as_the_margin_grows():
    ref_c, ref_r = torch.tensor([-12.0, -30.0, -5.0]), torch.tensor([-11.0, -25.0, -9.0])
    assert dpo.dpo_loss(ref_c, ref_r, ref_c, ref_r).item() == pytest.approx(math.log(2), rel=1e-7)
    losses = [dpo.dpo_loss(ref_c + m, ref_r - m, ref_c, ref_r).item() for m in (0.0, 1.0, 5.0, 20.0, 100.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 1e-4
    assert dpo.dpo_loss(ref_c - 5, ref_r, ref_c, ref_r).item() > math.log(2)  # the chosen one got less likely


def test_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-10.0, -3.0], requires_grad=True), torch.tensor([-9.0, -4.0], requires_grad=True)
    dpo.dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.1).backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # gradient descent moves pc up, pr down
    torch.testing.assert_close(pc.grad, torch.full((2,), -0.1 * 0.5 / 2))  # beta * sigmoid(0) / B


def test_refusals():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        dpo.dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        dpo.dpo_loss(x, x, x, x, beta=0)


@pytest.mark.parametrize("seed", range(3))
def test_sequence_logps_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, V = 3, 9, 17
    logits = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.4] = D.IGNORE_INDEX
    y[0] = D.IGNORE_INDEX  # a row with no reply token sums to 0
    torch.testing.assert_close(dpo.sequence_logps(logits, y).double(), dpo.sequence_logps_reference(logits, y),
                               rtol=1e-5, atol=1e-5)
    assert dpo.sequence_logps(logits, y)[0].item() == 0.0
    torch.testing.assert_close(dpo.sequence_logps(logits.bfloat16(), y).double(),
                               dpo.sequence_logps_reference(logits.bfloat16(), y), rtol=1e-4, atol=1e-4)


def test_pair_batch_shares_the_prompt_and_masks_only_the_replies():
    tok = C.small_chat_tokenizer()
    pairs = C.dpo_records(4, seed=2)
    examples = [dpo.pair_examples(tok, p) for p in pairs]
    x, y = dpo.pair_batch(examples, D.pad_id_of(tok))
    assert x.shape[0] == 8
    for b, ((ci, cm), (ri, rm)) in enumerate(examples):
        first = cm.index(1)
        assert ci[:first] == ri[:first] == ri[:rm.index(1)]  # the same prompt tokens
        assert tok.decode([t for t in y[b].tolist() if t != D.IGNORE_INDEX]) == pairs[b]["chosen"] + "<|im_end|>"
        assert tok.decode([t for t in y[4 + b].tolist() if t != D.IGNORE_INDEX]) == pairs[b]["rejected"] + "<|im_end|>"


def test_task_split_grader_and_pairs():
    train, held = C.split_words(0)
    assert not set(train) & set(held) and len(held) > 20
    assert C.make_examples(30, "held_out", seed=4) == C.make_examples(30, "held_out", seed=4)
    assert C.make_examples(30, "held_out", seed=4) != C.make_examples(30, "held_out", seed=5)
    assert {e.word for e in C.make_examples(200, "train")} <= set(train)
    for e in C.make_examples(100, "held_out", seed=1):
        assert e.count == e.word.count(e.letter) and C.grade(e.answer, e)
    counts = [e.count for e in C.make_examples(300)]
    assert counts.count(0) > 50 and max(counts) >= 2
    rng = random.Random(0)
    for e in C.make_examples(50, seed=2):
        p = C.dpo_pair(e, rng)
        assert C.grade(p["chosen"], e) and not C.grade(p["rejected"], e)
        assert abs(C.final_answer(p["rejected"]) - e.count) == 1
    e = C.Example("strawberry", "r", 3)
    assert C.grade("There are 3.", e) and not C.grade("s, t, r. The letter appears 2 times. Maybe 3", e)
    assert not C.grade("no idea", e) and C.final_answer("no idea") is None
