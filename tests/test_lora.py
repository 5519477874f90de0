"""LoRA: starts equal to the base model, trains only the adapters, equals W + (alpha/r) B A written
out, and merging gives the same outputs as the adapted model."""
import pytest
import torch

from tlama_mini import TlamaConfig, Transformer
from tlama_mini.lora import LoRALinear, apply_lora, lora_parameters, merge_lora


def _model():
    torch.manual_seed(0)
    return Transformer(TlamaConfig.from_preset("tiny"))


def test_lora_starts_equal_and_trains_only_adapters():
    base, model = _model(), _model()
    apply_lora(model, r=4, alpha=8)
    x = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(model(x, targets=x)[0], base(x, targets=x)[0])
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(lora_parameters(model), lr=0.1)
    assert len(lora_parameters(model)) == 2 * 4 * model.config.n_layers
    for _ in range(3):
        opt.zero_grad()
        model(x, targets=x)[1].backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.allclose(model(x, targets=x)[0], base(x, targets=x)[0])


def test_lora_linear_equals_the_formula_and_merges():
    lin = torch.nn.Linear(12, 20, bias=False)
    lora = LoRALinear(lin, r=3, alpha=6)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(4, 12)
    expected = x @ (lin.weight + 2.0 * lora.lora_B @ lora.lora_A).T
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)
    holder = torch.nn.Module()
    holder.Wq = lora
    merge_lora(holder)
    assert type(holder.Wq) is torch.nn.Linear
    torch.testing.assert_close(holder.Wq(x), expected, atol=1e-5, rtol=1e-5)


def test_merged_model_equals_adapted_model():
    model = apply_lora(_model(), targets=("Wq", "Wv", "w2"))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 256, (1, 8))
    adapted = model(x, kv_cache=False)[0]
    torch.testing.assert_close(merge_lora(model)(x, kv_cache=False)[0], adapted, atol=1e-5, rtol=1e-5)


def test_unknown_targets_are_reported():
    with pytest.raises(ValueError, match="no nn.Linear named any of"):
        apply_lora(_model(), targets=("q_proj",))
