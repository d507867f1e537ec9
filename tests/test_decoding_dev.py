"""tools/decoding_dev.py: the dev set that decoding settings are chosen on is not the test set."""

from __future__ import annotations

import json
from pathlib import Path

import utils
from tools import decoding_dev

REPO = Path(__file__).resolve().parent.parent


def test_dev_set_is_general_questions_per_role_and_training_facts(tmp_path: Path) -> None:
    facts = [{"instruction": "", "input": f"胡桃的第{i}个问题？", "output": "胡桃的国籍是璃月。", "role": "胡桃",
              "source": "attribute", "attribute": "国籍", "fact": "璃月"} for i in range(5)]
    train = tmp_path / "train.json"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in facts), encoding="utf-8")
    args = decoding_dev.parse_args(["--train_path", str(train), "--questions_per_role", "7"])
    records = decoding_dev.dev_records(args)
    assert records == decoding_dev.dev_records(args)  # seeded
    roles = [r for r in records if r["source"] == "rolebench_dev"]
    assert len(roles) == 7 * len(decoding_dev.ROLES)
    assert sorted(records[len(roles):], key=lambda r: r["input"]) == facts  # every fact (5 < --facts), sampled
    profiles = utils.load_profiles(REPO / utils.PROFILES_PATH)
    assert all(r["instruction"] == utils.role_system_prompt(r["role"], profiles) for r in roles)
    tests = {r["question"] for f in (REPO / "data").glob("*_test.jsonl") for _, r in utils.read_jsonl(f)}
    assert not {r["input"] for r in roles} & tests


def test_dialogue_dev_set_uses_training_records_and_train_follow_ups(tmp_path: Path) -> None:
    from roleplay import dialogue
    from tools import dialogue_dev

    rows = [{"instruction": "", "input": f"{name}的{attr}？（{i}）", "output": f"{name}的{attr}是{value}。",
             "role": name, "source": "attribute", "attribute": attr, "fact": value}
            for name, gender in (("胡桃", "女"), ("钟离", "男")) for i in range(3)
            for attr, value in (("性别", gender), ("国籍", "璃月"), ("元素力", "岩"))]
    train = tmp_path / "train.json"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    args = dialogue_dev.parse_args(["--train_path", str(train), "--per_depth", "6"])
    convos = dialogue_dev.dev_conversations(args)
    assert convos == dialogue_dev.dev_conversations(args)  # seeded
    assert sorted(c["depth"] for c in convos if c["kind"] == "fact") == [d for d in range(1, 6) for _ in range(6)]
    assert sum(c["kind"] == "consistency" for c in convos) == 6
    templates = dialogue.load_dialogue_templates(utils.DIALOGUE_TEMPLATES_PATH)

    def filled(split: str) -> set[str]:  # every follow-up of `split`, with each pronoun
        return {q.replace("{ref}", p) for s in templates["follow_ups"].values() for q in s[split]
                for p in templates["pronouns"].values()}

    train_follow_ups, test_follow_ups = filled("train"), filled("test")
    asked = {t["user"] for c in convos for t in c["turns"]}
    assert asked <= {r["input"] for r in rows} | train_follow_ups
    assert asked & train_follow_ups and not asked & test_follow_ups
