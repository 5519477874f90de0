"""The Triton flash-attention kernels (run here under Triton's CPU interpreter): outputs and gradients
equal to SDPA, to `tlama_mini.flash` and to the written-out formula, causal and not, GQA, T != S,
lengths that are not tile multiples, fp32/bf16/fp16; the model's `attn_backend="triton"`; clear errors."""
import builtins
import importlib
import inspect

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend is optional: pip install triton")

from tlama_mini import TlamaConfig, Transformer  # noqa: E402
from tlama_mini import triton_flash  # noqa: E402
from tlama_mini.attention import attention  # noqa: E402
from tlama_mini.flash import flash_attention  # noqa: E402
from tlama_mini.triton_flash import triton_flash_attention  # noqa: E402

ON_CPU = not torch.cuda.is_available()
DEVICE = "cpu" if ON_CPU else "cuda"


def inputs(B, H, K, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, L, D, generator=g).to(DEVICE, dtype).requires_grad_()
               for n, L in ((H, T), (K, S), (K, S)))
    return q, k, v


def run(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # B, H, K, T, S, D, causal: tile multiples and not, GQA and MQA, T < S (decoding), D not a power of 2
    (1, 2, 2, 16, 16, 16, False), (2, 4, 2, 19, 33, 24, True), (1, 4, 1, 37, 37, 32, True),
    (1, 3, 3, 5, 40, 8, True), (2, 2, 1, 33, 17, 16, False), (1, 2, 2, 1, 29, 16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}K{}T{}S{}D{}{}".format(*c[:6], "c" if c[6] else ""))
def test_equals_sdpa_flash_and_the_formula(case):
    B, H, K, T, S, D, causal = case
    q, k, v = inputs(B, H, K, T, S, D)
    dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = run(triton_flash_attention, q, k, v, dout, causal=causal)
    naive = run(lambda *a, **kw: attention(*(t.double() for t in a), backend="naive", **kw), q, k, v,
                dout.double(), is_causal=causal)
    sdpa = run(attention, q, k, v, dout, is_causal=causal, backend="sdpa")
    tiled = run(flash_attention, q, k, v, dout, causal=causal, block_size=16)
    for name, a, n, s, t in zip(("out", "dq", "dk", "dv"), got, naive, sdpa, tiled):
        assert a.dtype == q.dtype and a.shape == s.shape, name
        assert rel(a, n) < 1e-5, f"{name}: {rel(a, n):.2e} from the float64 formula"
        assert rel(a, s) < 1e-5 and rel(a, t) < 1e-5, f"{name}: sdpa {rel(a, s):.2e}, flash {rel(a, t):.2e}"


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = inputs(2, 4, 2, 21, 30, 16, dtype)
    dout = torch.randn(2, 4, 21, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = run(triton_flash_attention, q, k, v, dout, causal=True)
    ref = run(lambda *a, **kw: attention(*(t.float() for t in a), backend="naive", **kw), q, k, v,
              dout.float(), is_causal=True)
    sdpa = run(attention, q, k, v, dout, is_causal=True, backend="sdpa")  # torch's kernel in the same dtype
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), got, ref, sdpa):
        assert a.dtype == dtype, name
        assert rel(a, r) < tol, f"{name}: {rel(a, r):.2e} from the float32 computation"
        assert rel(a, r) < 3 * rel(s, r) + 1e-3, f"{name}: {rel(a, r):.2e}, SDPA in {dtype}: {rel(s, r):.2e}"


def test_block_sizes_and_non_contiguous_inputs_agree():
    q, k, v = inputs(1, 2, 1, 40, 45, 16)
    ref = triton_flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(triton_flash_attention(q, k, v, causal=True, block_m=32, block_n=16), ref,
                               rtol=1e-5, atol=1e-6)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) tensor
    torch.testing.assert_close(triton_flash_attention(qt, k, v, causal=True), ref, rtol=1e-5, atol=1e-6)


def test_model_with_the_triton_backend_equals_sdpa():
    cfg = TlamaConfig.from_preset("tiny", max_seq_len=32)
    torch.manual_seed(0)
    a = Transformer(cfg).to(DEVICE)
    b = Transformer(TlamaConfig.from_preset("tiny", max_seq_len=32, attn_backend="triton")).to(DEVICE)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (la, loss_a), (lb, loss_b) = a(x, targets=x), b(x, targets=x)
    loss_a.backward(), loss_b.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    a.eval(), b.eval()
    with torch.no_grad():  # prefill then one cached decode step (T=1 against S keys)
        torch.testing.assert_close(b(x[:, :12], kv_cache=True)[0], a(x[:, :12], kv_cache=True)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b(x[:, 12:13], start_pos=12)[0], a(x[:, 12:13], start_pos=12)[0],
                                   rtol=1e-5, atol=1e-5)


def test_causal_is_the_default_as_in_flash_attention():
    default = {f.__name__: inspect.signature(f).parameters["causal"].default
               for f in (flash_attention, triton_flash_attention)}
    assert default == {"flash_attention": True, "triton_flash_attention": True}


def test_bad_input_is_refused():
    q, k, v = inputs(1, 3, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_flash_attention(q, k, v)
    q, k, v = inputs(1, 2, 2, 9, 8, 16)
    with pytest.raises(ValueError, match="fewer keys"):
        triton_flash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="one dtype"):
        triton_flash_attention(q, k.detach().double(), v.detach().double(), causal=False)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        triton_flash_attention(q, k, v, causal=False, block_m=24)
    with pytest.raises(ValueError, match="explicit masks"):
        attention(q, k, v, torch.ones(9, 8, dtype=torch.bool, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="attn_backend='triton' supports plain causal"):
        TlamaConfig.from_preset("tiny", attn_backend="triton", sliding_window=4)


def test_without_triton_the_backend_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(triton_flash, "_KERNELS", None)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.delitem(importlib.sys.modules, "tlama_mini.triton_kernels", raising=False)
    monkeypatch.delattr(importlib.import_module("tlama_mini"), "triton_kernels", raising=False)
    q, k, v = inputs(1, 2, 2, 4, 4, 16)
    with pytest.raises(ImportError, match="pip install triton"):
        triton_flash_attention(q, k, v)
