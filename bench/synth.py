"""Synthetic inputs for the benchmark when the real ones are not built yet (development only).

- `synth_train_records`: training records {"instruction","input","output"} with RoleBench-like,
  long-tailed lengths (system prompt + short question + answer of 10 to ~400 characters);
- `synth_rolebench`: a RoleBench-zh folder in the flat layout (4 split files + profiles) of a given
  number of lines, split like upstream (general train/test, role-specific train/test);
- `random_tiny_model`: a random tiny Baichuan2 folder (tests/tiny.py), optionally shaped like the
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
# upstream RoleBench-zh line counts (see shared/docs/rolebench-format.md), used as proportions
ROLEBENCH_SPLITS = {("general", "train"): 5900, ("general", "test"): 1450,
                    ("role_specific", "train"): 1500, ("role_specific", "test"): 240}
ADDRESSES = {"皇帝": "皇上", "孙悟空": "大圣", "华妃": "娘娘", "张飞": "三将军", "李白": "太白兄"}


def _char_pool() -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import utils

    text = utils.SYSTEM_PROMPT_TEMPLATE
    try:
        from tests.tiny import TINY_CORPUS

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


def synth_rolebench(folder: Path, lines: int, seed: int = 0) -> Path:
    """Write a flat-layout RoleBench-zh folder with about `lines` lines in all; returns the profiles path.

    General questions repeat across roles (as upstream) and carry 1-3 references; role-specific
    questions start with an address ("大圣，...") and carry one reference and a type.
    """
    rng = random.Random(seed)
    pool = _char_pool()
    total = sum(ROLEBENCH_SPLITS.values())
    general_questions = [_text(rng, pool, _length(rng, 18, 0.6, 4, 120)) for _ in range(max(1, lines // 25))]
    for (kind, split), upstream in ROLEBENCH_SPLITS.items():
        count = max(1, round(lines * upstream / total))
        records = []
        for _ in range(count):
            role = rng.choice(ROLES)
            refs = [_text(rng, pool, _length(rng, 60, 0.8, 8, 400)) for _ in range(rng.randint(1, 3))]
            if kind == "general":
                records.append({"role": role, "question": rng.choice(general_questions), "generated": refs})
            else:
                question = f"{ADDRESSES[role]}，{_text(rng, pool, _length(rng, 18, 0.6, 4, 80))}"
                records.append({"role": role, "question": question, "generated": refs[:1], "type": "script_based"})
        write_jsonl(folder / f"rolebench-zh_{kind}_{split}.jsonl", records)
    profiles = folder / "profiles-zh_desc.json"
    profiles.write_text(json.dumps(_profiles(rng, pool), ensure_ascii=False), encoding="utf-8")
    return profiles


def random_tiny_model(folder: Path, default_shape: bool) -> Path:
    """A random tiny Baichuan2 folder; `default_shape` sizes it like the embedded default."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.tiny import make_tiny_model

    shape = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4} if default_shape else {}
    return make_tiny_model(folder, seed=0, **shape)
