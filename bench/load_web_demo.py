"""Bounded load test of the web demo on localhost: N concurrent chat sessions, each picking a role and
sending a few turns, against a web_demo.py it starts on a free 127.0.0.1 port (or an already running
one given by --url). Two ways in:
- the page's Gradio API (`/chat`, via gradio_client) — the default;
- `--api`: the OpenAI-compatible API, each session one streaming client (`POST /v1/chat/completions`
  with `stream: true`, SSE read with httpx) that carries its conversation from turn to turn. The server
  gets a random API key, sent as `Authorization: Bearer`.

Every request must get an answer (a reply message for that turn); in --api mode a request the server's
bounded queue refuses (HTTP 429, or 503) is counted on its own line ("rejected"), not as an error.
Reported: requests, answered, errors, rejected, empty replies, latency percentiles (p50/p90/p99/max),
with --api also time to first token (first content chunk) and generated tokens/s (from `usage`), wall
time and the server's peak RSS (psutil, server process plus its children; only when this script started
the server). Bounded: at most --sessions x --turns requests, a hard --timeout for the whole run; the
server is always stopped at the end. Exit status 0 when every request was answered or rejected, with no
error, else 1.

Examples:
    python bench/load_web_demo.py                                  # 20 sessions x 2 turns, tiny default model
    python bench/load_web_demo.py --sessions 4 --turns 1 --max_new_tokens 4
    python bench/load_web_demo.py --api --sessions 50 --turns 2    # 50 concurrent streaming API clients
    python bench/load_web_demo.py --api --sessions 50 --server_queue_size 8   # provoke 429s on purpose
    python bench/load_web_demo.py --url http://127.0.0.1:7860/ --sessions 10   # a running demo (no RSS)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import utils  # noqa: E402  (after the path setup: runnable as `python bench/load_web_demo.py`)
from tools.harness import child_env, free_port, wait_until_serving  # noqa: E402

QUESTIONS = ["你好，请问你是谁？", "你会用什么元素？", "今天天气很好，我们一起去吧！", "你喜欢吃什么？",
             "给我讲讲你的故事。", "你最好的朋友是谁？"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running web demo (default: start one on a free port)")
    p.add_argument("--model_path", default=str(REPO / utils.DEFAULT_BASE_DIR),
                   help="model for the demo this script starts")
    p.add_argument("--desc_path", default=str(REPO / utils.PROFILES_PATH),
                   help="role profiles (roles are picked from it)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent chat sessions (at most 200)")
    p.add_argument("--turns", type=int, default=2, help="messages per session (at most 10)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="reply length cap per request")
    p.add_argument("--server_concurrency", type=int, default=4, help="web_demo.py --concurrency")
    p.add_argument("--server_queue_size", type=int, default=None,
                   help="web_demo.py --queue_size (default: web_demo.py's own)")
    p.add_argument("--api", action="store_true",
                   help="drive the OpenAI-compatible API with streaming clients instead of the page")
    p.add_argument("--api_key", default=None, help="with --url and --api: the running server's API key")
    p.add_argument("--adapter", action="append", default=[], metavar="ROLE=PATH",
                   help="web_demo.py --adapter (per-role adapters on one base; repeatable)")
    p.add_argument("--temperature", type=float, default=0.3, help="sampling temperature of the API requests")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit in seconds for the whole run")
    p.add_argument("--startup_timeout", type=float, default=300.0, help="seconds to wait for the server")
    p.add_argument("--seed", type=int, default=0, help="seed for role and question choice")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


class RssSampler(threading.Thread):
    """Polls the resident set size of a process and its children: the peak (bytes), and every sample as
    (seconds since start, MiB) in `samples` (bench/soak_web_demo.py reads the series)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval, self.peak, self.stop_event = interval, 0, threading.Event()
        self.t0, self.samples = time.monotonic(), []

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        if total:
            self.peak = max(self.peak, total)
            self.samples.append((time.monotonic() - self.t0, total / 2**20))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def start_server(args: argparse.Namespace, log_path: Path, api_key: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start web_demo.py on a free loopback port; return (process, url) once it answers HTTP."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "web_demo.py"), "--model_path", str(args.model_path), "--desc_path",
           str(args.desc_path), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--concurrency", str(args.server_concurrency), *(f"--adapter={spec}" for spec in args.adapter)]
    if args.server_queue_size is not None:
        cmd += ["--queue_size", str(args.server_queue_size)]
    extra = {"ROLEPLAY_API_KEY": api_key} if api_key else {}
    if api_key:
        cmd.append("--api_only")  # with a key the page asks for a login; the API is what is measured
    env = child_env(threads=int(os.environ.get("OMP_NUM_THREADS", "1")), GRADIO_ANALYTICS_ENABLED="False", **extra)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        if api_key:
            wait_for_api(url, api_key, proc, args.startup_timeout)
        else:
            wait_until_serving(url, proc, args.startup_timeout, log_path)
    except TimeoutError as e:
        stop_server(proc)
        raise RuntimeError(f"web_demo.py: {e}:\n{tail(log_path)}") from e
    return proc, url


def wait_for_api(url: str, api_key: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll GET `url`v1/models until the API answers."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"web_demo.py exited with code {proc.returncode} before serving")
        try:
            r = httpx.get(url + "v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the API at {url}v1 did not answer within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after 10 s."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def reply_text(chat: Any, turn: int) -> str | None:
    """The assistant text answering user message number `turn` (0-based) of a returned chat, or None."""
    if not isinstance(chat, list):
        return None
    users = 0
    for i, message in enumerate(chat):
        if isinstance(message, dict) and message.get("role") == "user":
            if users == turn:
                nxt = chat[i + 1] if i + 1 < len(chat) else None
                if isinstance(nxt, dict) and nxt.get("role") == "assistant":
                    return content_text(nxt.get("content"))
                return None
            users += 1
    return None


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return str(content)


def run_session(url: str, session: int, roles: list[str], args: argparse.Namespace, deadline: float) -> list[dict]:
    """One chat session: a client with its own Gradio session, a role, `args.turns` messages in order."""
    from gradio_client import Client

    rng = random.Random(args.seed * 1000 + session)
    role = rng.choice(roles)
    results = []
    try:
        client = Client(url, verbose=False)
    except Exception as e:  # noqa: BLE001  (a load test reports every failure, whatever its kind)
        return [{"session": session, "turn": t, "role": role, "ok": False, "error": f"connect: {e!r}"[:300]}
                for t in range(args.turns)]
    for turn in range(args.turns):
        t0 = time.perf_counter()
        result = {"session": session, "turn": turn, "role": role, "ok": False}
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("hard timeout reached before the request was sent")
            job = client.submit(rng.choice(QUESTIONS), role, args.max_new_tokens, 0.8, 0.3, api_name="/chat")
            chat, _box = job.result(timeout=remaining)
            text = reply_text(chat, turn)
            if text is None:
                raise RuntimeError(f"no reply for turn {turn} in the returned chat")
            result.update(ok=True, empty=not text.strip(), latency=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            result.update(error=f"{type(e).__name__}: {e}"[:300], latency=time.perf_counter() - t0)
        results.append(result)
        if not result["ok"]:
            break  # the session's conversation is broken; later turns are counted as not sent
    for turn in range(len(results), args.turns):
        results.append({"session": session, "turn": turn, "role": role, "ok": False, "error": "not sent"})
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass
    return results


def stream_chat(client: Any, url: str, body: dict, deadline: float) -> dict:
    """One streamed chat completion: status, reply text, time to first content chunk, usage."""
    t0 = time.perf_counter()
    out: dict = {"status": None, "text": "", "ttft": None, "usage": None}
    timeout = max(1.0, deadline - time.monotonic())
    with client.stream("POST", url + "v1/chat/completions", json=body, timeout=timeout) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = f"HTTP {r.status_code}: {r.read().decode('utf-8', 'replace')[:200]}"
            return out
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = f"stream error: {event['error'].get('message')}"[:300]
                break
            if event.get("usage"):
                out["usage"] = event["usage"]
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
                    out["text"] += piece
    return out


def run_api_session(url: str, session: int, roles: list[str], args: argparse.Namespace, deadline: float,
                    api_key: str | None) -> list[dict]:
    """One API client: a role, `args.turns` streamed requests in order, each carrying the conversation."""
    import httpx

    rng = random.Random(args.seed * 1000 + session)
    role = rng.choice(roles)
    messages: list[dict] = []
    results = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers) as client:
        for turn in range(args.turns):
            result = {"session": session, "turn": turn, "role": role, "ok": False}
            t0 = time.perf_counter()
            try:
                if deadline - time.monotonic() <= 0:
                    raise TimeoutError("hard timeout reached before the request was sent")
                messages.append({"role": "user", "content": rng.choice(QUESTIONS)})
                body = {"model": role, "messages": messages, "stream": True, "max_tokens": args.max_new_tokens,
                        "temperature": args.temperature, "stream_options": {"include_usage": True}}
                out = stream_chat(client, url, body, deadline)
                result["latency"] = time.perf_counter() - t0
                if out["status"] in (429, 503):
                    result.update(rejected=out["status"], error=out.get("error"))
                elif "error" in out or not out.get("done"):
                    result["error"] = out.get("error", "the stream ended without [DONE]")
                else:
                    result.update(ok=True, empty=not out["text"].strip(), ttft=out["ttft"],
                                  tokens=(out["usage"] or {}).get("completion_tokens", 0))
                    messages.append({"role": "assistant", "content": out["text"]})
            except Exception as e:  # noqa: BLE001  (a load test reports every failure, whatever its kind)
                result.update(error=f"{type(e).__name__}: {e}"[:300], latency=time.perf_counter() - t0)
            results.append(result)
            if not result["ok"]:
                break  # the conversation is broken (or refused); later turns are counted as not sent
    refused = "rejected" in results[-1]
    for turn in range(len(results), args.turns):
        results.append({"session": session, "turn": turn, "role": role, "ok": False, "error": "not sent",
                        "after_rejection": refused})
    return results


def run(args: argparse.Namespace) -> dict:
    """Run the load test; returns the report (also for tests)."""
    if not 1 <= args.sessions <= 200 or not 1 <= args.turns <= 10:
        raise utils.UserError("--sessions must be in 1..200 and --turns in 1..10 (a bounded load test)")
    roles = list(utils.load_profiles(args.desc_path))
    t_start = time.monotonic()
    proc = sampler = None
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"load_web_demo-{os.getpid()}.log"
    url = args.url
    api_key = args.api_key if args.url else (secrets.token_hex(16) if args.api else None)
    try:
        if url is None:
            proc, url = start_server(args, log_path, api_key)
            sampler = RssSampler(proc.pid)
            sampler.start()
        startup = time.monotonic() - t_start
        deadline = t_start + args.timeout
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.sessions) as pool:
            if args.api:
                futures = [pool.submit(run_api_session, url, s, roles, args, deadline, api_key)
                           for s in range(args.sessions)]
            else:
                futures = [pool.submit(run_session, url, s, roles, args, deadline) for s in range(args.sessions)]
            results = [r for f in futures for r in f.result()]
        wall = time.monotonic() - t0
    finally:
        if sampler is not None:
            sampler.sample()
            sampler.stop_event.set()
        if proc is not None:
            stop_server(proc)
    return summarize(args, results, wall, startup, sampler.peak if sampler else None, url)


def summarize(args: argparse.Namespace, results: list[dict], wall: float, startup: float, peak_rss: int | None,
              url: str) -> dict:
    ok = [r for r in results if r["ok"]]
    latencies = [r["latency"] for r in ok]
    rejected = [r for r in results if "rejected" in r]
    unsent = [r for r in results if r.get("after_rejection")]  # later turns of a refused conversation
    errors = [r for r in results if not r["ok"] and "rejected" not in r and not r.get("after_rejection")]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r.get("tokens", 0) for r in ok)
    return {
        "url": url, "mode": "api (streaming)" if getattr(args, "api", False) else "page (gradio_client)",
        "sessions": args.sessions, "turns": args.turns, "max_new_tokens": args.max_new_tokens,
        "server_concurrency": args.server_concurrency, "server_queue_size": getattr(args, "server_queue_size", None),
        "adapters": list(getattr(args, "adapter", [])), "requests": len(results), "answered": len(ok),
        "errors": len(errors), "error_samples": sorted({r["error"] for r in errors})[:5],
        "rejected_429": sum(r["rejected"] == 429 for r in rejected),
        "rejected_503": sum(r["rejected"] == 503 for r in rejected), "not_sent_after_rejection": len(unsent),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90), "ttft_p99_s": percentile(ttfts, 99),
        "generated_tokens": tokens, "generated_tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "empty_replies": sum(r.get("empty", False) for r in ok),
        "p50_s": percentile(latencies, 50), "p90_s": percentile(latencies, 90), "p99_s": percentile(latencies, 99),
        "max_s": max(latencies, default=float("nan")), "wall_s": wall, "startup_s": startup,
        "requests_per_s": len(ok) / wall if wall > 0 else float("nan"),
        "server_peak_rss_mb": peak_rss / 2**20 if peak_rss else None,
    }


def format_table(report: dict) -> str:
    rss = report["server_peak_rss_mb"]
    rows = [
        ("mode", report.get("mode", "page (gradio_client)")),
        ("sessions x turns", f"{report['sessions']} x {report['turns']} (max_new_tokens {report['max_new_tokens']}, "
                             f"server concurrency {report['server_concurrency']}, queue "
                             f"{report.get('server_queue_size') or 'default'})"),
        ("requests / answered / errors", f"{report['requests']} / {report['answered']} / {report['errors']}"),
        ("rejected by the full queue: 429 / 503",
         f"{report.get('rejected_429', 0)} / {report.get('rejected_503', 0)} "
         f"(+{report.get('not_sent_after_rejection', 0)} later turns not sent)"),
        ("empty replies", str(report["empty_replies"])),
        ("latency p50 / p90 / p99 / max", " / ".join(f"{report[k]:.2f} s" for k in ("p50_s", "p90_s", "p99_s",
                                                                                       "max_s"))),
    ]
    if report.get("mode", "").startswith("api"):
        rows += [
            ("time to first token p50 / p90 / p99",
             " / ".join(f"{report[k]:.2f} s" for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"))),
            ("generated tokens (usage) / per s", f"{report['generated_tokens']} / "
                                                 f"{report['generated_tokens_per_s']:.1f}"),
        ]
    rows += [
        ("wall (requests) / server start", f"{report['wall_s']:.1f} s / {report['startup_s']:.1f} s"),
        ("throughput", f"{report['requests_per_s']:.2f} requests/s"),
        ("server peak RSS", f"{rss:.0f} MiB" if rss else "n/a (server not started here)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)} | value", f"{'-' * width}-|-{'-' * 40}"]
    lines += [f"{k.ljust(width)} | {v}" for k, v in rows]
    lines += [f"error: {e}" for e in report["error_samples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report), flush=True)
    if args.json:
        utils.write_json(args.json, report)
    refused = report.get("rejected_429", 0) + report.get("rejected_503", 0) + report.get("not_sent_after_rejection", 0)
    return 0 if report["errors"] == 0 and report["answered"] + refused == report["requests"] else 1


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
