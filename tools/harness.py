"""Helpers shared by the tests, the benchmarks and the dev tools (never by the pipeline itself): free ports,
JSON-lines fixtures, the environment for child training processes, waiting for a server, scoring a model
with predict.py.

Example:
    python -c "from tools.harness import free_port; print(free_port())"
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Set by a distributed launcher; a child process must not inherit the parent's.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump_jsonl(path: Path, records: list) -> Path:
    """Write `records` as UTF-8 JSON lines (parent folders made); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def child_env(port: int | None = None, threads: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a training child: no inherited launcher variables, `threads`
    torch threads (tiny models gain nothing from more on a shared CPU), the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if port is not None:
        env["MASTER_PORT"] = str(port)
    env.update(extra)
    return env


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float, log_path: Path | None = None) -> dict:
    """Poll GET `url`config until a Gradio app answers; fail early (with the log) if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"the server exited with code {proc.returncode} before serving:\n{log}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5) as r:
                return json.load(r)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the server did not serve {url} within {timeout:.0f} s")


def predict_metrics(model_path: str, test_path: Path, preds_path: Path, *flags: str) -> dict:
    """Score `model_path` on `test_path` with predict.py (extra `flags` passed on); its metrics dict."""
    subprocess.run([sys.executable, str(REPO / "predict.py"), "--model_path", model_path, "--test_path",
                    str(test_path), "--output_path", str(preds_path), *flags],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(preds_path.with_suffix(".metrics.json").read_text(encoding="utf-8"))
