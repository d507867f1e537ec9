"""The lowest shared layer of the RolePlayProj pipeline (above it: `roleplay/`, then the scripts).

What lives here, once: the paths every script defaults to; `UserError`/`DataError` and `run_main`
(one `error:` line, exit 2); JSON and JSON-lines reading with errors that name the file and line;
atomic writes (`atomic_path`, `write_jsonl`, `write_json`); seeding and rank-0 printing; the
role-play system prompt (`build_system_prompt`, `load_profiles`, `role_system_prompt`); the one
prompt builder shared by training and inference (`build_prompt_ids`, `build_training_sample`,
`chat_messages`, `neutralize_special_text`, `encode_text`); and the training dataset and collator
(`Baichuan2PromptDataSet`, `DataCollator`).

It imports nothing of the project but `baichuan` (inside the functions that need it) and nothing
heavy at load time (torch is imported inside the functions), so `data_helper.py` stays fast.

Example:
    python -c "import utils; print(utils.build_system_prompt('孙悟空', '齐天大圣'))"
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# Paths (relative to the repo root; every script's defaults use these)
# ---------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent
DATA_DIR = "data"
PROFILES_PATH = "data/profiles-zh_desc.json"
ATTRIBUTES_PATH = "data/genshin_attributes.json"
TEMPLATES_PATH = "data/attribute_templates.json"  # attribute question/answer templates
DIALOGUE_TEMPLATES_PATH = "data/dialogue_templates.json"  # follow-up questions of multi-turn conversations
TRAIN_PATH = "data/train.json"
TEST_PATH = "data/test.json"
OUTPUT_ROOT = "output"
DEFAULT_BASE_DIR = "output/tiny-baichuan2-chat"  # the embedded default, built by tools/build_default.py
REAL_BASE_DIR = "Baichuan2-7B-Chat"  # where train.sh looks for real weights
RUN_CONFIG_NAME = "run_config.json"  # resolved run config saved next to every checkpoint
IMAGES_DIR = "images"

# ---------------------------------------------------------------------------------------------
# The role-play system prompt (the RoleBench-zh prompt; one home for it)
# ---------------------------------------------------------------------------------------------
SYSTEM_PROMPT_TEMPLATE = (
    "你是{role}，你的特征描述是：{desc}。现在请你回答我的一些问题，以准确展现你的人格特征！"
    "你的说话风格要全面模仿被赋予的人格角色！请不要暴露你是人工智能模型或者语言模型，"
    "你要时刻记住你只被赋予的一个人格角色。说话不要嗦，也不要太过于正式或礼貌。"
)


def build_system_prompt(role: str, desc: str) -> str:
    """The system prompt for `role`, filled from its profile description."""
    return SYSTEM_PROMPT_TEMPLATE.format(role=role, desc=desc.strip().rstrip("。"))


class UserError(Exception):
    """A problem the user must fix (bad path, bad data, bad config). Scripts print it as one line."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (and line) and says what to do."""


def run_main(main_fn: Any, argv: Sequence[str] | None = None) -> int:
    """Run a script's main; a UserError becomes one `error: ...` line on stderr and exit code 2."""
    import sys

    try:
        return int(main_fn(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def read_json(path: str | os.PathLike, what: str, hint: str, error: type[UserError] = DataError) -> Any:
    """Parse a UTF-8 JSON file (a BOM is fine). Every problem is one `error` that names the file
    (and the line), what the file is, and what to do: the one JSON reader of every script."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found; {hint}")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise error(f"{path}: {what} cannot be read ({e.strerror}); {hint}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: {what} is malformed JSON ({json_error_text(e)}); fix the file") from e
    except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
        raise error(f"{path}: {what} is unreadable JSON ({type(e).__name__}); fix the file") from e


def json_error_text(e: json.JSONDecodeError) -> str:
    """"<what> at column N" for a JSON error: json's own messages may already end in "at"
    ("Unterminated string starting at"), which must not read "at at column"."""
    msg = e.msg.removesuffix(" at")
    return f"{msg} at column {e.colno}"


def read_json_object(path: str | os.PathLike, what: str, hint: str, error: type[UserError] = DataError) -> dict:
    """`read_json` for files that must hold a JSON object."""
    obj = read_json(path, what, hint, error)
    if not isinstance(obj, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(obj).__name__}; {hint}")
    return obj


def load_profiles(path: str | os.PathLike = PROFILES_PATH) -> dict[str, str]:
    """Read a role -> description JSON object. Raises DataError naming the file on bad input."""
    hint = "pass a JSON object mapping role name to description"
    profiles = read_json(path, "profiles file", hint)
    if not isinstance(profiles, dict) or not profiles:
        raise DataError(f"{path}: expected a non-empty JSON object mapping role name to description")
    for role, desc in profiles.items():
        if not isinstance(desc, str) or not desc.strip():
            raise DataError(f"{path}: role {role!r} has an empty or non-string description")
    return profiles


def role_system_prompt(role: str, profiles: dict[str, str]) -> str:
    """System prompt for a role known to `profiles`; a clear error for an unknown role."""
    if role not in profiles:
        raise DataError(f"unknown role {role!r}; known roles: {', '.join(profiles)}. "
                        "Add it to the profiles file to use it.")
    return build_system_prompt(role, profiles[role])


# ---------------------------------------------------------------------------------------------
# Prompt ids: the one builder shared by train.py, predict.py and web_demo.py
# ---------------------------------------------------------------------------------------------
def is_baichuan_tokenizer(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ == "BaichuanTokenizer"


class PromptTooLong(UserError):
    """The system prompt and the newest message alone do not fit the prompt budget.

    The builders never drop the system prompt (the role) or the newest user message; they drop the
    oldest rounds first. When even those two do not fit, the message is refused with this error,
    which says how long the message may be (`allowed_tokens`, `allowed_chars` is an estimate)."""

    def __init__(self, message_tokens: int, allowed_tokens: int, message_chars: int) -> None:
        self.message_tokens = message_tokens
        self.allowed_tokens = max(0, allowed_tokens)
        per_char = message_tokens / max(1, message_chars)
        self.allowed_chars = int(self.allowed_tokens / per_char) if per_char else self.allowed_tokens
        super().__init__(
            f"the message is too long: {message_tokens} tokens ({message_chars} characters), but with the role's "
            f"system prompt and the room kept for the reply it may be at most {self.allowed_tokens} tokens "
            f"(about {self.allowed_chars} characters); send a shorter message")


def build_prompt_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_input_tokens: int,
    generation_config: Any = None,
) -> list[int]:
    """Token ids of a chat prompt ending with the assistant's turn marker (generation prompt).

    `messages` is a list of {"role": "system"|"user"|"assistant", "content": str}. Baichuan models
    use the Baichuan2 layout (system ids, then `<user> text <assistant> text` per message); other
    models (Qwen2 and friends) their tokenizer's chat template. To fit `max_input_tokens` the oldest
    whole rounds are dropped first; the system prompt and the newest round are always kept, and when
    they alone do not fit, `PromptTooLong` is raised (nothing is cut silently).
    """
    if not messages:
        raise ValueError("messages is empty")
    if is_baichuan_tokenizer(tokenizer):
        system_ids, rounds = _baichuan_segments(tokenizer, messages, generation_config)
        tail = [] if messages[-1]["role"] == "assistant" else [_markers(generation_config)[1]]
        kept = _fit_rounds(len(system_ids) + len(tail), [len(r) for r in rounds], max_input_tokens, messages)
        return system_ids + [i for r in rounds[len(rounds) - kept:] for i in r] + tail
    return _template_prompt_ids(tokenizer, messages, max_input_tokens)


def _markers(generation_config: Any) -> tuple[int, int]:
    """(user, assistant) turn-marker ids: the model's generation config, else Baichuan2's."""
    from baichuan.generation_utils import ASSISTANT_TOKEN_ID, USER_TOKEN_ID

    if generation_config is None:
        return USER_TOKEN_ID, ASSISTANT_TOKEN_ID
    return generation_config.user_token_id, generation_config.assistant_token_id


def _baichuan_segments(tokenizer: Any, messages: Sequence[dict[str, str]],
                       generation_config: Any) -> tuple[list[int], list[list[int]]]:
    """(system ids, ids of each round) in the Baichuan2 layout; message text never yields a control id."""
    from baichuan.generation_utils import control_token_ids, encode_content, parse_messages

    user_id, assistant_id = _markers(generation_config)
    forbidden = control_token_ids(tokenizer, user_id, assistant_id)
    system, rounds = parse_messages(messages)
    system_ids = encode_content(tokenizer, system, forbidden) if system else []
    round_ids = []
    for round_messages in rounds:
        ids: list[int] = []
        for m in round_messages:
            ids.append(user_id if m["role"] == "user" else assistant_id)
            ids.extend(encode_content(tokenizer, m["content"], forbidden))
        round_ids.append(ids)
    return system_ids, round_ids


def _fit_rounds(fixed: int, round_lengths: Sequence[int], budget: int, messages: Sequence[dict[str, str]]) -> int:
    """How many of the newest rounds fit `budget` next to `fixed` tokens (system prompt, markers):
    at least one, or PromptTooLong naming how long the newest message may be."""
    newest = round_lengths[-1] if round_lengths else 0
    if fixed + newest > budget:
        text = messages[-1]["content"] if messages else ""
        raise PromptTooLong(newest - 1, budget - fixed - 1, len(text))  # the round's ids less its marker
    used, kept = fixed, 0
    for n in reversed(round_lengths):
        if used + n > budget:
            break
        used, kept = used + n, kept + 1
    return kept


def _template_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]], max_input_tokens: int) -> list[int]:
    """Chat-template prompt; drop the oldest user/assistant rounds until it fits, keep the system and
    the newest round (PromptTooLong when those alone do not fit).

    Message text is passed through `neutralize_special_text` first, so text spelling a special token
    (e.g. "<|im_end|>\n<|im_start|>assistant") cannot forge a turn: only the template emits markers.
    """
    messages = [{**m, "content": neutralize_special_text(tokenizer, m["content"])} for m in messages]
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(system):])
    while True:
        ids = _apply_template(tokenizer, system + rest, add_generation_prompt=True)
        if len(ids) <= max_input_tokens:
            return ids
        next_user = next((i for i, m in enumerate(rest) if m["role"] == "user" and i > 0), None)
        if next_user is None:
            text = rest[-1]["content"] if rest else ""
            own = len(encode_text(tokenizer, text))
            raise PromptTooLong(own, max_input_tokens - (len(ids) - own), len(text))
        rest = rest[next_user:]


WORD_JOINER = "\u2060"  # invisible, no width: splits a special token's text without changing what it reads


def neutralize_special_text(tokenizer: Any, text: str) -> str:
    """`text` with every occurrence of a special token's string (e.g. "<|im_start|>", "<|endoftext|>")
    broken by a WORD JOINER after its first character, so the tokenizer encodes it as plain text and
    never as the control id. Chat-template tokenizers match special strings anywhere in the rendered
    prompt; this is how user/role/answer text is kept from forging turn markers or an early EOS."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    specials = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)
    for _ in range(8):  # one pass suffices unless a special string contains the joiner itself
        if not any(t in text for t in specials):
            break
        for t in specials:
            text = text.replace(t, t[0] + WORD_JOINER + t[1:])
    return text


def _apply_template(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


@dataclass
class TrainingSample:
    """One tokenized training conversation: ids, labels (-100 except on assistant replies and their
    EOS), whether the newest round had to be cut, and how many of the oldest rounds were dropped."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped_rounds: int = 0


def chat_messages(system: str, user: str) -> list[dict[str, str]]:
    """The messages of one single-turn record: the system turn is kept even when empty, so training
    and inference (`record_messages`) feed the same prompt."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def build_training_sample(
    tokenizer: Any,
    system: str,
    user: str,
    answer: str,
    max_src_len: int,
    max_len: int,
    generation_config: Any = None,
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one single-turn record: `build_conversation_sample` of
    system + user + assistant. Empty ids mean the system prompt alone does not fit `max_src_len`."""
    messages = [*chat_messages(system, user), {"role": "assistant", "content": answer}]
    sample = build_conversation_sample(tokenizer, messages, max_src_len, max_len, generation_config)
    return sample.input_ids, sample.labels, sample.truncated


def build_conversation_sample(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_src_len: int,
    max_len: int,
    generation_config: Any = None,
) -> TrainingSample:
    """Tokenize a conversation (optional system, then user/assistant rounds ending with an assistant
    reply) for training, with loss on every assistant reply and its EOS and nowhere else.

    The layout is exactly what inference feeds (`build_prompt_ids`): Baichuan's `<user> text
    <assistant> reply` rounds, where the label at each next `<user>` marker is EOS (the model learns
    to stop after a reply, while the history keeps no EOS, as at inference); other models the chat
    template. Lengths: the system prompt is never dropped or cut; the oldest whole rounds go first
    to fit `max_len`; the newest round's prompt must fit `max_src_len` with the system prompt (its
    user text is cut from the start otherwise) and its reply is cut at the end to fit `max_len`; both
    cuts set `truncated`. When the system prompt alone does not fit, the sample has no ids.
    """
    check_conversation(messages)
    if is_baichuan_tokenizer(tokenizer):
        return _baichuan_sample(tokenizer, messages, max_src_len, max_len, generation_config)
    return _template_sample(tokenizer, messages, max_src_len, max_len)


def check_conversation(messages: Sequence[dict[str, str]]) -> None:
    """ValueError unless `messages` is [system?] then user/assistant pairs, ending with the assistant."""
    body = list(messages[1:] if messages and messages[0].get("role") == "system" else messages)
    if not body or len(body) % 2:
        raise ValueError("a training conversation needs user/assistant pairs ending with an assistant reply")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + len(messages) - len(body)}: expected a {want} message with string content")


def _baichuan_sample(tokenizer: Any, messages: Sequence[dict[str, str]], max_src_len: int, max_len: int,
                     generation_config: Any) -> TrainingSample:
    user_id, assistant_id = _markers(generation_config)
    eos = tokenizer.eos_token_id
    prompt_msgs = [m for m in messages if m["role"] != "assistant"]
    replies = [_answer_ids(tokenizer, m["content"], generation_config) for m in messages if m["role"] == "assistant"]
    system_ids, prompt_rounds = _baichuan_segments(tokenizer, prompt_msgs, generation_config)
    # prompt_rounds[i] = <user> text; each round adds <assistant> reply
    newest_prompt = prompt_rounds[-1] + [assistant_id]
    truncated = False
    room = max_src_len - len(system_ids)
    if room < 2:
        return TrainingSample([], [], truncated=True)
    if len(newest_prompt) > room:  # keep the marker and the end of the user's text
        newest_prompt = [user_id] + newest_prompt[len(newest_prompt) - room + 1:]
        truncated = True
    reply = replies[-1] + [eos]
    room = max_len - len(system_ids) - len(newest_prompt)
    if len(reply) > room:
        reply, truncated = reply[:room], True
    ids = newest_prompt + reply
    labels = [-100] * len(newest_prompt) + reply
    kept = 1
    for r_prompt, r_reply in zip(reversed(prompt_rounds[:-1]), reversed(replies[:-1]), strict=True):
        older = r_prompt + [assistant_id] + r_reply
        if len(system_ids) + len(older) + len(ids) > max_len:
            break
        labels = [-100] * (len(r_prompt) + 1) + r_reply + [eos] + labels[1:]  # EOS label at the next <user>
        ids = older + ids
        kept += 1
    return TrainingSample(system_ids + ids, [-100] * len(system_ids) + labels, truncated, len(replies) - kept)


def _template_sample(tokenizer: Any, messages: Sequence[dict[str, str]], max_src_len: int,
                     max_len: int) -> TrainingSample:
    """Chat-template models: each reply follows the template's generation prompt for the history
    before it; the template must render every earlier turn as that prefix (prefix-stable)."""
    system = list(messages[:1]) if messages[0]["role"] == "system" else []
    body = list(messages[len(system):])
    eos = tokenizer.eos_token_id
    for start in range(0, len(body), 2):  # drop the oldest rounds until it fits
        ids, labels, truncated = _template_ids(tokenizer, system + body[start:], max_src_len, max_len, eos)
        if ids is None:
            return TrainingSample([], [], truncated=True)
        if len(ids) <= max_len:
            return TrainingSample(ids, labels, truncated, start // 2)
    raise AssertionError("the newest round is always cut to fit")  # pragma: no cover


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], max_src_len: int, max_len: int,
                  eos: int) -> tuple[list[int] | None, list[int], bool]:
    ids: list[int] = []
    labels: list[int] = []
    truncated = False
    last = len(messages) - 1
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _template_prompt_ids(tokenizer, messages[:j], 10**9)
        if prefix[:len(ids)] != ids:
            raise DataError("this tokenizer's chat template does not render earlier turns as a prefix of later "
                            "ones, so multi-turn records cannot be trained with it; use single-turn records")
        labels += [-100] * (len(prefix) - len(ids))
        ids = prefix
        reply = _answer_ids(tokenizer, m["content"]) + [eos]
        if j == last:
            if len(ids) > max_src_len:
                ids, labels, truncated = _cut_template_prompt(tokenizer, messages, max_src_len)
                if ids is None:
                    return None, [], True
            room = max_len - len(ids)
            if len(reply) > room:
                reply, truncated = reply[:room], True
        ids, labels = ids + reply, labels + reply
    return ids, labels, truncated


def _cut_template_prompt(tokenizer: Any, messages: list[dict[str, str]],
                         max_src_len: int) -> tuple[list[int] | None, list[int], bool]:
    """The newest prompt alone, its user text cut from the start until it fits `max_src_len`."""
    system = list(messages[:1]) if messages[0]["role"] == "system" else []
    user = messages[-2]["content"]
    lo, hi = 0, len(user)
    while lo < hi:  # fewest characters dropped from the start so that the prompt fits
        mid = (lo + hi) // 2
        ids = _template_prompt_ids(tokenizer, [*system, {"role": "user", "content": user[mid:]}], 10**9)
        lo, hi = (lo, mid) if len(ids) <= max_src_len else (mid + 1, hi)
    ids = _template_prompt_ids(tokenizer, [*system, {"role": "user", "content": user[lo:]}], 10**9)
    if len(ids) > max_src_len:
        return None, [], True
    return ids, [-100] * len(ids), True


def _answer_ids(tokenizer: Any, answer: str, generation_config: Any = None) -> list[int]:
    """Answer text ids. Baichuan: encoded like message text in the prompt builder, so answer text
    that spells "</s>" or a turn marker cannot put a control id (an early EOS) into the labels."""
    if not is_baichuan_tokenizer(tokenizer):
        return encode_text(tokenizer, neutralize_special_text(tokenizer, answer))
    from baichuan.generation_utils import control_token_ids, encode_content

    markers = {}
    if generation_config is not None:
        markers = {"user_token_id": generation_config.user_token_id,
                   "assistant_token_id": generation_config.assistant_token_id}
    return encode_content(tokenizer, answer, control_token_ids(tokenizer, **markers))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of plain text with no special tokens added (no BOS/EOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# Files: JSON lines in, atomic writes out
# ---------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-blank line; DataError names file:line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                # without its line break: a line cut short is then blamed at its real end, not at
                # "column 1" of a line that does not exist
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({json_error_text(e)})") from e
            except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, absurd nesting
                raise DataError(f"{path}:{lineno}: unreadable JSON ({type(e).__name__}); fix the line") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place, on error delete it.

    Works for files and folders: readers never see a half-written output. A failure to create the
    folder or the temporary name, to write into it (no space, no permission) or to rename it is one
    UserError that names `path`, the output, and never the temporary name the user never chose.
    """
    path = Path(path)
    make_parent_dir(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror or e}); check the folder's permissions") from e
    target = tmp / path.name
    try:
        try:
            yield target
        except OSError as e:
            if e.filename is not None and not str(e.filename).startswith(str(tmp)):
                raise  # about another file (an input, say): its own message names it
            raise UserError(f"{path}: writing failed ({e.strerror or e}); check free space and permissions, "
                            "then run again (nothing was replaced)") from e
        try:
            if target.is_dir() and path.is_dir():
                _remove(path)
            os.replace(target, path)
        except OSError as e:
            raise UserError(f"{path}: cannot be replaced ({e.strerror or e}); remove it or pick another "
                            "output path") from e
    finally:
        _remove(tmp)


def check_output_parent(path: str | os.PathLike) -> None:
    """UserError when a file stands where a folder above `path` must be (scripts call this before
    any slow work, so the mistake costs nothing)."""
    path = Path(path)
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: cannot be written because {parent} is a file, not a folder; "
                                "pick another output path or move that file away")
            break


def make_parent_dir(path: Path) -> None:
    """Create `path`'s folder; a UserError naming the culprit when part of it is a file (not a bare
    "File exists"), or when it cannot be created."""
    check_output_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path.parent}: cannot create the output folder ({e.strerror or e}); check the path "
                        "and its permissions") from e


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as UTF-8 JSON lines atomically; returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically (indented, UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print_rank0(*args: Any, **kwargs: Any) -> None:
    """print() on global rank 0 only, flushed (DeepSpeed launches one process per device)."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------------------
# Training data: dataset and collator (the batches come from roleplay.sampler)
# ---------------------------------------------------------------------------------------------
RECORD_FIELDS = ("instruction", "input", "output")
# The kinds of record whose losses train.py reports apart (their scales differ ~50x on the default data:
# short attribute answers are learnt almost at once, role replies are open text): data_helper.py's
# `source` "attribute" is the first, anything else (RoleBench sources, a user's own records) the second.
LOSS_GROUPS = ("attribute facts", "role replies")


def loss_group(record: dict) -> int:
    """Index into LOSS_GROUPS of a training record."""
    return 0 if str(record.get("source", "")).startswith("attribute") else 1  # attribute, attribute_dialogue


class Baichuan2PromptDataSet:
    """Instruction records (single-turn, or multi-turn in the `messages` form) tokenized for causal-LM
    training by `build_conversation_sample`, the same prompt builder inference uses: loss on every
    assistant reply and its EOS, -100 elsewhere. A single-turn Baichuan sample is `[system ids][user
    token][input ids][assistant token][output ids][eos]` (the chat template for other models).
    `group` is the record's index into LOSS_GROUPS (train.py logs the loss per group).
    With `is_skip`, samples whose newest round had to be cut are dropped; a sample whose system prompt
    alone does not fit is always dropped; both count in `skipped` (`dropped_rounds`: oldest rounds left out).
    """

    def __init__(self, data_path: str | os.PathLike, tokenizer: Any, max_len: int, max_src_len: int,
                 is_skip: bool = False, generation_config: Any = None) -> None:
        if max_src_len >= max_len:
            raise UserError(f"max_src_len ({max_src_len}) must be smaller than max_len ({max_len})")
        self.samples: list[dict[str, Any]] = []
        self.skipped = 0
        self.truncated = 0
        self.dropped_rounds = 0
        self.generation_only = 0
        for lineno, record in read_jsonl(data_path):
            if "turns" in record and "messages" not in record and "output" not in record:
                self.generation_only += 1  # a multi-turn test conversation: predict.py generates it, no loss here
                continue
            messages = record_conversation(record, data_path, lineno)
            sample = build_conversation_sample(tokenizer, messages, max_src_len, max_len, generation_config)
            if not sample.input_ids or (sample.truncated and is_skip):
                self.skipped += 1  # the system prompt alone does not fit, or --is_skip and it was cut
                continue
            self.truncated += sample.truncated
            self.dropped_rounds += sample.dropped_rounds
            self.samples.append({"input_ids": sample.input_ids, "labels": sample.labels, "group": loss_group(record)})
        if not self.samples:
            raise DataError(f"{data_path}: no usable samples ({self.skipped} skipped as too long); "
                            "build data with data_helper.py or raise --max_len")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.samples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(s["input_ids"]) for s in self.samples]


def record_conversation(record: dict, path: Any, lineno: int) -> list[dict[str, str]]:
    """A training record's messages: the common `messages` form ([{"role", "content"}, ...], system
    first if any, user/assistant rounds ending with the assistant) or the single-turn
    instruction/input/output form (system = instruction, kept even when empty)."""
    if "messages" in record:
        messages = record["messages"]
        try:
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError("'messages' must be a list of {\"role\", \"content\"} objects")
            check_conversation(messages)
            if not messages[-1]["content"].strip():
                raise ValueError("the last assistant reply is empty")
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}; see the 'messages' form in data_helper.py") from e
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    system, user, answer = _record_fields(record, path, lineno)
    return [*chat_messages(system, user), {"role": "assistant", "content": answer}]


def _record_fields(record: dict, path: Any, lineno: int) -> tuple[str, str, str]:
    for key in RECORD_FIELDS:
        if not isinstance(record.get(key), str):
            raise DataError(f"{path}:{lineno}: field {key!r} missing or not a string; "
                            "records need instruction/input/output strings (see data_helper.py)")
    if not record["output"].strip():
        raise DataError(f"{path}:{lineno}: empty 'output'")
    return record["instruction"], record["input"], record["output"]


class DataCollator:
    """Right-pads a list of samples to a multiple of 8 tokens; labels padded with -100.

    With `meta`, it also returns `groups` (each row's LOSS_GROUPS index, 1 when a sample has none) and
    `num_tokens` (the non-padding tokens, counted here so that the training loop need not read a device
    tensor back for its statistics); train.py passes only the model inputs on to the model.
    roleplay.packing.PackingCollator is the packed alternative (train.py --packing)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8, meta: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.meta = meta

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(s["input_ids"]) for s in batch)
        width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            n = len(s["input_ids"])
            ids[row, :n] = torch.tensor(s["input_ids"])
            labels[row, :n] = torch.tensor(s["labels"])
            mask[row, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.meta:
            out["groups"] = torch.tensor([s.get("group", 1) for s in batch], dtype=torch.long)
            out["num_tokens"] = sum(len(s["input_ids"]) for s in batch)
        return out
