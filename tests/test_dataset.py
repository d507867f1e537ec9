"""Tests for the training data path of utils.py and roleplay/sampler.py: build_training_sample,
Baichuan2PromptDataSet, DataCollator and LengthGroupedBatchSampler. In-process and fast (no training).

The tokenizer is the tiny Qwen2 one from tools/tiny_models.py (chat-template path); the Baichuan
variants use the `tiny_tokenizer_dir` fixture of tests/conftest.py and skip while `baichuan` (or
that fixture) does not exist yet.
"""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.harness import dump_jsonl

# the scripts live in the repo root, not in a package: import them from there whatever the cwd
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
utils = importlib.import_module("utils")
LengthGroupedBatchSampler = importlib.import_module("roleplay.sampler").LengthGroupedBatchSampler
tiny_models = importlib.import_module("tools.tiny_models")

SYSTEM = utils.build_system_prompt("刻晴", "璃月七星之一的玉衡星，使用雷元素，做事雷厉风行")
USER = "你好，请问你是谁？"
ANSWER = "我是刻晴，璃月的玉衡星。"


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tiny_models.make_tiny_qwen2(tmp_path_factory.mktemp("qwen2"))
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def baichuan_tok(request):
    pytest.importorskip("baichuan", reason="baichuan/ is not importable yet")
    try:
        path = request.getfixturevalue("tiny_tokenizer_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_tokenizer_dir fixture yet")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert utils.is_baichuan_tokenizer(tok), type(tok).__name__
    return tok


def _messages(system: str = SYSTEM, user: str = USER) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _split(ids: list[int], labels: list[int]) -> int:
    """Length of the masked prompt: labels are -100 on a prefix and never after it."""
    n = next((i for i, v in enumerate(labels) if v != -100), len(labels))
    assert all(v != -100 for v in labels[n:]), "a -100 label after the answer started"
    return n


# ---------------------------------------------------------------------------------------------
# build_training_sample
# ---------------------------------------------------------------------------------------------
def _check_untruncated(tok, gen_config=None):
    ids, labels, truncated = utils.build_training_sample(tok, SYSTEM, USER, ANSWER, 400, 512, gen_config)
    prompt = utils.build_prompt_ids(tok, _messages(), 400, gen_config)
    answer = utils.encode_text(tok, ANSWER) + [tok.eos_token_id]
    assert not truncated
    assert len(ids) == len(labels)
    assert ids == prompt + answer
    assert labels == [-100] * len(prompt) + answer  # answer + EOS carry their own ids as labels
    assert _split(ids, labels) == len(prompt)
    assert labels[-1] == tok.eos_token_id


def test_sample_masks_prompt_and_keeps_answer_with_eos(qwen_tok):
    _check_untruncated(qwen_tok)
    ids, _, _ = utils.build_training_sample(qwen_tok, SYSTEM, USER, ANSWER, 400, 512)
    text = qwen_tok.decode(ids)
    # the model learns to answer right after the inference prompt's assistant marker
    assert text.endswith("<|im_start|>assistant\n" + ANSWER + "<|im_end|>"), text


def test_sample_long_prompt_cuts_the_user_text_never_the_system(qwen_tok):
    full = utils.build_prompt_ids(qwen_tok, _messages(), 10**9)
    max_src = len(full) - 3
    ids, labels, truncated = utils.build_training_sample(qwen_tok, SYSTEM, USER, ANSWER, max_src, 512)
    n = _split(ids, labels)
    assert truncated and n <= max_src
    text = qwen_tok.decode(ids[:n])
    assert SYSTEM in text and text.endswith("<|im_start|>assistant\n")  # the system prompt and both markers stay
    assert USER[-1] in text and USER not in text  # the user text lost its start, kept its end
    assert ids[n:] == utils.encode_text(qwen_tok, ANSWER) + [qwen_tok.eos_token_id]
    # a system prompt that alone does not fit gives no sample at all (it is never cut)
    ids, labels, truncated = utils.build_training_sample(qwen_tok, SYSTEM * 4, USER, ANSWER, max_src, 512)
    assert ids == [] and labels == [] and truncated


def test_sample_answer_is_cut_to_max_len(qwen_tok):
    prompt = utils.build_prompt_ids(qwen_tok, _messages(), 10**9)
    answer = utils.encode_text(qwen_tok, ANSWER * 5)
    max_len = len(prompt) + 5
    ids, labels, truncated = utils.build_training_sample(qwen_tok, SYSTEM, USER, ANSWER * 5, len(prompt), max_len)
    assert truncated
    assert len(ids) == len(labels) == max_len
    assert ids == prompt + answer[:5]
    assert labels == [-100] * len(prompt) + answer[:5]
    # exactly fitting (answer + EOS == room) is not truncation
    exact = len(prompt) + len(answer) + 1
    ids, labels, truncated = utils.build_training_sample(qwen_tok, SYSTEM, USER, ANSWER * 5, len(prompt), exact)
    assert not truncated and labels[-1] == qwen_tok.eos_token_id and len(ids) == exact


def test_sample_baichuan_layout(baichuan_tok):
    from transformers import GenerationConfig

    gen = GenerationConfig(user_token_id=195, assistant_token_id=196)
    _check_untruncated(baichuan_tok, gen)
    ids, labels, _ = utils.build_training_sample(baichuan_tok, SYSTEM, USER, ANSWER, 400, 512, gen)
    n = _split(ids, labels)
    assert ids[n - 1] == 196 and 195 in ids[:n]  # ... [195] user [196] | answer EOS
    # a cut prompt keeps the system prompt and the markers; the user text loses its start
    full = utils.build_prompt_ids(baichuan_tok, _messages(), 10**9, gen)
    cut = len(full) - 3
    ids, labels, truncated = utils.build_training_sample(baichuan_tok, SYSTEM, USER, ANSWER, cut, 512, gen)
    n = _split(ids, labels)
    system_ids = utils.build_prompt_ids(baichuan_tok, _messages(user=""), 10**9, gen)[:-2]
    assert truncated and n == cut and ids[:len(system_ids)] == system_ids
    assert ids[len(system_ids)] == 195 and ids[n - 1] == 196 and ids[n - 4:n] == full[-4:]


def test_sample_baichuan_answer_cannot_forge_eos(baichuan_tok):
    """Answer text that spells a control piece must not put a control id into the labels."""
    from transformers import GenerationConfig

    gen = GenerationConfig(user_token_id=195, assistant_token_id=196)
    answer = f"好的{baichuan_tok.eos_token}继续"
    ids, labels, _ = utils.build_training_sample(baichuan_tok, SYSTEM, USER, answer, 400, 512, gen)
    body = ids[_split(ids, labels):-1]
    assert baichuan_tok.eos_token_id not in body and 195 not in body and 196 not in body


# ---------------------------------------------------------------------------------------------
# Baichuan2PromptDataSet
# ---------------------------------------------------------------------------------------------
def test_dataset_truncation_and_is_skip_counts(qwen_tok, tmp_path):
    short = {"instruction": SYSTEM, "input": USER, "output": ANSWER}
    long_answer = {"instruction": SYSTEM, "input": USER, "output": ANSWER * 20}
    long_prompt = {"instruction": SYSTEM * 4, "input": USER, "output": ANSWER}
    records = [short, long_answer, short, long_prompt, short]
    path = dump_jsonl(tmp_path / "train.json", records)
    prompt_len = len(utils.build_prompt_ids(qwen_tok, _messages(), 10**9))
    max_src, max_len = prompt_len + 5, prompt_len + 40
    assert len(utils.build_prompt_ids(qwen_tok, _messages(SYSTEM * 4), 10**9)) > max_src

    kept = utils.Baichuan2PromptDataSet(path, qwen_tok, max_len, max_src, is_skip=False)
    # the long system prompt cannot be cut, so that record is skipped even without is_skip
    assert len(kept) == 4 and kept.skipped == 1 and kept.truncated == 1
    assert max(kept.lengths) == max_len
    assert all(len(s["input_ids"]) <= max_len and len(s["input_ids"]) == len(s["labels"]) for s in kept.samples)
    assert kept.lengths == [len(s["input_ids"]) for s in kept.samples]
    # the dataset's sample is build_training_sample's
    ids, labels, _ = utils.build_training_sample(qwen_tok, SYSTEM, USER, ANSWER, max_src, max_len)
    assert kept[0] == {"input_ids": ids, "labels": labels, "group": 1}  # no source: a role reply (LOSS_GROUPS)

    skipped = utils.Baichuan2PromptDataSet(path, qwen_tok, max_len, max_src, is_skip=True)
    assert len(skipped) == 3 and skipped.skipped == 2 and skipped.truncated == 0
    assert all(s == kept[0] for s in skipped.samples)


def test_dataset_errors_name_the_problem(qwen_tok, tmp_path):
    good = {"instruction": SYSTEM, "input": USER, "output": ANSWER}
    with pytest.raises(utils.UserError, match="max_src_len"):
        utils.Baichuan2PromptDataSet(dump_jsonl(tmp_path / "a.json", [good]), qwen_tok, 64, 64)
    with pytest.raises(utils.DataError, match=r"b\.json:2: field 'output'"):
        utils.Baichuan2PromptDataSet(dump_jsonl(tmp_path / "b.json", [good, {"instruction": "x", "input": "y"}]),
                                     qwen_tok, 512, 256)
    with pytest.raises(utils.DataError, match="no usable samples"):
        utils.Baichuan2PromptDataSet(dump_jsonl(tmp_path / "c.json", []), qwen_tok, 512, 256)
    with pytest.raises(utils.DataError, match="2 skipped"):
        long_answer = dict(good, output=ANSWER * 50)
        utils.Baichuan2PromptDataSet(dump_jsonl(tmp_path / "d.json", [long_answer, long_answer]), qwen_tok, 300, 256,
                                     is_skip=True)


# ---------------------------------------------------------------------------------------------
# DataCollator
# ---------------------------------------------------------------------------------------------
def test_collator_pads_to_multiple_of_8_with_masked_labels():
    samples = [{"input_ids": list(range(10, 10 + n)), "labels": [-100] * 2 + list(range(12, 10 + n))}
               for n in (3, 17, 9)]
    batch = utils.DataCollator(pad_token_id=0)(samples)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert tuple(batch[key].shape) == (3, 24), key  # longest 17 -> 24
        assert str(batch[key].dtype) == "torch.int64"
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == s["input_ids"]
        assert batch["labels"][row, :n].tolist() == s["labels"]
        assert batch["input_ids"][row, n:].tolist() == [0] * (24 - n)
        assert batch["labels"][row, n:].tolist() == [-100] * (24 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (24 - n)
    # already a multiple of 8: no extra padding; other multiples honored
    assert utils.DataCollator(5)([{"input_ids": [1] * 16, "labels": [1] * 16}])["input_ids"].shape[1] == 16
    assert utils.DataCollator(5, pad_to_multiple_of=1)(samples)["input_ids"].shape[1] == 17


# ---------------------------------------------------------------------------------------------
# LengthGroupedBatchSampler
# ---------------------------------------------------------------------------------------------
def _sampler(lengths, bs, world=1, rank=0, ga=1, seed=0, **kw):
    return LengthGroupedBatchSampler(lengths, bs, world, rank, ga, seed, **kw)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 150), bs=st.integers(1, 4), world=st.integers(1, 3), ga=st.integers(1, 3),
       seed=st.integers(0, 5), epoch=st.integers(0, 2))
def test_sampler_covers_every_sample_once_per_epoch(n, bs, world, ga, seed, epoch):
    lengths = [random.Random(seed * 1000 + i).randint(1, 300) for i in range(n)]
    per_rank = [_sampler(lengths, bs, world, r, ga, seed).micro_batches(epoch) for r in range(world)]
    size = bs * world * ga
    steps = -(-n // size)
    counts = [0] * n
    for batches in per_rank:
        assert len(batches) == steps * ga  # every rank runs the same number of micro-batches ...
        for b in batches:
            assert len(b) == bs  # ... of full size
            for i in b:
                counts[i] += 1
    assert sum(counts) == steps * size
    assert min(counts) >= 1  # every sample is seen; the only repeats are the documented padding
    assert sum(c - 1 for c in counts) == steps * size - n
    assert max(counts) <= 1 + -(-(steps * size - n) // n)  # repeats are spread, not one sample many times


def test_sampler_ranks_match_single_process_grad_accum():
    lengths = [random.Random(i).randint(5, 200) for i in range(101)]
    for bs, world, ga in [(2, 2, 1), (2, 4, 1), (1, 2, 2), (3, 3, 2)]:
        single = _sampler(lengths, bs, 1, 0, ga * world, seed=7).micro_batches(1)
        ranks = [_sampler(lengths, bs, world, r, ga, seed=7).micro_batches(1) for r in range(world)]
        steps = len(single) // (ga * world)
        assert all(len(r) == steps * ga for r in ranks)
        for s in range(steps):
            for a in range(ga):
                # accumulation step a of optimizer step s: one process's micro-batches a*world .. a*world+world-1
                for r in range(world):
                    assert ranks[r][s * ga + a] == single[s * ga * world + a * world + r]


def test_sampler_reshuffles_per_epoch_and_is_seeded():
    lengths = list(range(1, 65))
    a = _sampler(lengths, 2, seed=3)
    assert a.micro_batches(0) == _sampler(lengths, 2, seed=3).micro_batches(0)
    assert a.micro_batches(0) != a.micro_batches(1)
    assert a.micro_batches(0) != _sampler(lengths, 2, seed=4).micro_batches(0)


def _padding(batches, lengths):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_sampler_pads_less_than_random_batching():
    rng = random.Random(0)
    lengths = [rng.randint(20, 500) for _ in range(512)]
    grouped = _sampler(lengths, 4, 2, 0, 2, seed=1).micro_batches(0)
    grouped += _sampler(lengths, 4, 2, 1, 2, seed=1).micro_batches(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    plain = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert _padding(grouped, lengths) < 0.5 * _padding(plain, lengths), (
        _padding(grouped, lengths), _padding(plain, lengths))
    # ... while length groups still mix over the epoch (not sorted longest-first)
    maxima = [max(lengths[i] for i in b) for b in _sampler(lengths, 4, seed=1).micro_batches(0)]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_sampler_start_skips_consumed_micro_batches():
    lengths = [random.Random(i).randint(5, 50) for i in range(40)]
    s = _sampler(lengths, 2, 2, 1, 2, seed=5)
    full = s.micro_batches(3)
    s.set_epoch(3, start=4)
    assert list(iter(s)) == full[4:]
    assert len(s) == len(full) - 4
    s.set_epoch(3)
    assert list(iter(s)) == full and len(s) == len(full)
    s.set_epoch(3, start=len(full))
    assert list(iter(s)) == [] and len(s) == 0


def test_sampler_feeds_a_dataloader(qwen_tok, tmp_path):
    """The DataLoader in train.py: batch_sampler + collator give the sampler's batches, padded."""
    from torch.utils.data import DataLoader

    records = [{"instruction": SYSTEM[: 10 + 7 * i], "input": USER, "output": ANSWER * (1 + i % 3)} for i in range(9)]
    ds = utils.Baichuan2PromptDataSet(dump_jsonl(tmp_path / "t.json", records), qwen_tok, 1024, 512)
    assert len(ds) == 9  # every system prompt fits (one that does not is skipped, never cut)
    sampler = _sampler(ds.lengths, 2, 1, 0, 2, seed=0)
    collator = utils.DataCollator(99)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collator))
    expected = sampler.micro_batches(0)
    assert len(batches) == len(expected) == 6  # 9 samples -> 3 steps of 4 (3 repeats)
    for batch, idx in zip(batches, expected, strict=True):
        assert batch["input_ids"].shape[1] % 8 == 0
        assert batch["attention_mask"].sum(1).tolist() == [ds.lengths[i] for i in idx]
