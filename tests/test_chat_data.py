"""tlama_mini.chat_data: the assistant mask checked token by token against an independent scan of the
ChatML tokens (single-turn, multi-turn, system message, truncated), the rendered text against
transformers' apply_chat_template on SmolLM2's tokenizer, batching, and the refusals."""
import random

import pytest
import torch

from tlama_mini import chat_data as D
from tlama_mini import chat_tasks as C


@pytest.fixture(scope="module")
def tok():
    return C.small_chat_tokenizer()


def reference_mask(tok, ids):
    """Independent of chat_data: after the tokens <|im_start|> 'assistant\\n', every token up to and
    including the next <|im_end|> is the assistant's; nothing else is."""
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    mask, k = [0] * len(ids), 0
    while k < len(ids):
        if ids[k] == start:
            j, text = k + 1, ""
            while j < len(ids) and len(text) < len("assistant\n") and ids[j] not in (start, end):
                text += tok.decode([ids[j]])
                j += 1
            if text == "assistant\n":
                while j < len(ids):
                    mask[j] = 1
                    if ids[j] == end:
                        break
                    j += 1
            k = j
        k += 1
    return mask


CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    "multi": [{"role": "user", "content": "Count the r in 'strawberry'."},
              {"role": "assistant", "content": "s, t, r, a, w, b, e, r, r, y. 3."},
              {"role": "user", "content": "And the e?"}, {"role": "assistant", "content": "1 time."},
              {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}],
    "system": [{"role": "system", "content": "You answer briefly."},
               {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
    "unicode": [{"role": "user", "content": "Say café in Japanese"}, {"role": "assistant", "content": "カフェ ☕"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_token_by_token(tok, name):
    messages = CONVERSATIONS[name]
    ids, mask = D.render_conversation(tok, messages)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert mask == reference_mask(tok, ids)
    # the masked tokens spell exactly the replies, each followed by its end-of-turn token
    replies = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == replies


def test_headers_and_the_newline_after_a_turn_are_not_masked(tok):
    ids, mask = D.render_conversation(tok, CONVERSATIONS["single"])
    end = ids.index(tok.special_tokens["<|im_end|>"], len(ids) - 3)
    assert mask[end] == 1 and ids[end + 1:] and all(m == 0 for m in mask[end + 1:])  # the trailing "\n"
    first = mask.index(1)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_random_task_conversations_match_the_reference(tok):
    for e in C.make_examples(20, "held_out", seed=3):
        ids, mask = D.render_conversation(tok, C.messages(e))
        assert mask == reference_mask(tok, ids)


def test_prompt_ids_are_what_inference_encodes(tok):
    """Training sees the prompt as `chat` encodes it: the ids before the first masked token equal the
    encoding of the generation prompt."""
    messages = CONVERSATIONS["system"]
    ids, mask = D.render_conversation(tok, messages)
    prompt = tok.encode(tok.apply_chat_template(messages[:-1], add_generation_prompt=True), allowed_special="all")
    assert ids[:mask.index(1)] == prompt


def test_truncated_conversation_stays_aligned(tok):
    ids, mask = D.render_conversation(tok, CONVERSATIONS["multi"])
    with pytest.raises(ValueError, match="longer than max_len"):
        D.render_conversation(tok, CONVERSATIONS["multi"], max_len=len(ids) - 1)
    cut = mask.index(1) + 5
    t_ids, t_mask = D.truncate(ids, mask, cut)
    assert t_ids == ids[:cut] and t_mask == mask[:cut] and t_mask == reference_mask(tok, t_ids)[:cut]
    with pytest.raises(ValueError, match="no assistant token"):
        D.truncate(ids, mask, mask.index(1))


def test_collate_pads_and_ignores_outside_the_mask(tok):
    rows = [D.render_conversation(tok, CONVERSATIONS[n]) for n in ("single", "system", "multi")]
    pad = D.pad_id_of(tok)
    x, y = D.collate(rows, pad)
    assert x.shape == y.shape == (3, max(len(i) for i, _ in rows) - 1)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1] and (x[b, n:] == pad).all()
        for t in range(x.shape[1]):
            want = ids[t + 1] if t < n and mask[t + 1] else D.IGNORE_INDEX
            assert y[b, t].item() == want
    # the loss counts exactly the masked tokens
    logits = torch.randn(*y.shape, tok.vocab_size, dtype=torch.float64)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=D.IGNORE_INDEX)
    lp = logits.log_softmax(-1)
    picks = [-lp[b, t, y[b, t]] for b in range(3) for t in range(y.shape[1]) if y[b, t] != D.IGNORE_INDEX]
    assert len(picks) == sum(sum(m[1:]) for _, m in rows)
    torch.testing.assert_close(loss, torch.stack(picks).mean())


def test_refusals(tok):
    with pytest.raises(ValueError, match="must end with"):
        D.render_conversation(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no messages"):
        D.render_conversation(tok, [])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        D.render_conversation(tok, [{"role": "user"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="longer than length"):
        D.collate([D.render_conversation(tok, CONVERSATIONS["multi"])], 0, length=5)


def test_a_template_that_rewrites_history_is_refused(tok):
    """A template that drops earlier assistant turns' content does not render prefixes as prefixes."""
    import copy
    t = copy.copy(tok)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                       "<|im_start|>assistant\n<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                       "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="prefix"):
        D.render_conversation(t, CONVERSATIONS["multi"])


def test_smollm2_text_equals_transformers(smollm2_path, smollm2):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    _, tok = smollm2
    rng = random.Random(0)
    convs = list(CONVERSATIONS.values()) + [C.messages(e) for e in C.make_examples(5, "held_out", seed=1)]
    for messages in convs:
        ids, mask = D.render_conversation(tok, messages)
        assert tok.decode(ids) == hf.apply_chat_template(messages, tokenize=False)
        assert mask == reference_mask(tok, ids)
        k = rng.randrange(1, len(ids))
        assert D.truncate(ids, mask, len(ids))[1] == mask and len(D.to_example(ids[:k + 1], mask[:k + 1])[0]) == k


def test_a_saved_tokenizer_keeps_its_chat_template(tok, tmp_path):
    from tlama_mini.tokenizer import load_tokenizer
    tok.save(tmp_path / "t.json")
    back = load_tokenizer(tmp_path / "t.json")
    assert (back.chat_template, back.eos_token_id) == (tok.chat_template, tok.eos_token_id)
    assert D.render_conversation(back, CONVERSATIONS["multi"]) == D.render_conversation(tok, CONVERSATIONS["multi"])
