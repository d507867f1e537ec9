"""Shared pieces of the RolePlayProj pipeline: paths, the role system prompt, the one prompt
builder used by training and inference, the training dataset and collator, and small helpers.

Every fact lives here once: scripts import it instead of restating it. The module imports
nothing heavy at load time (torch is imported inside the functions that need it), so
`data_helper.py` stays fast.

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
TRAIN_PATH = "data/train.json"
TEST_PATH = "data/test.json"
OUTPUT_ROOT = "output"
DEFAULT_BASE_DIR = "output/tiny-baichuan2-chat"  # the embedded default, built by baichuan/build_default.py
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
# Training data: dataset, length-grouped batches, collator
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


class LengthGroupedBatchSampler:
    """Micro-batches of similar length, reshuffled every epoch, split over data-parallel ranks.

    One optimizer step consumes a *global batch* of `batch_size * world_size * grad_accum`
    samples. Global batches are drawn from a seeded permutation, sorted by length (so little
    compute goes to padding), cut into micro-batches, and micro-batch `a * world_size + rank`
    goes to `rank` at accumulation step `a`. So one process with grad_accum=2 sees exactly the
    micro-batches two processes with grad_accum=1 see. The order of global batches is shuffled
    so that lengths are mixed over the epoch. `start` skips micro-batches already consumed (resume).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0, megabatch: int = 64) -> None:
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.grad_accum, self.seed, self.megabatch = grad_accum, seed, megabatch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_batches(self, epoch: int) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.world_size * self.grad_accum
        if len(order) % size:  # repeat samples (cyclically: the data may be smaller than the padding)
            pad = size - len(order) % size  # so that every rank gets full, equal batches
            order += (order * (pad // len(order) + 1))[:pad]
        chunk = size * self.megabatch
        batches = []
        for i in range(0, len(order), chunk):
            group = sorted(order[i:i + chunk], key=lambda j: -self.lengths[j])
            batches += [group[k:k + size] for k in range(0, len(group), size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[p] for p in perm]

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches for `epoch`, in training order."""
        out = []
        bs = self.batch_size
        for gb in self.global_batches(epoch):
            for a in range(self.grad_accum):
                k = a * self.world_size + self.rank
                out.append(gb[k * bs:(k + 1) * bs])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.micro_batches(self.epoch)[self.start:]

    def __len__(self) -> int:
        return len(self.micro_batches(self.epoch)) - self.start


def find_all_linear_names(model: Any) -> list[str]:
    """Names (last path component) of every linear layer LoRA should wrap: nn.Linear and
    bitsandbytes 4/8-bit linears, except the output head (it maps to the vocabulary)."""
    import torch

    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # bitsandbytes is optional for LoRA/full modes
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, linear_types) and module is not head}
    names.discard("lm_head")
    return sorted(names)


def plot_loss(history: dict[str, list], paths: Iterable[str | os.PathLike], title: str = "") -> None:
    """Save a PNG of train loss per optimizer step and eval loss per epoch to each path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = history.get("train", [])
    if train:
        steps, values = [s for s, _ in train], [v for _, v in train]
        ax.plot(steps, values, lw=0.6, alpha=0.35, label="train loss (per step)")
        # Length-grouped batches mix short and long samples step by step, so the raw curve jumps;
        # a moving average shows the trend.
        k = max(1, min(25, len(values) // 10))
        windows = [values[max(0, i - k + 1):i + 1] for i in range(len(values))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, lw=1.6, label=f"train loss (mean of last {k} steps)")
    ev = history.get("eval", [])
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", label="eval loss (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Inference: load a model (base, checkpoint + adapter, merged, 4-bit), generation settings, chat
# and batched generation. Used by predict.py, merge_params.py and web_demo.py; every prompt goes
# through `build_prompt_ids`, the builder training used.
# ---------------------------------------------------------------------------------------------
ADAPTER_CONFIG_NAME = "adapter_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILE_NAMES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
DEFAULT_MAX_NEW_TOKENS = 512  # when the model's generation config names none


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a PEFT adapter (adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


RERUN_HINT = "re-create it (re-run the step that wrote it)"
INFERENCE_MODEL_HINT = ("pass --model_path/--ori_model_dir with a model folder (Baichuan2-7B-Chat, a merged model, "
                        "or `python -m baichuan.build_default` for the tiny default)")


def check_model_dir(path: str, hint: str = INFERENCE_MODEL_HINT) -> None:
    """A clear UserError unless `path` is a model folder: a folder with config.json and weights."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model folder {path!r} not found; {hint}")
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: no config.json, so it is not a model folder; {hint}")
    if not any(any(p.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{path}: no model weights (*.safetensors or pytorch_model*.bin); the download or "
                        "merge is incomplete: fetch/merge again")


def _check_adapter_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"adapter folder {path!r} not found; pass a checkpoint folder written by train.py "
                        "(output/qlora/epoch-E-step-S)")
    if not (p / ADAPTER_CONFIG_NAME).is_file():
        raise UserError(f"{path}: no {ADAPTER_CONFIG_NAME}, so it is not a LoRA checkpoint (a full-mode "
                        "checkpoint is a model folder: pass it as the model path, without an adapter)")
    if not any((p / name).is_file() for name in ADAPTER_WEIGHT_NAMES):
        raise UserError(f"{path}: adapter weights (adapter_model.safetensors) missing; the checkpoint is "
                        "incomplete: pick another one or re-train")


def resolve_model_paths(model_path: str, adapter_dir: str | None = None) -> tuple[str, str | None]:
    """(base model folder, adapter folder or None) for a model path and optional adapter.

    A `model_path` that is a LoRA checkpoint (holds adapter_config.json) stands for its base model
    (run_config.json's `base_model`, else the adapter config's `base_model_name_or_path`) plus
    itself as the adapter. Raises UserError naming the folder and the fix when something is missing.
    """
    model_path = str(model_path)
    if adapter_dir is None and is_adapter_dir(model_path):
        adapter_dir = model_path
        run_config = Path(model_path) / RUN_CONFIG_NAME
        base = None
        if run_config.is_file():
            base = read_json_object(run_config, "run config", RERUN_HINT, UserError).get("base_model")
        if not base:
            base = read_json_object(Path(model_path) / ADAPTER_CONFIG_NAME, "adapter config", RERUN_HINT,
                                    UserError).get(
                "base_model_name_or_path")
        if not base:
            raise UserError(f"{model_path}: checkpoint names no base model (run_config.json base_model); "
                            "pass the base folder as --model_path and the checkpoint as --adapter_dir")
        model_path = str(base)
    if adapter_dir is not None:
        adapter_dir = str(adapter_dir)
        _check_adapter_dir(adapter_dir)
    check_model_dir(model_path)
    return model_path, adapter_dir


def resolve_inference_device(device: str = "auto") -> Any:
    """torch.device for "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA device is visible; use cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UserError(f"bad device {device!r}: use auto, cpu, cuda or cuda:N") from e


def resolve_inference_dtype(dtype: str, device: Any) -> Any:
    """torch dtype for "auto" (bf16 on cuda, fp32 on cpu), "fp32", "bf16" or "fp16"."""
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    if dtype not in names:
        raise UserError(f"bad dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return names[dtype]


def load_inference_tokenizer(base_dir: str, adapter_dir: str | None = None) -> Any:
    """Tokenizer saved with the adapter (it may carry an added pad token), else the base's."""
    from transformers import AutoTokenizer

    import baichuan  # noqa: F401  (registers the Baichuan classes with the Auto factories)

    src = base_dir
    if adapter_dir and any((Path(adapter_dir) / n).is_file() for n in TOKENIZER_FILE_NAMES):
        src = adapter_dir
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UserError(f"{src}: tokenizer does not load ({e}); the folder needs its tokenizer files") from e


def load_model_for_inference(
    model_path: str,
    adapter_dir: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a base/merged model folder, or a base plus LoRA adapter.

    `model_path` may also be a train.py checkpoint (see `resolve_model_paths`). Never runs remote
    code. When the adapter's tokenizer has more tokens than the base's embeddings (train.py added a
    pad token), the base embeddings are resized before the adapter (which carries those rows) is
    loaded. `load_in_4bit` loads the base NF4-quantized (as QLoRA trained it; needs bitsandbytes).
    """
    from transformers import AutoModelForCausalLM

    import baichuan  # noqa: F401  (registers the Baichuan classes with the Auto factories)

    base_dir, adapter_dir = resolve_model_paths(model_path, adapter_dir)
    dev = resolve_inference_device(device)
    torch_dtype = resolve_inference_dtype(dtype, dev)
    tokenizer = load_inference_tokenizer(base_dir, adapter_dir)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": {"": dev}}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if adapter_dir is not None:
        model = attach_adapter(model, tokenizer, adapter_dir)
    model.eval()
    return model, tokenizer


def resize_for_tokenizer(model: Any, tokenizer: Any, rows: int | None = None) -> bool:
    """Resize the input/output embeddings to `rows` (default: the tokenizer's size, when larger).

    train.py resizes the base to `len(tokenizer)` when it adds a pad token (which can also shrink a
    vocabulary padded past the tokenizer, as Qwen2's is); the adapter it saves carries the trained
    embedding and head matrices, which overwrite the placeholder rows. Returns whether it resized.
    """
    current = model.get_input_embeddings().weight.shape[0]
    if rows is None:
        rows = max(current, len(tokenizer))
    if rows == current:
        return False
    model.resize_token_embeddings(rows, mean_resizing=False)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return True


def attach_adapter(model: Any, tokenizer: Any, adapter_dir: str) -> Any:
    """PeftModel of `model` with the adapter in `adapter_dir` (embeddings resized first when needed)."""
    from peft import PeftModel

    saved_rows = _adapter_embedding_rows(adapter_dir)
    resized = resize_for_tokenizer(model, tokenizer, saved_rows)
    if resized and saved_rows is None:
        raise UserError(f"{adapter_dir}: the tokenizer has {len(tokenizer)} tokens but the base model fewer, "
                        "and the adapter does not carry the resized embeddings; re-train with train.py "
                        "(it saves them) or load with the base tokenizer")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{adapter_dir}: adapter does not fit the base model ({str(e).splitlines()[0][:300]}); "
                        "pass the base model it was trained on (run_config.json base_model)") from e


def _adapter_embedding_rows(adapter_dir: str) -> int | None:
    """Rows of the full input-embedding matrix saved with the adapter (train.py saves it when it resized
    the vocabulary), or None when the adapter holds no such matrix."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        for name in names:
            if name.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight", "wte.weight",
                              "wte.base_layer.weight")):
                return int(f.get_slice(name).get_shape()[0])
    return None


def generation_config_for(model: Any, **overrides: Any) -> Any:
    """A copy of the model's generation config with the non-None `overrides` applied.

    Accepted overrides: max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample
    (and any other GenerationConfig field). With do_sample False the sampling parameters are
    reset to their neutral values, so greedy decoding carries no ignored settings. max_new_tokens
    falls back to DEFAULT_MAX_NEW_TOKENS (capped at half the context) when the model's config has
    none. A value generation cannot take (e.g. temperature 0 with sampling) raises UserError.
    """
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in updates if not hasattr(GenerationConfig(), k) and not hasattr(config, k)]
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


def model_device(model: Any) -> Any:
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


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
