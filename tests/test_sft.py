"""`train --sft` and `train --dpo` on a tiny model with a small ChatML tokenizer: a few steps each, the loss
only on the assistant's tokens, DPO starting at log 2 and falling, exact resume, LoRA adapters + merged
model that `chat --ckpt` reads, and bad JSONL lines named by number."""
import json
import math

import pytest
import torch

from tlama_mini import TlamaConfig, Transformer
from tlama_mini import chat_data as D
from tlama_mini import chat_tasks as C
from tlama_mini import checkpoint as ckpt
from tlama_mini import sft
from tlama_mini.cli import main
from tlama_mini.sample import load_for_inference


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    tok = C.small_chat_tokenizer()
    config = TlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)
    torch.manual_seed(0)
    ckpt.save_checkpoint(folder / "base" / "ckpt", Transformer(config), {},
                         {"model": config.to_dict(), "train": {"preset": "tiny", "tokenizer": "bpe"}, "step": 0}, tok)
    return (folder, tok, write_jsonl(folder / "sft.jsonl", C.sft_records(40)),
            write_jsonl(folder / "dpo.jsonl", C.dpo_records(4) * 10))  # 4 pairs: validation repeats training


def args(out, *extra):
    return ["train", "--out", str(out), "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2",
            "--dtype", "float32", "--seed", "3", "--seq-len", "128", "--quiet", "--warmup-steps", "2", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(setup):
    folder, tok, data, _ = setup
    out = folder / "sft"
    assert main(args(out, "--init-from", str(folder / "base"), "--sft", str(data), "--max-steps", "8",
                     "--lr", "3e-3")) == 0
    return out


def test_sft_trains_on_the_assistant_tokens_only(setup, sft_run):
    folder, tok, data, _ = setup
    rows = metrics(sft_run)
    summary = json.loads((sft_run / "summary.json").read_text())
    assert rows[-1]["val_loss"] < summary["base_val_loss"]
    # the reported validation loss is the masked loss, recomputed here directly
    corpus = sft.load_chat_corpus(data, "sft", tok, 128)
    model, _, _ = load_for_inference(sft_run)
    total, count = 0.0, 0
    for ids, mask in corpus.val:
        logp = model(torch.tensor([ids[:-1]]))[0][0].double().log_softmax(-1)
        picks = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1]]
        total, count = total + sum(picks), count + len(picks)
    assert rows[-1]["val_loss"] == pytest.approx(total / count, rel=1e-4)


def test_sft_tokens_per_second_counts_the_tokens_really_fed(setup, sft_run):
    """Chat batches are padded to their longest row, not to --seq-len: the summary's tokens (and so its
    tok/s) are the input tokens of the batches the run drew, replayed here with the same seeded sampler."""
    folder, tok, data, _ = setup
    summary = json.loads((sft_run / "summary.json").read_text())
    sampler = sft.ChatSampler(sft.load_chat_corpus(data, "sft", tok, 128), 4, 3)
    fed = sum(sampler.next()[0].numel() for _ in range(8))
    assert summary["tokens"] == fed < 8 * 4 * 128  # the nominal batch_size * seq_len it used to report
    assert summary["tokens_per_s"] > 0


def test_sft_resume_is_exact(setup, tmp_path):
    folder, _, data, _ = setup
    common = ("--init-from", str(folder / "base"), "--sft", str(data), "--lr", "3e-3", "--ckpt-interval", "3")
    assert main(args(tmp_path / "a", *common, "--max-steps", "6")) == 0
    assert main(args(tmp_path / "b", *common, "--max-steps", "3")) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "b"), "--max-steps", "6", "--quiet", "--dtype", "float32",
                 "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2", "--seed", "3", "--seq-len", "128",
                 "--warmup-steps", "2", "--lr", "3e-3", "--ckpt-interval", "3"]) == 0  # --sft from the saved run
    a, _, _ = load_for_inference(tmp_path / "a")
    b, _, _ = load_for_inference(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_dpo_starts_at_log2_falls_and_writes_a_chat_model(setup, sft_run, capsys):
    folder, tok, _, pairs = setup
    out = folder / "dpo"
    assert main(args(out, "--init-from", str(sft_run), "--dpo", str(pairs), "--lora-rank", "4", "--lr", "1e-2",
                     "--max-steps", "8")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    rows = metrics(out)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < math.log(2) - 0.01  # the margin grows
    assert (out / "adapters" / "adapters.safetensors").is_file()
    model, t2, _ = load_for_inference(out)  # OUT/merged, with the chat template
    assert t2.chat_template == tok.chat_template
    capsys.readouterr()
    assert main(["chat", "--ckpt", str(out), "-p", C.make_examples(1, "held_out")[0].question,
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("kind, line, problem", [
    ("sft", "not json", "line 2: not valid JSON"),
    ("sft", '{"text": "hello"}', 'line 2: no "messages"'),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the last message is the user's"),
    ("sft", '{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: messages\\[0\\] needs a role"),
    ("dpo", '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a"}', "line 2: missing rejected"),
    ("dpo", '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "a"}', "line 2: chosen and"),
])
def test_bad_lines_are_named(setup, tmp_path, capsys, kind, line, problem):
    folder, tok, data, pairs = setup
    good = (data if kind == "sft" else pairs).read_text().splitlines()
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join([good[0], line, *good[1:3]]) + "\n")
    with pytest.raises(ValueError, match=problem):
        sft.read_jsonl(path, kind)
    assert main(args(tmp_path / "out", "--init-from", str(folder / "base"), f"--{kind}", str(path),
                     "--max-steps", "1")) == 2
    assert "line 2" in capsys.readouterr().err


def test_refusals(setup, tmp_path, capsys):
    folder, tok, data, pairs = setup
    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "x " * 200},
                                                              {"role": "assistant", "content": "y"}]}] * 3)
    assert main(args(tmp_path / "o1", "--init-from", str(folder / "base"), "--sft", str(long), "--max-steps", "1")) == 2
    assert "line 1" in capsys.readouterr().err
    assert main(args(tmp_path / "o2", "--sft", str(data), "--max-steps", "1")) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main(args(tmp_path / "o3", "--init-from", str(folder / "base"), "--sft", str(data), "--dpo", str(pairs),
                     "--max-steps", "1")) == 2
    assert "not both" in capsys.readouterr().err


def test_gguf_to_checkpoint_keeps_model_and_template(smollm2_path, smollm2, tmp_path):
    model, tok = smollm2
    folder = sft.gguf_to_checkpoint(smollm2_path, tmp_path / "base")
    back, t2, _ = load_for_inference(folder)
    assert t2.chat_template == tok.chat_template and t2.eos_token_id == tok.eos_token_id
    x = torch.tensor([D.render_conversation(t2, [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello!"}])[0]])
    torch.testing.assert_close(back(x, kv_cache=False)[0], model(x, kv_cache=False)[0])
    assert sft.gguf_to_checkpoint(smollm2_path, tmp_path / "base") == folder  # converted once


def test_no_assistant_only_trains_on_every_token(setup, tmp_path):
    folder, tok, data, _ = setup
    masked = sft.load_chat_corpus(data, "sft", tok, 128)
    every = sft.load_chat_corpus(data, "sft", tok, 128, assistant_only=False)
    assert all(all(m) for _, m in every.train) and not all(all(m) for _, m in masked.train)
    assert [i for i, _ in every.train] == [i for i, _ in masked.train] and every.first_prompt == masked.first_prompt
    assert main(args(tmp_path / "o", "--init-from", str(folder / "base"), "--sft", str(data), "--max-steps", "2",
                     "--no-assistant-only")) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["train"]["assistant_only"] is False


def test_a_run_saved_before_the_chat_fields_still_resumes(tmp_path):
    """saved_finetune fills the chat fields a run written before them lacks with their defaults."""
    from tlama_mini.finetune import saved_finetune
    from tlama_mini.trainer import TrainConfig
    config = TlamaConfig.from_preset("tiny", vocab_size=300, max_seq_len=16)
    train = {"init_from": "base", "lora_rank": 4, "lora_alpha": None, "lora_targets": ["Wq"], "tokenizer": "bpe"}
    ckpt.save_checkpoint(tmp_path / "ckpt", Transformer(config), {}, {"model": config.to_dict(), "train": train})
    saved = saved_finetune(tmp_path)
    defaults = TrainConfig()
    assert {k: saved[k] for k in ("sft", "dpo", "dpo_beta", "assistant_only")} == {
        "sft": defaults.sft, "dpo": defaults.dpo, "dpo_beta": defaults.dpo_beta, "assistant_only": defaults.assistant_only}
