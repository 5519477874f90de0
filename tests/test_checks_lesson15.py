"""The lesson 15 checks (GGUF blocks, the chat template) accept correct solutions, written here from
the format's description (not from tlama_mini), and reject the typical mistakes by name, over many draws."""
import pytest
import torch

from tlama_mini.checks.common import expect_failure as fails_with
from tlama_mini.checks.lesson15 import check_dequantize_q4_1, check_dequantize_q8_0, check_render_chat

DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _fp16(b):  # two bytes, little-endian -> float32 (N, 1)
    return b.contiguous().view(torch.float16).float()


def q8_0(raw, *, signed=True, scale=True):
    q = raw[:, 2:].contiguous().view(torch.int8).float() if signed else raw[:, 2:].float()
    return q * _fp16(raw[:, :2]) if scale else q


def q4_1(raw, *, order="low-high", add_min=True, minus8=False):
    d, m, qs = _fp16(raw[:, 0:2]), _fp16(raw[:, 2:4]), raw[:, 4:]
    lo, hi = qs & 0x0F, qs >> 4
    if order == "low-high":
        q = torch.cat([lo, hi], 1)
    elif order == "high-low":
        q = torch.cat([hi, lo], 1)
    else:
        q = torch.stack([lo, hi], 2).reshape(raw.shape[0], 32)
    q = q.float() - (8 if minus8 else 0)
    return d * q + (m if add_min else 0)


def render(messages, add_generation_prompt, *, default=True, gen=True, newline=True):
    out = DEFAULT if default and messages[0]["role"] != "system" else ""
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" + ("\n" if newline else "")
    if add_generation_prompt and gen:
        out += "<|im_start|>assistant\n"
    return out


def test_correct_solutions_pass(capsys):
    for seed in range(10):
        torch.manual_seed(seed)
        check_dequantize_q8_0(q8_0)
        check_dequantize_q4_1(q4_1)
        check_render_chat(render)
    assert capsys.readouterr().out.count("✓") == 30


@pytest.mark.parametrize("seed", range(5))
def test_q8_0_mistakes(seed):
    torch.manual_seed(seed)
    fails_with(check_dequantize_q8_0, lambda r: q8_0(r, signed=False), "unsigned")
    fails_with(check_dequantize_q8_0, lambda r: q8_0(r, scale=False), "scale d is missing")
    fails_with(check_dequantize_q8_0, lambda r: q8_0(r)[:, :31], "wrong shape")
    fails_with(check_dequantize_q8_0, lambda r: q8_0(r).half(), "")  # fp16 output loses precision or dtype


@pytest.mark.parametrize("seed", range(5))
def test_q4_1_mistakes(seed):
    torch.manual_seed(seed)
    fails_with(check_dequantize_q4_1, lambda r: q4_1(r, order="interleaved"), "interleaved", "16 low nibbles")
    fails_with(check_dequantize_q4_1, lambda r: q4_1(r, order="high-low"), "high nibbles came first")
    fails_with(check_dequantize_q4_1, lambda r: q4_1(r, add_min=False), "minimum m was not added")
    fails_with(check_dequantize_q4_1, lambda r: q4_1(r, minus8=True), "that is Q4_0")


@pytest.mark.parametrize("seed", range(5))
def test_chat_mistakes(seed):
    torch.manual_seed(seed)
    fails_with(check_render_chat, lambda m, g: render(m, g, default=False), "default system message is missing")
    fails_with(check_render_chat, lambda m, g: DEFAULT * (m[0]["role"] == "system") + render(m, g),
               "added although the conversation has one")
    fails_with(check_render_chat, lambda m, g: render(m, g, gen=False), "generation prompt is missing")
    fails_with(check_render_chat, lambda m, g: render(m, True), "add_generation_prompt=False")
    fails_with(check_render_chat, lambda m, g: render(m, g, newline=False), "followed by a newline")
    fails_with(check_render_chat, lambda m, g: None, "expected the prompt text")


def test_stubs_raise_not_implemented():
    def stub(*args):
        raise NotImplementedError
    for check in (check_dequantize_q8_0, check_dequantize_q4_1, check_render_chat):
        with pytest.raises(NotImplementedError):
            check(stub)
