"""Synthetic inputs for the benchmark when the real ones are not built yet (development only).

- `synth_train_records`: training records {"instruction","input","output"} with RoleBench-like,
  long-tailed lengths (system prompt + short question + answer of 10 to ~400 characters);
- `synth_rolebench`: a RoleBench-zh folder in the flat layout (4 split files + profiles) of a given
  number of lines (default the published 9,158), split in the published files' proportions and with
  their quirks: role-specific `type` a string in train and a list in test, questions with spaces
  around them, general questions with a second part after "\n";
- `random_tiny_model`: a random tiny Baichuan2 folder (tools/tiny_models.py), optionally shaped like the
  embedded default (hidden 256, intermediate 768, 4 layers).

Text is drawn from the characters of the role system prompt and the tiny test corpus, which both the
tiny test tokenizer and the embedded default's tokenizer know as single pieces (no byte fallback).

Example:
    python -c "from bench.synth import synth_train_records as s; print(s(2, seed=0))"
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROLES = ("皇帝", "孙悟空", "华妃", "张飞", "李白")  # the published RoleBench-zh roles
# line counts of the published RoleBench-zh files: the split proportions, and the size by default
ROLEBENCH_SPLITS = {("general", "train"): 5933, ("general", "test"): 1451,
                    ("role_specific", "train"): 1535, ("role_specific", "test"): 239}
PUBLISHED_LINES = sum(ROLEBENCH_SPLITS.values())
ADDRESSES = {"皇帝": "皇上", "孙悟空": "大圣", "华妃": "娘娘", "张飞": "三将军", "李白": "太白兄"}


def _char_pool() -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import utils

    text = utils.SYSTEM_PROMPT_TEMPLATE
    try:
        from tools.tiny_models import TINY_CORPUS

        text += TINY_CORPUS
    except ImportError:
        pass
    return "".join(sorted({c for c in text if "\u4e00" <= c <= "\u9fff"}))


def _text(rng: random.Random, pool: str, n: int) -> str:
    """`n` characters of pseudo-sentences: pool characters with a "，"/"。" now and then."""
    out = []
    for i in range(max(1, n)):
        out.append(rng.choice(pool))
        if i % rng.randint(6, 14) == 5:
            out.append(rng.choice("，。"))
    return "".join(out)[:n] or pool[0]


def _length(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal length: most short, a long tail, clipped to [lo, hi]."""
    return int(min(hi, max(lo, rng.lognormvariate(0, sigma) * median)))


def _profiles(rng: random.Random, pool: str) -> dict[str, str]:
    return {role: _text(rng, pool, rng.randint(20, 60)) for role in ROLES}


def synth_train_records(n: int, seed: int = 1234, scale: float = 1.0) -> list[dict[str, str]]:
    """`n` single-turn training records with varied lengths; `scale` shrinks/grows every text."""
    import utils

    rng = random.Random(seed)
    pool = _char_pool()
    profiles = _profiles(rng, pool)
    records = []
    for _ in range(n):
        role = rng.choice(ROLES)
        records.append({
            "instruction": utils.build_system_prompt(role, profiles[role]),
            "input": _text(rng, pool, int(scale * _length(rng, 18, 0.6, 4, 120))),
            "output": _text(rng, pool, int(scale * _length(rng, 60, 0.8, 8, 400))),
        })
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """utils.write_jsonl, returning the path."""
    import utils

    utils.write_jsonl(path, records)
    return path


def synth_rolebench(folder: Path, lines: int = PUBLISHED_LINES, seed: int = 0) -> Path:
    """Write a flat-layout RoleBench-zh folder with about `lines` lines in all; returns the profiles path.

    As published: each general question is asked of every role but one in train (1-3 references
    each) and of the remaining role in test, and often carries an input after "\n"; role-specific
    questions start with an address ("大圣，...") and carry one reference and a type, stored as a
    string in train and a list in test. One question in five has a space before or after it.
    """
    rng = random.Random(seed)
    pool = _char_pool()
    counts = {key: max(1, round(lines * n / PUBLISHED_LINES)) for key, n in ROLEBENCH_SPLITS.items()}
    files = _general_records(rng, pool, counts[("general", "train")], counts[("general", "test")])
    for split in ("train", "test"):
        files[("role_specific", split)] = [_role_specific_record(rng, pool, split)
                                           for _ in range(counts[("role_specific", split)])]
    for (kind, split), records in files.items():
        for record in records:
            record["question"] = _pad_spaces(rng, record["question"])
        write_jsonl(folder / f"rolebench-zh_{kind}_{split}.jsonl", records)
    profiles = folder / "profiles-zh_desc.json"
    profiles.write_text(json.dumps(_profiles(rng, pool), ensure_ascii=False), encoding="utf-8")
    return profiles


def _references(rng: random.Random, pool: str, most: int) -> list[str]:
    return [_text(rng, pool, _length(rng, 60, 0.8, 8, 400)) for _ in range(rng.randint(1, most))]


def _general_records(rng: random.Random, pool: str, n_train: int, n_test: int) -> dict[tuple[str, str], list]:
    """General train/test records: question i goes to every role but one in train, to that one in test."""
    n_questions = max(1, -(-n_train // (len(ROLES) - 1)))
    questions = [_general_question(rng, pool) for _ in range(n_questions)]
    left_out = [rng.choice(ROLES) for _ in questions]
    train = [{"role": role, "question": q, "generated": _references(rng, pool, 3)}
             for q, skip in zip(questions, left_out, strict=True) for role in ROLES if role != skip][:n_train]
    test = [{"role": left_out[i % n_questions], "question": questions[i % n_questions],
             "generated": _references(rng, pool, 3)} for i in range(n_test)]
    return {("general", "train"): train, ("general", "test"): test}


def _role_specific_record(rng: random.Random, pool: str, split: str) -> dict:
    role = rng.choice(ROLES)
    question = f"{ADDRESSES[role]}，{_text(rng, pool, _length(rng, 18, 0.6, 4, 80))}"
    qtype = "script_based" if split == "train" else ["script_based"]  # as the published files store it
    return {"role": role, "question": question, "generated": _references(rng, pool, 1), "type": qtype}


def _general_question(rng: random.Random, pool: str) -> str:
    """An instruction, with its input after "\n" two times in five."""
    question = _text(rng, pool, _length(rng, 18, 0.6, 4, 120))
    if rng.random() < 0.4:
        question += "\n" + _text(rng, pool, _length(rng, 24, 0.6, 4, 160))
    return question


def _pad_spaces(rng: random.Random, question: str) -> str:
    roll = rng.random()
    return f" {question}" if roll < 0.1 else f"{question} " if roll < 0.2 else question


def random_tiny_model(folder: Path, default_shape: bool) -> Path:
    """A random tiny Baichuan2 folder; `default_shape` sizes it like the embedded default."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tools.tiny_models import make_tiny_model

    shape = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4} if default_shape else {}
    return make_tiny_model(folder, seed=0, **shape)
