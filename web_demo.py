"""Chat with a role-playing model in the browser (Gradio 6).

Pick a role (the list comes from the profiles file), type a message, and the reply streams in token by
token. The whole conversation goes to the model with the role's system prompt, built by the same prompt
builder training uses (`utils.build_prompt_ids`, which drops the oldest turns to fit the length budget).
Switching role starts a fresh conversation. With `--compare` the page shows the base model's and the
fine-tuned model's replies side by side (one loaded base model, the LoRA adapter toggled off for the
base reply).

Examples:
    python web_demo.py --model_path output/merged --desc_path data/profiles-zh_desc.json
    python web_demo.py --model_path output/tiny-baichuan2-chat --adapter_dir output/qlora --compare --device cpu
Then open http://127.0.0.1:7860 . The server binds to 127.0.0.1 unless --host says otherwise; there is no
authentication, so only expose it (e.g. --host 0.0.0.0) on a network you trust.
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import gradio as gr

import utils
from roleplay import generation, loading

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
    switched off for the base reply, which changes the shared model, so compare requests hold `lock`.
    """

    def __init__(self, model: Any, tokenizer: Any, profiles: dict[str, str],
                 max_input_chars: int = DEFAULT_MAX_INPUT_CHARS) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.profiles = profiles
        self.max_input_chars = max_input_chars
        self.lock = threading.Lock()

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

    def stream(self, messages: list[Message], generation_config: Any, adapter: bool = True) -> Iterator[str]:
        """Growing reply text; `adapter=False` runs the base model (adapter disabled) — hold `lock`.

        When the consumer stops early (Clear, role switch, closed tab), `generation.chat_stream` is closed in a
        background thread: its close waits for `generate` to finish, and Gradio closes a cancelled handler
        on its event loop, which must not stall the other sessions.
        """
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


def warn(message: str) -> None:
    """A yellow toast on the page (`gr.Warning` renders HTML, so the text is escaped); outside a Gradio
    request it is a UserWarning."""
    gr.Warning(html.escape(message))


def _refuse(text: str | None, backend: ChatBackend, role: str, max_new_tokens: float) -> str | None:
    problem = check_input(text, backend.max_input_chars)
    if problem is None and role not in backend.profiles:
        problem = f"Unknown role {role!r}: pick one from the list."
    if problem is None and generation_overrides(max_new_tokens, 1.0, 1.0)["max_new_tokens"] < 1:
        problem = "Max new tokens is 0: raise it to get a reply."
    return problem


def respond(backend: ChatBackend, user_text: str, history: Sequence[Any] | None, role: str,
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
        for reply in backend.stream(build_messages(role, history, user_text, backend.profiles), config):
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
def build_ui(backend: ChatBackend, compare: bool = False, title: str = "RolePlayProj") -> gr.Blocks:
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
                user_box = gr.Textbox(show_label=False, lines=2, max_lines=8, elem_id="user-input",
                                      placeholder=f"Type a message (at most {cap} characters), Enter to send")
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


def serve(demo: gr.Blocks, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          concurrency: int = DEFAULT_CONCURRENCY, block: bool = True) -> str:
    """Queue and launch `demo` (never a share link); returns the local URL. `block=False` returns at once
    with the server running in background threads (tests; stop it with `demo.close()`)."""
    demo.queue(default_concurrency_limit=concurrency, max_size=DEFAULT_QUEUE_SIZE)
    try:
        demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False,
                    prevent_thread_lock=True, quiet=True, run_history=False, footer_links=["api", "settings"])
    except OSError as e:
        raise utils.UserError(f"cannot serve on {host}:{port} (port in use?); pick another --port") from e
    url = str(demo.local_url)
    print(f"Running on {url}", flush=True)
    if block:
        demo.block_thread()
    return url


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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Serve a role-playing chat page (Gradio) for a local model folder.",
        epilog="Example: python web_demo.py --model_path output/merged --desc_path data/profiles-zh_desc.json",
    )
    p.add_argument("--model_path", default=utils.DEFAULT_BASE_DIR,
                   help="local model folder (merged model, or the base when --adapter_dir is given); "
                        "default: %(default)s")
    p.add_argument("--adapter_dir", default=None, help="local PEFT (LoRA/QLoRA) adapter folder to apply")
    p.add_argument("--desc_path", default=utils.PROFILES_PATH,
                   help="JSON object role -> description; its roles fill the role picker (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (GPU when there is one), cpu, a GPU index such as 0, or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32 "
                                                   "(default: auto)")
    p.add_argument("--load_in_4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes NF4)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default: %(default)s; anything else exposes the demo to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--compare", action="store_true",
                   help="show the base model's and the fine-tuned model's replies side by side "
                        "(needs --adapter_dir)")
    p.add_argument("--max_input_chars", type=int, default=DEFAULT_MAX_INPUT_CHARS,
                   help="longest accepted user message in characters (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed the samplers once at start (reproducible demos)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="replies generated at the same time; more requests wait in the queue (default: %(default)s)")
    return p.parse_args(argv)


def torch_device(device: str) -> str:
    """--device value for `loading.load_model_for_inference`: a bare GPU index N becomes cuda:N."""
    return f"cuda:{device}" if device.isdigit() else device


def check_args(args: argparse.Namespace) -> None:
    """Raise utils.UserError (one line, exit 2) for unusable arguments, before loading anything."""
    if not Path(args.model_path).is_dir():
        raise utils.UserError(f"--model_path {args.model_path}: no such local folder (only local model folders "
                              "are loaded; train or download the model first)")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise utils.UserError(f"--adapter_dir {args.adapter_dir}: no such local folder")
    if args.compare and args.adapter_dir is None and not loading.is_adapter_dir(args.model_path):
        raise utils.UserError("--compare needs --adapter_dir (the base is --model_path, the adapter toggles)")
    if args.max_input_chars < 1:
        raise utils.UserError(f"--max_input_chars must be at least 1, got {args.max_input_chars}")
    if args.concurrency < 1:
        raise utils.UserError(f"--concurrency must be at least 1, got {args.concurrency}")
    if not 0 <= args.port <= 65535:
        raise utils.UserError(f"--port must be between 0 and 65535, got {args.port}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    profiles = utils.load_profiles(args.desc_path)
    check_port_free(args.host, args.port)
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} is not a loopback address: anyone who can reach this machine can "
              "use the demo (there is no authentication)", file=sys.stderr, flush=True)
    if args.seed is not None:
        utils.set_seed(args.seed)
    model, tokenizer = loading.load_model_for_inference(args.model_path, adapter_dir=args.adapter_dir,
                                                        device=torch_device(args.device), dtype=args.dtype,
                                                        load_in_4bit=args.load_in_4bit)
    backend = ChatBackend(model, tokenizer, profiles, max_input_chars=args.max_input_chars)
    if args.compare and not backend.has_adapter:
        raise utils.UserError("--compare needs the adapter kept separate (a PeftModel), but the loaded model "
                              "has no disable_adapter()")
    adapter = f" + adapter {args.adapter_dir}" if args.adapter_dir else ""
    print(f"{len(profiles)} roles from {args.desc_path}; model {args.model_path}{adapter}"
          + (" (compare mode)" if args.compare else ""), flush=True)
    serve(build_ui(backend, compare=args.compare), host=args.host, port=args.port, concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
