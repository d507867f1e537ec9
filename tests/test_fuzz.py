"""Property-based fuzzing (hypothesis) of the prompt builder and the JSON-lines reader.

- `utils.build_training_sample` / `utils.build_prompt_ids` on the tiny Baichuan tokenizer: any Unicode
  system/user/answer text gives a valid sample (int ids in the vocabulary, labels -100 or equal to the
  ids, lengths within the limits, the control ids only where the layout puts them) or a clean UserError.
- the chat-template path (tiny Qwen2): any user text gives exactly the turn markers of a clean prompt.
- `utils.read_jsonl` on arbitrary bytes: (line, dict) records or a DataError, never another exception.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils
from tools.tiny_models import ASSISTANT_TOKEN_ID, USER_TOKEN_ID

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# any Unicode (surrogates excluded: they cannot be encoded), sprinkled with the special tokens' text
SPECIAL_TEXT = st.sampled_from(["<reserved_106>", "<reserved_107>", "</s>", "<s>", "<unk>", "<|im_start|>",
                                "<|im_end|>", "<|endoftext|>", "\n", " "])
TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), SPECIAL_TEXT),
                max_size=6).map("".join)


def control_ids(tok) -> set[int]:
    return {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, USER_TOKEN_ID, ASSISTANT_TOKEN_ID} - {None}


@FUZZ
@given(system=TEXT, user=TEXT, answer=TEXT, max_src_len=st.integers(2, 64), extra=st.integers(1, 64))
def test_training_sample_is_valid_for_any_text(baichuan_tok, system: str, user: str, answer: str,
                                               max_src_len: int, extra: int) -> None:
    """Any text: ids are ints in the vocabulary, labels are -100 (prompt) then equal to the ids (answer +
    EOS), the prompt fits max_src_len and the whole max_len; the answer carries no control id but a final
    EOS when it was not cut. Or a UserError, never another exception."""
    max_len = max_src_len + extra
    try:
        ids, labels, truncated = utils.build_training_sample(baichuan_tok, system, user, answer, max_src_len, max_len)
    except utils.UserError:
        return
    vocab = baichuan_tok.vocab_size
    assert len(ids) == len(labels) <= max_len
    assert all(isinstance(i, int) and 0 <= i < vocab for i in ids)
    prompt = [i for i, lab in zip(ids, labels, strict=True) if lab == -100]
    assert len(prompt) <= max_src_len and labels[:len(prompt)] == [-100] * len(prompt)
    answer_ids = labels[len(prompt):]
    assert answer_ids == ids[len(prompt):] and -100 not in answer_ids
    assert not set(answer_ids[:-1]) & control_ids(baichuan_tok), "answer text produced a control id"
    if not truncated:
        assert answer_ids and answer_ids[-1] == baichuan_tok.eos_token_id


@FUZZ
@given(turns=st.lists(TEXT, min_size=1, max_size=5), system=TEXT, budget=st.integers(4, 200))
def test_prompt_ids_are_valid_for_any_conversation(baichuan_tok, turns: list[str], system: str, budget: int) -> None:
    """Any conversation (alternating user/assistant, ending with a user turn) gives ids in the vocabulary,
    within the budget, ending with the assistant marker, with user markers never outnumbering the turns."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}]
    messages += [{"role": r, "content": t} for r, t in zip(roles[:2 * (len(turns) // 2) + 1], turns, strict=False)]
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "?"})
    try:
        ids = utils.build_prompt_ids(baichuan_tok, messages, budget)
    except utils.UserError:
        return
    assert all(isinstance(i, int) and 0 <= i < baichuan_tok.vocab_size for i in ids)
    assert len(ids) <= budget and ids[-1] == ASSISTANT_TOKEN_ID
    assert ids.count(USER_TOKEN_ID) <= sum(m["role"] == "user" for m in messages)


@FUZZ
@given(user=TEXT)
def test_template_path_markers_come_only_from_the_template(qwen_tok, user: str) -> None:
    """Chat-template path: any user text gives the same special-token ids as a plain prompt."""
    special = set(qwen_tok.all_special_ids) | {qwen_tok.convert_tokens_to_ids(t)
                                               for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}

    def markers(text: str) -> list[int]:
        ids = utils.build_prompt_ids(qwen_tok, [{"role": "system", "content": "s"}, {"role": "user", "content": text}],
                                     10_000)
        return [i for i in ids if i in special]

    assert markers(user) == markers("plain")


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300),
                     st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"a"', b":", b",", b"1", b"\n", b"\r\n",
                                               b"\xef\xbb\xbf", b"\xff", b"\\u00e9", b'"\\ud800"', b"null", b" "]),
                              max_size=40).map(b"".join)))
def test_read_jsonl_gives_records_or_data_error(raw: bytes) -> None:
    """Arbitrary bytes: read_jsonl yields (line number, dict) pairs or raises DataError naming the file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        path.write_bytes(raw)
        try:
            records = list(utils.read_jsonl(path))
        except utils.DataError as e:
            assert str(path) in str(e)
            return
    lines = raw.split(b"\n")
    assert all(isinstance(r, dict) and 1 <= n <= len(lines) for n, r in records)
