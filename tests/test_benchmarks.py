"""The benchmark scripts run end to end in their quick modes (CI never asserts timings: these only
check that each script works and that the implementations it compares agree)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_attention_benchmark_quick():
    # One length, not --quick's two: each (method, length) is a fresh Python process (about 2.5 s of CPU each,
    # nearly all importing torch), and a second length proves nothing more; the forward + backward test below
    # runs --quick's two lengths.
    out = _run("benchmarks/bench_attention.py", "--lengths", "256", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")][-3:]  # the final table
    assert [r.split("|")[3].strip() for r in rows] == ["naive", "sdpa", "flash"], out
    diffs = [float(r.split("|")[-2]) for r in rows]
    assert max(diffs) < 1e-5, out


def test_generation_benchmark_quick():
    out = _run("benchmarks/bench_generation.py", "--quick", "--threads", "1", "--presets", "tiny")
    assert re.search(r"tok", out) and "tiny" in out, out


def test_matvec_benchmark_quick():
    out = _run("benchmarks/bench_matvec.py", "--quick", "--threads", "1", "2")
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")][-5:]
    assert [r.split("|")[2].strip().split(",")[0] for r in rows] == ["F.linear", "fuse.linear", "F.linear",
                                                                     "fuse.linear", "read the same bytes (torch.sum)"], out
    diff = float(re.search(r"agree within (\S+) of", out).group(1))
    assert diff < 1e-5, out


def test_triton_flash_benchmark_quick():
    pytest.importorskip("triton")
    out = _run("benchmarks/bench_triton_flash.py", "--quick")
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["sdpa", "flash (PyTorch tiles)", "triton"], out
    assert max(float(r.split("|")[-2]) for r in rows) < 1e-5, out


def test_long_context_benchmark_quick(tmp_path):
    import json
    out_file = tmp_path / "long.json"
    out = _run("benchmarks/bench_long_context.py", "--quick", "--threads", "1", "--out", str(out_file))
    (result,) = json.loads(out_file.read_text())
    budget = result["budget_mib"]
    longest = {}
    for variant, d in result["variants"].items():
        measured = {int(k): v for k, v in d["measured"].items()}
        T = d["longest"]
        assert T > 0 and measured[T] <= budget, (variant, d)
        assert any(k > T and v > budget for k, v in measured.items()), (variant, d)  # the next length did not fit
        assert all(v > budget for k, v in measured.items() if k > T), (variant, d)   # monotone in length
        longest[variant] = T
    assert longest["blockwise"] > longest["memory_efficient"] >= longest["vanilla"], longest
    assert "| char (65) | 0.25 | blockwise |" in out, out


def test_attention_benchmark_forward_backward_quick():
    out = _run("benchmarks/bench_attention.py", "--quick", "--threads", "1", "--backward", "--naive-max", "256")
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")][-6:]  # the final table
    assert [r.split("|")[3].strip() for r in rows] == ["naive", "sdpa", "flash", "naive", "sdpa", "flash"], out
    assert "not run" in rows[3]  # T=512 > --naive-max: compared with SDPA instead
    diffs = [float(r.split("|")[-2]) for r in rows if "not run" not in r]
    assert max(diffs) < 1e-5, out
    assert len(re.findall(r"T=(256|512): flash time = \d+\.\d+ x SDPA", out[out.rindex("|---|"):])) == 2, out


def test_attention_benchmark_interleaved_flash_quick():
    out = _run("benchmarks/bench_attention.py", "--quick", "--threads", "1", "--interleave", "2")
    rows = [line.split("|") for line in out.splitlines() if re.match(r"\| (256|512) \|", line)]
    assert [r[1].strip() for r in rows] == ["256", "512"], out
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0, out  # flash / SDPA time ratios, wall and CPU
        assert int(r[6]) > 0, out                        # kernels per tiled call
        assert float(r[7]) < 1e-5, out                   # flash equals SDPA
