"""Generation for predict.py, web_demo.py and bench/: the generation settings of a model with
overrides (`generation_config_for`), the prompt budget, prompts through the training prompt builder
(`utils.build_prompt_ids`), a streamed reply (`chat_stream`, generate in a background thread), one
reply (`chat_once`) and batched replies from left-padded prompts (`generate_batch`).

torch and transformers are imported inside the functions.

Example:
    >>> from roleplay.generation import chat_once, generation_config_for
    >>> config = generation_config_for(model, do_sample=False, max_new_tokens=32)
    >>> chat_once(model, tokenizer, [{"role": "user", "content": "你好"}], config)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from roleplay.devices import model_device
from utils import UserError, build_prompt_ids, chat_messages

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
DEFAULT_MAX_NEW_TOKENS = 512  # when the model's generation config names none
# generation_config.json key our decoding reads (reply_frequency_penalty): logit - penalty x (times the
# token is already in the reply); transformers' generate() ignores it
REPLY_FREQUENCY_PENALTY = "reply_frequency_penalty"


def generation_config_for(model: Any, **overrides: Any) -> Any:
    """A copy of the model's generation config with the non-None `overrides` applied.

    Accepted overrides: max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample,
    reply_frequency_penalty (ours, see `reply_frequency_penalty`) and any other GenerationConfig field.
    With do_sample False the sampling parameters are reset to their neutral values, so greedy
    decoding carries no ignored settings. max_new_tokens falls back to DEFAULT_MAX_NEW_TOKENS
    (capped at half the context) when the model's config has none. A value generation cannot take
    (e.g. temperature 0 with sampling) raises UserError.
    """
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in updates if not hasattr(GenerationConfig(), k) and not hasattr(config, k)
               and k != REPLY_FREQUENCY_PENALTY]
    if unknown:
        raise UserError(f"unknown generation setting(s) {unknown}")
    for key, value in updates.items():  # setattr, not update(): no validation before greedy is cleaned up
        setattr(config, key, value)
    if config.max_new_tokens is None:
        config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, max(1, context_length(model) // 2))
    config.max_length = None
    if not config.do_sample:
        # Neutral values, not None: generate() would refill None from the model's sampling defaults.
        neutral = GenerationConfig()._get_default_generation_params()
        for name in SAMPLING_FIELDS:
            if getattr(config, name, None) is not None:
                setattr(config, name, neutral.get(name))
    _check_generation_values(config, updates)
    try:
        config.validate(strict=True)
    except ValueError as e:
        raise UserError(f"bad generation setting(s) {updates}: {str(e).splitlines()[0]}") from e
    return config


def _check_generation_values(config: Any, updates: dict[str, Any]) -> None:
    """Reject values generate() would fail on only once it starts (or silently misuse)."""
    problems = []
    if not (isinstance(config.max_new_tokens, int) and config.max_new_tokens >= 1):
        problems.append(f"max_new_tokens must be a positive integer, got {config.max_new_tokens!r}")
    if config.repetition_penalty is not None and not config.repetition_penalty > 0:
        problems.append(f"repetition_penalty must be > 0, got {config.repetition_penalty}")
    penalty = getattr(config, REPLY_FREQUENCY_PENALTY, None)
    if penalty is not None and not (isinstance(penalty, (int, float)) and -2 <= penalty <= 2):
        problems.append(f"{REPLY_FREQUENCY_PENALTY} must be a number in [-2, 2] (OpenAI's range), got {penalty!r}")
    if config.do_sample:
        if config.temperature is not None and not config.temperature > 0:
            problems.append(f"temperature must be > 0 when sampling, got {config.temperature} (use do_sample=False "
                            "for greedy decoding)")
        if config.top_p is not None and not 0 < config.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {config.top_p}")
        if config.top_k is not None and not (isinstance(config.top_k, int) and config.top_k >= 0):
            problems.append(f"top_k must be an integer >= 0, got {config.top_k!r}")
    if problems:
        raise UserError("bad generation setting(s): " + "; ".join(problems))


def context_length(model: Any) -> int:
    """The model's context window: config.model_max_length, else max_position_embeddings."""
    config = model.config
    value = getattr(config, "model_max_length", None) or getattr(config, "max_position_embeddings", None)
    if not value:
        raise UserError("the model config names no model_max_length / max_position_embeddings")
    return int(value)


def max_input_tokens(model: Any, generation_config: Any) -> int:
    """Prompt budget: the context window minus max_new_tokens."""
    budget = context_length(model) - int(generation_config.max_new_tokens or 0)
    if budget < 1:
        raise UserError(f"max_new_tokens ({generation_config.max_new_tokens}) leaves no room for the prompt in "
                        f"the {context_length(model)}-token context; lower --max_new_tokens")
    return budget


def chat_prompt_ids(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]],
                    generation_config: Any) -> list[int]:
    """Prompt ids for `messages` through `build_prompt_ids` (the training builder), within budget."""
    marker_config = generation_config if hasattr(generation_config, "user_token_id") else None
    return build_prompt_ids(tokenizer, messages, max_input_tokens(model, generation_config), marker_config)


def record_messages(record: dict) -> list[dict[str, str]]:
    """Chat messages of a data record, exactly as `build_training_sample` builds its prompt:
    system = record["instruction"] (kept even when empty, as training keeps it), user = record["input"]."""
    return chat_messages(record.get("instruction") or "", record["input"])


def _eos_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _with_pad(tokenizer: Any, generation_config: Any) -> Any:
    """The config with pad_token_id set (tokenizer's pad, else the config's, else 0)."""
    import copy

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
    if generation_config.pad_token_id == pad:
        return generation_config
    config = copy.deepcopy(generation_config)
    config.pad_token_id = pad
    return config


def reply_ids(ids: Sequence[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to (not including) the first EOS."""
    out = []
    for i in ids:
        if i in eos_ids:
            break
        out.append(int(i))
    return out


def reply_processors(generation_config: Any, prompt_width: int) -> list[Any]:
    """Our own logits processors that the generation config asks for, given the prompt width (every
    row's prompt, left padding included, ends there): `reply_frequency_penalty` (REPLY_FREQUENCY_PENALTY)."""
    penalty = float(getattr(generation_config, REPLY_FREQUENCY_PENALTY, 0.0) or 0.0)
    return [reply_frequency_penalty(penalty, prompt_width)] if penalty else []


def reply_frequency_penalty(penalty: float, prompt_width: int) -> Any:
    """A logits processor that lowers each token's logit by `penalty` times the number of times the
    token is already in the reply (the ids after `prompt_width`), as OpenAI's `frequency_penalty` does.

    transformers' `repetition_penalty` counts the prompt too, so raising it to stop the loops a small
    model falls into under greedy decoding ("末将以为，末将以为，……") would also push a fact answer
    away from the question's own words ("胡桃的性别是女" for "胡桃的性别是男还是女？"). This one only
    sees the reply, and grows with every repeat.
    """
    import torch
    from transformers.generation import LogitsProcessor

    class ReplyFrequencyPenalty(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            reply = input_ids[:, prompt_width:]
            if not reply.shape[1]:
                return scores
            counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
            return scores - penalty * counts

    return ReplyFrequencyPenalty()


def _generate(model: Any, input_ids: Any, attention_mask: Any, pad_lengths: Sequence[int], generation_config: Any,
              streamer: Any = None, stop_event: Any = None) -> Any:
    """`model.generate` where the repetition penalty ignores each row's left padding.

    transformers' default penalty also penalises the pad id wherever a row is padded, so a padded
    row could decode differently from the same prompt alone; the same processor with
    `prompt_ignore_length` = pad count gives identical math for unpadded rows and skips pads.
    A set `stop_event` (threading.Event) ends generation after the current token.
    """
    import copy

    import torch
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    class _StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device)

    stopping = StoppingCriteriaList([_StopOnEvent()] if stop_event is not None else [])

    processors = LogitsProcessorList()
    penalty = generation_config.repetition_penalty
    if penalty is not None and float(penalty) != 1.0:
        generation_config = copy.deepcopy(generation_config)
        generation_config.repetition_penalty = 1.0
        ignore = torch.tensor(list(pad_lengths), dtype=torch.long, device=input_ids.device)
        processors.append(RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=ignore))
    processors.extend(reply_processors(generation_config, input_ids.shape[1]))
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                              logits_processor=processors, stopping_criteria=stopping, streamer=streamer)


def chat_stream(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]],
                generation_config: Any) -> Iterator[str]:
    """Yield the growing reply text while `generate` runs in a background thread.

    The prompt comes from `build_prompt_ids`; text is streamed by transformers' TextIteratorStreamer
    (special tokens skipped). The last string yielded equals `chat_once` for the same settings. An
    error inside generation is re-raised here. Closing the generator early (consumer stops) stops
    `generate` after its current token and waits for the thread.
    """
    import threading

    import torch
    from transformers import TextIteratorStreamer

    generation_config = _with_pad(tokenizer, generation_config)
    ids = chat_prompt_ids(model, tokenizer, messages, generation_config)
    input_ids = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}
    stop = threading.Event()

    def run() -> None:
        try:
            result["output"] = _generate(model, input_ids, torch.ones_like(input_ids), [0], generation_config,
                                         streamer=streamer, stop_event=stop)
        except Exception as exc:  # noqa: BLE001  (re-raised in the consuming thread)
            result["error"] = exc
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        for chunk in streamer:
            if chunk:
                text += chunk
                yield text
    finally:
        stop.set()  # no-op when generation already ended; else it stops after the current token
        thread.join()
    if "error" in result:
        raise result["error"]
    final = tokenizer.decode(reply_ids(result["output"][0, len(ids):].tolist(), _eos_ids(tokenizer, generation_config)),
                             skip_special_tokens=True)
    if final != text:  # incremental decoding can differ at the edges; end on the exact text
        yield final


def chat_once(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]], generation_config: Any) -> str:
    """The whole reply to `messages` (same prompt and settings as `chat_stream`)."""
    return generate_batch(model, tokenizer, [messages], generation_config, batch_size=1)[0]


def generate_batch(
    model: Any,
    tokenizer: Any,
    list_of_messages: Sequence[Sequence[dict[str, str]]],
    generation_config: Any,
    batch_size: int = 8,
    stats: dict | None = None,
) -> list[str]:
    """Replies to many chats, `batch_size` at a time: prompts left-padded (pad id from the tokenizer,
    or 0) with an attention mask, so each reply equals generating that row alone.

    Greedy unless `generation_config.do_sample`. When `stats` is given it receives
    `generated_tokens` (reply tokens including each EOS), `prompt_tokens` and `seconds`.
    """
    import time

    import torch

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    generation_config = _with_pad(tokenizer, generation_config)
    pad = generation_config.pad_token_id
    eos_ids = _eos_ids(tokenizer, generation_config)
    device = model_device(model)
    replies: list[str] = []
    generated = prompt_tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(list_of_messages), batch_size):
        prompts = [chat_prompt_ids(model, tokenizer, m, generation_config)
                   for m in list_of_messages[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        out = _generate(model, input_ids.to(device), mask.to(device), [width - len(p) for p in prompts],
                        generation_config)
        for row, p in enumerate(prompts):
            new = out[row, width:].tolist()
            ids = reply_ids(new, eos_ids)
            generated += min(len(ids) + 1, len(new))
            prompt_tokens += len(p)
            replies.append(tokenizer.decode(ids, skip_special_tokens=True))
    if stats is not None:
        stats.update(generated_tokens=stats.get("generated_tokens", 0) + generated,
                     prompt_tokens=stats.get("prompt_tokens", 0) + prompt_tokens,
                     seconds=stats.get("seconds", 0.0) + time.perf_counter() - t0)
    return replies
