"""Multi-turn data and evaluation (roleplay/dialogue.py, data_helper.py, predict.py).

Units: the follow-up templates' checks, composed training conversations (rounds, seeded, only the
records' own answers, follow-ups that name the character by context), evaluation conversations
(depths, test phrasings only, the repeated fact), round-by-round generation with the model's own
history, and the metrics (fact accuracy and out-of-character rate by depth, consistency, degenerate
share, distinct-2). Components: data_helper.py's default build trains and tests multi-turn, and
predict.py scores a test file with conversations on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import utils
from roleplay import dialogue
from roleplay.attributes import template_key
from tools.harness import REPO, dump_jsonl

TEMPLATES = dialogue.load_dialogue_templates(str(REPO / utils.DIALOGUE_TEMPLATES_PATH))


def attribute_record(name: str, attribute: str, fact: str, question: str, split: str = "train") -> dict:
    return {"instruction": "", "input": question, "output": f"{name}的{attribute}是{fact}。", "role": name,
            "source": "attribute", "attribute": attribute, "fact": fact, "template_set": split, "split": split}


FACTS = {"刻晴": {"性别": "女", "国籍": "璃月", "元素力": "雷"}, "钟离": {"性别": "男", "国籍": "璃月", "元素力": "岩"}}
RECORDS = [attribute_record(n, a, f, f"{n}的{a}是什么？") for n, fs in FACTS.items() for a, f in fs.items()]
ROLE_RECORDS = [{"instruction": "你是孙悟空。", "input": f"问题{i}", "output": f"俺老孙答{i}", "role": "孙悟空",
                 "source": "rolebench_general", "split": "train"} for i in range(8)]


def test_templates_refuse_a_test_phrasing_that_is_a_train_phrasing(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(TEMPLATES))
    bad["follow_ups"]["国籍"]["test"].append(bad["follow_ups"]["国籍"]["train"][0] + "呢")
    path = tmp_path / "t.json"
    path.write_text(json.dumps(bad, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(utils.DataError, match="also a train phrasing"):
        dialogue.load_dialogue_templates(str(path))
    path.write_text(json.dumps({"follow_ups": {"国籍": {"train": ["x"]}}, "pronouns": {}, "pronoun_attribute": "性别"}),
                    encoding="utf-8")
    with pytest.raises(utils.DataError, match="needs non-empty 'train' and 'test'"):
        dialogue.load_dialogue_templates(str(path))


def test_shipped_follow_ups_are_disjoint_from_every_training_phrasing() -> None:
    shipped = json.loads((REPO / utils.TEMPLATES_PATH).read_text(encoding="utf-8"))
    for attribute, sets in TEMPLATES["follow_ups"].items():
        train = {template_key(q) for q in sets["train"]} | {template_key(q) for q in shipped[attribute]["train"]}
        assert not {template_key(q) for q in sets["test"]} & train, attribute


def test_training_conversations_are_seeded_well_formed_and_use_the_records_answers() -> None:
    records = dialogue.compose_training_conversations(RECORDS + ROLE_RECORDS, TEMPLATES, 7, 5, 30)
    assert records == dialogue.compose_training_conversations(RECORDS + ROLE_RECORDS, TEMPLATES, 7, 5, 30)
    assert records != dialogue.compose_training_conversations(RECORDS + ROLE_RECORDS, TEMPLATES, 8, 5, 30)
    convos = [r for r in records if "messages" in r]
    assert 1 <= sum(c["source"] == dialogue.ROLE_SOURCE for c in convos) <= 5
    assert sum(c["source"] == dialogue.ATTRIBUTE_SOURCE for c in convos) == 30
    # every role reply is trained: alone, or inside conversations (then never alone)
    alone = {r["output"] for r in records if r.get("source") == "rolebench_general"}
    in_conversations = [m["content"] for c in convos if c["source"] == dialogue.ROLE_SOURCE
                        for m in c["messages"] if m["role"] == "assistant"]
    assert alone | set(in_conversations) == {r["output"] for r in ROLE_RECORDS}
    assert not alone & set(in_conversations)
    for c in (c for c in convos if c["source"] == dialogue.ROLE_SOURCE):  # no role reply twice in one
        replies = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        assert len(set(replies)) == len(replies)
    few = dialogue.compose_training_conversations(ROLE_RECORDS, TEMPLATES, 7, 1, 0)  # one conversation: the rest alone
    assert sum("messages" in r for r in few) == 1 and len(few) == len(ROLE_RECORDS) - few[-1]["rounds"] + 1
    assert [r for r in records if "messages" not in r and r.get("source") == "attribute"] == RECORDS
    answers = {r["output"] for r in RECORDS + ROLE_RECORDS}
    follow_ups = 0
    for c in convos:
        utils.check_conversation(c["messages"])
        assert dialogue.ROUNDS[0] <= c["rounds"] == len(c["messages"][1:]) // 2 <= dialogue.ROUNDS[1]
        replies = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        assert set(replies) <= answers
        if c["source"] == dialogue.ROLE_SOURCE:
            assert c["messages"][0]["content"] == "你是孙悟空。"
            continue
        users = [m["content"] for m in c["messages"] if m["role"] == "user"]
        for question, reply in zip(users[1:], replies[1:], strict=True):
            name = reply.split("的")[0]
            if name not in question:  # asked by context: the previous round was about the same character
                previous = replies[users.index(question) - 1]
                assert previous.startswith(name)
                follow_ups += 1
    assert follow_ups > 5


def test_follow_ups_use_the_pronoun_of_the_characters_gender() -> None:
    import random

    rng = random.Random(0)
    she = {dialogue._follow_up(TEMPLATES, "国籍", FACTS["刻晴"], "train", rng) for _ in range(30)}
    he = {dialogue._follow_up(TEMPLATES, "国籍", FACTS["钟离"], "train", rng) for _ in range(30)}
    assert all("她" in q for q in she) and all("他" in q for q in he)


def test_eval_conversations_put_the_fact_at_each_depth_and_repeat_one() -> None:
    tests = [attribute_record(n, a, f, f"请问{n}的{a}？", "dev") for n, fs in FACTS.items() for a, f in fs.items()]
    roles = [{**r, "references": [r["output"]], "split": "test"} for r in ROLE_RECORDS]
    convos = dialogue.compose_eval_conversations(tests + roles, TEMPLATES, 3, 4, 1)
    facts = [c for c in convos if c["kind"] == "fact"]
    assert sorted({c["depth"] for c in facts}) == list(dialogue.EVAL_DEPTHS)
    assert all(sum(c["depth"] == d for c in facts) == 4 for d in dialogue.EVAL_DEPTHS)
    train_follow_ups = {q.replace("{ref}", p) for sets in TEMPLATES["follow_ups"].values() for q in sets["train"]
                        for p in ("他", "她", "ta")}
    for c in convos:
        dialogue.check_eval_record(c, "test")
        assert not {t["user"] for t in c["turns"]} & train_follow_ups
    for c in (c for c in convos if c["kind"] == "consistency"):
        first, last = c["turns"][0], c["turns"][-1]
        assert (first["name"], first["attribute"]) == (last["name"], last["attribute"]) and c["depth"] >= 3
    assert {c["depth"] for c in convos if c["kind"] == "role"} == set(dialogue.EVAL_DEPTHS)


def test_run_conversations_feeds_each_round_the_models_own_history() -> None:
    convos = [{"instruction": "S", "turns": [{"user": "a"}, {"user": "b"}]},
              {"instruction": "", "turns": [{"user": "c"}]}]
    calls = []

    def generate(histories):
        calls.append([[m["content"] for m in h] for h in histories])
        return [f"r{len(h)}" for h in histories]

    replies = dialogue.run_conversations(generate, convos)
    assert replies == [["r2", "r4"], ["r2"]]
    assert calls == [[["S", "a"], ["", "c"]], [["S", "a", "r2", "b"]]]  # one call per round, own replies kept


def test_dialogue_metrics_hand_values() -> None:
    def fact(name, attribute, value):
        return {"user": "?", "name": name, "attribute": attribute, "fact": value}

    convos = [
        {"kind": "fact", "role": "刻晴", "turns": [fact("钟离", "国籍", "璃月"), fact("刻晴", "元素力", "雷")]},
        {"kind": "fact", "role": "钟离", "turns": [fact("钟离", "元素力", "岩")]},
        {"kind": "consistency", "role": "钟离", "turns": [fact("钟离", "元素力", "岩"), fact("x", "y", "z"),
                                                           fact("钟离", "元素力", "岩")]},
        {"kind": "consistency", "role": "刻晴", "turns": [fact("刻晴", "元素力", "雷"), fact("刻晴", "元素力", "雷")]},
        {"kind": "role", "role": "孙悟空", "turns": [{"user": "?"}, {"user": "?"}]},
    ]
    replies = [["璃月", "刻晴是雷元素"], ["风"], ["岩", "?", "岩元素"], ["雷", "火"], ["俺老孙", "我是AI哈哈哈哈哈"]]

    def matches(turn, reply):
        return turn["fact"] in reply

    def ooc(reply, role):
        return "AI" if "AI" in reply else None

    m = dialogue.dialogue_metrics(convos, replies, matches, ooc)
    assert m["fact_accuracy_by_depth"] == {"1": {"accuracy": 0.0, "correct": 0, "n": 1},
                                           "2": {"accuracy": 1.0, "correct": 1, "n": 1}}
    assert m["out_of_character_by_depth"]["1"]["rate"] == 0.0 and m["out_of_character_by_depth"]["2"]["rate"] == 1.0
    assert m["consistency"] == {"rate": 0.5, "hits": 1, "n": 2}
    assert m["role_reply_quality"]["degenerate"] == 1 and m["role_reply_quality"]["n"] == 2


@pytest.mark.parametrize("reply, degenerate", [("末将以为，末将以为，末将以为，", True), ("俺老孙来也！", False),
                                               ("哈哈哈哈哈", True), ("一二三一二三一二", False), ("", False)])
def test_is_degenerate(reply: str, degenerate: bool) -> None:
    assert dialogue.is_degenerate(reply) is degenerate


def test_distinct_2() -> None:
    assert dialogue.distinct_n(["abab"]) == 2 / 3
    assert dialogue.distinct_n(["ab", "cd"]) == 1.0 and dialogue.distinct_n(["a"]) is None


def test_default_build_has_multi_turn_train_and_test_that_training_reads(tmp_path: Path,
                                                                         tiny_tokenizer_dir: Path) -> None:
    import subprocess
    import sys

    from transformers import AutoTokenizer

    out = tmp_path / "data"
    run = subprocess.run([sys.executable, "data_helper.py", "--output_dir", str(out)], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    train = [json.loads(line) for line in (out / "train.json").read_text(encoding="utf-8").splitlines()]
    test = [json.loads(line) for line in (out / "test.json").read_text(encoding="utf-8").splitlines()]
    assert sum(r["source"] == dialogue.ROLE_SOURCE for r in train) > 0
    assert sum(r["source"] == dialogue.ATTRIBUTE_SOURCE for r in train) > 0
    assert {c["kind"] for c in test if c["source"] == dialogue.EVAL_SOURCE} == {"fact", "consistency", "role"}
    # a depth's accuracy rests on EVAL_DIALOGUES conversations (100: ~3% standard error), roles on 4 per depth
    from data_helper import EVAL_DIALOGUES, EVAL_ROLE_DIALOGUES
    convos = [c for c in test if c["source"] == dialogue.EVAL_SOURCE]
    for depth in dialogue.EVAL_DEPTHS:
        assert sum(c["kind"] == "fact" and c["depth"] == depth for c in convos) == EVAL_DIALOGUES >= 100
        roles = {c["role"] for c in convos if c["kind"] == "role"}
        assert sum(c["kind"] == "role" and c["depth"] == depth for c in convos) == EVAL_ROLE_DIALOGUES * len(roles)
    assert sum(c["kind"] == "consistency" for c in convos) == EVAL_DIALOGUES
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ds = utils.Baichuan2PromptDataSet(out / "train.json", tok, 2048, 1024)  # the tiny test tokenizer is verbose
    assert len(ds) == len(train) and ds.skipped == 0
    # a 5-round conversation labels 5 replies: EOS labels = replies
    five = next(i for i, r in enumerate(train) if r.get("rounds") == 5 and r["source"] == dialogue.ATTRIBUTE_SOURCE)
    assert ds.samples[five]["labels"].count(tok.eos_token_id) == 5


def test_predict_scores_conversations(tiny_model_dir: Path, tmp_path: Path) -> None:
    import predict

    tests = [attribute_record(n, a, f, f"请问{n}的{a}？", "dev") for n, fs in FACTS.items() for a, f in fs.items()]
    roles = [{**r, "references": [r["output"]], "split": "test"} for r in ROLE_RECORDS[:3]]
    convos = dialogue.compose_eval_conversations(tests + roles, TEMPLATES, 3, 1, 1)
    path = dump_jsonl(tmp_path / "test.json", tests[:2] + roles + convos)
    out = tmp_path / "preds.jsonl"
    code = predict.main(["--model_path", str(tiny_model_dir), "--test_path", str(path), "--output_path", str(out),
                         "--max_new_tokens", "8", "--batch_size", "4"])
    assert code in (0, None)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text(encoding="utf-8"))
    mt = metrics["multi_turn"]
    assert mt["conversations"] == len(convos)
    assert set(mt["fact_accuracy_by_depth"]) == {str(d) for d in dialogue.EVAL_DEPTHS}
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    scored = [r for r in lines if r["source"] == dialogue.EVAL_SOURCE]
    assert [len(r["predictions"]) for r in scored] == [len(c["turns"]) for c in convos]
