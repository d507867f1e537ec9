"""Soak test of the web demo, bounded: bench/soak_web_demo.py serves the tiny test model on a free
127.0.0.1 port and sends about a minute of mixed requests (multi-turn chat, refused over-long and
empty messages, special-token text, cancelled requests, fresh clients) from a few clients. Every
request must be handled and the server's RSS must not climb (growth from the start sample, taken
after warm-up, to the end sample within the script's --max_growth_mb). The figures are printed, so
`pytest -s` shows RSS at start and end. Longer runs: `python bench/soak_web_demo.py --seconds 600`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import profiles_file
from tools.harness import REPO, child_env

SOAK_SECONDS = 60


def test_web_demo_soak_rss_does_not_climb(tiny_model_dir: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "bench" / "soak_web_demo.py"), "--model_path", str(tiny_model_dir),
           "--desc_path", str(profiles_file(tmp_path / "p.json")), "--seconds", str(SOAK_SECONDS), "--clients", "3",
           "--max_new_tokens", "4", "--json", str(report_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(GRADIO_ANALYTICS_ENABLED="False"), capture_output=True,
                          text=True, timeout=SOAK_SECONDS + 420, check=False)
    print(proc.stdout)
    assert report_path.is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["server_alive_at_end"], report.get("server_log_tail")
    assert report["errors"] == 0, report["error_samples"]
    # a real mix was sent: every kind of request, and more than a handful of them
    kinds = {"chat", "over_long", "empty", "special_text", "cancelled", "fresh_client"}
    assert set(report["per_kind"]) == kinds, report
    assert report["requests"] >= 30 and report["outcomes"].get("refused", 0) >= 2, report
    assert report["rss_samples"] >= SOAK_SECONDS // 2
    assert report["rss_growth_mb"] <= report["max_growth_mb"], (report["rss_start_mb"], report["rss_end_mb"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
