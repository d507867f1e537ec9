"""The role is never lost to length: no prompt built by training or inference lacks its system prompt.

Property tests (hypothesis) over conversation shapes and message lengths, for the Baichuan2 layout and
the chat-template path (tiny Qwen2):
- inference (`utils.build_prompt_ids`): the prompt starts with the whole system prompt and ends with
  the whole newest user message and the assistant marker; older rounds go first, whole; a message that
  cannot fit even alone raises `PromptTooLong`, whose `allowed_tokens` is exactly the room there was.
- training (`utils.build_conversation_sample`): every sample starts with the whole system prompt, has
  loss on the newest reply, and only on reply tokens and EOS; oldest rounds are dropped first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils
from tools.tiny_models import ASSISTANT_TOKEN_ID, USER_TOKEN_ID

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])
SYSTEM = utils.build_system_prompt("孙悟空", "齐天大圣，花果山水帘洞美猴王")
WORDS = st.sampled_from(["俺老孙", "你好", "师父", "妖怪", "哪里走", "筋斗云", "hello", "？", "！", "，"])
# messages from empty to ~2,000 characters: the lengths that used to push the role out
MESSAGE = st.integers(0, 400).flatmap(lambda n: st.lists(WORDS, min_size=n, max_size=n).map("".join))


def conversation(turns: list[str], end_with: str) -> list[dict[str, str]]:
    """System, then alternating user/assistant messages with the given texts, ending with `end_with`."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
    if messages[-1]["role"] != end_with:
        messages.append({"role": end_with, "content": "好" if end_with == "assistant" else "你是谁？"})
    return [{"role": "system", "content": SYSTEM}, *messages]


def baichuan_system_ids(tok) -> list[int]:
    return utils.build_prompt_ids(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ""}],
                                  10**9)[:-2]


@PROPERTY
@given(turns=st.lists(MESSAGE, min_size=1, max_size=9), budget=st.integers(1, 1500))
def test_baichuan_inference_prompt_keeps_system_and_newest_message(baichuan_tok, turns, budget) -> None:
    messages = conversation(turns, end_with="user")
    system_ids = baichuan_system_ids(baichuan_tok)
    newest = utils.encode_text(baichuan_tok, messages[-1]["content"])
    try:
        ids = utils.build_prompt_ids(baichuan_tok, messages, budget)
    except utils.PromptTooLong as e:
        assert len(system_ids) + 1 + len(newest) + 1 > budget  # it really could not fit
        assert e.allowed_tokens == max(0, budget - len(system_ids) - 2)
        return
    assert len(ids) <= budget
    assert ids[:len(system_ids)] == system_ids
    assert ids[-len(newest) - 2:] == [USER_TOKEN_ID, *newest, ASSISTANT_TOKEN_ID]
    # whole rounds only: what follows the system prompt starts at a user marker
    assert ids[len(system_ids)] == USER_TOKEN_ID


@PROPERTY
@given(turns=st.lists(MESSAGE, min_size=1, max_size=7), budget=st.integers(1, 1500))
def test_template_inference_prompt_keeps_system_and_newest_message(qwen_tok, turns, budget) -> None:
    messages = conversation(turns, end_with="user")
    try:
        ids = utils.build_prompt_ids(qwen_tok, messages, budget)
    except utils.PromptTooLong:
        alone = utils.build_prompt_ids(qwen_tok, [messages[0], messages[-1]], 10**9)
        assert len(alone) > budget
        return
    text = qwen_tok.decode(ids)
    assert len(ids) <= budget
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert text.endswith(f"<|im_start|>user\n{messages[-1]['content']}<|im_end|>\n<|im_start|>assistant\n")


@PROPERTY
@given(turns=st.lists(MESSAGE, min_size=2, max_size=10), max_src=st.integers(8, 700), extra=st.integers(1, 900))
def test_baichuan_training_sample_keeps_system_and_newest_reply(baichuan_tok, turns, max_src, extra) -> None:
    messages = conversation(turns, end_with="assistant")
    system_ids = baichuan_system_ids(baichuan_tok)
    sample = utils.build_conversation_sample(baichuan_tok, messages, max_src, max_src + extra)
    if not sample.input_ids:  # only when the system prompt itself leaves no room
        assert len(system_ids) + 2 > max_src
        return
    ids, labels = sample.input_ids, sample.labels
    assert len(ids) == len(labels) <= max_src + extra
    assert ids[:len(system_ids)] == system_ids and labels[:len(system_ids)] == [-100] * len(system_ids)
    assert ids[len(system_ids)] == USER_TOKEN_ID  # whole rounds: the oldest kept one starts with its user turn
    reply = utils.encode_text(baichuan_tok, messages[-1]["content"]) + [baichuan_tok.eos_token_id]
    if not sample.truncated:
        assert ids[-len(reply):] == reply and labels[-len(reply):] == reply
    assert any(label != -100 for label in labels)
    # loss only on replies and EOS: a labelled position holds its own id, or EOS at the next user marker
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label != -100:
            assert label == token or (label == baichuan_tok.eos_token_id and token == USER_TOKEN_ID), i
    kept_rounds = ids.count(USER_TOKEN_ID)
    assert kept_rounds + sample.dropped_rounds == sum(m["role"] == "user" for m in messages)


def test_baichuan_multi_turn_sample_labels_every_reply(baichuan_tok) -> None:
    """Three rounds: three replies labelled, each followed by an EOS label; prompts unlabelled."""
    messages = conversation(["你好", "俺老孙", "师父呢", "哪里走", "妖怪", "筋斗云"], end_with="assistant")
    sample = utils.build_conversation_sample(baichuan_tok, messages, 256, 512)
    assert not sample.truncated and sample.dropped_rounds == 0
    labelled = [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != -100]
    eos = baichuan_tok.eos_token_id
    expected = []
    for reply in ("俺老孙", "哪里走", "筋斗云"):
        expected += utils.encode_text(baichuan_tok, reply) + [eos]
    as_labels = [lab for lab in sample.labels if lab != -100]
    assert as_labels == expected
    assert labelled.count(USER_TOKEN_ID) == 2 and labelled[-1] == eos  # EOS labels sit on the next <user>
    # the prompt of each reply is exactly what inference feeds for that history
    prefix = utils.build_prompt_ids(baichuan_tok, messages[:4], 10**9)
    assert sample.input_ids[:len(prefix)] == prefix


def test_template_multi_turn_sample_matches_inference_prefixes(qwen_tok) -> None:
    messages = conversation(["你好", "俺老孙", "师父呢", "哪里走"], end_with="assistant")
    sample = utils.build_conversation_sample(qwen_tok, messages, 1000, 2000)
    for cut in (2, 4):  # the history before each reply is the inference prompt for it
        prefix = utils.build_prompt_ids(qwen_tok, messages[:cut], 10**9)
        assert sample.input_ids[:len(prefix)] == prefix
        assert set(sample.labels[:len(prefix)]) <= {-100} | set(sample.input_ids)
    labelled = qwen_tok.decode([lab for lab in sample.labels if lab != -100])
    assert labelled == "俺老孙<|im_end|>哪里走<|im_end|>"


def test_too_long_message_is_refused_with_its_limit(baichuan_tok) -> None:
    messages = conversation(["妖怪" * 600], end_with="user")
    with pytest.raises(utils.PromptTooLong, match=r"at most \d+ tokens \(about \d+ characters\)"):
        utils.build_prompt_ids(baichuan_tok, messages, 300)


def test_dataset_reads_messages_records(baichuan_tok, tmp_path: Path) -> None:
    from tools.harness import dump_jsonl

    convo = conversation(["你好", "俺老孙", "师父呢", "哪里走"], end_with="assistant")
    single = {"instruction": SYSTEM, "input": "你好", "output": "俺老孙"}
    path = dump_jsonl(tmp_path / "train.json", [{"messages": convo, "role": "孙悟空"}, single])
    ds = utils.Baichuan2PromptDataSet(path, baichuan_tok, 512, 256)
    assert ds[0]["input_ids"] == utils.build_conversation_sample(baichuan_tok, convo, 256, 512).input_ids
    assert ds[1]["input_ids"] == utils.build_training_sample(baichuan_tok, SYSTEM, "你好", "俺老孙", 256, 512)[0]
    bad = dump_jsonl(tmp_path / "bad.json", [{"messages": convo[:-1]}])
    with pytest.raises(utils.DataError, match=r"bad.json:1: .*ending with an assistant reply"):
        utils.Baichuan2PromptDataSet(bad, baichuan_tok, 512, 256)


def test_terminal_chat_refuses_a_message_too_long_and_goes_on(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch, capsys) -> None:
    """predict.py's chat: a message that cannot fit beside the role's prompt is refused with its limit, is
    not added to the history, and the next message is answered as if it had not been sent."""
    import io
    import json
    import sys

    import predict

    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"孙悟空": "齐天大圣"}, ensure_ascii=False), encoding="utf-8")
    script = "1\n" + "妖怪" * 2000 + "\n你好\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["--model_path", str(tiny_model_dir), "--desc_path", str(profiles), "--max_new_tokens", "6",
            "--no-do_sample", "--device", "cpu"]
    assert predict.main(argv) == 0
    out = capsys.readouterr().out
    assert "the message is too long" in out and "at most" in out
    spoken = [line.split("user: ")[-1] for line in out.split("\n") if "孙悟空: " in line]
    from roleplay import generation, loading

    model, tok = loading.load_model_for_inference(str(tiny_model_dir), device="cpu")
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=6)
    alone = generation.chat_once(model, tok, [{"role": "system", "content": utils.role_system_prompt(
        "孙悟空", {"孙悟空": "齐天大圣"})}, {"role": "user", "content": "你好"}], config)
    assert spoken == [f"孙悟空: {alone}"]
