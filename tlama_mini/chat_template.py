"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered as the one string
the model was fine-tuned on, with the template that ships in the model file (a Jinja2 program).

SmolLM2's template is ChatML: each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`, a default
system message comes first when the conversation has none, and `add_generation_prompt` ends the text
with `<|im_start|>assistant\\n`, where the model's reply begins. The reply ends with `<|im_end|>`.

Rendered as transformers' `apply_chat_template` renders it (a sandboxed Jinja2 environment with
trim_blocks and lstrip_blocks, `raise_exception` available to the template), and tested equal to it.
`tokenizer.py` renders with it; `chat.py` (the chat command) builds on both.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# SmolLM2-135M-Instruct's template, as its GGUF file stores it (tokenizer.chat_template); kept here so
# lesson 15's checks can render it without the model file (tests/test_gguf.py checks it is the file's).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def render_chat_template(template: str, messages: Sequence[dict[str, str]], *,
                         add_generation_prompt: bool = True, **variables: Any) -> str:
    """messages -> the prompt text. `variables` (e.g. bos_token) are visible to the template."""
    if not template:
        raise ValueError("this tokenizer has no chat template (the model file has no tokenizer.chat_template)")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
    # jinja2 is imported here: it is an optional extra (requirements.txt), needed only to render a template
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **variables)
