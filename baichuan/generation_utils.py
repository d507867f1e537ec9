"""The Baichuan2 chat layout, in one place, and a text streamer for `model.chat(..., stream=True)`.

Layout, as Baichuan2-Chat builds its prompts: `[system ids][195][user ids][196][assistant ids][195][user ids][196]`
— no BOS, no EOS between turns, no separators; the history is cut from the oldest whole round to fit the budget.

Example:
    >>> from baichuan.generation_utils import build_chat_ids
    >>> ids = build_chat_ids(tokenizer, [{"role": "user", "content": "你好"}], max_input_tokens=2048)
    >>> ids[0], ids[-1]
    (195, 196)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from queue import Queue
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.streamers import BaseStreamer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

USER_TOKEN_ID = 195
ASSISTANT_TOKEN_ID = 196


# ---------------------------------------------------------------------------------------------
# Message text -> ids that can never contain a control id
# ---------------------------------------------------------------------------------------------
def control_token_ids(
    tokenizer: PreTrainedTokenizerBase, user_token_id: int = USER_TOKEN_ID, assistant_token_id: int = ASSISTANT_TOKEN_ID
) -> frozenset[int]:
    """Ids that message text must never produce: the turn markers, BOS, EOS and PAD."""
    ids = {user_token_id, assistant_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return frozenset(i for i in ids if i is not None)


def encode_content(tokenizer: PreTrainedTokenizerBase, text: str, forbidden_ids: Iterable[int]) -> list[int]:
    """Ids of message `text` (no special tokens added) in which no id of `forbidden_ids` occurs.

    Normally this is exactly `tokenizer.encode(text, add_special_tokens=False)`. The real tokenizer
    however maps the literal text of some pieces ("<s>", "</s>", "<unk>", and the user-defined pieces
    behind ids 195/196) to those ids, so user text could forge a turn marker. Each such occurrence is
    re-encoded as its first character and the rest encoded separately, which yields ordinary pieces
    (bytes/characters) for the same text. A forbidden id that cannot be traced back to its literal
    text (e.g. a genuine <unk> from a tokenizer without byte fallback) is dropped.
    """
    forbidden = frozenset(forbidden_ids)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    hits = forbidden.intersection(ids)
    if not hits:
        return ids
    pieces = {tokenizer.convert_ids_to_tokens(i) for i in hits}
    pieces = sorted((p for p in pieces if p and p in text), key=len, reverse=True)
    if not pieces or len(text) == 1:
        return [i for i in ids if i not in forbidden]
    out: list[int] = []
    pos = 0
    # Longest pieces first in the alternation, so "<reserved_106>" wins over a shorter prefix piece.
    for match in re.finditer("|".join(map(re.escape, pieces)), text):
        out += encode_content(tokenizer, text[pos:match.start()], forbidden) if match.start() > pos else []
        piece = match.group()
        out += encode_content(tokenizer, piece[0], forbidden)
        out += encode_content(tokenizer, piece[1:], forbidden)
        pos = match.end()
    if pos < len(text):
        out += encode_content(tokenizer, text[pos:], forbidden)
    return out


# ---------------------------------------------------------------------------------------------
# The chat prompt
# ---------------------------------------------------------------------------------------------
def parse_messages(messages: Sequence[dict[str, str]]) -> tuple[str, list[list[dict[str, str]]]]:
    """(system text, rounds). A system message may only be at index 0; a round starts at each user
    message and any other message joins the current round."""
    system = ""
    rounds: list[list[dict[str, str]]] = []
    current: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise TypeError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message is only allowed at index 0")
            system = content
            continue
        if role == "user" and current:
            rounds.append(current)
            current = []
        current.append(message)
    if current:
        rounds.append(current)
    return system, rounds


def build_chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_input_tokens: int,
    user_token_id: int = USER_TOKEN_ID,
    assistant_token_id: int = ASSISTANT_TOKEN_ID,
) -> list[int]:
    """Token ids of a Baichuan2 chat prompt.

    - system ids first (no BOS), budget for the history = `max_input_tokens - len(system ids)`;
    - rounds are walked newest -> oldest; each message contributes `user_token_id` (role "user") or
      `assistant_token_id` (any other role) followed by its text ids; a round is prepended while the
      history is empty (so the newest round is always kept) or if it fits whole; the walk stops at the
      first round that does not fit, or once the history reaches the budget;
    - `assistant_token_id` is appended when the last message is not from the assistant;
    - the result is cut from the left to `max_input_tokens` (which can cut into the system prompt or
      the newest round).
    Message text never yields a control id (see `encode_content`).
    """
    if not messages:
        raise ValueError("messages is empty")
    if max_input_tokens < 1:
        raise ValueError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
    forbidden = control_token_ids(tokenizer, user_token_id, assistant_token_id)
    system, rounds = parse_messages(messages)
    system_ids = encode_content(tokenizer, system, forbidden) if system else []
    max_history_tokens = max_input_tokens - len(system_ids)

    history: list[int] = []
    for round_messages in reversed(rounds):
        round_ids: list[int] = []
        for message in round_messages:
            round_ids.append(user_token_id if message["role"] == "user" else assistant_token_id)
            round_ids.extend(encode_content(tokenizer, message["content"], forbidden))
        if not history or len(history) + len(round_ids) <= max_history_tokens:
            history = round_ids + history
            if len(history) < max_history_tokens:
                continue
        break

    ids = system_ids + history
    if messages[-1]["role"] != "assistant":
        ids.append(assistant_token_id)
    return ids[-max_input_tokens:]


def build_chat_input(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_new_tokens: int = 0,
) -> torch.LongTensor:
    """The chat prompt as a [1, n] LongTensor on `model.device`.

    Budget: `model.config.model_max_length - (max_new_tokens or generation_config.max_new_tokens)`;
    turn-marker ids come from `model.generation_config` (user_token_id / assistant_token_id).
    """
    generation_config = model.generation_config
    max_new_tokens = max_new_tokens or generation_config.max_new_tokens or 0
    model_max_length = getattr(model.config, "model_max_length", None) or model.config.max_position_embeddings
    ids = build_chat_ids(
        tokenizer,
        messages,
        model_max_length - max_new_tokens,
        user_token_id=getattr(generation_config, "user_token_id", USER_TOKEN_ID),
        assistant_token_id=getattr(generation_config, "assistant_token_id", ASSISTANT_TOKEN_ID),
    )
    return torch.tensor([ids], dtype=torch.long, device=model.device)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
class _End:
    """Queue sentinel: generation finished."""


class _Failure:
    """Queue item: generation raised `exc` in its thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class TextIterStreamer(BaseStreamer):
    """A `generate(streamer=...)` target that is iterated from another thread.

    Each new token re-decodes the whole response so far and queues the cumulative text; iterating
    yields those growing strings until generation ends. Batch size 1 only (row 0 is used).
    `fail(exc)` makes the iterator raise `exc` instead of waiting forever when generation crashes.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_prompt: bool = False,
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.timeout = timeout
        self.tokens: list[int] = []
        self.queue: Queue[Any] = Queue()
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (first call) or the next token(s) from `generate`."""
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        if value.dim() > 1:
            value = value[0]
        self.tokens.extend(value.tolist())
        self.queue.put(self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens))

    def end(self) -> None:
        """Generation finished."""
        self.queue.put(_End)

    def fail(self, exc: BaseException) -> None:
        """Generation raised `exc`; the consumer re-raises it."""
        self.queue.put(_Failure(exc))

    def __iter__(self) -> TextIterStreamer:
        return self

    def __next__(self) -> str:
        item = self.queue.get(timeout=self.timeout)
        if item is _End:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item


__all__ = [
    "ASSISTANT_TOKEN_ID",
    "USER_TOKEN_ID",
    "TextIterStreamer",
    "build_chat_ids",
    "build_chat_input",
    "control_token_ids",
    "encode_content",
    "parse_messages",
]
