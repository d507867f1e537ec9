"""web_demo.py in a real browser: Debian's Chromium driven by playwright (no `playwright install`).

The test starts `web_demo.py` as a subprocess on a free localhost port, picks a role, sends two messages
(the first by pressing Enter; for the second, Shift+Enter must only break the line, then Submit sends),
waits for each streamed reply, takes a screenshot, checks that switching role starts a fresh conversation,
and always stops the server. A second test serves the model API-only (with an API key) in one process and
the page as its client (`--api_base`) in another, and chats through that page. Needs
`apt-get install chromium fonts-wqy-zenhei` (the font makes Chinese readable in the screenshot); skipped
when /usr/bin/chromium is absent.

Regenerate the README screenshot on a trained model (env knobs below; the profiles default to
data/profiles-zh_desc.json when a model is given):
    SAVE_SCREENSHOT=1 WEB_DEMO_MODEL=output/merged pytest tests/test_web_browser.py
    python tests/test_web_browser.py --model_path output/merged --out images/web_demo.png   # same, no pytest

Environment: WEB_DEMO_MODEL (model folder; default: the tiny random test model), WEB_DEMO_ADAPTER
(adapter folder), WEB_DEMO_PROFILES, WEB_DEMO_ROLE, WEB_DEMO_DEVICE (default: auto for WEB_DEMO_MODEL, cpu
for the tiny model), SAVE_SCREENSHOT=1 (also write images/web_demo.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script (see above), too
from tools.harness import free_port, wait_until_serving  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
README_SCREENSHOT = REPO / "images" / "web_demo.png"
DEFAULT_PROFILES = REPO / "data" / "profiles-zh_desc.json"
TEST_ROLES = {
    "孙悟空": "齐天大圣，花果山美猴王，性格桀骜不驯、机智勇敢，说话直来直去",
    "刻晴": "璃月七星之一的玉衡星，雷元素神之眼的持有者，做事雷厉风行，不信神明只信自己",
}
MESSAGES = ("你好，请介绍一下你自己。", "你平时最喜欢做什么？")
SERVER_START_TIMEOUT = 300  # loading a 7B model can take minutes
REPLY_TIMEOUT = 300

# One selector each for the page parts the test touches (elem_ids set in web_demo.build_ui).
BOT_MESSAGES = "#chat .message.bot"
USER_MESSAGES = "#chat .message.user"


def start_server(model_path: str | Path | None, profiles: str | Path, port: int, device: str = "cpu",
                 adapter_dir: str | Path | None = None, log_path: Path | None = None,
                 extra: Sequence[str] = ()) -> subprocess.Popen:
    """`python web_demo.py ...` on 127.0.0.1:`port` (output to `log_path`), seeded for a repeatable run;
    `model_path=None` for a page that is a client of another server (`extra` = --api_base ...)."""
    cmd = [sys.executable, str(REPO / "web_demo.py"), "--desc_path", str(profiles), "--host", "127.0.0.1",
           "--port", str(port), "--seed", "0", *extra]
    if model_path is not None:
        cmd += ["--model_path", str(model_path), "--device", device]
    if adapter_dir:
        cmd += ["--adapter_dir", str(adapter_dir)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    if log_path is None:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    with open(log_path, "w") as log:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def pick_role(page: object, role: str) -> None:
    """Choose `role` and wait until the server has handled the switch (it resets the chat and shows the
    role's card); a message sent before that would be wiped by the reset."""
    page.click("#role input")
    page.get_by_role("option", name=role, exact=True).click()
    page.wait_for_function(
        """r => document.querySelector('#role input').value === r
            && document.querySelector('#role-card').innerText.startsWith(r)""", arg=role, timeout=60_000)


def send_and_wait(page: object, text: str, turn: int, timeout_s: float = REPLY_TIMEOUT,
                  send: str = "Enter") -> tuple[str, list[int]]:
    """Type `text`, send it (`send`: "Enter" presses the key; "click" first checks that Shift+Enter only
    breaks the line, then removes the newline and presses Submit), wait for the `turn`-th (1-based) reply
    to finish streaming.

    Returns the reply text and the reply lengths seen while it streamed (a MutationObserver records them).
    """
    page.evaluate("""() => {
        window.__lengths = [];
        const chat = document.querySelector('#chat');
        window.__observer?.disconnect();
        window.__observer = new MutationObserver(() => {
            const bots = chat.querySelectorAll('.message.bot');
            if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
        });
        window.__observer.observe(chat, {subtree: true, childList: true, characterData: true});
    }""")
    box = "#user-input textarea"
    page.fill(box, text)
    if send == "Enter":
        page.press(box, "Enter")
    else:
        page.press(box, "Shift+Enter")
        page.wait_for_timeout(500)  # a send would have shown the user bubble (and emptied the box) by now
        value = page.input_value(box)
        if value != text + "\n" or page.locator(USER_MESSAGES).count() != turn - 1:
            raise AssertionError(f"Shift+Enter did not just break the line: box {value!r}, {page_state(page)}")
        page.press(box, "Backspace")
        page.click("#submit")
    # The event is over: the n-th user bubble is shown and the chat's status tracker is hidden again.
    try:
        page.wait_for_function(
            """([user, n]) => {
                const tracker = document.querySelector('#chat [data-testid="status-tracker"]');
                return document.querySelectorAll(user).length === n && tracker && tracker.classList.contains('hide');
            }""",
            arg=[USER_MESSAGES, turn], timeout=timeout_s * 1000, polling=100)
    except Exception as e:
        raise AssertionError(f"reply {turn} did not finish: {page_state(page)}") from e
    if page.locator(BOT_MESSAGES).count() != turn:
        raise AssertionError(f"reply {turn} is missing or empty: {page_state(page)}")
    reply = page.locator(BOT_MESSAGES).nth(turn - 1).inner_text()
    lengths = page.evaluate("() => window.__lengths")
    return reply, lengths


def page_state(page: object) -> str:
    """What the chat shows, for failure messages."""
    return page.evaluate("""() => JSON.stringify({
        messages: Array.from(document.querySelectorAll('#chat .message')).map(e => e.className + ': '
            + e.innerText.slice(0, 60)),
        tracker: document.querySelector('#chat [data-testid="status-tracker"]')?.className,
        role: document.querySelector('#role input')?.value,
        box: document.querySelector('#user-input textarea')?.value.slice(0, 60),
        toasts: Array.from(document.querySelectorAll('.toast-body')).map(e => e.innerText.slice(0, 120)),
    })""")


def run_session(url: str, role: str, screenshots: Sequence[Path], messages: Sequence[str] = MESSAGES,
                switch_to: str | None = None) -> dict:
    """Drive the page: pick `role`, chat, screenshot to each path; then, when `switch_to` is given, pick
    that role and report whether the conversation emptied (`cleared`)."""
    from playwright.sync_api import sync_playwright

    result: dict = {"replies": [], "lengths": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#chat", timeout=60_000)
            pick_role(page, role)
            for turn, text in enumerate(messages, start=1):
                reply, lengths = send_and_wait(page, text, turn, send="Enter" if turn % 2 else "click")
                result["replies"].append(reply)
                result["lengths"].append(lengths)
            result["user_texts"] = page.locator(USER_MESSAGES).all_inner_texts()
            result["role_value"] = page.input_value("#role input")
            page.mouse.move(0, 0)  # no hover effects in the picture
            for path in screenshots:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(path), full_page=True)
            if switch_to is not None:
                pick_role(page, switch_to)
                page.wait_for_function("s => document.querySelectorAll(s).length === 0", arg=USER_MESSAGES,
                                       timeout=30_000)
                result["cleared"] = page.locator(BOT_MESSAGES).count() == 0
        finally:
            browser.close()
    return result


# ---------------------------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------------------------
def tiny_model_without_empty_replies(src: Path, dst: Path) -> Path:
    """A copy of the random tiny model whose generation config asks for at least 8 new tokens: a random
    model may otherwise end at once, and an empty reply shows no bubble to wait for."""
    shutil.copytree(src, dst)
    config_path = dst / "generation_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "min_new_tokens": 8}, indent=2), encoding="utf-8")
    return dst


pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} not found: apt-get install chromium fonts-wqy-zenhei")


@pytest.fixture()
def demo_target(tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    """What to serve: WEB_DEMO_MODEL (+ real profiles) when set, else the tiny model and test roles."""
    model = os.environ.get("WEB_DEMO_MODEL")
    if model:
        profiles = Path(os.environ.get("WEB_DEMO_PROFILES") or DEFAULT_PROFILES)
        device = os.environ.get("WEB_DEMO_DEVICE", "auto")
    else:
        model = str(tiny_model_without_empty_replies(request.getfixturevalue("tiny_model_dir"), tmp_path / "model"))
        profiles = Path(os.environ.get("WEB_DEMO_PROFILES") or tmp_path / "profiles.json")
        if not profiles.exists():
            profiles.write_text(json.dumps(TEST_ROLES, ensure_ascii=False), encoding="utf-8")
        device = os.environ.get("WEB_DEMO_DEVICE", "cpu")
    roles = list(json.loads(profiles.read_text(encoding="utf-8")))
    role = os.environ.get("WEB_DEMO_ROLE") or (roles[1] if len(roles) > 1 else roles[0])
    return {"model": model, "adapter": os.environ.get("WEB_DEMO_ADAPTER"), "profiles": profiles, "device": device,
            "roles": roles, "role": role, "tiny": not os.environ.get("WEB_DEMO_MODEL")}


def test_chat_in_browser(demo_target: dict, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (its Python driver only)")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = tmp_path / "web_demo.log"
    proc = start_server(demo_target["model"], demo_target["profiles"], port, demo_target["device"],
                        demo_target["adapter"], log_path)
    try:
        config = wait_until_serving(url, proc, SERVER_START_TIMEOUT, log_path)
        dropdown = next(c for c in config["components"] if c["type"] == "dropdown")
        assert [c[0] for c in dropdown["props"]["choices"]] == demo_target["roles"]

        shots = [tmp_path / "web_demo.png"]
        if os.environ.get("SAVE_SCREENSHOT") == "1":
            shots.append(README_SCREENSHOT)
        other = next((r for r in demo_target["roles"] if r != demo_target["role"]), None)
        result = run_session(url, demo_target["role"], shots, switch_to=other)
        assert result["role_value"] == demo_target["role"]
        assert result["user_texts"] == list(MESSAGES)
        assert len(result["replies"]) == 2 and all(r.strip() for r in result["replies"])
        if demo_target["tiny"]:  # 256 new tokens on CPU: the reply visibly grows in steps
            assert len(set(result["lengths"][0])) >= 2, "the reply did not stream"
        assert shots[0].stat().st_size > 10_000
        print(f"screenshot: {', '.join(map(str, shots))}")
        if other is not None:
            assert result["cleared"], "switching role did not clear the conversation"
    finally:
        stop_server(proc)
    assert proc.poll() is not None


def wait_for_api(url: str, key: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> list[str]:
    """Poll GET `url`v1/models (with the key) until the API answers; the model ids."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url + "v1/models", headers={"Authorization": f"Bearer {key}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return [m["id"] for m in json.load(r)["data"]]
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the API server did not answer within {timeout:.0f} s")


def test_page_as_client_of_a_remote_server(demo_target: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`web_demo.py --api_only` (API key in the environment) serves the model; a second `web_demo.py
    --api_base URL --api_key KEY` serves the page with no model of its own; the browser chats there."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (its Python driver only)")
    key = "browser-test-key"
    monkeypatch.setenv("ROLEPLAY_API_KEY", key)
    api_port, page_port = free_port(), free_port()
    api_url, page_url = f"http://127.0.0.1:{api_port}/", f"http://127.0.0.1:{page_port}/"
    api_log, page_log = tmp_path / "api.log", tmp_path / "page.log"
    remote = start_server(demo_target["model"], demo_target["profiles"], api_port, demo_target["device"],
                          demo_target["adapter"], api_log, extra=["--api_only"])
    page_proc = None
    try:
        assert wait_for_api(api_url, key, remote, SERVER_START_TIMEOUT, api_log) == demo_target["roles"]
        monkeypatch.delenv("ROLEPLAY_API_KEY")  # the page process gets the key by flag only
        page_proc = start_server(None, demo_target["profiles"], page_port, log_path=page_log,
                                 extra=["--api_base", api_url + "v1", "--api_key", key])
        config = wait_until_serving(page_url, page_proc, SERVER_START_TIMEOUT, page_log)
        dropdown = next(c for c in config["components"] if c["type"] == "dropdown")
        assert [c[0] for c in dropdown["props"]["choices"]] == demo_target["roles"]
        result = run_session(page_url, demo_target["role"], [tmp_path / "remote.png"])
        assert result["user_texts"] == list(MESSAGES)
        assert len(result["replies"]) == 2 and all(r.strip() for r in result["replies"])
    finally:
        if page_proc is not None:
            stop_server(page_proc)
        stop_server(remote)
    assert remote.poll() is not None and (page_proc is None or page_proc.poll() is not None)


# ---------------------------------------------------------------------------------------------
# Standalone: regenerate images/web_demo.png without pytest
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve web_demo.py on a model, chat in headless Chromium, screenshot.")
    ap.add_argument("--model_path", required=True, help="model folder (e.g. output/merged)")
    ap.add_argument("--adapter_dir", default=None, help="adapter folder, if the model is a base plus adapter")
    ap.add_argument("--desc_path", default=str(DEFAULT_PROFILES), help="profiles file (default: %(default)s)")
    ap.add_argument("--role", default=None, help="role to chat as (default: the second role in the file)")
    ap.add_argument("--device", default="auto", help="auto, cpu, or a GPU index (default: auto)")
    ap.add_argument("--out", default=str(README_SCREENSHOT), help="screenshot path (default: %(default)s)")
    ap.add_argument("--message", action="append", default=None,
                    help="a user message, in order; repeat for more rounds (default: the test's two messages)")
    args = ap.parse_args(argv)
    messages = tuple(args.message or MESSAGES)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} not found: apt-get install chromium fonts-wqy-zenhei", file=sys.stderr)
        return 2
    roles = list(json.loads(Path(args.desc_path).read_text(encoding="utf-8")))
    role = args.role or (roles[1] if len(roles) > 1 else roles[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="web_demo-") as tmp:
        log_path = Path(tmp) / "web_demo.log"
        proc = start_server(args.model_path, args.desc_path, port, args.device, args.adapter_dir, log_path)
        try:
            wait_until_serving(url, proc, SERVER_START_TIMEOUT, log_path)
            result = run_session(url, role, [Path(args.out)], messages)
        finally:
            stop_server(proc)
    for text, reply in zip(messages, result["replies"], strict=True):
        print(f"[{role}] user: {text}\n[{role}] reply: {reply}\n")
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
