"""Checks for lesson 15 (a real model from its GGUF file). Each check_<name>(fn) calls the learner's fn
on fresh random inputs, compares with tlama_mini (`quant.dequantize`, `chat.render_chat_template` with
SmolLM2's template) and names the mistake when it can: unsigned int8, a missing scale, the nibbles read
in the wrong order, a forgotten minimum, the default system message added or forgotten."""
from __future__ import annotations

import random

import torch

from ..chat import SMOLLM2_CHAT_TEMPLATE, render_chat_template
from ..quant import dequantize, quantize
from .common import attributes_stubs, call, check_tensor, fail, passed

__all__ = ["check_dequantize_q8_0", "check_dequantize_q4_1", "check_render_chat"]


def _blocks(n: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw (n, bytes per block), weights (n, 32)): quantized blocks of mixed scale, sign and offset."""
    scale = torch.exp(torch.empty(n, 1).uniform_(-4, 2))              # scales from 0.02 to 7
    w = torch.randn(n, 32) * scale + torch.randn(n, 1) * scale         # some blocks far from zero
    w[0] = w[0].abs()                                                  # one block of one sign only
    return quantize(w, fmt), w


@attributes_stubs
def check_dequantize_q8_0(fn) -> None:
    """fn(raw) -> float32 (N, 32): raw is uint8 (N, 34) Q8_0 blocks [d: fp16][32 x int8]."""
    name = "dequantize_q8_0"
    n = int(torch.randint(3, 9, ()))
    raw, _ = _blocks(n, "Q8_0")
    expected = dequantize(raw, "Q8_0", (n, 32))
    out = call(name, fn, raw.clone(), hint="raw[:, :2] is the fp16 scale, raw[:, 2:] the 32 int8 values")
    d = raw[:, :2].contiguous().view(torch.float16).float()
    q_signed = raw[:, 2:].contiguous().view(torch.int8).float()
    q_unsigned = raw[:, 2:].float()
    check_tensor(name, out, expected, atol=1e-6, rtol=1e-6, mistakes={
        "the values were read as unsigned (uint8: 0..255) instead of signed int8 (-128..127)": q_unsigned * d,
        "the scale d is missing: the int8 values themselves were returned": q_signed,
        "the scale was read with its two bytes swapped (GGUF is little-endian)":
            raw[:, [1, 0]].contiguous().view(torch.float16).float() * q_signed,
        "the values were divided by d instead of multiplied": q_signed / d,
    }, hint="d = raw[:, :2].contiguous().view(torch.float16).float() (N, 1); q = raw[:, 2:].view(torch.int8)")
    passed(name, f"{n} blocks equal tlama_mini.quant.dequantize exactly")


@attributes_stubs
def check_dequantize_q4_1(fn) -> None:
    """fn(raw) -> float32 (N, 32): raw is uint8 (N, 20) Q4_1 blocks [d: fp16][m: fp16][16 bytes]; element
    j < 16 is the low nibble of byte j, element j + 16 its high nibble; x = d * q + m."""
    name = "dequantize_q4_1"
    n = int(torch.randint(3, 9, ()))
    raw, _ = _blocks(n, "Q4_1")
    expected = dequantize(raw, "Q4_1", (n, 32))
    out = call(name, fn, raw.clone(), hint="raw[:, 0:2] is d, raw[:, 2:4] is m, raw[:, 4:] the packed nibbles")
    d = raw[:, 0:2].contiguous().view(torch.float16).float()
    m = raw[:, 2:4].contiguous().view(torch.float16).float()
    qs = raw[:, 4:]
    lo, hi = (qs & 0x0F).float(), (qs >> 4).float()
    interleaved = torch.stack([lo, hi], dim=2).reshape(n, 32)          # (lo0, hi0, lo1, hi1, ...)
    check_tensor(name, out, expected, atol=1e-6, rtol=1e-6, mistakes={
        "the nibbles are interleaved (low, high of byte 0, then of byte 1 ...): GGUF puts all 16 low nibbles "
        "first (elements 0..15), then the 16 high ones (elements 16..31)": d * interleaved + m,
        "the high nibbles came first: elements 0..15 are the LOW nibbles": d * torch.cat([hi, lo], 1) + m,
        "the minimum m was not added": d * torch.cat([lo, hi], 1),
        "8 was subtracted from q (that is Q4_0; Q4_1 adds the minimum m instead)": d * (torch.cat([lo, hi], 1) - 8) + m,
        "d and m are swapped (d comes first in the block)": m * torch.cat([lo, hi], 1) + d,
    }, hint="q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float(); x = d * q + m")
    passed(name, f"{n} blocks equal tlama_mini.quant.dequantize exactly")


_WORDS = ["hello", "Paris", "why?", "tokens", "a b", "line\nbreak", "42", "été", "<code>", "  spaced  "]


def _conversation(rng: random.Random, system: bool, turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": " ".join(rng.choices(_WORDS, k=3))}] if system else []
    for k in range(turns):
        msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": " ".join(rng.choices(_WORDS, k=rng.randint(1, 4)))})
    return msgs


@attributes_stubs
def check_render_chat(fn) -> None:
    """fn(messages, add_generation_prompt) -> str: SmolLM2's ChatML template by hand."""
    name = "render_chat"
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    cases = [(_conversation(rng, system, turns), gen) for system, turns, gen in
             [(False, 1, True), (True, 1, True), (False, 3, False), (True, 2, False), (False, 2, True)]]
    for messages, gen in cases:
        expected = render_chat_template(SMOLLM2_CHAT_TEMPLATE, messages, add_generation_prompt=gen)
        out = call(name, fn, [dict(m) for m in messages], gen)
        if not isinstance(out, str):
            fail(name, f"returned {type(out).__name__}, expected the prompt text (str)", "did you forget a `return`?")
        if out == expected:
            continue
        default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        has_system = messages[0]["role"] == "system"
        where = f"(messages: {[m['role'] for m in messages]}, add_generation_prompt={gen})"
        if not has_system and out == expected[len(default):]:
            fail(name, f"the default system message is missing {where}",
                 "when the first message is not a system message, SmolLM2's template starts with its default one")
        if has_system and out == default + expected:
            fail(name, f"the default system message was added although the conversation has one {where}")
        if gen and out == expected.removesuffix("<|im_start|>assistant\n"):
            fail(name, f"the generation prompt is missing {where}",
                 "with add_generation_prompt=True the text ends with '<|im_start|>assistant\\n': the reply starts there")
        if not gen and out == expected + "<|im_start|>assistant\n":
            fail(name, f"the generation prompt was added although add_generation_prompt=False {where}")
        if out.replace("<|im_end|>\n", "<|im_end|>") == expected.replace("<|im_end|>\n", "<|im_end|>"):
            fail(name, f"each message must end with '<|im_end|>' followed by a newline {where}")
        fail(name, f"the text differs {where}:\n  got      {out!r}\n  expected {expected!r}",
             "each message is '<|im_start|>' + role + '\\n' + content + '<|im_end|>\\n'")
    passed(name, f"{len(cases)} conversations equal the template rendered by Jinja2 (as transformers does)")
