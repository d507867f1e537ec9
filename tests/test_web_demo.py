"""web_demo.py without a browser: the request handlers, the page's wiring, and a launched app over HTTP.

The handlers run on the tiny random Baichuan2 model (`tiny_model_dir`); a spy on `model.generate` records
the prompt ids and generation config each request hands to the model (and caps the tokens generated, so
the tests stay fast).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

import utils
import web_demo
from roleplay import generation, loading
from tools.harness import free_port

ROLES = {
    "孙悟空": "齐天大圣，花果山美猴王，性格桀骜不驯、机智勇敢",
    "刻晴": "璃月七星之一的玉衡星，雷元素使用者，做事雷厉风行",
}
EXTRA_ROLE = "测试角色甲"  # only in the temp profiles file: the page must list it without code changes


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profiles_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "profiles.json"
    path.write_text(json.dumps({**ROLES, EXTRA_ROLE: "一个只为测试而存在的角色"}, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def profiles(profiles_path: Path) -> dict[str, str]:
    return utils.load_profiles(profiles_path)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, so base and fine-tuned replies differ."""
    from peft import LoraConfig, get_peft_model

    model, _ = loading.load_model_for_inference(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=loading.find_all_linear_names(model)))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded_adapter(tiny_model_dir: Path, adapter_dir: Path) -> tuple[Any, Any]:
    return loading.load_model_for_inference(str(tiny_model_dir), adapter_dir=str(adapter_dir), device="cpu")


@pytest.fixture()
def backend(loaded: tuple[Any, Any], profiles: dict[str, str]) -> web_demo.ChatBackend:
    model, tokenizer = loaded
    return web_demo.ChatBackend(model, tokenizer, profiles, max_input_chars=50)


class GenerateSpy:
    """Replaces `model.generate`: records prompt ids, generation config and adapter state, then generates
    at most `cap` tokens."""

    def __init__(self, model: Any, cap: int = 3) -> None:
        self.model, self.cap, self.calls = model, cap, []
        self.original = model.generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        config = kwargs["generation_config"]
        self.calls.append({"ids": kwargs["input_ids"][0].tolist(), "config": copy.deepcopy(config),
                           "adapters_disabled": adapters_disabled(self.model)})
        run = copy.deepcopy(config)
        run.max_new_tokens = min(run.max_new_tokens, self.cap)
        return self.original(*args, **{**kwargs, "generation_config": run})


def adapters_disabled(model: Any) -> bool | None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return all(m.disable_adapters for m in layers) if layers else None


@pytest.fixture()
def spy(loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> GenerateSpy:
    spy = GenerateSpy(loaded[0])
    monkeypatch.setattr(loaded[0], "generate", spy)
    return spy


def run_all(gen: Any) -> list[Any]:
    return list(gen)


# ---------------------------------------------------------------------------------------------
# Pure request logic
# ---------------------------------------------------------------------------------------------
def test_check_input_caps_length() -> None:
    assert web_demo.check_input("你好", 10) is None
    assert web_demo.check_input("好" * 10, 10) is None
    message = web_demo.check_input("好" * 11, 10)
    assert message is not None and "11" in message and "10" in message
    assert web_demo.check_input("   ", 10) is not None
    assert web_demo.check_input(None, 10) is not None


def test_build_messages_uses_role_system_prompt(profiles: dict[str, str]) -> None:
    history = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "俺老孙！"},
               {"role": "assistant", "content": [{"type": "text", "text": "Gradio 的格式"}]},
               {"role": "system", "content": "dropped"}, "junk"]
    messages = web_demo.build_messages("孙悟空", history, "你住在哪里？", profiles)
    assert messages[0] == {"role": "system", "content": utils.role_system_prompt("孙悟空", profiles)}
    assert messages[1:] == [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "俺老孙！"},
                            {"role": "assistant", "content": "Gradio 的格式"},
                            {"role": "user", "content": "你住在哪里？"}]
    with pytest.raises(utils.UserError, match="unknown role"):
        web_demo.build_messages("无名氏", [], "你好", profiles)


def test_generation_overrides_are_clamped() -> None:
    assert web_demo.generation_overrides(100.4, 0.5, 0.7) == {
        "max_new_tokens": 100, "top_p": 0.5, "temperature": 0.7, "do_sample": True}
    high = web_demo.generation_overrides(10**6, 3.0, 9.0)
    assert (high["max_new_tokens"], high["top_p"], high["temperature"]) == (2048, 1.0, 2.0)
    low = web_demo.generation_overrides(-5, -1.0, 0.0)
    assert (low["max_new_tokens"], low["top_p"], low["temperature"]) == (0, 0.0, 0.01)


# ---------------------------------------------------------------------------------------------
# The handler and the model: same prompt as training, budget, sliders, streaming
# ---------------------------------------------------------------------------------------------
def test_prompt_ids_equal_training_prompt(backend: web_demo.ChatBackend, spy: GenerateSpy,
                                          profiles: dict[str, str]) -> None:
    tokenizer, model = backend.tokenizer, backend.model
    outputs = run_all(web_demo.respond(backend, "你叫什么名字？", [], "孙悟空", 8, 0.8, 0.3))
    assert len(spy.calls) == 1
    system = utils.role_system_prompt("孙悟空", profiles)
    ids, labels, _ = utils.build_training_sample(tokenizer, system, "你叫什么名字？", "我是齐天大圣。", max_src_len=400,
                                                 max_len=512, generation_config=model.generation_config)
    prompt = ids[:next(i for i, label in enumerate(labels) if label != -100)]
    assert spy.calls[0]["ids"] == prompt
    assert prompt[-1] == model.generation_config.assistant_token_id

    # A second turn carries the whole conversation, exactly as the shared builder lays it out.
    history = outputs[-1][0]
    run_all(web_demo.respond(backend, "你住在哪里？", history, "孙悟空", 8, 0.8, 0.3))
    messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": "你住在哪里？"}]
    config = spy.calls[1]["config"]
    assert spy.calls[1]["ids"] == utils.build_prompt_ids(tokenizer, messages,
                                                         generation.max_input_tokens(model, config), config)
    assert len(spy.calls[1]["ids"]) > len(prompt)


def test_history_is_cut_to_budget_oldest_first(backend: web_demo.ChatBackend, spy: GenerateSpy,
                                               profiles: dict[str, str]) -> None:
    tokenizer, model = backend.tokenizer, backend.model
    history = []
    for i in range(1, 7):
        history += [{"role": "user", "content": f"第{i}轮：花果山在哪里？请你回答我的一些问题。"},
                    {"role": "assistant", "content": f"答{i}：我喜欢吃桃子和香蕉，我们一起去花果山吧！"}]
    user = "第7轮：你喜欢吃什么？"
    system = utils.role_system_prompt("孙悟空", profiles)
    messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": user}]
    full = utils.build_prompt_ids(tokenizer, messages, 10**9, model.generation_config)
    kept = [{"role": "system", "content": system}, *history[-4:], {"role": "user", "content": user}]
    budget = len(utils.build_prompt_ids(tokenizer, kept, 10**9, model.generation_config)) + 3  # 2 rounds fit
    max_new_tokens = generation.context_length(model) - budget  # the sliders' value sets the prompt budget
    run_all(web_demo.respond(backend, user, history, "孙悟空", max_new_tokens, 0.8, 0.3))
    ids = spy.calls[0]["ids"]
    assert ids == utils.build_prompt_ids(tokenizer, messages, budget, model.generation_config)
    assert len(ids) <= budget < len(full)
    text = tokenizer.decode(ids)
    assert text.startswith(system)  # the system prompt stays
    assert all(f"第{i}轮" in text and f"答{i}" in text for i in (5, 6)) and "第7轮" in text  # newest stay
    assert not any(f"第{i}轮" in text or f"答{i}" in text for i in range(1, 5))  # oldest dropped


def test_sliders_reach_generation(backend: web_demo.ChatBackend, spy: GenerateSpy) -> None:
    run_all(web_demo.respond(backend, "你好", [], "刻晴", 7, 0.55, 1.23))
    config = spy.calls[0]["config"]
    assert (config.max_new_tokens, config.top_p, config.temperature, config.do_sample) == (7, 0.55, 1.23, True)
    run_all(web_demo.respond(backend, "你好", [], "刻晴", 21, 0.9, 0.05))
    config = spy.calls[1]["config"]
    assert (config.max_new_tokens, config.top_p, config.temperature) == (21, 0.9, 0.05)


def test_reply_streams_into_history(backend: web_demo.ChatBackend, spy: GenerateSpy) -> None:
    spy.cap = 12
    torch.manual_seed(0)
    outputs = run_all(web_demo.respond(backend, "你好", [{"role": "user", "content": "早"},
                                                        {"role": "assistant", "content": "早上好"}],
                                       "孙悟空", 12, 0.8, 0.3))
    first_history, first_box = outputs[0]
    assert first_box == "" and first_history[-1] == {"role": "user", "content": "你好"}  # shown at once
    assert len(outputs) >= 3  # the user turn, then the growing reply
    final = outputs[-1][0]
    assert [m["role"] for m in final] == ["user", "assistant", "user", "assistant"]
    replies = [h[-1]["content"] for h, _ in outputs[1:]]
    assert all(isinstance(r, str) for r in replies) and final[-1]["content"] == replies[-1]


def test_over_long_input_is_refused(backend: web_demo.ChatBackend, spy: GenerateSpy) -> None:
    history = [{"role": "user", "content": "早"}, {"role": "assistant", "content": "早上好"}]
    text = "好" * (backend.max_input_chars + 1)
    with pytest.warns(UserWarning, match=f"limit is {backend.max_input_chars}"):
        outputs = run_all(web_demo.respond(backend, text, history, "孙悟空", 8, 0.8, 0.3))
    assert outputs == [(history, text)]  # conversation unchanged, the text stays in the box to edit
    with pytest.warns(UserWarning, match="Type a message"):
        assert run_all(web_demo.respond(backend, "  ", history, "孙悟空", 8, 0.8, 0.3)) == [(history, "  ")]
    with pytest.warns(UserWarning, match="Max new tokens is 0"):
        run_all(web_demo.respond(backend, "你好", history, "孙悟空", 0, 0.8, 0.3))
    with pytest.warns(UserWarning, match="Unknown role"):
        run_all(web_demo.respond(backend, "你好", history, "无名氏", 8, 0.8, 0.3))
    assert spy.calls == []


def test_empty_reply_warns(backend: web_demo.ChatBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "chat_stream", lambda *args: iter(()))  # the model ended at once
    with pytest.warns(UserWarning, match="empty reply"):
        outputs = run_all(web_demo.respond(backend, "你好", [], "孙悟空", 8, 0.8, 0.3))
    assert outputs[-1] == ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": ""}], "")


def test_budget_error_becomes_warning(backend: web_demo.ChatBackend, spy: GenerateSpy) -> None:
    too_many = generation.context_length(backend.model)  # leaves no room for the prompt
    with pytest.warns(UserWarning, match="max_new_tokens"):
        outputs = run_all(web_demo.respond(backend, "你好", [], "孙悟空", too_many, 0.8, 0.3))
    assert outputs[-1] == ([], "你好") and spy.calls == []


def test_closing_a_reply_does_not_wait_for_generation(backend: web_demo.ChatBackend,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear / role switch cancel the handler; Gradio closes it on its event loop, which must not block
    while the rest of the generation runs."""
    closed = threading.Event()

    def slow_stream(*args: Any) -> Any:
        try:
            yield "a"
            yield "ab"
        finally:
            time.sleep(1.5)  # chat_stream's close joins the generation thread
            closed.set()

    monkeypatch.setattr(generation, "chat_stream", slow_stream)
    gen = web_demo.respond(backend, "你好", [], "孙悟空", 8, 0.8, 0.3)
    next(gen), next(gen)
    t0 = time.perf_counter()
    gen.close()
    assert time.perf_counter() - t0 < 0.75
    assert closed.wait(5)


# ---------------------------------------------------------------------------------------------
# Compare mode: one base model, adapter toggled
# ---------------------------------------------------------------------------------------------
def test_compare_toggles_adapter(loaded_adapter: tuple[Any, Any], profiles: dict[str, str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = loaded_adapter
    backend = web_demo.ChatBackend(model, tokenizer, profiles)
    assert backend.has_adapter
    spy = GenerateSpy(model, cap=4)
    monkeypatch.setattr(model, "generate", spy)
    outputs = run_all(web_demo.respond_compare(backend, "你好", [], [], "孙悟空", 4, 0.8, 0.3))
    assert [c["adapters_disabled"] for c in spy.calls] == [True, False]  # base reply, then fine-tuned
    assert spy.calls[0]["ids"] == spy.calls[1]["ids"]  # same message, same prompt
    base, tuned, box = outputs[-1]
    assert box == "" and [m["role"] for m in base] == [m["role"] for m in tuned] == ["user", "assistant"]
    assert adapters_disabled(model) is False

    # Each side continues its own conversation.
    run_all(web_demo.respond_compare(backend, "再见", base, tuned, "孙悟空", 4, 0.8, 0.3))
    system = utils.role_system_prompt("孙悟空", profiles)
    for call, history in zip(spy.calls[2:], (base, tuned), strict=True):
        messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": "再见"}]
        assert call["ids"] == utils.build_prompt_ids(
            tokenizer, messages, generation.max_input_tokens(model, call["config"]), call["config"])

    # Cancelled in the middle of the base reply: adapter back on, lock free.
    gen = web_demo.respond_compare(backend, "你好", [], [], "孙悟空", 4, 0.8, 0.3)
    next(gen), next(gen)
    gen.close()
    assert adapters_disabled(model) is False
    assert backend.lock.acquire(blocking=False)
    backend.lock.release()


def test_compare_refuses_over_long_input(loaded_adapter: tuple[Any, Any], profiles: dict[str, str]) -> None:
    backend = web_demo.ChatBackend(*loaded_adapter, profiles, max_input_chars=5)
    with pytest.warns(UserWarning, match="limit is 5"):
        assert run_all(web_demo.respond_compare(backend, "123456", [], [], "孙悟空", 4, 0.8, 0.3)) == [
            ([], [], "123456")]


# ---------------------------------------------------------------------------------------------
# The page's wiring and a launched app
# ---------------------------------------------------------------------------------------------
def _components(config: dict) -> dict[int, dict]:
    return {c["id"]: c for c in config["components"]}


def _find(config: dict, kind: str, label: str | None = None) -> dict:
    return next(c for c in config["components"] if c["type"] == kind
                and (label is None or c["props"].get("label") == label))


@pytest.mark.parametrize("compare", [False, True])
def test_role_switch_and_clear_reset_the_conversation(backend: web_demo.ChatBackend, compare: bool) -> None:
    demo = web_demo.build_ui(backend, compare=compare)
    config = demo.get_config_file()
    comps = _components(config)
    role = _find(config, "dropdown", "Role")["id"]
    clear = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "clear")
    chats = sorted(i for i, c in comps.items() if c["type"] == "chatbot")
    states = sorted(i for i, c in comps.items() if c["type"] == "state")
    assert len(chats) == len(states) == (2 if compare else 1)
    deps = config["dependencies"]
    chat_dep = next(i for i, d in enumerate(deps) if d["api_name"] == "chat")
    assert set(states) <= set(deps[chat_dep]["inputs"]) and set(states) <= set(deps[chat_dep]["outputs"])
    for trigger in ((role, "change"), (clear, "click"), *((chat, "clear") for chat in chats)):
        wired = [i for i, d in enumerate(deps) if list(trigger) in [list(t) for t in d["targets"]]]
        resets = [i for i in wired if set(chats + states) <= set(deps[i]["outputs"])]
        assert resets, f"{trigger} does not reset the conversation"
        assert any(chat_dep in deps[i]["cancels"] for i in wired), f"{trigger} does not stop a running reply"
        fn = demo.fns[resets[0]].fn
        values = fn("刻晴") if trigger[1] == "change" else fn()
        outputs = dict(zip(deps[resets[0]]["outputs"], values, strict=True))
        assert all(outputs[i] == [] for i in chats + states)
    if compare:
        labels = [comps[i]["props"]["label"] for i in chats]
        assert labels == [web_demo.BASE_LABEL, web_demo.FINETUNED_LABEL]
        assert demo.fns[chat_dep].concurrency_limit == 1  # adapter toggling: one compare request at a time


@pytest.fixture(scope="module")
def launched(loaded: tuple[Any, Any], profiles: dict[str, str]) -> Any:
    backend = web_demo.ChatBackend(*loaded, profiles)
    app = web_demo.build_app(backend, api_config=web_demo.api.ApiConfig(), concurrency=2)
    server = web_demo.serve(app, host="127.0.0.1", port=free_port(), block=False)
    yield server.url
    server.close()


def test_enter_sends_and_shift_enter_breaks_the_line(backend: web_demo.ChatBackend) -> None:
    """Gradio's textbox sends on Enter only when it is one line high (lines=1; it grows to max_lines), and
    Shift+Enter then inserts a newline; a box of 2+ lines would send on Shift+Enter only. The browser test
    presses the keys."""
    config = web_demo.build_ui(backend).get_config_file()
    box = next(c for c in config["components"] if c["props"].get("elem_id") == "user-input")
    assert box["props"]["lines"] == 1 and box["props"]["max_lines"] > 1
    assert "Enter sends" in box["props"]["placeholder"] and "Shift+Enter" in box["props"]["placeholder"]
    deps = config["dependencies"]
    chat = next(d for d in deps if d["api_name"] == "chat")
    assert [box["id"], "submit"] in [list(t) for t in chat["targets"]]


def test_page_and_api_share_one_port(launched: str) -> None:
    with urllib.request.urlopen(launched + "v1/models", timeout=30) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [*ROLES, EXTRA_ROLE]
    with urllib.request.urlopen(launched + "config", timeout=30) as r:
        assert json.load(r)["components"]


def test_role_adapters_follow_the_role_on_the_page(tiny_model_dir: Path, adapter_dir: Path, profiles_path: Path,
                                                   profiles: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--adapter ROLE=PATH: the page's reply for that role runs its adapter, another role the base; a reply
    closed early stops in the background and frees the adapter switch."""
    args = web_demo.parse_args(["--model_path", str(tiny_model_dir), "--desc_path", str(profiles_path),
                                "--device", "cpu", "--adapter", f"孙悟空={adapter_dir}"])
    backend = web_demo.local_backend(args, profiles)
    model = backend.model
    spy = GenerateSpy(model, cap=3)
    original_call = spy.__call__

    def record_active(*a: Any, **k: Any) -> Any:
        out = original_call(*a, **k)
        spy.calls[-1]["active"] = model.active_adapter
        return out

    monkeypatch.setattr(model, "generate", record_active)
    run_all(web_demo.respond(backend, "你好", [], "孙悟空", 3, 0.8, 0.3))
    run_all(web_demo.respond(backend, "你好", [], "刻晴", 3, 0.8, 0.3))
    assert [(c["adapters_disabled"], c["active"]) for c in spy.calls] == [(False, backend.role_adapters["孙悟空"]),
                                                                          (True, backend.role_adapters["孙悟空"])]
    assert backend.role_adapters["刻晴"] is None
    spy.cap = 50
    gen = web_demo.respond(backend, "你好", [], "孙悟空", 50, 0.8, 0.3)
    next(gen), next(gen)
    gen.close()
    from roleplay import adapters

    lock = adapters.model_lock(backend.model)
    deadline = time.monotonic() + 30
    while not lock.acquire(blocking=False):  # the worker thread stops after its current token
        assert time.monotonic() < deadline, "the adapter switch stayed locked"
        time.sleep(0.05)
    lock.release()


def test_config_lists_roles_from_profiles_file(launched: str, profiles: dict[str, str]) -> None:
    with urllib.request.urlopen(launched.rstrip("/") + "/config", timeout=30) as r:
        config = json.load(r)
    dropdown = _find(config, "dropdown", "Role")
    choices = [c[1] if isinstance(c, list | tuple) else c for c in dropdown["props"]["choices"]]
    assert choices == list(profiles) and EXTRA_ROLE in choices
    assert _find(config, "chatbot", "Role-Playing")
    sliders = {c["props"]["label"]: c["props"] for c in config["components"] if c["type"] == "slider"}
    assert sliders["Top-p"]["value"] == 0.8 and (sliders["Top-p"]["minimum"], sliders["Top-p"]["maximum"]) == (0, 1)
    assert sliders["Temperature"]["value"] == 0.3  # the tiny model's generation_config.json
    assert (sliders["Temperature"]["minimum"], sliders["Temperature"]["maximum"]) == (0.01, 2)
    assert sliders["Max new tokens"]["minimum"] == 0
    assert sliders["Max new tokens"]["maximum"] == 256  # half the tiny model's 512-token context
    assert {c["type"] for c in config["components"]} >= {"textbox", "button", "state"}
    assert config["enable_queue"] is True


def test_sessions_are_separate_and_a_slow_reply_blocks_no_one(launched: str, loaded: tuple[Any, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply that hangs in `generate` (until the test releases it) must not hold up another session."""
    from gradio_client import Client

    model = loaded[0]
    original = model.generate
    entered, release = threading.Event(), threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        config = copy.deepcopy(kwargs["generation_config"])
        if config.max_new_tokens == 100:  # the "slow" request
            entered.set()
            release.wait(60)
        config.max_new_tokens = min(config.max_new_tokens, 3)
        return original(*args, **{**kwargs, "generation_config": config})

    monkeypatch.setattr(model, "generate", gated)
    slow_client, fast_client = Client(launched, verbose=False), Client(launched, verbose=False)
    slow = slow_client.submit("你好，请讲一个很长的故事", "孙悟空", 100, 0.8, 0.3, api_name="/chat")
    try:
        assert entered.wait(60), "the slow request never reached the model"
        chat, box = fast_client.predict("你是谁？", "刻晴", 2, 0.8, 0.3, api_name="/chat")
        assert not slow.done()
    finally:
        release.set()
    assert box == "" and chat[0]["content"][0]["text"] == "你是谁？"
    slow_chat, _ = slow.result(timeout=60)
    assert slow_chat[0]["content"][0]["text"] == "你好，请讲一个很长的故事"
    # A second turn in the fast session sees only its own conversation.
    chat, _ = fast_client.predict("再见", "刻晴", 2, 0.8, 0.3, api_name="/chat")
    assert [m["content"][0]["text"] for m in chat if m["role"] == "user"] == ["你是谁？", "再见"]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def test_missing_model_folder_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 profiles_path: Path) -> None:
    rc = utils.run_main(web_demo.main, ["--model_path", str(tmp_path / "nope"), "--desc_path", str(profiles_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --model_path") and "\n" not in err


def test_compare_needs_adapter(tiny_model_dir: Path, capsys: pytest.CaptureFixture, profiles_path: Path) -> None:
    rc = utils.run_main(web_demo.main, ["--model_path", str(tiny_model_dir), "--desc_path", str(profiles_path),
                                        "--compare"])
    assert rc == 2 and "--compare needs --adapter_dir" in capsys.readouterr().err


def test_non_loopback_host_needs_a_key_or_insecure(tiny_model_dir: Path, capsys: pytest.CaptureFixture,
                                                   profiles_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_load(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise utils.UserError("stop before loading")

    monkeypatch.setattr(loading, "load_model_for_inference", fake_load)
    monkeypatch.delenv(web_demo.api.API_KEY_ENV, raising=False)
    argv = ["--model_path", str(tiny_model_dir), "--desc_path", str(profiles_path), "--host", "0.0.0.0",
            "--device", "0", "--port", str(free_port())]
    rc = utils.run_main(web_demo.main, argv)  # no key: refused before loading, one line
    err = capsys.readouterr().err
    assert rc == 2 and not seen and err.count("\n") == 1
    assert "error: --host 0.0.0.0 is not a loopback address and no API key is set" in err and "--insecure" in err
    rc = utils.run_main(web_demo.main, [*argv, "--insecure"])
    err = capsys.readouterr().err
    assert rc == 2 and "warning: --host 0.0.0.0 is not a loopback address" in err and "stop before loading" in err
    assert seen["device"] == "cuda:0"
    for extra, env in ((["--api_key", "k"], None), ([], "k")):  # a key (flag or environment) is enough
        seen.clear()
        if env:
            monkeypatch.setenv(web_demo.api.API_KEY_ENV, env)
        assert utils.run_main(web_demo.main, [*argv, *extra]) == 2 and seen
        assert "warning" not in capsys.readouterr().err
    utils.run_main(web_demo.main, ["--model_path", str(tiny_model_dir), "--desc_path", str(profiles_path)])
    assert "warning" not in capsys.readouterr().err


def test_busy_port_fails_before_loading(tiny_model_dir: Path, capsys: pytest.CaptureFixture, profiles_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_model_for_inference", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = utils.run_main(web_demo.main, ["--model_path", str(tiny_model_dir), "--desc_path", str(profiles_path),
                                            "--port", str(port)])
    assert rc == 2 and f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_defaults_are_safe() -> None:
    args = web_demo.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.max_input_chars == 1000 and not args.compare
    assert all(web_demo.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(web_demo.is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.com"))
