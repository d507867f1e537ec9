"""Chat with a role-playing model in the browser (Gradio 6), and through an OpenAI-compatible API.

Pick a role (the list comes from the profiles file), type a message (Enter sends, Shift+Enter breaks the
line), and the reply streams in token by token. The whole conversation goes to the model with the role's
system prompt, built by the same prompt builder training uses (`utils.build_prompt_ids`, which drops the
oldest turns to fit the length budget). Switching role starts a fresh conversation. With `--compare` the
page shows the base model's and the fine-tuned model's replies side by side (one loaded base model, the
LoRA adapter toggled off for the base reply).

The same process and port serve the OpenAI-compatible API (`roleplay/api.py`): `GET /v1/models` (one
model per role), `POST /v1/chat/completions` (`model` = the role's name; `stream: true` for server-sent
events). `--api_only` serves the API without the page. `--adapter ROLE=PATH` (repeatable) loads one
LoRA adapter per role on one base model; each request (page or API) runs its role's adapter, and a role
without one runs the --adapter_dir adapter, or the base. `--api_base URL` turns the page into a client
of any OpenAI-compatible server (no local model is loaded).

Examples:
    python web_demo.py --model_path output/merged --desc_path data/profiles-zh_desc.json
    python web_demo.py --model_path output/tiny-baichuan2-chat --adapter_dir output/qlora --compare --device cpu
    python web_demo.py --model_path output/tiny-baichuan2-chat --adapter 孙悟空=output/a --adapter 赵子龙=output/b
    ROLEPLAY_API_KEY=secret python web_demo.py --model_path output/merged --host 0.0.0.0 --api_only
    python web_demo.py --api_base http://gpu-box:8000/v1 --api_key secret   # the page as a remote client
Then open http://127.0.0.1:7860 (API: http://127.0.0.1:7860/v1). The server binds to 127.0.0.1 unless
--host says otherwise; binding another address needs an API key (--api_key or $ROLEPLAY_API_KEY, which
then also guards the page: log in with any user name and the key as password) or an explicit --insecure.
"""

from __future__ import annotations

import argparse
import hmac
import html
import ipaddress
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import gradio as gr

import utils
from roleplay import api, generation, loading

Message = dict[str, str]  # {"role": "user"|"assistant", "content": str}

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_INPUT_CHARS = 1000
DEFAULT_CONCURRENCY = 4
DEFAULT_QUEUE_SIZE = 64
MAX_NEW_TOKENS_RANGE = (0, 2048)
DEFAULT_MAX_NEW_TOKENS = 512
TOP_P_RANGE = (0.0, 1.0)
DEFAULT_TOP_P = 0.8
TEMPERATURE_RANGE = (0.01, 2.0)
FALLBACK_TEMPERATURE = 0.3  # when the model's generation config has none
CHAT_LABEL = "Role-Playing"
BASE_LABEL = "Base model"
FINETUNED_LABEL = "Fine-tuned"
EMPTY_REPLY = "The model ended its reply at once (empty reply). Send again, or raise the temperature."
CHAT_BUTTONS = ["copy", "copy_all"]  # no "share" (to Hugging Face): the demo is local


# ---------------------------------------------------------------------------------------------
# Request logic: pure functions, no Gradio components (unit tests call these directly)
# ---------------------------------------------------------------------------------------------
def check_input(text: str | None, cap: int) -> str | None:
    """Why `text` cannot be sent (empty, or longer than `cap` characters), or None when it is fine."""
    text = text or ""
    if not text.strip():
        return "Type a message first."
    if len(text) > cap:
        return f"Your message has {len(text)} characters; the limit is {cap}. Please shorten it."
    return None


def clean_history(history: Sequence[Any] | None) -> list[Message]:
    """The conversation as plain {"role", "content": str} user/assistant messages (anything else dropped)."""
    out: list[Message] = []
    for message in history or []:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue
        content = message.get("content")
        if isinstance(content, list):  # Gradio's normalized form: [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
    return out


def build_messages(role: str, history: Sequence[Any] | None, user_text: str,
                   profiles: dict[str, str]) -> list[Message]:
    """The model's input: the role's system prompt, the conversation so far, and the new user message.

    Length is not handled here: the prompt builder (`utils.build_prompt_ids`) drops the oldest turns.
    Raises utils.DataError for a role not in `profiles`.
    """
    system = utils.role_system_prompt(role, profiles)
    return [{"role": "system", "content": system}, *clean_history(history), {"role": "user", "content": user_text}]


def generation_overrides(max_new_tokens: float, top_p: float, temperature: float) -> dict[str, Any]:
    """Slider values -> `generation.generation_config_for` overrides, clamped to the sliders' ranges
    (a client can send anything through the API)."""
    return {
        "max_new_tokens": int(min(max(round(max_new_tokens), MAX_NEW_TOKENS_RANGE[0]), MAX_NEW_TOKENS_RANGE[1])),
        "top_p": float(min(max(top_p, TOP_P_RANGE[0]), TOP_P_RANGE[1])),
        "temperature": float(min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])),
        "do_sample": True,
    }


class ChatBackend:
    """The loaded model and what every request needs; the only state shared between sessions.

    Conversations live in each browser session's `gr.State`, never here. In compare mode the adapter is
    switched off for the base reply, which changes the shared model, so compare requests (and API
    requests in compare mode) hold `lock`. With per-role adapters (`switch`, `role_adapters`), every
    generation runs inside `switch.using(the role's adapter)`, which holds the switch's own lock for the
    whole generation, so concurrent requests for different roles never see each other's adapter.
    """

    def __init__(self, model: Any, tokenizer: Any, profiles: dict[str, str],
                 max_input_chars: int = DEFAULT_MAX_INPUT_CHARS, switch: Any = None,
                 role_adapters: dict[str, str] | None = None, adapter_paths: dict[str, str] | None = None,
                 compare: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.profiles = profiles
        self.max_input_chars = max_input_chars
        self.lock = threading.Lock()
        self.switch = switch
        self.role_adapters = role_adapters or {}  # role -> PEFT adapter name
        self.adapter_paths = adapter_paths or {}  # role -> adapter folder (for /v1/models)
        self.compare = compare

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def default_temperature(self) -> float:
        t = getattr(getattr(self.model, "generation_config", None), "temperature", None)
        t = FALLBACK_TEMPERATURE if not isinstance(t, int | float) or t <= 0 else float(t)
        return min(max(t, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])

    def max_new_tokens_limit(self) -> int:
        """Slider maximum: 2048, but at most half the context window (the rest is the prompt's)."""
        try:
            context = generation.context_length(self.model)
        except (utils.UserError, AttributeError):
            return MAX_NEW_TOKENS_RANGE[1]
        return max(1, min(MAX_NEW_TOKENS_RANGE[1], context // 2))

    def generation_config(self, max_new_tokens: float, top_p: float, temperature: float) -> Any:
        return generation.generation_config_for(self.model, **generation_overrides(max_new_tokens, top_p, temperature))

    def messages_for(self, role: str, history: Sequence[Any] | None, user_text: str) -> list[Message]:
        return build_messages(role, history, user_text, self.profiles)

    def role_context(self, role: str | None) -> AbstractContextManager:
        """Where a generation for `role` runs: its adapter made active (per-role adapters), the compare lock,
        or nothing."""
        if self.switch is not None:
            return self.switch.using(self.role_adapters.get(role))
        return self.lock if self.compare else nullcontext()

    def stream(self, messages: list[Message], generation_config: Any, adapter: bool = True,
               role: str | None = None) -> Iterator[str]:
        """Growing reply text; `adapter=False` runs the base model (adapter disabled) — hold `lock`.

        When the consumer stops early (Clear, role switch, closed tab), `generation.chat_stream` is closed in a
        background thread: its close waits for `generate` to finish, and Gradio closes a cancelled handler
        on its event loop, which must not stall the other sessions.
        """
        if self.switch is not None:
            yield from self._stream_with_adapter(messages, generation_config, role)
            return
        toggle = nullcontext() if adapter else self.model.disable_adapter()
        with toggle:
            replies = generation.chat_stream(self.model, self.tokenizer, messages, generation_config)
            finished = False
            try:
                for text in replies:  # noqa: UP028  (`yield from` would close `replies` here, blocking)
                    yield text
                finished = True
            finally:
                if not finished:
                    threading.Thread(target=replies.close, name="close-chat-stream", daemon=True).start()

    def _stream_with_adapter(self, messages: list[Message], generation_config: Any, role: str | None) -> Iterator[str]:
        """`stream` for per-role adapters: the whole generation, adapter switch included, runs in one worker
        thread (the switch's lock is taken and released there); the consumer only reads its queue, and
        leaving early tells the worker to stop after the current token."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                with self.role_context(role):
                    replies = generation.chat_stream(self.model, self.tokenizer, messages, generation_config)
                    try:
                        for text in replies:
                            events.put(("text", text))
                            if stop.is_set():
                                break
                    finally:
                        replies.close()
                events.put(("end", None))
            except Exception as e:  # noqa: BLE001  (re-raised in the consuming thread)
                events.put(("error", e))

        threading.Thread(target=work, name="adapter-chat-stream", daemon=True).start()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:
            stop.set()

    # --- the OpenAI-compatible API (roleplay/api.py calls these) ---
    def api_roles(self) -> list[str]:
        return list(self.profiles)

    def model_entry(self, role: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"max_model_len": self._context_or_none()}
        if self.switch is not None:
            entry["adapter"] = self.adapter_paths.get(role)  # None: this role runs the base model
        return entry

    def _context_or_none(self) -> int | None:
        try:
            return generation.context_length(self.model)
        except (utils.UserError, AttributeError):
            return None

    def prepare(self, request: api.ChatRequest) -> tuple[api.ChatRequest, list[Message], api.ReplySettings]:
        """Cheap checks before a request is queued (role, settings, prompt budget); UserError when refused."""
        return request, api.role_messages(request, self.profiles), api.reply_settings(self.model, request)

    def run(self, prepared: tuple[api.ChatRequest, list[Message], api.ReplySettings],
            on_text: Callable[[str], None] | None, cancel: threading.Event) -> api.Reply:
        request, messages, settings = prepared
        with self.role_context(request.model):
            return api.generate_reply(self.model, self.tokenizer, messages, settings, on_text, cancel)


class RemoteBackend:
    """The page as a client of an OpenAI-compatible server (`--api_base`): roles are the server's models,
    replies stream from it; no model is loaded here. With `send_system` the role's system prompt from the
    local profiles file is sent as the system message (for servers that do not build it, e.g. vLLM)."""

    def __init__(self, api_base: str, api_key: str | None, models: list[dict[str, Any]], profiles: dict[str, str],
                 max_input_chars: int = DEFAULT_MAX_INPUT_CHARS, send_system: bool = False) -> None:
        self.api_base, self.api_key = api_base, api_key
        self.models = {m["id"]: m for m in models}
        self.local_profiles = profiles
        self.profiles = {role: profiles.get(role, "") for role in self.models}  # role picker + cards
        self.max_input_chars = max_input_chars
        self.send_system = send_system
        self.has_adapter = False
        self.lock = threading.Lock()

    def default_temperature(self) -> float:
        return FALLBACK_TEMPERATURE

    def max_new_tokens_limit(self) -> int:
        """Half the smallest context a model reports (vLLM's and our own `max_model_len`), at most 2048."""
        lengths = [m.get("max_model_len") for m in self.models.values()]
        lengths = [n for n in lengths if isinstance(n, int) and n > 1]
        return max(1, min(MAX_NEW_TOKENS_RANGE[1], *(n // 2 for n in lengths)))

    def generation_config(self, max_new_tokens: float, top_p: float, temperature: float) -> dict[str, Any]:
        o = generation_overrides(max_new_tokens, top_p, temperature)
        return {"max_tokens": o["max_new_tokens"], "top_p": o["top_p"], "temperature": o["temperature"]}

    def messages_for(self, role: str, history: Sequence[Any] | None, user_text: str) -> list[Message]:
        if self.send_system and role in self.local_profiles:
            return build_messages(role, history, user_text, self.local_profiles)
        return [*clean_history(history), {"role": "user", "content": user_text}]

    def stream(self, messages: list[Message], generation_config: dict[str, Any], adapter: bool = True,
               role: str | None = None) -> Iterator[str]:
        yield from api.remote_stream(self.api_base, self.api_key, {"model": role, "messages": messages,
                                                                   **generation_config})


def warn(message: str) -> None:
    """A yellow toast on the page (`gr.Warning` renders HTML, so the text is escaped); outside a Gradio
    request it is a UserWarning."""
    gr.Warning(html.escape(message))


def _refuse(text: str | None, backend: ChatBackend | RemoteBackend, role: str, max_new_tokens: float) -> str | None:
    problem = check_input(text, backend.max_input_chars)
    if problem is None and role not in backend.profiles:
        problem = f"Unknown role {role!r}: pick one from the list."
    if problem is None and generation_overrides(max_new_tokens, 1.0, 1.0)["max_new_tokens"] < 1:
        problem = "Max new tokens is 0: raise it to get a reply."
    return problem


def respond(backend: ChatBackend | RemoteBackend, user_text: str, history: Sequence[Any] | None, role: str,
            max_new_tokens: float, top_p: float, temperature: float) -> Iterator[tuple[list[Message], str]]:
    """Stream one reply: yields (conversation including the growing reply, new input-box text).

    Refused input (empty, over the cap, unknown role, 0 new tokens) or a generation setting the model
    cannot take shows a warning (`gr.Warning`) and leaves the conversation and the input box as they were.
    """
    history = clean_history(history)
    problem = _refuse(user_text, backend, role, max_new_tokens)
    if problem:
        warn(problem)
        yield history, user_text
        return
    turn = [*history, {"role": "user", "content": user_text}]
    yield turn, ""
    reply = ""
    try:
        config = backend.generation_config(max_new_tokens, top_p, temperature)
        for reply in backend.stream(backend.messages_for(role, history, user_text), config, role=role):
            yield [*turn, {"role": "assistant", "content": reply}], ""
    except utils.UserError as e:
        warn(str(e))
        yield history, user_text
        return
    if not reply:
        warn(EMPTY_REPLY)
    yield [*turn, {"role": "assistant", "content": reply}], ""


def respond_compare(backend: ChatBackend, user_text: str, base_history: Sequence[Any] | None,
                    tuned_history: Sequence[Any] | None, role: str, max_new_tokens: float, top_p: float,
                    temperature: float) -> Iterator[tuple[list[Message], list[Message], str]]:
    """Compare mode: the base model's reply (adapter off), then the fine-tuned one's, to the same message.

    Each side keeps its own conversation. Yields (base conversation, fine-tuned conversation, box text).
    """
    base, tuned = clean_history(base_history), clean_history(tuned_history)
    problem = _refuse(user_text, backend, role, max_new_tokens)
    if problem:
        warn(problem)
        yield base, tuned, user_text
        return
    user = {"role": "user", "content": user_text}
    base_turn, tuned_turn = [*base, user], [*tuned, user]
    yield base_turn, tuned_turn, ""
    base_reply = tuned_reply = ""
    try:
        config = backend.generation_config(max_new_tokens, top_p, temperature)
        with backend.lock:  # the adapter toggle changes the shared model
            for base_reply in backend.stream(build_messages(role, base, user_text, backend.profiles), config,
                                             adapter=False):
                yield [*base_turn, {"role": "assistant", "content": base_reply}], tuned_turn, ""
            base_turn = [*base_turn, {"role": "assistant", "content": base_reply}]
            for tuned_reply in backend.stream(build_messages(role, tuned, user_text, backend.profiles), config):
                yield base_turn, [*tuned_turn, {"role": "assistant", "content": tuned_reply}], ""
    except utils.UserError as e:
        warn(str(e))
        yield base, tuned, user_text
        return
    if not base_reply or not tuned_reply:
        warn(EMPTY_REPLY)
    yield base_turn, [*tuned_turn, {"role": "assistant", "content": tuned_reply}], ""


def new_conversation(n_chats: int = 1) -> tuple[Any, ...]:
    """Values that start a fresh conversation: empty chatbots, empty conversation states, empty input box."""
    return (*([] for _ in range(2 * n_chats)), "")


def role_card(role: str, profiles: dict[str, str]) -> str:
    """Markdown shown under the role picker."""
    desc = profiles.get(role, "")
    return f"**{role}**：{desc}" if desc else ""


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
def build_ui(backend: ChatBackend | RemoteBackend, compare: bool = False, title: str = "RolePlayProj") -> gr.Blocks:
    """The Gradio Blocks app (not launched). Call `.queue(...)` and `.launch(...)` on it (see `serve`)."""
    roles = list(backend.profiles)
    cap = backend.max_input_chars
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}: role-playing chat" + (" — base vs fine-tuned" if compare else ""))
        with gr.Row():
            with gr.Column(scale=4):
                if compare:
                    with gr.Row():
                        chats = [gr.Chatbot(label=BASE_LABEL, height=540, elem_id="base-chat", buttons=CHAT_BUTTONS),
                                 gr.Chatbot(label=FINETUNED_LABEL, height=540, elem_id="tuned-chat",
                                            buttons=CHAT_BUTTONS)]
                else:
                    chats = [gr.Chatbot(label=CHAT_LABEL, height=580, elem_id="chat", buttons=CHAT_BUTTONS)]
                # lines=1 (growing to 8): Gradio sends on Enter only for a one-line box; Shift+Enter breaks
                # the line. A box of 2+ lines sends on Shift+Enter and its Enter only inserts a newline.
                user_box = gr.Textbox(show_label=False, lines=1, max_lines=8, elem_id="user-input",
                                      placeholder=f"Type a message (at most {cap} characters). "
                                                  "Enter sends, Shift+Enter starts a new line")
                with gr.Row():
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="submit")
                    clear_btn = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1, min_width=240):
                role_dd = gr.Dropdown(choices=roles, value=roles[0], label="Role", elem_id="role")
                card = gr.Markdown(role_card(roles[0], backend.profiles), elem_id="role-card")
                limit = backend.max_new_tokens_limit()
                max_tokens = gr.Slider(MAX_NEW_TOKENS_RANGE[0], limit, value=min(DEFAULT_MAX_NEW_TOKENS, limit),
                                       step=1, label="Max new tokens", elem_id="max-new-tokens")
                top_p = gr.Slider(*TOP_P_RANGE, value=DEFAULT_TOP_P, step=0.01, label="Top-p", elem_id="top-p")
                temperature = gr.Slider(*TEMPERATURE_RANGE, value=backend.default_temperature(), step=0.01,
                                        label="Temperature", elem_id="temperature")
        # This session's conversations: the exact text (the chatbot's copy comes back normalised).
        states = [gr.State([]) for _ in chats]
        knobs = [role_dd, max_tokens, top_p, temperature]

        if compare:
            def chat_fn(text: str, base: list, tuned: list, role: str, n: float, p: float, t: float) -> Iterator:
                for b, f, box in respond_compare(backend, text, base, tuned, role, n, p, t):
                    yield b, f, b, f, box
        else:
            def chat_fn(text: str, history: list, role: str, n: float, p: float, t: float) -> Iterator:
                for h, box in respond(backend, text, history, role, n, p, t):
                    yield h, h, box

        chat_event = gr.on(
            triggers=[user_box.submit, submit_btn.click], fn=chat_fn, inputs=[user_box, *states, *knobs],
            outputs=[*chats, *states, user_box], api_name="chat", show_progress="minimal",
            # Compare mode toggles the adapter on the shared model: one such request at a time.
            concurrency_limit=1 if compare else "default",
        )

        resettable = [*chats, *states, user_box]
        # Clear, and the chatbots' own trash icon, empty the conversation state too (not only the display).
        for trigger in (clear_btn.click, *(chat.clear for chat in chats)):
            trigger(lambda: new_conversation(len(chats)), None, resettable, cancels=[chat_event],
                    concurrency_limit=None, api_visibility="private")
        role_dd.change(lambda role: (*new_conversation(len(chats)), role_card(role, backend.profiles)), role_dd,
                       [*resettable, card], cancels=[chat_event], concurrency_limit=None, api_visibility="private")
    return demo


class Server:
    """A server running in a background thread (`serve(..., block=False)`): its `url`; `close()` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self.server, self.thread, self.url = server, thread, url

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def build_app(backend: ChatBackend | RemoteBackend, *, compare: bool = False, page: bool = True,
              api_config: api.ApiConfig | None = None, concurrency: int = DEFAULT_CONCURRENCY,
              queue_size: int = DEFAULT_QUEUE_SIZE, page_password: str | None = None) -> Any:
    """One FastAPI app: the OpenAI-compatible routes under /v1 (when `api_config` is given) and the Gradio
    page mounted at / (when `page`), queued with `concurrency` / `queue_size`. With `page_password` the
    page asks for a login (any user name, that password)."""
    from fastapi import FastAPI

    app = FastAPI(title="RolePlayProj", docs_url=None, redoc_url=None, openapi_url=None)
    if api_config is not None:
        app.state.gate = api.mount_api(app, backend, api_config)
    if page:
        demo = build_ui(backend, compare=compare)
        demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
        auth = None
        if page_password:
            def auth(_user: str, password: str) -> bool:
                return hmac.compare_digest(password.encode(), page_password.encode())
        gr.mount_gradio_app(app, demo, path="/", footer_links=["api", "settings"], run_history=False,
                            show_error=False, auth=auth)
        app.state.demo = demo
    return app


def serve(app: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True) -> Server:
    """Serve `app` (see `build_app`) with uvicorn on host:port; prints and returns the URL holder. `block=False`
    returns at once with the server running in a background thread (tests; stop it with `.close()`)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise utils.UserError(f"cannot serve on {host}:{port} (port in use?); pick another --port")
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    handle = Server(server, thread, f"http://{shown}:{bound}/")
    print(f"Running on {handle.url}" + (f" (API: {handle.url}v1)" if getattr(app.state, "gate", None) else ""),
          flush=True)
    if block:
        try:
            while thread.is_alive():
                thread.join(timeout=1)
        finally:
            handle.close()
    return handle


def check_port_free(host: str, port: int) -> None:
    """Fail before the (slow) model load when `host:port` cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        raise utils.UserError(f"cannot serve on {host}:{port} ({e.strerror or e}); "
                              "pick another --port or --host") from e


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api_key, else $ROLEPLAY_API_KEY, else None (an empty value counts as none)."""
    return args.api_key or os.environ.get(api.API_KEY_ENV) or None


def check_exposure(host: str, local_key: str | None, insecure: bool) -> None:
    """Binding a non-loopback address needs a key guarding what is served, or an explicit --insecure."""
    if is_loopback(host) or local_key:
        return
    if not insecure:
        raise utils.UserError(f"--host {host} is not a loopback address and no API key is set: anyone who can reach "
                              f"this machine could use the model; set --api_key (or ${api.API_KEY_ENV}), or pass "
                              "--insecure on a network you trust")
    print(f"warning: --host {host} is not a loopback address: anyone who can reach this machine can use the demo "
          "(--insecure, no authentication)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Serve a role-playing chat page (Gradio) and an OpenAI-compatible API for a local model folder.",
        epilog="Example: python web_demo.py --model_path output/merged --desc_path data/profiles-zh_desc.json",
    )
    p.add_argument("--model_path", default=utils.DEFAULT_BASE_DIR,
                   help="local model folder (merged model, or the base when --adapter_dir/--adapter is given); "
                        "default: %(default)s")
    p.add_argument("--adapter_dir", default=None,
                   help="local PEFT (LoRA/QLoRA) adapter folder to apply (every role without its own --adapter)")
    p.add_argument("--adapter", action="append", default=[], metavar="ROLE=PATH",
                   help="a LoRA adapter for one role, on the one base model --model_path (repeatable: "
                        "--adapter 孙悟空=output/a --adapter 赵子龙=output/b); roles without one run the "
                        "--adapter_dir adapter, or the base when there is none")
    p.add_argument("--desc_path", default=utils.PROFILES_PATH,
                   help="JSON object role -> description; its roles fill the role picker (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (GPU when there is one), cpu, a GPU index such as 0, or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32 "
                                                   "(default: auto)")
    p.add_argument("--load_in_4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes NF4)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default: %(default)s; anything else needs --api_key or --insecure)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--compare", action="store_true",
                   help="show the base model's and the fine-tuned model's replies side by side "
                        "(needs --adapter_dir)")
    p.add_argument("--max_input_chars", type=int, default=DEFAULT_MAX_INPUT_CHARS,
                   help="longest accepted user message in characters (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed the samplers once at start (reproducible demos)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="replies generated at the same time, for the page and for the API each; more requests "
                        "wait in the queue (default: %(default)s)")
    p.add_argument("--queue_size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="requests that may wait beyond --concurrency (page and API each); when the queue is full "
                        "a new API request gets HTTP 429 at once (default: %(default)s)")
    p.add_argument("--api_key", default=None,
                   help=f"key every /v1 call must send as 'Authorization: Bearer KEY' (also the page's login "
                        f"password); default: ${api.API_KEY_ENV}. With --api_base: the remote server's key")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone on the network can use it)")
    p.add_argument("--api_only", action="store_true", help="serve the OpenAI-compatible API only, no page")
    p.add_argument("--api_base", default=None, metavar="URL",
                   help="make the page a client of this OpenAI-compatible server (e.g. http://host:8000/v1); "
                        "no local model is loaded, the roles are the server's models")
    p.add_argument("--api_send_system", action="store_true",
                   help="with --api_base: send the role's system prompt from --desc_path (for servers that do "
                        "not build it themselves, such as vLLM)")
    return p.parse_args(argv)


def torch_device(device: str) -> str:
    """--device value for `loading.load_model_for_inference`: a bare GPU index N becomes cuda:N."""
    return f"cuda:{device}" if device.isdigit() else device


def check_args(args: argparse.Namespace) -> None:
    """Raise utils.UserError (one line, exit 2) for unusable arguments, before loading anything."""
    if args.max_input_chars < 1:
        raise utils.UserError(f"--max_input_chars must be at least 1, got {args.max_input_chars}")
    if args.concurrency < 1:
        raise utils.UserError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.queue_size < 0:
        raise utils.UserError(f"--queue_size must be at least 0, got {args.queue_size}")
    if not 0 <= args.port <= 65535:
        raise utils.UserError(f"--port must be between 0 and 65535, got {args.port}")
    if args.api_base is not None:
        if not args.api_base.startswith(("http://", "https://")):
            raise utils.UserError(f"--api_base {args.api_base}: give an http:// or https:// URL ending in /v1")
        clash = [flag for flag, on in (("--adapter_dir", args.adapter_dir), ("--adapter", args.adapter),
                                       ("--compare", args.compare), ("--api_only", args.api_only),
                                       ("--load_in_4bit", args.load_in_4bit)) if on]
        if clash:
            raise utils.UserError(f"--api_base serves no local model, so {', '.join(clash)} cannot be used with it")
        return
    if args.api_send_system:
        raise utils.UserError("--api_send_system only applies with --api_base")
    if not Path(args.model_path).is_dir():
        raise utils.UserError(f"--model_path {args.model_path}: no such local folder (only local model folders "
                              "are loaded; train or download the model first)")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise utils.UserError(f"--adapter_dir {args.adapter_dir}: no such local folder")
    if args.adapter and args.compare:
        raise utils.UserError("--adapter (one adapter per role) cannot be combined with --compare (which toggles "
                              "the one --adapter_dir adapter)")
    if args.compare and args.adapter_dir is None and not loading.is_adapter_dir(args.model_path):
        raise utils.UserError("--compare needs --adapter_dir (the base is --model_path, the adapter toggles)")
    if args.compare and args.api_only:
        raise utils.UserError("--compare is a page mode; it cannot be combined with --api_only")


def local_backend(args: argparse.Namespace, profiles: dict[str, str]) -> ChatBackend:
    """Load the model (with its shared adapter, and/or one adapter per role) and wrap it for the page and API."""
    device = torch_device(args.device)
    switch, role_adapters, adapter_paths = None, None, {}
    if args.adapter:
        from roleplay import adapters

        specs = adapters.parse_adapter_specs(args.adapter)
        adapters.check_roles(specs, profiles)
        model, tokenizer, names, shared = adapters.load_base_with_adapters(
            args.model_path, specs, args.adapter_dir, device=device, dtype=args.dtype, load_in_4bit=args.load_in_4bit)
        switch = adapters.AdapterSwitch(model)
        role_adapters = {role: adapters.role_adapter(role, names, shared) for role in profiles}
        adapter_paths = {role: specs.get(role, args.adapter_dir) for role in profiles}
    else:
        model, tokenizer = loading.load_model_for_inference(args.model_path, adapter_dir=args.adapter_dir,
                                                            device=device, dtype=args.dtype,
                                                            load_in_4bit=args.load_in_4bit)
    backend = ChatBackend(model, tokenizer, profiles, max_input_chars=args.max_input_chars, switch=switch,
                          role_adapters=role_adapters, adapter_paths=adapter_paths, compare=args.compare)
    if args.compare and not backend.has_adapter:
        raise utils.UserError("--compare needs the adapter kept separate (a PeftModel), but the loaded model "
                              "has no disable_adapter()")
    return backend


def remote_backend(args: argparse.Namespace) -> RemoteBackend:
    """The page's backend for --api_base: the remote server's models (the local profiles file, when there is
    one, only describes them)."""
    profiles = utils.load_profiles(args.desc_path) if Path(args.desc_path).is_file() or args.api_send_system else {}
    models = api.remote_models(args.api_base, resolve_api_key(args))
    if not models:
        raise utils.UserError(f"--api_base {args.api_base}: the server lists no models")
    return RemoteBackend(args.api_base, resolve_api_key(args), models, profiles, args.max_input_chars,
                         args.api_send_system)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    local_key = None if args.api_base else resolve_api_key(args)  # with --api_base the key is the remote's
    if args.api_base is None:
        profiles = utils.load_profiles(args.desc_path)
    check_exposure(args.host, local_key, args.insecure)
    check_port_free(args.host, args.port)
    if args.seed is not None:
        utils.set_seed(args.seed)
    if args.api_base is not None:
        backend: ChatBackend | RemoteBackend = remote_backend(args)
        print(f"{len(backend.profiles)} roles from {args.api_base}", flush=True)
        app = build_app(backend, concurrency=args.concurrency, queue_size=args.queue_size)
    else:
        backend = local_backend(args, profiles)
        adapter = f" + adapter {args.adapter_dir}" if args.adapter_dir else ""
        adapter += "".join(f" + {spec}" for spec in args.adapter)
        print(f"{len(profiles)} roles from {args.desc_path}; model {args.model_path}{adapter}"
              + (" (compare mode)" if args.compare else "") + (" (API only)" if args.api_only else ""), flush=True)
        app = build_app(backend, compare=args.compare, page=not args.api_only,
                        api_config=api.ApiConfig(local_key, args.concurrency, args.queue_size),
                        concurrency=args.concurrency, queue_size=args.queue_size, page_password=local_key)
    serve(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
