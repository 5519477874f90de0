"""The training loop: exact resume after SIGKILL, clean Ctrl-C, NaN handling, schedules, metrics."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlama_mini import checkpoint as ckpt
from tlama_mini.data import BatchSampler
from tlama_mini import device as device_module
from tlama_mini.paths import find_data_file
from tlama_mini.trainer import TrainConfig, Trainer, autocast_dtype, train_config
from tlama_mini.training import get_lr_scheduler

ROOT = Path(__file__).resolve().parent.parent
STEPS = 150  # long enough that the test surely stops the run before its end


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The first 60k characters of Tiny Shakespeare (all 65 of its characters are not needed)."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("module_token_cache")


def tiny(small_text: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(small_text), out=str(out), batch_size=8, seq_len=32, eval_interval=5, eval_batches=2,
                warmup_steps=5, lr=3e-3, min_lr=3e-4, quiet=True, sample_tokens=0, dtype="float32")
    return train_config("tiny", **{**base, **kw})


def cli_args(small_text: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tlama_mini", "train", "--preset", "tiny", "--data", str(small_text),
            "--out", str(out), "--batch-size", "8", "--seq-len", "32", "--max-steps", str(STEPS),
            "--eval-interval", "20", "--eval-batches", "2", "--ckpt-interval", "3", "--threads", "1",
            "--seed", "7", "--sample-tokens", "0", "--quiet", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start_and_stop_after_first_checkpoint(args: list[str], out: Path, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "ckpt" / "config.json").exists():
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.002)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.find_checkpoint(out) / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(small_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(cli_args(small_text, out), env=env(), cwd=ROOT, check=True, capture_output=True, text=True)
    return out


def test_sigkill_then_resume_gives_bitwise_the_uninterrupted_weights(small_text, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = start_and_stop_after_first_checkpoint(cli_args(small_text, out), out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = ckpt.read_config(ckpt.find_checkpoint(out))["step"]
    assert 0 < killed_at < STEPS
    subprocess.run(cli_args(small_text, out, "--resume"), env=env(), cwd=ROOT, check=True, capture_output=True)
    a, b = final_weights(uninterrupted), final_weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert ckpt.read_config(ckpt.find_checkpoint(out))["step"] == STEPS


def test_ctrl_c_saves_and_exits_cleanly_and_resumes_exactly(small_text, tmp_path, uninterrupted):
    out = tmp_path / "interrupted"
    proc = start_and_stop_after_first_checkpoint(cli_args(small_text, out), out, signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted (SIGINT) at step" in err and "--resume" in err and "Traceback" not in err
    step = ckpt.read_config(ckpt.find_checkpoint(out))["step"]
    assert f"at step {step}:" in err and step < STEPS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["final"] and rows[-1]["step"] == step
    subprocess.run(cli_args(small_text, out, "--resume"), env=env(), cwd=ROOT, check=True, capture_output=True)
    a, b = final_weights(uninterrupted), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path, max_steps=50, ckpt_interval=2))
    calls = [0]

    class Poisoned(torch.nn.Module):  # the 7th step's loss is NaN (a module: train_step clips its parameters)
        def __init__(self, real: torch.nn.Module) -> None:
            super().__init__()
            self.real = real

        def forward(self, x, targets):
            calls[0] += 1
            logits, loss = self.real(x, targets=targets)
            return logits, loss * float("nan") if calls[0] == 7 else loss

    trainer.fwd = Poisoned(trainer.fwd)
    messages = []
    reporter = type("R", (), {"update": lambda *a: None, "evaluated": lambda *a: None, "close": lambda *a: None,
                              "message": lambda self, text: messages.append(text)})()
    result = trainer.run(reporter)
    assert result == {"status": "diverged", "step": 6}
    assert "loss is nan at step 7" in messages[0] and "last good checkpoint" in messages[0]
    saved = final_weights(tmp_path)
    assert ckpt.read_config(ckpt.find_checkpoint(tmp_path))["step"] == 6
    state = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() and torch.equal(v, state[k]) for k, v in saved.items())
    assert not any(json.loads(r).get("final") for r in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_metrics_config_and_step_schedule(small_text, tmp_path):
    cfg = tiny(small_text, tmp_path, max_steps=12)
    result = Trainer(cfg).run()
    assert result["status"] == "done" and result["step"] == 12
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 12]
    for r in rows:
        assert {"step", "tokens", "elapsed_s", "train_loss", "val_loss"} <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 32
    assert rows[-1]["final"] is True and "final" not in rows[0]
    assert rows[0]["val_loss"] > rows[-1]["val_loss"]  # it learns
    sched = get_lr_scheduler(3e-3, 3e-4, 5, 12)
    assert [r["lr"] for r in rows] == [sched(4), sched(9), sched(11)]  # the lr of each row's last step
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["d_model"] == 64 and config["train"]["max_steps"] == 12
    assert config["data"]["val_tokens"] == 6000 and config["model"]["max_seq_len"] == 32


def test_muon_trains_with_its_own_learning_rate_and_resumes_its_state(small_text, tmp_path):
    from tlama_mini.muon import Muon
    trainer = Trainer(tiny(small_text, tmp_path, max_steps=12, optimizer="muon", muon_lr_ratio=10.0))
    assert isinstance(trainer.optimizer, Muon)
    result = trainer.run()
    muon_group, *adamw_groups = trainer.optimizer.param_groups
    assert muon_group["muon"] and muon_group["lr"] == pytest.approx(10 * adamw_groups[0]["lr"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result["status"] == "done" and rows[0]["val_loss"] > rows[-1]["val_loss"]
    resumed = Trainer(tiny(small_text, tmp_path, max_steps=12, optimizer="muon", muon_lr_ratio=10.0), resume=True)
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):  # momentum buffers, Adam moments
        a, b = trainer.optimizer.state[p], resumed.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_split_evaluation_is_the_mean_over_every_validation_token(small_text, tmp_path):
    # The module's first 12k characters, not its 60k: a 1,200-token validation split (37 full windows and a
    # partial last one) proves the same per-token mean with a fifth of the reference's one-window forwards.
    text = tmp_path / "short.txt"
    text.write_text(small_text.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    trainer = Trainer(tiny(text, tmp_path / "run", max_steps=1))
    val = trainer.corpus.val
    assert (len(val) - 1) % 32, "the split should end in a partial window"
    trainer.model.eval()
    with torch.no_grad():  # reference: one window at a time, summed per token
        total = 0.0
        for i in range(0, len(val) - 1, 32):
            x, y = val[i:i + 32][None], val[i + 1:i + 33][None]
            x = x[:, :y.shape[1]]
            logits, _ = trainer.model(x, targets=None, kv_cache=False)
            total += torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
    assert math.isclose(trainer.evaluate_full(), total / (len(val) - 1), rel_tol=1e-5)


def test_time_budget_ends_the_cosine_at_min_lr(small_text, tmp_path, monkeypatch):
    # The trainer's clock is a fake one that advances 10 ms at every reading, so the test checks where the
    # schedule ends whatever the machine's load (with the real clock, one slow step on a busy machine could
    # jump from 70% of the budget past its end, and the last step's lr was still far above min_lr).
    ticks = iter(range(10**9))
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) * 0.01)
    result = Trainer(tiny(small_text, tmp_path, max_seconds=3.0, eval_interval=1000)).run()
    monkeypatch.undo()
    assert result["status"] == "done" and result["step"] >= 20
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["lr"] <= 3e-4 + 0.05 * (3e-3 - 3e-4), final


class Halves:
    """Serves each batch of an 8-row sampler as two micro-batches of 4 rows."""

    def __init__(self, sampler: BatchSampler) -> None:
        self.sampler, self.pending = sampler, None

    def next(self):
        if self.pending is None:
            x, y = self.sampler.next()
            self.pending = x[4:], y[4:]
            return x[:4], y[:4]
        out, self.pending = self.pending, None
        return out

    def state_dict(self):
        return self.sampler.state_dict()


def test_gradient_accumulation_matches_one_big_batch(small_text, tmp_path):
    big = Trainer(tiny(small_text, tmp_path / "a", max_steps=3, batch_size=8))
    accum = Trainer(tiny(small_text, tmp_path / "b", max_steps=3, batch_size=4, grad_accum=2))
    accum.sampler = Halves(BatchSampler(accum.corpus.train, 8, 32, seed=big.cfg.seed))
    big.run(), accum.run()
    for (k, a), b in zip(big.model.state_dict().items(), accum.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_config_validation_and_existing_run_protection(small_text, tmp_path):
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float8")
    Trainer(tiny(small_text, tmp_path, max_steps=5)).run()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny(small_text, tmp_path, max_steps=5))
    with pytest.raises(ValueError, match="d_model: checkpoint 64, now 32"):
        Trainer(tiny(small_text, tmp_path, max_steps=5), {"d_model": 32}, resume=True)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) is torch.bfloat16  # native bf16 matmuls: faster
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None  # emulated bf16 would be slower: stay in float32
    assert autocast_dtype("auto", torch.device("mps")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", cuda) is torch.float16  # (the trainer adds a GradScaler)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("float32", cuda) is None and autocast_dtype("bfloat16", cpu) is torch.bfloat16
