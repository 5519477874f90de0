"""A task made here, with no download, that a 135M chat model gets wrong and can learn: count a letter in
a word, spelling the word out first (a model sees tokens, not letters, so it must spell to count).

    user:      How many times does the letter "r" appear in "strawberry"?
    assistant: s, t, r, a, w, b, e, r, r, y. The letter "r" appears 3 times.

Everything is seeded. The split is by *word*: a held-out word never appears in training, so held-out
accuracy measures the skill, not memory. `grade` is an exact match on the final answer (the number in
"appears N times"); `dpo_pair` gives a correct reply and a plausible wrong one (the same spelling, a count
off by one) for DPO. `sft_records` / `dpo_records` are the JSONL rows `train --sft` / `--dpo` read.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from .chat_template import SMOLLM2_CHAT_TEMPLATE, render_chat_template
from .tokenizer import BPETokenizer

WORDS = tuple("""
apple banana cherry orange lemon grape melon peach pear plum berry strawberry raspberry blueberry mango
papaya coconut avocado tomato potato carrot pepper onion garlic ginger celery lettuce cabbage spinach
broccoli pumpkin squash zucchini radish turnip parsley basil oregano thyme mustard vinegar butter cheese
yogurt bread pasta noodle rice cereal cookie muffin pancake waffle coffee cocoa sugar honey syrup
elephant giraffe monkey tiger lion zebra rabbit squirrel kitten puppy hamster parrot penguin dolphin
whale shark turtle lizard snake spider beetle butterfly mosquito eagle falcon sparrow pigeon chicken
rooster donkey horse camel kangaroo koala panda buffalo gorilla cheetah leopard raccoon hedgehog otter
banner bottle button candle carpet castle chimney circle coffee collar cotton cradle crayon cushion
dinner doctor dollar eraser fabric feather finger flower forest freezer garden gallery hammer harbor
helmet hollow husband island jacket jigsaw kettle kitchen ladder lantern letter ribbon mirror mitten
needle office pebble pencil pepper pillow planet pocket puzzle rabbit rocket rubber saddle scissors
shadow shelter shoulder silver sister soccer spinner summer sunset table teacher terrace thunder
ticket toffee tunnel umbrella valley velvet village violin wallet window winter wizard yellow zipper
balloon baggage coffee committee success address necessary accommodate occasion possession embarrass
mississippi tennessee assessment bookkeeper referee volleyball millennium parallel bubble giggle
grammar hippopotamus lollipop mammal narrow pepperoni rhubarb sassafras tattoo toddler bulletin
""".split())
WORDS = tuple(dict.fromkeys(WORDS))  # repeated words once, order kept


@dataclass(frozen=True)
class Example:
    word: str
    letter: str
    count: int

    @property
    def question(self) -> str:
        return f'How many times does the letter "{self.letter}" appear in "{self.word}"?'

    @property
    def answer(self) -> str:
        return reply_text(self.word, self.letter, self.count)


def reply_text(word: str, letter: str, count: int) -> str:
    """The reply's format: the word spelled out, then the count."""
    times = "time" if count == 1 else "times"
    return f'{", ".join(word)}. The letter "{letter}" appears {count} {times}.'


def split_words(seed: int = 0, held_out: float = 0.25) -> tuple[list[str], list[str]]:
    """(train words, held-out words): a seeded shuffle of WORDS, cut at the held-out fraction."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out ({held_out}) must be between 0 and 1")
    words = list(WORDS)
    random.Random(seed).shuffle(words)
    n = max(1, round(len(words) * held_out))
    return words[n:], words[:n]


def make_examples(n: int, split: str = "train", seed: int = 0, *, split_seed: int = 0) -> list[Example]:
    """n examples from the split's words ("train" or "held_out"); the letter is one of the word's own
    letters two times in three (counts 1-4), otherwise a letter it lacks (count 0)."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split {split!r} must be 'train' or 'held_out'")
    words = split_words(split_seed)[0 if split == "train" else 1]
    rng = random.Random(f"{split}-{seed}")
    out = []
    for _ in range(n):
        word = rng.choice(words)
        if rng.random() < 2 / 3:
            letter = rng.choice(sorted(set(word)))
        else:
            letter = rng.choice(sorted(set("abcdefghijklmnopqrstuvwxyz") - set(word)))
        out.append(Example(word, letter, word.count(letter)))
    return out


def final_answer(reply: str) -> int | None:
    """The number in the reply's last "appears N time(s)", else the last integer in it, else None."""
    found = re.findall(r"appears\s+(\d+)\s+time", reply)
    if not found:
        found = re.findall(r"\d+", reply)
    return int(found[-1]) if found else None


def grade(reply: str, example: Example) -> bool:
    """Exact match on the final answer."""
    return final_answer(reply) == example.count


def messages(example: Example, *, with_answer: bool = True) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": example.question}]
    return msgs + [{"role": "assistant", "content": example.answer}] if with_answer else msgs


def wrong_count(example: Example, rng: random.Random) -> int:
    """A plausible wrong count: off by one (never negative)."""
    return example.count + 1 if example.count == 0 or rng.random() < 0.5 else example.count - 1


def dpo_pair(example: Example, rng: random.Random) -> dict[str, Any]:
    """{"prompt": [user message], "chosen": correct reply, "rejected": the same spelling, a wrong count}."""
    return {"prompt": messages(example, with_answer=False), "chosen": example.answer,
            "rejected": reply_text(example.word, example.letter, wrong_count(example, rng))}


def sft_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n `{"messages": [...]}` rows of the training split (the JSONL of `train --sft`)."""
    return [{"messages": messages(e)} for e in make_examples(n, "train", seed)]


def dpo_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n DPO rows of the training split (the JSONL of `train --dpo`)."""
    rng = random.Random(f"dpo-{seed}")
    return [dpo_pair(e, rng) for e in make_examples(n, "train", seed + 10_000)]


def small_chat_tokenizer(vocab_size: int = 400, seed: int = 0) -> Any:
    """A small byte-level BPE with ChatML's special tokens and SmolLM2's chat template, trained on this
    task's conversations: what a tiny model trained from scratch (tests, lesson 16) chats with."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = "".join(render_chat_template(SMOLLM2_CHAT_TEMPLATE, messages(e), add_generation_prompt=False)
                   for e in make_examples(300, "train", seed) + make_examples(100, "held_out", seed))
    tok = BPETokenizer.train(text, vocab_size, special_tokens=specials)
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    tok.eos_token_id = tok.special_tokens["<|im_end|>"]
    return tok
