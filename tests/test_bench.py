"""bench/run.py: a smoke test of `--quick` (every section runs and the table is written; no timing
assertions) and checks of the pure bookkeeping that turns logs into figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run  # the repo root is on sys.path (pyproject: pythonpath = ["."])

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_writes_every_section(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--threads", "1", "--model",
           str(tiny_model_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert "FAILED" not in report
    for needle in ("## Results", "| train | QLoRA tokens/s", "| train | padding share, whole epoch",
                   "| memory | resident weights, decoder linear layers only", "| memory | peak RSS",
                   "| generation | decode tokens/s", "| generation | time to first streamed token",
                   "| generation | utils.generate_batch", "| data | data_helper.py", "| gpu |",
                   "where the time goes", "- command: `python bench/run.py --quick", "torch "):
        assert needle in report, needle
    assert "## Results" in proc.stdout  # the table is printed too


def test_train_py_steps_read_logged_counts() -> None:
    # train.py logs [step, tokens/s, padding share, tokens, padded positions, seconds] per step
    entries = [[1, 50.0, 0.5, 10, 20, 0.2], [2, 200.0, 0.25, 30, 40, 0.15], [3, 300.0, 0.0, 60, 60, 0.2]]
    steps = bench_run.train_py_steps(entries, warmup=1)
    assert steps == [{"tokens": 30, "positions": 40, "seconds": 0.15}, {"tokens": 60, "positions": 60,
                                                                          "seconds": 0.2}]
    summary = bench_run.phase_summary(steps)
    assert summary["tok_s"] == pytest.approx(90 / 0.35)
    assert summary["pad"] == pytest.approx(1 - 90 / 100)
    with pytest.raises(RuntimeError, match="no step after"):
        bench_run.train_py_steps(entries, warmup=3)


def test_unknown_section_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--skip", "nope"])
