"""Muon: Newton-Schulz orthogonalization against the exact U V^T, the update rule against a hand-written
step, the AdamW part against torch.optim.AdamW, the parameter split, and exact state round trips. Training
with --optimizer muon through the Trainer is in test_trainer.py."""
import io

import pytest
import torch

from tlama_mini import TlamaConfig, Transformer
from tlama_mini.muon import Muon, muon_param_groups, orthogonalize


@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48)])
def test_orthogonalize_sets_singular_values_near_one(shape):
    torch.manual_seed(0)
    r = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], r))[0], torch.linalg.qr(torch.randn(shape[1], r))[0]
    g = u @ torch.diag(torch.logspace(-1.5, 1, r)) @ v.T  # singular values spread over 2.5 decades
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())  # the quintic's band, not exactly 1
    exact = u @ v.T  # U V^T of g
    cos = (o * exact).sum() / (o.norm() * exact.norm())
    assert cos > 0.95  # close in direction to the exact U V^T
    stacked = orthogonalize(torch.stack([g, 3 * g.flip(0)]))  # a stack: each matrix on its own
    torch.testing.assert_close(stacked[0], o), torch.testing.assert_close(stacked[1], o.flip(0), atol=1e-5, rtol=0)
    low = orthogonalize(g, dtype=torch.bfloat16)  # the fast path: close to the float32 result
    sl = torch.linalg.svdvals(low)
    assert low.dtype == g.dtype and sl.min() > 0.5 and sl.max() < 1.3
    assert (low * o).sum() / (low.norm() * o.norm()) > 0.99
    with pytest.raises(ValueError, match="needs a matrix"):
        orthogonalize(torch.randn(4))


def test_muon_step_equals_the_written_out_rule():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(96, 32))
    ref = w.detach().clone()
    opt = Muon([{"params": [w], "muon": True}], lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32)
    buf = torch.zeros_like(ref)
    for _ in range(3):
        g = torch.randn_like(ref)
        w.grad = g.clone()
        opt.step()
        ref.mul_(1 - 0.05 * 0.1)
        buf = 0.9 * buf + g
        ref -= 0.05 * (96 / 32) ** 0.5 * orthogonalize(g + 0.9 * buf)
    torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-6)


def test_non_muon_groups_equal_torch_adamw():
    torch.manual_seed(2)
    a = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = Muon([{"params": a[:1], "weight_decay": 0.1}, {"params": a[1:], "weight_decay": 0.0}], lr=1e-2,
                betas=(0.9, 0.99))
    theirs = torch.optim.AdamW([{"params": b[:1], "weight_decay": 0.1}, {"params": b[1:], "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(), theirs.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_groups_split_block_matrices_from_embeddings_head_and_vectors():
    model = Transformer(TlamaConfig.from_preset("tiny", tie_embeddings=False))
    muon, decay, no_decay = muon_param_groups(model, 0.1, 10.0)
    assert muon["muon"] and muon["lr_ratio"] == 10.0 and all(p.dim() == 2 for p in muon["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"token_emb.weight", "output.weight"}
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in (muon, decay, no_decay))
    assert n == len(list(model.parameters()))
    opt = model.configure_optimizers(0.1, 1e-3, "cpu", master_process=False, optimizer="muon")
    assert isinstance(opt, Muon)
    with pytest.raises(ValueError, match="2-D weights only"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(3))], "muon": True}])
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        model.configure_optimizers(0.1, 1e-3, "cpu", master_process=False, optimizer="sgd")


def test_state_round_trip_continues_exactly():
    torch.manual_seed(3)
    cfg = TlamaConfig.from_preset("tiny")
    x = torch.randint(0, cfg.vocab_size, (4, 16))

    def steps(model, opt, n):
        for _ in range(n):
            model(x, targets=x)[1].backward()
            opt.step()
            opt.zero_grad()

    a = Transformer(cfg)
    b = Transformer(cfg)
    b.load_state_dict(a.state_dict())
    opt_a = a.configure_optimizers(0.1, 1e-3, "cpu", master_process=False, optimizer="muon")
    steps(a, opt_a, 2)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what the trainer's checkpoints allow
    b.load_state_dict(saved["model"])
    opt_b = b.configure_optimizers(0.1, 1e-3, "cpu", master_process=False, optimizer="muon")
    opt_b.load_state_dict(saved["opt"])
    steps(a, opt_a, 2), steps(b, opt_b, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
