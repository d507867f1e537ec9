"""The OpenAI-compatible chat API that web_demo.py serves next to its page (`/v1/models`,
`/v1/chat/completions`, streamed as server-sent events).

What lives here: the error object and status codes (`ApiError`), validation of a chat request
(`parse_chat_request`: types, ranges, the input cap, unknown roles), the role's messages (the
system prompt is built server-side by `utils.role_system_prompt`; a client's own system message is
appended after it), the generation settings of a request (`reply_settings`: temperature 0 =
greedy, top_p, max_tokens, stop, seed), one reply generated token by token (`generate_reply`: stop
strings, usage in real tokens, cancellation), the OpenAI response and chunk bodies, SSE framing,
the bounded request queue (`RequestGate`, full = HTTP 429 at once) and the FastAPI routes
(`mount_api`) over any `ChatService` (web_demo.ChatBackend is one).

Sampling uses a per-request `torch.Generator` (`seed`, or a fresh random seed) inside a logits
processor, so a seeded request gives the same reply whatever else the server runs at the time,
and a streamed reply equals the non-streamed one for the same seed.

torch, transformers, fastapi and httpx are imported inside the functions that need them.

Example (web_demo.py serves it; see its --help):
    curl http://127.0.0.1:7860/v1/chat/completions -H "Authorization: Bearer $ROLEPLAY_API_KEY" \\
        -H "Content-Type: application/json" \\
        -d '{"model": "孙悟空", "messages": [{"role": "user", "content": "你好"}], "temperature": 0}'
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from roleplay import generation
from roleplay.devices import model_device
from utils import UserError, role_system_prompt

Message = dict[str, str]

API_KEY_ENV = "ROLEPLAY_API_KEY"
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused before parsing
MAX_MESSAGES = 256
MAX_STOP = 4  # OpenAI's limit on stop sequences
TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; 0 = greedy
# Request fields we cannot honour: refused (400) unless given their neutral value, never silently ignored.
UNSUPPORTED = {"n": 1, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
               "functions": None, "function_call": None, "logit_bias": None,
               "presence_penalty": 0, "audio": None, "modalities": None, "prediction": None}
FREQUENCY_PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range; omitted = the model's reply_frequency_penalty
CLIENT_SYSTEM_ROLES = ("system", "developer")  # "developer" is OpenAI's newer name for system


# ---------------------------------------------------------------------------------------------
# Errors: the OpenAI error object
# ---------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A refused request: HTTP `status` with body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                              500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated chat request. `messages` holds the conversation (user/assistant, last one user);
    `system` the client's own system text (appended after the role's prompt), "" when none."""

    model: str
    messages: list[Message]
    system: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(raw: bytes, roles: Sequence[str], max_input_chars: int, max_tokens_limit: int) -> ChatRequest:
    """The request body (JSON bytes) as a ChatRequest; ApiError 400 (404 for an unknown model) otherwise."""
    if len(raw) > MAX_BODY_BYTES:
        raise bad(f"the request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", code="body_too_large")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid UTF-8 JSON ({type(e).__name__})", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    model = _typed(body, "model", str, required=True)
    if model not in roles:
        raise ApiError(404, f"the model {model!r} does not exist; models are the role names: "
                            f"{', '.join(roles)} (GET /v1/models)", "model", "model_not_found")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None):
            raise bad(f"{name}={body[name]!r} is not supported by this server", name, "unsupported_parameter")
    system, messages = _parse_messages(body.get("messages"), max_input_chars)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise bad(f"{param} must be an integer, got {max_tokens!r}", param, "invalid_type")
        if not 1 <= max_tokens <= max_tokens_limit:
            raise bad(f"{param} must be between 1 and {max_tokens_limit}, got {max_tokens}", param)
    temperature = _number(body, "temperature", *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0:
        raise bad("top_p must be greater than 0 (use temperature 0 for greedy decoding)", "top_p")
    frequency_penalty = _number(body, "frequency_penalty", *FREQUENCY_PENALTY_RANGE)
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise bad(f"seed must be an integer in [0, 2**63), got {seed!r}", "seed", "invalid_type")
    stream = _typed(body, "stream", bool) or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    include_usage = bool((options or {}).get("include_usage", False))
    return ChatRequest(model=model, messages=messages, system=system, max_tokens=max_tokens, temperature=temperature,
                       top_p=top_p, frequency_penalty=frequency_penalty, stop=_parse_stop(body.get("stop")),
                       seed=seed, stream=stream,
                       include_usage=include_usage)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(body: dict, name: str, kind: type, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"{name} is required", name, "missing_required_parameter")
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad(f"{name} must be a {kind.__name__}, got {type(value).__name__}", name, "invalid_type")
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if not low <= value <= high:
        raise bad(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _content_text(content: Any, param: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                          f"{param}[{i}]", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{param} must be a string or a list of text parts, got {type(content).__name__}", param,
              "invalid_type")


def _parse_messages(raw: Any, max_input_chars: int) -> tuple[str, list[Message]]:
    """(client system text, user/assistant messages). System messages are accepted only before the first
    user/assistant message (the chat layout has one system slot, at the start)."""
    if not isinstance(raw, list):
        raise bad("messages must be a list of {\"role\", \"content\"} objects", "messages", "invalid_type")
    if not raw:
        raise bad("messages must not be empty", "messages")
    if len(raw) > MAX_MESSAGES:
        raise bad(f"messages has {len(raw)} entries; the limit is {MAX_MESSAGES}", "messages")
    system: list[str] = []
    out: list[Message] = []
    for i, message in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{param} must be an object", param, "invalid_type")
        role = message.get("role")
        if role not in ("user", "assistant", *CLIENT_SYSTEM_ROLES):
            raise bad(f"{param}.role must be one of user, assistant, system, developer; got {role!r}",
                      f"{param}.role")
        text = _content_text(message.get("content"), f"{param}.content")
        if len(text) > max_input_chars:
            raise bad(f"{param}.content has {len(text)} characters; the limit is {max_input_chars}",
                      f"{param}.content", "input_too_long")
        if role in CLIENT_SYSTEM_ROLES:
            if out:
                raise bad(f"{param}: a system message must come before the conversation", f"{param}.role")
            system.append(text)
        else:
            out.append({"role": role, "content": text})
    if not out or out[-1]["role"] != "user":
        raise bad("the last message must be a user message", f"messages[{len(raw) - 1}].role")
    if not out[-1]["content"].strip():
        raise bad("the last user message is empty", f"messages[{len(raw) - 1}].content")
    return "\n".join(s for s in system if s.strip()), out


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP or not all(stops):
        raise bad(f"stop takes at most {MAX_STOP} non-empty strings", "stop")
    return tuple(stops)


def role_messages(request: ChatRequest, profiles: dict[str, str], with_role_prompt: bool = True) -> list[Message]:
    """The model's input: the role's system prompt (the training prompt builder's), then the client's
    own system text on a new line after it, then the conversation."""
    parts = [role_system_prompt(request.model, profiles)] if with_role_prompt else []
    if request.system:
        parts.append(request.system)
    system = [{"role": "system", "content": "\n".join(parts)}] if parts else []
    return [*system, *request.messages]


# ---------------------------------------------------------------------------------------------
# Generation settings and one reply, token by token
# ---------------------------------------------------------------------------------------------
@dataclass
class ReplySettings:
    """What `generate_reply` runs: a greedy GenerationConfig (sampling, when asked, is done by our own
    seeded processor on top of it), the sampler's values, the stop strings."""

    config: Any
    sample: dict[str, Any] | None = None  # {"temperature", "top_k", "top_p"} or None for greedy
    seed: int | None = None
    stop: tuple[str, ...] = ()


def reply_settings(model: Any, request: ChatRequest) -> ReplySettings:
    """The request's generation settings on top of the model's generation config: temperature omitted =
    the model's own (its do_sample/temperature), 0 = greedy. Raises UserError for values the model cannot
    take (e.g. max_tokens leaving no room for the prompt)."""
    model_config = getattr(model, "generation_config", None)
    sampling = bool(getattr(model_config, "do_sample", False)) if request.temperature is None \
        else request.temperature > 0
    overrides = {"max_new_tokens": request.max_tokens,
                 generation.REPLY_FREQUENCY_PENALTY: request.frequency_penalty}  # None: the model's own
    greedy = generation.generation_config_for(model, do_sample=False, **overrides)
    generation.max_input_tokens(model, greedy)  # raises when max_tokens leaves no room for the prompt
    if not sampling:
        return ReplySettings(greedy, None, request.seed, request.stop)
    sampled = generation.generation_config_for(model, do_sample=True, temperature=request.temperature,
                                               top_p=request.top_p, **overrides)
    sample = {"temperature": sampled.temperature or 1.0, "top_k": sampled.top_k or 0, "top_p": sampled.top_p or 1.0}
    seed = request.seed if request.seed is not None else secrets.randbits(63)
    return ReplySettings(greedy, sample, seed, request.stop)


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated (an EOS included), not a re-encoding of the text

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _seeded_sampler(sample: dict[str, Any], seed: int) -> Any:
    """A logits processor that samples the next token with its own torch.Generator (temperature, top-k,
    top-p as transformers' warpers apply them) and leaves only that token possible, so the greedy step of
    `generate` picks it: sampling that no other request's use of the global RNG can disturb."""
    import torch
    from transformers.generation import (
        LogitsProcessor,
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(sample["temperature"]))])
    if sample["top_k"]:
        warpers.append(TopKLogitsWarper(int(sample["top_k"])))
    if sample["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(float(sample["top_p"])))
    rng = torch.Generator(device="cpu").manual_seed(int(seed))

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            probs = torch.softmax(warpers(input_ids, scores.float()), dim=-1)
            choice = torch.multinomial(probs.cpu(), 1, generator=rng).to(scores.device)
            out = torch.full_like(scores, -math.inf)
            return out.scatter_(1, choice, 0.0)

    return SeededSampler()


def _safe_prefix(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text that can be sent now, whether a stop string was found). The text is cut before the first stop
    string; otherwise a tail that could still grow into one, or an unfinished character (U+FFFD from a
    partial UTF-8 sequence), is held back."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], True
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    text = text[:keep]
    return text.rstrip("\ufffd"), False


def generate_reply(model: Any, tokenizer: Any, messages: Sequence[Message], settings: ReplySettings,
                   on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None) -> Reply:
    """One reply to `messages` (prompt from the training prompt builder), generated in this thread.

    `on_text` receives each new piece of text as it is decoded; the pieces joined equal `Reply.text`
    (so a streamed reply equals a non-streamed one with the same settings). A stop string ends the
    reply before it (finish_reason "stop"); a set `cancel` event ends generation after the current
    token.
    """
    import torch
    from transformers.generation import BaseStreamer, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    config = settings.config
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt = generation.chat_prompt_ids(model, tokenizer, messages, config)
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    done = threading.Event()
    state = {"ids": [], "sent": "", "stopped": False, "skip_prompt": True}

    def emit(text: str) -> None:
        if text.startswith(state["sent"]) and len(text) > len(state["sent"]):
            piece, state["sent"] = text[len(state["sent"]):], text
            if on_text is not None:
                on_text(piece)

    class Streamer(BaseStreamer):
        def put(self, value: Any) -> None:
            if state["skip_prompt"]:  # generate first hands over the prompt
                state["skip_prompt"] = False
                return
            state["ids"].extend(int(i) for i in value.reshape(-1).tolist())
            if state["stopped"]:
                return
            text = tokenizer.decode(generation.reply_ids(state["ids"], eos_ids), skip_special_tokens=True)
            safe, hit = _safe_prefix(text, settings.stop)
            emit(safe)
            if hit:
                state["stopped"] = True
                done.set()

        def end(self) -> None:
            pass

    class StopWhenDone(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = done.is_set() or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    processors = LogitsProcessorList(generation.reply_processors(config, len(prompt)))
    if settings.sample is not None:
        processors.append(_seeded_sampler(settings.sample, settings.seed or 0))
    input_ids = torch.tensor([prompt], dtype=torch.long, device=model_device(model))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                             logits_processor=processors, stopping_criteria=StoppingCriteriaList([StopWhenDone()]),
                             streamer=Streamer())
    new = out[0, len(prompt):].tolist()
    ids = generation.reply_ids(new, eos_ids)
    if not state["stopped"]:  # the end: what was held back for a stop string that never came
        final, hit = _safe_prefix(tokenizer.decode(ids, skip_special_tokens=True), settings.stop)
        state["stopped"] = hit
        if not hit:
            final = tokenizer.decode(ids, skip_special_tokens=True)
        emit(final)
    finish = "stop" if state["stopped"] or len(ids) < len(new) else "length"
    if cancel is not None and cancel.is_set() and finish == "length":
        finish = "cancelled"
    return Reply(state["sent"], finish, len(prompt), len(new))


# ---------------------------------------------------------------------------------------------
# Response bodies and SSE
# ---------------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion_body(cid: str, created: int, model: str, reply: Reply) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": reply.usage()}


def chunk_body(cid: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` is the usage-only chunk (no choices)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None, "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if usage is not None:
        body["usage"] = usage
    return body


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The bounded queue
# ---------------------------------------------------------------------------------------------
class RequestGate:
    """Admission control: at most `concurrency` requests generate and `queue_size` more wait; a request
    beyond that is refused at once (HTTP 429) instead of piling up in memory. Thread-safe."""

    def __init__(self, concurrency: int, queue_size: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.limit = concurrency + queue_size
        self.admitted = 0
        self.peak = 0
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="api-generate")

    def try_enter(self) -> bool:
        with self._lock:
            if self.admitted >= self.limit:
                return False
            self.admitted += 1
            self.peak = max(self.peak, self.admitted)
            return True

    def leave(self) -> None:
        with self._lock:
            self.admitted -= 1

    def full_error(self) -> ApiError:
        return ApiError(429, f"the server is busy: {self.limit} requests are already running or queued; "
                             "retry shortly", None, "queue_full")


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------
class ChatService(Protocol):
    """What the routes need from a backend (web_demo.ChatBackend)."""

    max_input_chars: int

    def api_roles(self) -> list[str]: ...

    def model_entry(self, role: str) -> dict[str, Any]: ...

    def max_new_tokens_limit(self) -> int: ...

    def prepare(self, request: ChatRequest) -> Any: ...

    def run(self, prepared: Any, on_text: Callable[[str], None] | None, cancel: threading.Event) -> Reply: ...


@dataclass
class ApiConfig:
    api_key: str | None = None
    concurrency: int = 4
    queue_size: int = 64
    created: int = field(default_factory=lambda: int(time.time()))


def check_bearer(header: str | None, api_key: str | None) -> None:
    """ApiError 401 unless `header` is "Bearer <api_key>" (constant-time compare); no key = open."""
    if api_key is None:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", None,
                       "invalid_api_key")


def mount_api(app: Any, service: ChatService, config: ApiConfig) -> RequestGate:
    """Add /v1/models and /v1/chat/completions (and a JSON 404 for other /v1 paths) to the FastAPI `app`;
    returns the request gate (its `peak` is the most requests admitted at once)."""
    import asyncio

    from fastapi import APIRouter, Depends, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    gate = RequestGate(config.concurrency, config.queue_size)

    async def api_error(_request: Any, exc: ApiError) -> Any:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    app.add_exception_handler(ApiError, api_error)

    def takes_request(fn: Callable) -> Callable:
        """FastAPI reads a route's hints from this module's globals, where `Request` is not (fastapi is
        imported here, inside the function): hand it the class itself."""
        fn.__annotations__ = {**fn.__annotations__, "request": Request}
        return fn

    @takes_request
    def auth(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.api_key)

    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.get("/models")
    def list_models() -> Any:
        data = [{"id": role, "object": "model", "created": config.created, "owned_by": "roleplayproj",
                 **service.model_entry(role)} for role in service.api_roles()]
        return {"object": "list", "data": data}

    @router.get("/models/{model}")
    def get_model(model: str) -> Any:
        if model not in service.api_roles():
            raise ApiError(404, f"the model {model!r} does not exist", "model", "model_not_found")
        return {"id": model, "object": "model", "created": config.created, "owned_by": "roleplayproj",
                **service.model_entry(model)}

    @router.post("/chat/completions")
    @takes_request
    async def chat_completions(request: Request) -> Any:
        raw = await request.body()
        chat = parse_chat_request(raw, service.api_roles(), service.max_input_chars, service.max_new_tokens_limit())
        try:
            prepared = service.prepare(chat)
        except UserError as e:
            raise bad(str(e), "max_tokens" if "max_new_tokens" in str(e) else None) from e
        if not gate.try_enter():
            raise gate.full_error()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def job() -> None:
            try:
                if cancel.is_set():  # the client left while the request waited
                    post("error", ApiError(499, "cancelled"))
                    return
                on_text = (lambda piece: post("text", piece)) if chat.stream else None
                post("done", service.run(prepared, on_text, cancel))
            except UserError as e:
                post("error", bad(str(e)))
            except Exception as e:  # noqa: BLE001  (one failed request must not take the server down)
                traceback.print_exc(file=sys.stderr)
                post("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}"[:500], None,
                                       "internal_error"))
            finally:
                gate.leave()

        try:
            gate.executor.submit(job)
        except RuntimeError as e:  # executor shut down
            gate.leave()
            raise ApiError(503, "the server is shutting down", None, "shutting_down") from e
        cid, created = completion_id(), int(time.time())
        if not chat.stream:
            try:
                kind, value = await events.get()
                while kind == "text":
                    kind, value = await events.get()
            finally:
                cancel.set()  # no-op once done; stops generation when the client went away
            if kind == "error":
                raise value
            return completion_body(cid, created, chat.model, value)
        return StreamingResponse(_stream_events(events, cancel, cid, created, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown(path: str) -> Any:
        raise ApiError(404, f"no such endpoint /v1/{path} (this server has /v1/models and /v1/chat/completions)",
                       None, "unknown_url")

    app.include_router(router)
    return gate


async def _stream_events(events: Any, cancel: threading.Event, cid: str, created: int,
                         chat: ChatRequest) -> Any:
    """The SSE body: a role chunk, content chunks, the finish chunk, a usage chunk when asked, [DONE].
    An error after the stream began is sent as a `data: {"error": ...}` event (the status is already 200)."""
    try:
        yield sse(chunk_body(cid, created, chat.model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield sse(chunk_body(cid, created, chat.model, {"content": value}))
            elif kind == "error":
                yield sse(value.body())
                break
            else:
                yield sse(chunk_body(cid, created, chat.model, {}, value.finish_reason))
                if chat.include_usage:
                    yield sse(chunk_body(cid, created, chat.model, None, usage=value.usage()))
                break
        yield SSE_DONE
    finally:
        cancel.set()  # the client left (or the stream ended): stop generating


# ---------------------------------------------------------------------------------------------
# A client of any OpenAI-compatible server (web_demo.py --api_base)
# ---------------------------------------------------------------------------------------------
def remote_models(api_base: str, api_key: str | None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """GET {api_base}/models; UserError when the server cannot be reached or answers with an error."""
    import httpx

    try:
        r = httpx.get(api_base.rstrip("/") + "/models", headers=_auth_headers(api_key), timeout=timeout)
    except httpx.HTTPError as e:
        raise UserError(f"--api_base {api_base}: cannot reach the server ({e}); check the URL (it ends in /v1)") from e
    if r.status_code != 200:
        raise UserError(f"--api_base {api_base}: GET /models answered {r.status_code} ({_error_message(r.text)}); "
                        "check --api_key and the URL")
    try:
        data = r.json()["data"]
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--api_base {api_base}: GET /models did not return an OpenAI model list") from e


def remote_stream(api_base: str, api_key: str | None, body: dict[str, Any], timeout: float = 600.0) -> Iterator[str]:
    """POST a streamed chat completion to an OpenAI-compatible server; yield the growing reply text.
    An error answer (or an error event) is a UserError carrying the server's message."""
    import httpx

    text = ""
    try:
        with httpx.stream("POST", api_base.rstrip("/") + "/chat/completions", json={**body, "stream": True},
                          headers=_auth_headers(api_key), timeout=timeout) as r:
            if r.status_code != 200:
                answer = _error_message(r.read().decode("utf-8", "replace"))
                raise UserError(f"the server answered {r.status_code}: {answer}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise UserError(f"the server stopped the reply: {_error_message(data)}")
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text += piece
                        yield text
    except httpx.HTTPError as e:
        raise UserError(f"the server at {api_base} cannot be reached ({type(e).__name__}: {e})") from e


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300]
