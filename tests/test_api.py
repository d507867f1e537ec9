"""The OpenAI-compatible API of web_demo.py (roleplay/api.py), over real HTTP on a free loopback port.

The official `openai` client lists the roles, answers a chat and streams one (streamed text == the
non-streamed text for greedy decoding, and both == the project's own greedy `chat_once` with the role's
system prompt); plain HTTP checks the SSE framing; sampling settings, seed, stop strings, usage in real
tokens; the API key; the bounded queue (429 at once when full); two per-role LoRA adapters on one base
under 20 concurrent mixed-role requests, each equal to its adapter's answer alone; the page as a client
of this server (`--api_base`). The table of bad requests (HTTP 400/404 with an OpenAI error object) is
`BAD_REQUESTS` here (tests/test_bad_inputs.py lists it); the server keeps answering after all of them.
All on the tiny random Baichuan2 model (`tiny_model_dir`).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import utils
import web_demo
from roleplay import api, generation, loading
from tools.harness import free_port

KEY = "test-key-123"
ROLES = {
    "孙悟空": "齐天大圣，花果山美猴王，性格桀骜不驯、机智勇敢",
    "刻晴": "璃月七星之一的玉衡星，雷元素使用者，做事雷厉风行",
    "赵子龙": "常山赵子龙，蜀汉名将",  # no adapter of its own in the adapters test: runs the base
}
CAP = 200  # --max_input_chars of the test server
QUESTION = "你好，请介绍一下你自己。"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profiles_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "profiles.json"
    path.write_text(json.dumps(ROLES, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def profiles(profiles_path: Path) -> dict[str, str]:
    return utils.load_profiles(profiles_path)


def start(backend: Any, **config: Any) -> web_demo.Server:
    app = web_demo.build_app(backend, api_config=api.ApiConfig(**{"api_key": KEY, **config}), page_password=KEY)
    return web_demo.serve(app, host="127.0.0.1", port=free_port(), block=False)


@pytest.fixture(scope="module")
def server(loaded: tuple[Any, Any], profiles: dict[str, str]) -> Any:
    srv = start(web_demo.ChatBackend(*loaded, profiles, max_input_chars=CAP), concurrency=2, queue_size=8)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server: web_demo.Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)


def reference(model: Any, tokenizer: Any, profiles: dict[str, str], role: str, user: str, max_tokens: int,
              system_extra: str = "", **overrides: Any) -> str:
    """The project's own greedy reply (generation.chat_once) with the role's system prompt."""
    system = utils.role_system_prompt(role, profiles) + (f"\n{system_extra}" if system_extra else "")
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=max_tokens, **overrides)
    return generation.chat_once(model, tokenizer, [{"role": "system", "content": system},
                                                   {"role": "user", "content": user}], config)


def ask(client: openai.OpenAI, role: str, user: str = QUESTION, stream: bool = False, **kw: Any) -> dict:
    """One chat through the openai client: {"text", "finish", "usage"} (streamed chunks joined)."""
    messages = [{"role": "user", "content": user}] if isinstance(user, str) else user
    if not stream:
        r = client.chat.completions.create(model=role, messages=messages, **kw)
        return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason, "usage": r.usage}
    out: dict = {"text": "", "finish": None, "usage": None}
    for chunk in client.chat.completions.create(model=role, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            out["text"] += choice.delta.content or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def post(server: web_demo.Server, body: Any, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode()
    return httpx.post(server.url + "v1/chat/completions", content=content, timeout=120,
                      headers={**headers, "Content-Type": "application/json"})


# ---------------------------------------------------------------------------------------------
# The openai client and plain HTTP
# ---------------------------------------------------------------------------------------------
def test_openai_client_lists_answers_and_streams(client: openai.OpenAI, loaded: tuple[Any, Any],
                                                 profiles: dict[str, str]) -> None:
    model, tokenizer = loaded
    assert [m.id for m in client.models.list().data] == list(ROLES)
    assert client.models.retrieve("刻晴").id == "刻晴"
    for role in ("孙悟空", "刻晴"):
        plain = ask(client, role, temperature=0, max_tokens=16)
        streamed = ask(client, role, stream=True, temperature=0, max_tokens=16)
        assert plain["text"] and streamed["text"] == plain["text"]
        assert plain["text"] == reference(model, tokenizer, profiles, role, QUESTION, 16)  # server-side prompt
        assert streamed["finish"] == plain["finish"] and plain["finish"] in ("stop", "length")
        # usage in real tokens: the prompt builder's ids, and the tokens generate produced
        messages = [{"role": "system", "content": utils.role_system_prompt(role, profiles)},
                    {"role": "user", "content": QUESTION}]
        config = generation.generation_config_for(model, do_sample=False, max_new_tokens=16)
        prompt = generation.chat_prompt_ids(model, tokenizer, messages, config)
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                          dtype=torch.long),
                             generation_config=config)
        generated = out.shape[1] - len(prompt)
        for r in (plain, streamed):
            assert (r["usage"].prompt_tokens, r["usage"].completion_tokens) == (len(prompt), generated)
            assert r["usage"].total_tokens == len(prompt) + generated
        assert (plain["finish"] == "length") == (generated == 16 and out[0, -1].item() != tokenizer.eos_token_id)


def test_stream_over_plain_http(server: web_demo.Server) -> None:
    body = {"model": "孙悟空", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": 12, "stream": True}
    with httpx.stream("POST", server.url + "v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    plain = post(server, {**body, "stream": False}).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["content"] == text


def test_client_system_message_is_appended_after_the_role_prompt(client: openai.OpenAI, loaded: tuple[Any, Any],
                                                                  profiles: dict[str, str]) -> None:
    extra = "回答要简短。"
    messages = [{"role": "system", "content": extra}, {"role": "user", "content": QUESTION}]
    got = ask(client, "孙悟空", messages, temperature=0, max_tokens=12)["text"]
    assert got == reference(*loaded, profiles, "孙悟空", QUESTION, 12, system_extra=extra)
    request = api.ChatRequest(model="孙悟空", messages=messages[1:], system=extra)
    system = api.role_messages(request, profiles)[0]["content"]
    assert system == utils.role_system_prompt("孙悟空", profiles) + "\n" + extra


def test_sampling_settings_and_seed(client: openai.OpenAI) -> None:
    kw = {"temperature": 1.2, "max_tokens": 12}
    first = ask(client, "刻晴", seed=7, **kw)["text"]
    assert ask(client, "刻晴", seed=7, **kw)["text"] == first
    assert ask(client, "刻晴", seed=7, stream=True, **kw)["text"] == first  # seeded stream == seeded answer
    assert len({ask(client, "刻晴", seed=s, **kw)["text"] for s in range(4)}) >= 2  # the seed matters
    greedy = ask(client, "刻晴", temperature=0, max_tokens=12)["text"]
    assert ask(client, "刻晴", temperature=1.5, top_p=1e-6, seed=3, max_tokens=12)["text"] == greedy  # top_p reaches


def test_frequency_penalty_is_our_reply_only_penalty(client: openai.OpenAI, loaded: tuple[Any, Any],
                                                     profiles: dict[str, str]) -> None:
    model, tokenizer = loaded
    replies = {}
    for penalty in (0.0, 2.0):
        replies[penalty] = ask(client, "孙悟空", temperature=0, max_tokens=24, frequency_penalty=penalty)["text"]
        streamed = ask(client, "孙悟空", stream=True, temperature=0, max_tokens=24, frequency_penalty=penalty)
        assert streamed["text"] == replies[penalty]
        assert replies[penalty] == reference(model, tokenizer, profiles, "孙悟空", QUESTION, 24,
                                             reply_frequency_penalty=penalty)
    unpenalised = tokenizer.encode(replies[0.0], add_special_tokens=False)
    assert len(set(unpenalised)) < len(unpenalised)  # the random test model repeats itself when not penalised
    assert replies[2.0] != replies[0.0]


def test_stop_strings_end_the_reply(client: openai.OpenAI) -> None:
    full = ask(client, "孙悟空", temperature=0, max_tokens=24)["text"]
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = full[:full.find(stop)]
    for stream in (False, True):
        r = ask(client, "孙悟空", stream=stream, temperature=0, max_tokens=24, stop=[stop, "never-seen"])
        assert (r["text"], r["finish"]) == (cut, "stop")
        assert r["usage"].completion_tokens < 24
    assert ask(client, "孙悟空", temperature=0, max_tokens=24, stop="never-seen")["text"] == full


def test_streamed_text_holds_back_a_possible_stop_string() -> None:
    """While streaming, a tail that could still become a stop string (or a half-decoded character) is not
    sent yet; a complete stop string cuts the text before it."""
    assert api._safe_prefix("你好ab", ("abc",)) == ("你好", False)
    assert api._safe_prefix("你好abc再见", ("abc", "再")) == ("你好", True)
    assert api._safe_prefix("你好a\ufffd", ()) == ("你好a", False)
    assert api._safe_prefix("你好", ("x",)) == ("你好", False)


def test_max_tokens_bounds_the_reply(client: openai.OpenAI) -> None:
    r = ask(client, "赵子龙", temperature=0, max_tokens=3)
    assert r["usage"].completion_tokens <= 3
    assert r["finish"] == "stop" or r["usage"].completion_tokens == 3


# ---------------------------------------------------------------------------------------------
# Bad requests: HTTP 400 (404 for an unknown model) with an OpenAI error object
# ---------------------------------------------------------------------------------------------
GOOD = {"model": "孙悟空", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
BAD_REQUESTS = [  # (id, body or raw bytes, status, param)
    ("not_json", b"{\"model\": ", 400, None),
    ("not_utf8", "{\"model\": \"孙悟空\"}".encode("gbk"), 400, None),
    ("body_not_object", [GOOD], 400, None),
    ("no_model", {"messages": GOOD["messages"]}, 400, "model"),
    ("model_wrong_type", {**GOOD, "model": 5}, 400, "model"),
    ("unknown_model", {**GOOD, "model": "无名氏"}, 404, "model"),
    ("no_messages", {"model": "孙悟空"}, 400, "messages"),
    ("empty_messages", {**GOOD, "messages": []}, 400, "messages"),
    ("messages_wrong_type", {**GOOD, "messages": "你好"}, 400, "messages"),
    ("message_not_object", {**GOOD, "messages": ["你好"]}, 400, "messages[0]"),
    ("bad_role", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("content_wrong_type", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image_part", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0]"),
    ("over_input_cap", {**GOOD, "messages": [{"role": "user", "content": "好" * (CAP + 1)}]}, 400,
     "messages[0].content"),
    ("last_not_user", {**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages[1].role"),
    ("empty_user", {**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content"),
    ("late_system", {**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                          {"role": "user", "content": "c"}]}, 400, "messages[1].role"),
    ("max_tokens_zero", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens_too_big", {**GOOD, "max_tokens": 10**6}, 400, "max_tokens"),
    ("max_tokens_wrong_type", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens_float", {**GOOD, "max_tokens": 4.5}, 400, "max_tokens"),
    ("temperature_too_high", {**GOOD, "temperature": 2.5}, 400, "temperature"),
    ("temperature_wrong_type", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("top_p_zero", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top_p_too_high", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("frequency_penalty_too_high", {**GOOD, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("frequency_penalty_wrong_type", {**GOOD, "frequency_penalty": "some"}, 400, "frequency_penalty"),
    ("presence_penalty", {**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("stop_wrong_type", {**GOOD, "stop": 5}, 400, "stop"),
    ("stop_too_many", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("seed_wrong_type", {**GOOD, "seed": "x"}, 400, "seed"),
    ("stream_wrong_type", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("n_two", {**GOOD, "n": 2}, 400, "n"),
    ("tools", {**GOOD, "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.mark.parametrize("case, body, status, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_an_error_object(server: web_demo.Server, case: str, body: Any, status: int,
                                          param: str | None) -> None:
    for stream in (False, True):  # refused before any stream starts
        if isinstance(body, dict) and stream:
            body = {**body, "stream": True} if case != "stream_wrong_type" else body
        r = post(server, None, raw=body) if isinstance(body, bytes) else post(server, body)
        assert r.status_code == status, (r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param and error["type"] == "invalid_request_error"


def test_server_survives_bad_requests_and_odd_paths(server: web_demo.Server, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(server.url + "v1/no/such/thing", headers=headers, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert httpx.get(server.url + "v1/models/无名氏", headers=headers, timeout=30).status_code == 404
    budget = {**GOOD, "max_tokens": 256, "messages": [{"role": "user", "content": "好" * CAP}]}
    r = post(server, budget)  # over the prompt budget of the 512-token context: refused, not crashed
    assert r.status_code in (200, 400), r.text
    assert ask(client, "刻晴", temperature=0, max_tokens=4)["text"] is not None


# ---------------------------------------------------------------------------------------------
# The API key and the bounded queue
# ---------------------------------------------------------------------------------------------
def test_api_key_is_required(server: web_demo.Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        for method, path in (("GET", "v1/models"), ("POST", "v1/chat/completions"), ("GET", "v1/other")):
            r = httpx.request(method, server.url + path, headers=headers, json=GOOD, timeout=30)
            assert r.status_code == 401, (headers, path, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
    bad_client = openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
    assert httpx.get(server.url + "config", timeout=30).status_code == 401  # the page asks for a login too
    lower = httpx.get(server.url + "v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=30)
    assert lower.status_code == 200


def test_full_queue_answers_429_at_once(loaded: tuple[Any, Any], profiles: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = loaded[0]
    original = model.generate
    entered, release = threading.Event(), threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", gated)
    srv = start(web_demo.ChatBackend(*loaded, profiles), concurrency=1, queue_size=1)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, srv, GOOD)
            assert entered.wait(60)
            waiting = pool.submit(post, srv, {**GOOD, "stream": True})
            time.sleep(0.5)  # admitted: it waits in the queue
            t0 = time.perf_counter()
            refused = post(srv, GOOD)
            assert time.perf_counter() - t0 < 5
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert refused.headers.get("retry-after") == "1"
            assert not running.done() and not waiting.done()
            release.set()
            assert running.result(60).status_code == 200 and waiting.result(60).status_code == 200
        assert post(srv, GOOD).status_code == 200  # the slots were given back
    finally:
        release.set()
        srv.close()


# ---------------------------------------------------------------------------------------------
# Per-role adapters on one base
# ---------------------------------------------------------------------------------------------
def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = loading.load_model_for_inference(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=loading.find_all_linear_names(model)))
    peft_model.save_pretrained(out)
    return out


def test_two_adapters_concurrent_mixed_roles(tiny_model_dir: Path, tmp_path: Path, profiles_path: Path,
                                             profiles: dict[str, str]) -> None:
    """20 concurrent requests over three roles (two with their own adapter, one on the base), streamed and
    not: each answer equals that role's adapter alone (greedy)."""
    adapters = {"孙悟空": random_adapter(tiny_model_dir, tmp_path / "a", 1),
                "刻晴": random_adapter(tiny_model_dir, tmp_path / "b", 2)}
    questions = [QUESTION, "你会用什么元素？"]
    expected = {}
    for role in ROLES:
        adapter = str(adapters[role]) if role in adapters else None
        model, tokenizer = loading.load_model_for_inference(str(tiny_model_dir), device="cpu", adapter_dir=adapter)
        for q in questions:
            expected[role, q] = reference(model, tokenizer, profiles, role, q, 10)
    assert len({expected[r, QUESTION] for r in ROLES}) == 3, "the adapters do not change the answer"

    args = web_demo.parse_args(["--model_path", str(tiny_model_dir), "--desc_path", str(profiles_path),
                                "--device", "cpu", *(f"--adapter={r}={p}" for r, p in adapters.items())])
    web_demo.check_args(args)
    srv = start(web_demo.local_backend(args, profiles), concurrency=4, queue_size=32)
    try:
        client = openai.OpenAI(base_url=srv.url + "v1", api_key=KEY, max_retries=0, timeout=120)
        entries = {m.id: m.model_extra.get("adapter") for m in client.models.list().data}
        assert entries == {"孙悟空": str(adapters["孙悟空"]), "刻晴": str(adapters["刻晴"]), "赵子龙": None}
        jobs = [(list(ROLES)[i % 3], questions[i % 2], i % 4 == 0) for i in range(20)]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda j: ask(client, j[0], j[1], stream=j[2], temperature=0,
                                                  max_tokens=10)["text"], jobs))
        for (role, q, _), answer in zip(jobs, answers, strict=True):
            assert answer == expected[role, q], (role, q)
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------
# The page as a client of an OpenAI-compatible server (--api_base)
# ---------------------------------------------------------------------------------------------
def test_page_backend_against_a_remote_server(server: web_demo.Server, profiles_path: Path) -> None:
    args = web_demo.parse_args(["--api_base", server.url + "v1", "--api_key", KEY, "--desc_path", str(profiles_path)])
    web_demo.check_args(args)
    backend = web_demo.remote_backend(args)
    assert list(backend.profiles) == list(ROLES) and backend.profiles["刻晴"] == ROLES["刻晴"]
    assert backend.max_new_tokens_limit() == 256  # half the tiny model's context, from the server's model list
    outputs = list(web_demo.respond(backend, "你好", [], "刻晴", 6, 0.8, 0.3))
    final = outputs[-1][0]
    assert [m["role"] for m in final] == ["user", "assistant"] and isinstance(final[1]["content"], str)
    with pytest.warns(UserWarning, match="max_tokens must be between 1 and 256"):  # the server's error, shown
        list(web_demo.respond(backend, "你好", [], "刻晴", 300, 0.8, 0.3))
    wrong = web_demo.parse_args(["--api_base", server.url + "v1", "--api_key", "wrong"])
    with pytest.raises(utils.UserError, match="401"):
        web_demo.remote_backend(wrong)
