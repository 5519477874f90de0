"""DistributedDataParallel: 2 CPU processes (gloo, launched by torchrun) train like 1 process with the
same global batch, and only rank 0 writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tlama_mini.paths import find_data_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TLAMA_TOKEN_CACHE": str(tmp_path / "tokens")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_two_processes_match_one_process_and_resume(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text(find_data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:40_000])
    # A constant learning rate, so that stopping at step 5 and resuming to 8 follows the same schedule.
    args = ["train", "--preset", "tiny", "--data", str(text), "--batch-size", "8", "--seq-len", "32",
            "--eval-interval", "1", "--eval-batches", "2", "--warmup-steps", "0", "--lr", "3e-3",
            "--min-lr", "3e-3", "--threads", "1", "--sample-tokens", "0", "--dtype", "float32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tlama_mini"]
    single = run([sys.executable, "-m", "tlama_mini", *args, "--max-steps", "8", "--out", str(tmp_path / "one")], tmp_path)
    double = run([*torchrun, *args, "--max-steps", "5", "--out", str(tmp_path / "two")], tmp_path)
    assert "(1 process)" in single.stdout and "(2 processes)" in double.stdout
    assert double.stdout.count("done: step 5") == 1  # rank 1 prints nothing ...
    resumed = run([*torchrun, *args, "--max-steps", "8", "--out", str(tmp_path / "two"), "--resume"], tmp_path)
    assert resumed.stdout.count("resumed from") == 1
    one, two = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 8]  # ... and writes nothing twice
    two = [r for r in two if not (r.get("final") and r["step"] == 5)]  # the first run's end
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5, (a, b)
    assert one[-1]["train_loss"] < one[0]["train_loss"]  # it trained
    w1, w2 = (load_file(tmp_path / d / "ckpt" / "model.safetensors") for d in ("one", "two"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5, msg=k)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
