"""LoRA: starts equal to the base model, trains only the adapters, equals W + (alpha/r) B A written
out, and merging gives the same outputs as the adapted model; one alpha rule (2 r) everywhere; palm's
transposed layout is the same maths; a run written by the code before the unification still loads."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlama_mini import TlamaConfig, Transformer
from tlama_mini import checkpoint as ckpt
from tlama_mini.finetune import load_adapters, lora_settings
from tlama_mini.sample import load_for_inference
from tlama_mini.lora import (LoRA, LoRALinear, apply_lora, lora_delta, lora_delta_weight, lora_parameters,
                             merge_lora, resolve_alpha)


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


# --- one formula, one alpha rule, two storage layouts -------------------------------------------------
FIXTURE = Path(__file__).parent / "data" / "lora_run_v1"
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, sizes below 100: measured differences are ~1e-7


@pytest.mark.parametrize("r", [1, 2, 3, 8, 16])
def test_one_alpha_rule_everywhere(r):
    """alpha None means 2 r in the function, both adapter classes, apply_lora and a saved run's config."""
    assert resolve_alpha(r) == 2 * r and resolve_alpha(r, 5) == 5.0
    assert LoRA(6, 4, r=r).alpha == LoRALinear(torch.nn.Linear(6, 4), r=r).alpha == 2 * r
    assert LoRA(6, 4, r=r).scale == LoRALinear(torch.nn.Linear(6, 4), r=r).scale == 2.0
    model = apply_lora(_model(), targets=("Wq",), r=r)
    assert {m.scale for m in model.modules() if isinstance(m, LoRALinear)} == {2.0}
    assert lora_settings({"lora_rank": r, "lora_alpha": None, "lora_targets": ["Wq"]}) == (("Wq",), r, 2.0 * r)
    assert lora_settings({"lora_rank": r, "lora_alpha": 3, "lora_targets": ["Wq"]})[2] == 3.0


@pytest.mark.parametrize("call, match", [
    (lambda: resolve_alpha(0), r"rank r \(0\) must be a positive integer"),
    (lambda: resolve_alpha(2.5), r"rank r \(2.5\) must be a positive integer"),
    (lambda: resolve_alpha(4, 0.0), r"alpha \(0.0\) must be positive"),
    (lambda: LoRALinear(torch.nn.Linear(4, 4), r=-1), "must be a positive integer"),
    (lambda: LoRA(4, 0), "sizes must be positive"),
    (lambda: apply_lora(_model(), r=4, alpha=-2), r"alpha \(-2.0\) must be positive")])
def test_bad_rank_or_alpha_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("seed", range(5))
def test_formula_merged_and_unmerged_agree(seed):
    """lora_delta, LoRALinear and the merged weight all equal the formula written out, on fresh draws
    (random sizes, rank and alpha; B trained, i.e. not zero)."""
    g = torch.Generator().manual_seed(seed)
    I, O, r = (int(v) for v in torch.randint(2, 40, (3,), generator=g))
    alpha = float(torch.rand((), generator=g) * 10 + 0.5)
    lin = torch.nn.Linear(I, O, bias=bool(seed % 2))
    layer = LoRALinear(lin, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(O, r, generator=g))
    x = torch.randn(3, 5, I, generator=g)
    A, B, W = layer.lora_A.detach(), layer.lora_B.detach(), lin.weight.detach()
    want = lin(x) + (alpha / r) * (x @ A.T) @ B.T  # (3, 5, O)
    assert (want - lin(x)).abs().max() > 1e-2, "the update must be visible"
    torch.testing.assert_close(lin(x) + lora_delta(x, A, B, alpha / r), want, **TOL)
    torch.testing.assert_close(layer(x), want, **TOL)
    torch.testing.assert_close(lora_delta_weight(A, B, alpha / r) + W, layer.weight, **TOL)
    holder = torch.nn.Module()
    holder.w2 = layer
    merge_lora(holder)
    assert type(holder.w2) is torch.nn.Linear
    torch.testing.assert_close(holder.w2(x), want, **TOL)


@pytest.mark.parametrize("seed", range(5))
def test_palm_layout_equals_linear_layout(seed):
    """palm's LoRA (A (I, r), B (r, O)) is LoRALinear's maths on the transposed matrices."""
    g = torch.Generator().manual_seed(100 + seed)
    I, O, r = (int(v) for v in torch.randint(2, 40, (3,), generator=g))
    alpha = None if seed == 0 else float(torch.rand((), generator=g) * 10 + 0.5)
    palm = LoRA(I, O, r=r, alpha=alpha)
    with torch.no_grad():
        palm.B.copy_(torch.randn(r, O, generator=g))
    lin = torch.nn.Linear(I, O, bias=False)
    torch.nn.init.zeros_(lin.weight)  # the base adds nothing: LoRALinear's output is its update alone
    linear = LoRALinear(lin, r=r, alpha=alpha)
    with torch.no_grad():
        linear.lora_A.copy_(palm.A.T)
        linear.lora_B.copy_(palm.B.T)
    x = torch.randn(4, I, generator=g)
    want = (palm.alpha / r) * x @ palm.A.detach() @ palm.B.detach()  # the reference's formula, its layout
    torch.testing.assert_close(palm(x), want, **TOL)
    torch.testing.assert_close(linear(x), want, **TOL)
    torch.testing.assert_close(palm.weight, linear.weight.T, **TOL)
    bound = 1 / I ** 0.5  # one initialisation of A: nn.Linear's, uniform in +-1/sqrt(I), in both layouts
    assert LoRA(I, O, r=r).A.abs().max() <= bound and LoRALinear(lin, r=r).lora_A.abs().max() <= bound


def test_a_run_written_before_the_unification_still_loads():
    """tests/data/lora_run_v1 was written by the command line before this code (see its README): its
    training checkpoint (config lora_alpha null, meaning 2 * rank), its adapters and its merged model all
    load, and all equal W + (alpha / r) B A computed here from the raw tensors."""
    raw = load_file(str(FIXTURE / "ckpt" / "model.safetensors"))
    meta = ckpt.read_config(FIXTURE / "ckpt")
    assert meta["train"]["lora_alpha"] is None and meta["train"]["lora_rank"] == 2
    adapter_config = (FIXTURE / "adapters" / "adapter_config.json").read_text()
    assert '"alpha": 4.0' in adapter_config
    # the base model: the checkpoint's frozen weights without the adapters
    plain = {k.replace(".base.", "."): v for k, v in raw.items() if not k.endswith(("lora_A", "lora_B"))}
    config = TlamaConfig.from_dict(meta["model"])
    base = Transformer(config).eval()
    base.load_state_dict(plain)
    expected = Transformer(config).eval()
    merged_by_hand = dict(plain)
    prefixes = {k[: -len(".lora_A")] for k in raw if k.endswith(".lora_A")}
    assert len(prefixes) == 3  # Wq, Wv, w2 of the one layer
    for p in prefixes:
        A, B = raw[p + ".lora_A"], raw[p + ".lora_B"]
        assert B.abs().max() > 0.05, "the fixture's adapters trained"
        merged_by_hand[p + ".weight"] = raw[p + ".base.weight"] + (4.0 / 2) * B @ A
    expected.load_state_dict(merged_by_hand)
    x = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    want = expected(x, kv_cache=False)[0]
    assert (want - base(x, kv_cache=False)[0]).abs().max() > 1e-3, "the adapters change the outputs"
    from_ckpt = load_for_inference(FIXTURE / "ckpt")[0]
    from_merged = load_for_inference(FIXTURE)[0]  # the run folder: its merged/ checkpoint
    from_adapters = load_adapters(base, FIXTURE / "adapters").eval()
    for model in (from_ckpt, from_merged, from_adapters):
        torch.testing.assert_close(model(x, kv_cache=False)[0], want, **TOL)
