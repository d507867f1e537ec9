"""Tests for tools/build_default.py's bookkeeping (the build itself runs in test_e2e.py):
when a built default is reused or rebuilt, and what its tokenizer may learn from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import utils
from tools import build_default

REPO = Path(__file__).resolve().parent.parent


def built_default(folder: Path, stamp: str | None, built_by: str = "python -m baichuan.build_default") -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    if stamp is not None:
        (folder / "build_info.json").write_text(json.dumps({"built_by": built_by, "data_fingerprint": stamp}))
    return folder


def test_an_empty_or_missing_folder_is_built(tmp_path):
    assert not build_default.up_to_date(tmp_path / "nothing", "abc")
    assert not build_default.up_to_date(tmp_path, "abc")


def test_a_default_from_the_same_inputs_is_reused_and_a_stale_one_rebuilt(tmp_path, capsys):
    out = built_default(tmp_path / "m", "abc")
    assert build_default.up_to_date(out, "abc")
    assert not build_default.up_to_date(out, "def")
    assert "rebuilding" in capsys.readouterr().out


@pytest.mark.parametrize("built_by", [build_default.BUILT_BY, *build_default.LEGACY_BUILT_BY])
def test_defaults_built_before_and_after_the_move_to_tools_are_both_recognised(tmp_path, built_by):
    assert build_default.up_to_date(built_default(tmp_path / "m", "abc", built_by), "abc")


@pytest.mark.parametrize("stamp, built_by", [(None, ""), ("abc", "someone else")])
def test_a_folder_build_default_did_not_make_is_never_replaced(tmp_path, stamp, built_by):
    out = built_default(tmp_path / "m", stamp, built_by)
    with pytest.raises(utils.UserError, match="did not build"):
        build_default.up_to_date(out, "abc")


def test_fingerprint_follows_the_data_and_the_shaping_flags_only(tmp_path):
    data = tmp_path / "a.json"
    data.write_text("1", encoding="utf-8")
    args = build_default.parse_args([])
    stamp = build_default.fingerprint([data], args)
    assert build_default.fingerprint([data], build_default.parse_args(["--out", "x", "--force"])) == stamp
    assert build_default.fingerprint([data], build_default.parse_args(["--epochs", "1"])) != stamp
    data.write_text("2", encoding="utf-8")
    assert build_default.fingerprint([data], args) != stamp


def test_the_tokenizer_never_learns_from_test_text():
    """Test phrasings and the role test files stay out of the tokenizer's training text."""
    templates = {"性别": {"train": ["{name}训练问法？"], "heldout": ["{name}留出问法？"], "dev": ["{name}开发问法？"],
                          "novel": ["{name}全新问法？"], "answer": ["{name}是{value}。"]}}
    texts = build_default.vocabulary_texts([{"instruction": "", "input": "基座问题", "output": "基座回答"}], templates)
    joined = "\n".join(texts)
    assert "{name}训练问法？" in texts and "{name}是{value}。" in texts and "基座回答" in texts
    assert not any(w in joined for w in ("留出问法", "开发问法", "全新问法"))
    train_questions = {r["question"] for f in (REPO / "data").glob("*_train.jsonl") for _, r in utils.read_jsonl(f)}
    test_only = [r["question"] for f in (REPO / "data").glob("*_test.jsonl") for _, r in utils.read_jsonl(f)
                 if r["question"] not in train_questions]
    assert test_only and not any(q in joined for q in test_only)


def test_persona_records_become_conversations_each_record_once():
    plain = [{"instruction": "", "input": f"问{i}", "output": f"答{i}"} for i in range(3)]
    persona = [{"instruction": f"你是{who}。", "input": f"{who}问{i}", "output": f"{who}答{i}"}
               for who in ("渔夫", "画家") for i in range(7)]
    records = build_default.persona_conversations(plain + persona, seed=5)
    assert records == build_default.persona_conversations(plain + persona, seed=5)
    assert [r for r in records if "messages" not in r] == plain
    low, high = build_default.PERSONA_ROUNDS
    seen, short = [], []
    for r in (r for r in records if "messages" in r):
        system, *turns = r["messages"]
        utils.check_conversation(r["messages"])
        assert 1 <= len(turns) // 2 <= high
        who = system["content"][2:-1]
        if len(turns) // 2 < low:
            short.append(who)  # only a persona's last conversation may be shorter (what was left)
        for user, reply in zip(turns[::2], turns[1::2], strict=True):
            assert user["content"].startswith(who) and reply["content"].startswith(who)
            seen.append(reply["content"])
    assert sorted(seen) == sorted(r["output"] for r in persona)  # every persona reply exactly once
    assert len(short) == len(set(short))
    texts = build_default.vocabulary_texts(records, {})
    assert all(r["output"] in texts for r in persona)  # the tokenizer still sees the conversations' text


def test_every_general_file_of_the_base_folder_is_read_and_fingerprinted(tmp_path):
    for name in ("general_b.jsonl", "general_a.jsonl", "notes.jsonl"):
        (tmp_path / name).write_text("", encoding="utf-8")
    assert [p.name for p in build_default.general_files(tmp_path)] == ["general_a.jsonl", "general_b.jsonl"]
    shipped = build_default.build_inputs(REPO / "data" / "base", REPO / utils.TEMPLATES_PATH)
    assert {p.name for p in shipped} >= {p.name for p in (REPO / "data" / "base").glob("general_*.jsonl")}
