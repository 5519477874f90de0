"""`python -m tlama_mini train|sample`: complete --help, run folder contents, sampling, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tlama_mini.cli import build_parser, main
from tlama_mini.paths import find_data_file

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("module_token_cache")


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "8",
            "--batch-size", "4", "--seq-len", "32", "--eval-interval", "4", "--eval-batches", "2", *extra]


@pytest.fixture(scope="module")
def run(small_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(small_text, out, "--sample-tokens", "40")) == 0
    return out


def test_help_is_complete():
    out = subprocess.run([sys.executable, "-m", "tlama_mini", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--preset", "--data", "--tokenizer", "--max-seconds", "--max-steps", "--out", "--resume", "--device",
                 "--dtype", "--compile", "--seed", "--batch-size", "--seq-len", "--grad-accum", "--lr", "--min-lr",
                 "--warmup-steps", "--weight-decay", "--grad-clip", "--eval-interval", "--d-model", "--n-layers",
                 "--n-heads", "--dropout", "--set", "--threads", "--quiet", "--init-from", "--lora-rank",
                 "--lora-alpha", "--lora-targets"):
        assert flag in out, flag
    sample = build_parser().parse_args(["sample", "--ckpt", "x"])
    assert {"ckpt", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples"} <= vars(sample).keys()
    for action in build_parser()._subparsers._group_actions[0].choices["sample"]._actions:
        assert action.help, action.dest  # every option says what it does


def test_run_folder(run):
    assert {"config.json", "metrics.jsonl", "loss.png", "samples.txt", "ckpt"} <= {p.name for p in run.iterdir()}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 8] and rows[-1]["final"] is True
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 8


def test_sample_is_reproducible(run, capsys):
    args = ["sample", "--ckpt", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "60", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.95", "--seed", "1", "--num-samples", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    samples = first[:-1].split("\n\n---\n\n")  # print() adds the last newline
    assert len(samples) == 2 and all(s.startswith("ROMEO:") for s in samples)
    assert all(len(s) == len("ROMEO:") + 60 for s in samples)  # 60 characters: longer than the 32-token context


def test_errors_are_clear(run, small_text, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path)]) == 2
    assert "not a tlama-mini checkpoint" in capsys.readouterr().err
    assert main(train_args(small_text, run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(train_args(small_text, run, "--resume", "--d-model", "32")) == 2
    assert "d_model: checkpoint 64, now 32" in capsys.readouterr().err
    assert main(train_args(small_text, tmp_path / "x", "--data", str(tmp_path / "missing.txt"))) == 2
    assert "neither a named corpus" in capsys.readouterr().err


def test_offline_message_names_the_download(small_text, tmp_path, monkeypatch, capsys):
    import tlama_mini.paths as paths

    def offline(url, dest, timeout=30.0):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TLAMA_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(paths, "PACKAGED_DATA_DIR", tmp_path / "not-packaged")  # as if the package lacked it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "fetch_url", offline)
    assert main(train_args(small_text, tmp_path / "out", "--data", "shakespeare")) == 2
    err = capsys.readouterr().err
    assert "tinyshakespeare/input.txt" in err and "https://" in err and "TLAMA_DATA_DIR" in err


def test_folder_data_bpe_and_resume(tmp_path, capsys):
    text = find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    (tmp_path / "books").mkdir()
    for i in range(3):
        (tmp_path / "books" / f"{i}.txt").write_text(text[i * 8000:(i + 1) * 8000])
    out = tmp_path / "out"
    args = train_args(tmp_path / "books", out, "--tokenizer", "bpe", "--bpe-vocab-size", "300", "--quiet")
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 300 and "3 .txt files" in config["data"]["source"]
    assert main([*args[:args.index("--max-steps") + 1], "12", *args[args.index("--max-steps") + 2:], "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 8, 12, 12]  # the resumed run appends
