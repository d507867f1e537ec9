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
        raise error(f"{path}:{e.lineno}: {what} is malformed JSON ({e.msg} at column {e.colno}); fix the file") from e
    except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
        raise error(f"{path}: {what} is unreadable JSON ({type(e).__name__}); fix the file") from e


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


def build_prompt_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_input_tokens: int,
    generation_config: Any = None,
) -> list[int]:
    """Token ids of a chat prompt ending with the assistant's turn marker (generation prompt).

    `messages` is a list of {"role": "system"|"user"|"assistant", "content": str}. Baichuan
    models use the Baichuan2 layout from `baichuan.generation_utils.build_chat_ids` (history
    cut from the oldest round to fit `max_input_tokens`); other models (Qwen2 and friends) use
    their tokenizer's chat template, with the oldest rounds dropped the same way.
    """
    if is_baichuan_tokenizer(tokenizer):
        from baichuan.generation_utils import build_chat_ids

        kwargs = {}
        if generation_config is not None:
            kwargs = {"user_token_id": generation_config.user_token_id,
                      "assistant_token_id": generation_config.assistant_token_id}
        return build_chat_ids(tokenizer, messages, max_input_tokens, **kwargs)
    return _template_prompt_ids(tokenizer, messages, max_input_tokens)


def _template_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]], max_input_tokens: int) -> list[int]:
    """Chat-template prompt; drop the oldest user/assistant rounds until it fits, keep the system.

    Message text is passed through `neutralize_special_text` first, so text spelling a special token
    (e.g. "<|im_end|>\n<|im_start|>assistant") cannot forge a turn: only the template emits markers.
    """
    messages = [{**m, "content": neutralize_special_text(tokenizer, m["content"])} for m in messages]
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(system):])
    while True:
        ids = _apply_template(tokenizer, system + rest, add_generation_prompt=True)
        next_user = next((i for i, m in enumerate(rest) if m["role"] == "user" and i > 0), None)
        if len(ids) <= max_input_tokens or next_user is None:
            return ids[-max_input_tokens:]
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
    """(input_ids, labels, truncated) for one single-turn record.

    The prompt is built by `build_prompt_ids` (so it equals what inference feeds the model) and
    cut to `max_src_len`; then the answer ids and EOS follow, cut so that the whole fits
    `max_len`. Labels are -100 on the prompt and carry the answer and EOS.
    """
    full_prompt = build_prompt_ids(tokenizer, chat_messages(system, user), max_input_tokens=10**9,
                                   generation_config=generation_config)
    prompt = full_prompt[-max_src_len:]
    answer_ids = _answer_ids(tokenizer, answer, generation_config) + [tokenizer.eos_token_id]
    room = max_len - len(prompt)
    truncated = len(prompt) < len(full_prompt) or len(answer_ids) > room
    answer_ids = answer_ids[:room]
    return prompt + answer_ids, [-100] * len(prompt) + answer_ids, truncated


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
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, absurd nesting
                raise DataError(f"{path}:{lineno}: unreadable JSON ({type(e).__name__}); fix the line") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place, on error delete it.

    Works for files and folders: readers never see a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if target.is_dir() and path.is_dir():
            _remove(path)
        os.replace(target, path)
    finally:
        _remove(tmp)


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


class Baichuan2PromptDataSet:
    """Single-turn instruction records tokenized for causal-LM training.

    Each sample is `[system ids][user token][input ids][assistant token][output ids][eos]` for
    Baichuan models (the chat template for others), built by `build_training_sample`, i.e. by
    the same prompt builder that inference uses. Labels are -100 except on the output and EOS.
    With `is_skip`, samples that would be truncated are dropped (and counted in `skipped`).
    """

    def __init__(self, data_path: str | os.PathLike, tokenizer: Any, max_len: int, max_src_len: int,
                 is_skip: bool = False, generation_config: Any = None) -> None:
        if max_src_len >= max_len:
            raise UserError(f"max_src_len ({max_src_len}) must be smaller than max_len ({max_len})")
        self.samples: list[dict[str, list[int]]] = []
        self.skipped = 0
        self.truncated = 0
        for lineno, record in read_jsonl(data_path):
            system, user, answer = _record_fields(record, data_path, lineno)
            ids, labels, truncated = build_training_sample(
                tokenizer, system, user, answer, max_src_len, max_len, generation_config)
            if truncated and is_skip:
                self.skipped += 1
                continue
            self.truncated += truncated
            self.samples.append({"input_ids": ids, "labels": labels})
        if not self.samples:
            raise DataError(f"{data_path}: no usable samples ({self.skipped} skipped as too long); "
                            "build data with data_helper.py or raise --max_len")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.samples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(s["input_ids"]) for s in self.samples]


def _record_fields(record: dict, path: Any, lineno: int) -> tuple[str, str, str]:
    for key in RECORD_FIELDS:
        if not isinstance(record.get(key), str):
            raise DataError(f"{path}:{lineno}: field {key!r} missing or not a string; "
                            "records need instruction/input/output strings (see data_helper.py)")
    if not record["output"].strip():
        raise DataError(f"{path}:{lineno}: empty 'output'")
    return record["instruction"], record["input"], record["output"]


class DataCollator:
    """Right-pads a list of samples to a multiple of 8 tokens; labels padded with -100."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

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
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
