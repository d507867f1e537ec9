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
