"""BaichuanTokenizer against the reference tokenizer's behaviour, using the tiny sentencepiece model;
expected ids and text are computed with sentencepiece directly."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

import baichuan  # noqa: F401  (registers the Auto classes)
from baichuan import BaichuanTokenizer
from tools.tiny_models import ASSISTANT_TOKEN, ASSISTANT_TOKEN_ID, USER_TOKEN, USER_TOKEN_ID

TEXTS = ["你好，我是孙悟空，齐天大圣。", "Hello world! 12345", "两个  空格\n换行 and 😀 emoji", "刻晴会用什么元素？"]


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def shipped(tiny_tokenizer_dir: Path) -> BaichuanTokenizer:
    """Loaded from the folder: the shipped-style config (no BOS, pad <unk>)."""
    return BaichuanTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def bare(tiny_tokenizer_dir: Path) -> BaichuanTokenizer:
    """Built from the vocab file alone: constructor defaults (BOS on, no pad)."""
    return BaichuanTokenizer(vocab_file=str(tiny_tokenizer_dir / "tokenizer.model"))


def test_vocabulary_and_special_ids(shipped: BaichuanTokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert shipped.vocab_size == sp.get_piece_size() == len(shipped)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (shipped.unk_token_id, shipped.bos_token_id, shipped.eos_token_id, shipped.pad_token_id) == (0, 1, 2, 0)
    assert shipped.convert_ids_to_tokens([USER_TOKEN_ID, ASSISTANT_TOKEN_ID]) == [USER_TOKEN, ASSISTANT_TOKEN]
    assert shipped.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN]) == [USER_TOKEN_ID, ASSISTANT_TOKEN_ID]
    vocab = shipped.get_vocab()
    assert len(vocab) == sp.get_piece_size() and vocab[USER_TOKEN] == USER_TOKEN_ID


def test_constructor_defaults(bare: BaichuanTokenizer) -> None:
    assert bare.add_bos_token is True and bare.add_eos_token is False
    assert bare.pad_token is None and bare.pad_token_id is None
    assert bare.clean_up_tokenization_spaces is False


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_equals_sentencepiece(shipped: BaichuanTokenizer, bare: BaichuanTokenizer,
                                       sp: spm.SentencePieceProcessor, text: str) -> None:
    pieces = sp.encode(text)
    assert shipped.encode(text, add_special_tokens=False) == pieces
    assert shipped.encode(text) == pieces  # shipped config: add_bos_token false
    assert bare.encode(text) == [1] + pieces  # constructor default: BOS added
    assert shipped.decode(pieces) == sp.decode(pieces) == text  # byte fallback keeps any text


def test_bos_eos_switches_and_pairs(tiny_tokenizer_dir: Path, sp: spm.SentencePieceProcessor) -> None:
    a, b = sp.encode(TEXTS[0]), sp.encode(TEXTS[1])
    both = BaichuanTokenizer(vocab_file=str(tiny_tokenizer_dir / "tokenizer.model"), add_eos_token=True)
    assert both.encode(TEXTS[0]) == [1] + a + [2]
    assert both.build_inputs_with_special_tokens(a, b) == [1] + a + [2] + [1] + b + [2]
    assert both.get_special_tokens_mask(a, b) == [1] + [0] * len(a) + [1, 1] + [0] * len(b) + [1]
    assert both.create_token_type_ids_from_sequences(a, b) == [0] * (len(a) + 2) + [1] * (len(b) + 2)
    neither = BaichuanTokenizer(vocab_file=str(tiny_tokenizer_dir / "tokenizer.model"), add_bos_token=False)
    assert neither.encode(TEXTS[0], TEXTS[1]) == a + b
    assert neither.get_special_tokens_mask(a) == [0] * len(a)


def test_decode_quirk_and_skip_special_tokens(shipped: BaichuanTokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode(TEXTS[0])
    text = sp.decode(ids)
    # A special token after an ordinary piece (not at position 0) puts a space before that run.
    assert shipped.decode([1] + ids + [2]) == "<s> " + text + "</s>"
    a, b = ids[:2], ids[2:]
    assert shipped.decode(a + [1] + b + [2]) == " " + sp.decode(a) + "<s> " + sp.decode(b) + "</s>"
    assert shipped.decode([1, 2] + ids) == "<s></s>" + text
    # skip_special_tokens drops <s> </s> <unk>/pad, but 195/196 are ordinary pieces.
    assert shipped.decode([1, 0] + ids + [2], skip_special_tokens=True) == text
    assert shipped.decode([USER_TOKEN_ID] + ids + [ASSISTANT_TOKEN_ID], skip_special_tokens=True) == (
        USER_TOKEN + text + ASSISTANT_TOKEN)


def test_save_load_round_trip(shipped: BaichuanTokenizer, bare: BaichuanTokenizer, tmp_path: Path) -> None:
    shipped.save_pretrained(tmp_path / "shipped")
    config = json.loads((tmp_path / "shipped" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BaichuanTokenizer"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["pad_token"] == "<unk>" and config["model_max_length"] == 512
    assert (tmp_path / "shipped" / "tokenizer.model").is_file()
    shipped_dir = tmp_path / "shipped"
    for loaded in (BaichuanTokenizer.from_pretrained(shipped_dir), AutoTokenizer.from_pretrained(shipped_dir)):
        assert type(loaded) is BaichuanTokenizer
        assert loaded.add_bos_token is False and loaded.pad_token_id == 0
        for text in TEXTS:
            assert loaded.encode(text) == shipped.encode(text)
    # BOS-on tokenizers keep BOS on through a save/load cycle (transformers 5 drops the key by default).
    bare.save_pretrained(tmp_path / "bare")
    assert BaichuanTokenizer.from_pretrained(tmp_path / "bare").encode(TEXTS[1]) == bare.encode(TEXTS[1])
    files = bare.save_vocabulary(str(tmp_path / "bare"), filename_prefix="copy")
    assert Path(files[0]).read_bytes() == (tmp_path / "bare" / "tokenizer.model").read_bytes()


def test_pickle_and_deepcopy(shipped: BaichuanTokenizer) -> None:
    # DataLoader workers and multiprocessing pickle tokenizers; the sp processor itself is not picklable.
    for clone in (pickle.loads(pickle.dumps(shipped)), copy.deepcopy(shipped)):
        assert [clone.encode(t) for t in TEXTS] == [shipped.encode(t) for t in TEXTS]


def test_left_padding_uses_unk_as_pad(tiny_tokenizer_dir: Path) -> None:
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_tokenizer_dir, padding_side="left")
    long_ids, short_ids = tokenizer.encode(TEXTS[0]), tokenizer.encode(TEXTS[1])
    assert len(long_ids) != len(short_ids)
    batch = tokenizer([TEXTS[0], TEXTS[1]], padding=True)
    width = max(len(long_ids), len(short_ids))
    for row, ids in enumerate((long_ids, short_ids)):
        pad = width - len(ids)
        assert batch["input_ids"][row] == [0] * pad + ids
        assert batch["attention_mask"][row] == [0] * pad + [1] * len(ids)


def test_real_style_tokenizer_config_loads(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """The shipped tokenizer_config.json: AddedToken dicts, auto_map, use_fast false."""
    import shutil

    folder = tmp_path / "real-style"
    shutil.copytree(tiny_tokenizer_dir, folder)

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": True}

    config = {"add_bos_token": False, "add_eos_token": False, "auto_map": {"AutoTokenizer": [
        "tokenization_baichuan.BaichuanTokenizer", None]}, "bos_token": added("<s>"), "eos_token": added("</s>"),
        "unk_token": added("<unk>"), "pad_token": added("<unk>"), "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "sp_model_kwargs": {}, "tokenizer_class": "BaichuanTokenizer", "use_fast": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer) is BaichuanTokenizer and tokenizer.add_bos_token is False
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.model_max_length == 4096
    assert tokenizer.decode(tokenizer.encode(TEXTS[2])) == TEXTS[2]
