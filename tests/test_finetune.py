"""`train --init-from`: LoRA fine-tuning keeps the base bit-identical, writes adapters that rebuild the
merged model, resumes exactly, and refuses data, options and checkpoints that do not fit."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlama_mini import TlamaConfig, Transformer
from tlama_mini import checkpoint as ckpt
from tlama_mini.cli import main
from tlama_mini.finetune import load_adapters
from tlama_mini.paths import find_data_file
from tlama_mini.sample import load_for_inference
from tlama_mini.trainer import Reporter, Trainer, train_config

LORA = ("--lora-rank", "4")


pytestmark = pytest.mark.usefixtures("module_token_cache")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base text, new text in the base's characters, new text with characters the base never saw)."""
    full = find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("data")
    base, vocab = full[:30_000], set(full[:30_000])
    new = "".join(c for c in full[200_000:220_000] if c in vocab)
    paths = folder / "base.txt", folder / "new.txt", folder / "foreign.txt"
    for path, text in zip(paths, (base, new, new + "\nQuoth the Zephyr\n")):
        path.write_text(text, encoding="utf-8")
    return paths


def common(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--batch-size", "4", "--eval-interval", "5",
            "--eval-batches", "2", "--sample-tokens", "0", "--quiet", "--dtype", "float32", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def base(texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    assert main(common(texts[0], out, "--preset", "tiny", "--seq-len", "32", "--max-steps", "10")) == 0
    return out


def finetune(texts, base, out, *extra) -> list[str]:
    return common(texts[1], out, "--init-from", str(base), *extra)


@pytest.fixture(scope="module")
def lora_run(texts, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    assert main(finetune(texts, base, out, *LORA, "--lr", "1e-2", "--max-steps", "10")) == 0
    return out


def logits(model, x):
    return model(x, kv_cache=False)[0]


def test_lora_trains_only_the_adapters_and_reports_the_counts(lora_run, base):
    base_w = load_file(ckpt.find_checkpoint(base) / "model.safetensors")
    tuned = load_file(lora_run / "ckpt" / "model.safetensors")
    plain = {k.replace(".base.", "."): v for k, v in tuned.items() if not k.endswith(("lora_A", "lora_B"))}
    assert plain.keys() == base_w.keys()
    assert all(torch.equal(plain[k], base_w[k]) for k in base_w), "a frozen base weight changed"
    adapters = load_file(lora_run / "adapters" / "adapters.safetensors")
    assert {k for k in tuned if k.endswith(("lora_A", "lora_B"))} == adapters.keys()
    assert all(torch.equal(adapters[k], tuned[k]) for k in adapters)
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in adapters.items()), "the adapters did not train"
    config = json.loads((lora_run / "ckpt" / "config.json").read_text())["model"]
    C, D, H, K, r = config["d_model"], config["d_model"] // config["n_heads"], config["n_heads"], config["n_kv_heads"], 4
    per_layer = r * ((C + H * D) + 2 * (C + K * D) + (H * D + C))  # Wq, Wk, Wv, Wo: r * (in + out) each
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["trainable_params"] == config["n_layers"] * per_layer == sum(v.numel() for v in adapters.values())
    assert summary["total_params"] == sum(v.numel() for v in base_w.values()) + summary["trainable_params"]
    assert summary["val_loss"] < summary["base_val_loss"]


def test_merged_checkpoint_equals_base_plus_adapters(lora_run, base, capsys):
    merged, tok, meta = load_for_inference(lora_run)  # a run folder: its merged/ checkpoint
    assert ckpt.find_checkpoint(lora_run).name == "merged" and meta["train"]["merged_lora"]["rank"] == 4
    assert "lora" not in meta  # the merged model is a plain one
    wrapped, _, wrapped_meta = load_for_inference(lora_run / "ckpt")  # base + adapters, merged on load
    # with the resolved settings the run wrote: loading applies no fine-tuning policy (alpha's default)
    adapter_config = json.loads((lora_run / "adapters" / "adapter_config.json").read_text())
    assert wrapped_meta["lora"] == {k: adapter_config[k] for k in ("targets", "rank", "alpha")}
    rebuilt = load_adapters(load_for_inference(base)[0], lora_run / "adapters").eval()
    untouched = load_for_inference(base)[0]
    x = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(rebuilt, x)
    torch.testing.assert_close(logits(merged, x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(wrapped, x), ref, rtol=1e-5, atol=1e-5)
    assert (logits(untouched, x) - ref).abs().max() > 1e-3, "fine-tuning changed nothing"
    sample = ["sample", "--ckpt", str(lora_run), "--max-new-tokens", "20", "--seed", "1", "--prompt", "AB"]
    assert main(sample) == 0
    first = capsys.readouterr().out
    assert main([*sample[:2], str(lora_run / "ckpt"), *sample[3:]]) == 0
    assert capsys.readouterr().out == first and first.startswith("AB") and len(first) == len("AB") + 20 + 1
    assert main(["sample", "--ckpt", str(lora_run / "adapters")]) == 2  # adapters alone are not a model


class StopAt(Reporter):
    """Asks the trainer to stop at a step, as Ctrl-C would (the run saves and returns 'interrupted')."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        self.trainer, self.at = trainer, step

    def update(self, step, *args) -> None:
        if step == self.at:
            self.trainer.stop_signal = "SIGINT"

    def message(self, text: str) -> None: ...


def test_lora_run_resumes_exactly(texts, base, tmp_path):
    out = tmp_path / "resumed"
    cfg = train_config("tiny", data=str(texts[1]), out=str(out), init_from=str(base), lora_rank=4, lr=1e-2,
                       max_steps=20, seq_len=32, batch_size=4, eval_interval=5, eval_batches=2, sample_tokens=0,
                       quiet=True, dtype="float32", seed=3)
    trainer = Trainer(cfg)
    assert trainer.run(StopAt(trainer, 7))["status"] == "interrupted"
    assert ckpt.read_config(out / "ckpt")["step"] == 7
    assert main(common(texts[1], out, "--lr", "1e-2", "--max-steps", "20", "--resume")) == 0  # options from the run
    straight = tmp_path / "straight"
    assert main(finetune(texts, base, straight, *LORA, "--lr", "1e-2", "--max-steps", "20")) == 0
    for folder, name in (("ckpt", "model"), ("adapters", "adapters"), ("merged", "model")):
        a, b = (load_file(run / folder / f"{name}.safetensors") for run in (out, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["step"] == 20


def test_full_finetune_trains_every_weight(texts, base, tmp_path):
    out = tmp_path / "full"
    assert main(finetune(texts, base, out, "--max-steps", "5")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]
    a, b = load_file(ckpt.find_checkpoint(base) / "model.safetensors"), load_file(out / "ckpt" / "model.safetensors")
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a)
    assert not (out / "merged").exists() and not (out / "adapters").exists()


@pytest.mark.parametrize("extra, message", [
    (("--lora-rank", "0"), "lora_rank (0) must be a positive integer"),
    (("--lora-rank", "2", "--lora-targets", "Wq,q_proj"), "['q_proj']; choose among Wq"),
    (("--lora-rank", "2", "--optimizer", "muon"), "train with AdamW"),
    (("--d-model", "32"), "d_model: the model's shape comes from the checkpoint"),
    (("--tokenizer", "bpe"), "differs from the checkpoint's ('char')"),
    (("--seq-len", "64"), "longer than the base model's context (32); use --seq-len 32"),
])
def test_bad_finetune_options_are_refused(texts, base, tmp_path, capsys, extra, message):
    assert main(finetune(texts, base, tmp_path / "x", "--max-steps", "2", *extra)) == 2
    assert message in capsys.readouterr().err


def test_data_the_tokenizer_cannot_encode_is_refused(texts, base, tmp_path, capsys):
    args = finetune(texts, base, tmp_path / "x", *LORA, "--max-steps", "2")
    args[args.index("--data") + 1] = str(texts[2])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit the checkpoint's tokenizer (CharTokenizer" in err and "character 'Q'" in err
    assert "keeps its base's vocabulary" in err


def test_other_refusals(texts, base, lora_run, tmp_path, capsys):
    assert main(common(texts[1], tmp_path / "x", *LORA, "--max-steps", "2")) == 2
    assert "needs init_from" in capsys.readouterr().err
    assert main(finetune(texts, tmp_path / "nowhere", tmp_path / "y", *LORA)) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(finetune(texts, base, lora_run, "--lora-rank", "8", "--max-steps", "12", "--resume")) == 2
    assert "is another fine-tune (lora_rank: checkpoint 4, now 8)" in capsys.readouterr().err
    shape = {**load_for_inference(lora_run)[0].config.to_dict(), "d_model": 32}
    with pytest.raises(ValueError, match="trained for another model: d_model"):
        load_adapters(Transformer(TlamaConfig.from_dict(shape)), lora_run / "adapters")


def test_a_lora_training_checkpoint_without_its_resolved_settings_still_loads(lora_run, tmp_path):
    old = tmp_path / "ckpt"  # as a run written before the settings were saved in its config
    shutil.copytree(lora_run / "ckpt", old)
    meta = json.loads((old / "config.json").read_text())
    saved = meta.pop("lora")
    (old / "config.json").write_text(json.dumps(meta))
    assert meta["train"]["lora_rank"] == saved["rank"] and tuple(meta["train"]["lora_targets"]) == tuple(saved["targets"])
    x = torch.randint(0, meta["model"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    want = load_for_inference(lora_run / "ckpt")[0](x, kv_cache=False)[0]
    got = load_for_inference(old)[0](x, kv_cache=False)[0]  # settings from the train section, alpha by the one rule
    torch.testing.assert_close(got, want, rtol=0, atol=0)
