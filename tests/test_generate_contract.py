"""transformers' `generate` contract for our Baichuan model, on whatever transformers is installed.

These are the checks that break when transformers renames or reroutes a generation argument (5.24
renamed the KV cache from `past_key_values` to `cache`): with and without cache equal, left-padded
batches equal each row alone, beam search, streaming, seeded sampling. The canary
(`tests/canary.sh`) runs this file against the newest releases.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from threading import Thread

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, TextIteratorStreamer
from transformers.utils import logging as hf_logging

import baichuan  # noqa: F401  (registers the Auto classes)
from baichuan.modeling_baichuan import CACHE_NAME
from tests.helpers import ATOL, left_pad, random_ids, random_model

pytestmark = pytest.mark.usefixtures("single_thread_torch")

GREEDY = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "repetition_penalty": 1.05,
          "pad_token_id": 0}


def ones(length: int) -> torch.Tensor:
    return torch.ones(1, length, dtype=torch.long)


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_greedy_with_cache_equals_without(position_embedding: str) -> None:
    model = random_model(position_embedding)
    ids = random_ids(1, 7, seed=11)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=ones(7), use_cache=True, **GREEDY)
        uncached = model.generate(ids, attention_mask=ones(7), use_cache=False, **GREEDY)
    assert cached.tolist() == uncached.tolist()
    assert cached.shape[1] == 7 + GREEDY["max_new_tokens"]


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_left_padded_cached_batch_equals_uncached_rows(position_embedding: str) -> None:
    model = random_model(position_embedding)
    seqs = [random_ids(1, 8, seed=12)[0], random_ids(1, 3, seed=13)[0], random_ids(1, 5, seed=14)[0]]
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, use_cache=True, **GREEDY)
        for row, seq in enumerate(seqs):
            alone = model.generate(seq[None], attention_mask=ones(len(seq)), use_cache=False, **GREEDY)
            assert batch[row, ids.shape[1]:].tolist() == alone[0, len(seq):].tolist()


def test_beam_search_with_cache_equals_without() -> None:
    model = random_model("rope")
    ids = random_ids(1, 6, seed=15)
    beam = {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 3, "do_sample": False,
            "pad_token_id": 0, "early_stopping": True}
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=ones(6), use_cache=True, **beam)
        uncached = model.generate(ids, attention_mask=ones(6), use_cache=False, **beam)
        greedy = model.generate(ids, attention_mask=ones(6), **{**GREEDY, "repetition_penalty": 1.0})
    assert cached.shape[0] == 3 and cached.tolist() == uncached.tolist()
    # Beam search keeps the best-scoring sequence; it can only match or beat greedy's log-probability.
    assert beam_logprob(model, cached[0], 6) >= beam_logprob(model, greedy[0, :cached.shape[1]], 6) - ATOL


def beam_logprob(model, sequence: torch.Tensor, prompt_len: int) -> float:
    with torch.no_grad():
        logprobs = model(sequence[None]).logits[0].log_softmax(-1)
    targets = sequence[prompt_len:]
    return logprobs[prompt_len - 1:-1].gather(-1, targets[:, None]).sum().item()


def test_seeded_sampling_is_reproducible() -> None:
    model = random_model("rope")
    ids = random_ids(2, 5, seed=16)
    sample = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.95,
              "pad_token_id": 0}
    runs = []
    with torch.no_grad():
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), **sample).tolist())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed matters: sampling is not secretly greedy


def test_streamer_yields_the_generated_text(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok.encode("你好，我是孙悟空")])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs={"inputs": ids, "attention_mask": torch.ones_like(ids),
                                                   "streamer": streamer, **GREEDY})
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_both_cache_names_are_accepted_and_the_current_one_is_returned() -> None:
    model = random_model("rope")
    ids = random_ids(1, 9, seed=17)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :4], use_cache=True)
        assert isinstance(getattr(prefix, CACHE_NAME), DynamicCache)
        new_name = model(ids[:, 4:], cache=getattr(prefix, CACHE_NAME), use_cache=True).logits
        prefix = model(ids[:, :4], use_cache=True)
        old_name = model(ids[:, 4:], past_key_values=getattr(prefix, CACHE_NAME), use_cache=True).logits
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, 4:], cache=DynamicCache(), past_key_values=DynamicCache())
    assert (new_name - full[:, 4:]).abs().max().item() < ATOL
    assert (old_name - full[:, 4:]).abs().max().item() < ATOL


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_generate_raises_no_deprecation_warning_from_our_code() -> None:
    model = random_model("rope")
    ids, mask = left_pad([random_ids(1, 6, seed=18)[0], random_ids(1, 4, seed=19)[0]])
    logged = Records()
    hf_logging.get_logger().addHandler(logged)  # transformers warns through its own loggers, too
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model.generate(ids, attention_mask=mask, **GREEDY)
            model(ids, attention_mask=mask, use_cache=True)
    finally:
        hf_logging.get_logger().removeHandler(logged)
    deprecations = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    deprecations += [m for m in logged.messages if "deprecat" in m.lower()]
    assert not deprecations, deprecations
