"""The helpers that training and inference used to have one copy each of, and now share: the device
resolver (roleplay.devices.resolve_device), the tokenizer loader (roleplay.loading.load_tokenizer) and
the NF4 config (roleplay.loading.nf4_config). Each caller keeps its own behaviour and error messages."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

import train
import utils
from roleplay import devices, loading

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages for a machine without CUDA")


def test_training_resolves_the_launcher_rank_and_inference_the_named_device() -> None:
    assert devices.resolve_device("cpu", 0) == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.resolve_device("auto", 0) == expected
    assert devices.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(utils.UserError, match=r"^bad device 'tpu': use auto, cpu, cuda or cuda:N$"):
        devices.resolve_device("tpu")


@no_cuda
def test_asking_for_cuda_without_one_is_worded_for_each_caller() -> None:
    with pytest.raises(utils.UserError, match=r"^--device cuda asked for, but no CUDA device is visible; "
                                              r"use --device cpu or auto$"):
        devices.resolve_device("cuda", 0)
    with pytest.raises(utils.UserError, match=r"^device 'cuda:1' asked for, but no CUDA device is visible; "
                                              r"use cpu or auto$"):
        devices.resolve_device("cuda:1")


def test_the_tokenizer_loader_prefers_the_adapter_folder_and_keeps_both_messages(tiny_tokenizer_dir: Path,
                                                                                 tmp_path: Path) -> None:
    base = loading.load_tokenizer(str(tiny_tokenizer_dir))
    assert loading.load_tokenizer(str(tiny_tokenizer_dir), training=True).eos_token_id == base.eos_token_id
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_tokenizer_dir, adapter)
    base.add_special_tokens({"pad_token": "<|pad|>"})
    base.save_pretrained(adapter)
    assert len(loading.load_tokenizer(str(tiny_tokenizer_dir), str(adapter))) == len(base)
    assert loading.load_tokenizer(str(tiny_tokenizer_dir), str(tmp_path / "no-tokenizer-here")).pad_token == "<unk>"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}", encoding="utf-8")
    # inference quotes the loader's whole message (it may span lines), training its first line only
    with pytest.raises(utils.UserError, match=r"(?s)tokenizer does not load \(.*\); the folder needs its tokenizer "
                                              r"files$") as inference:
        loading.load_tokenizer(str(empty))
    with pytest.raises(utils.UserError, match=r"tokenizer does not load \(.*\); the folder needs its tokenizer "
                                              r"files \(tokenizer.model or tokenizer.json \+ "
                                              r"tokenizer_config.json\)$") as training:
        loading.load_tokenizer(str(empty), training=True)
    assert str(inference.value).startswith(f"{empty}: ") and str(training.value).startswith(f"{empty}: ")
    assert "\n" not in str(training.value)


def test_a_tokenizer_without_eos_is_refused_for_training_only(tiny_tokenizer_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained

    def without_eos(*args, **kwargs):
        tokenizer = real(*args, **kwargs)
        tokenizer.eos_token = None
        return tokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", without_eos)
    assert loading.load_tokenizer(str(tiny_tokenizer_dir)).eos_token_id is None
    with pytest.raises(utils.UserError, match="tokenizer has no eos token; training needs one to end replies"):
        loading.load_tokenizer(str(tiny_tokenizer_dir), training=True)


def test_nf4_config_is_nf4_with_double_quant_in_the_compute_dtype() -> None:
    config = loading.nf4_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


class Built(Exception):
    """Stops loading right after the quantization config is built."""


def test_qlora_training_and_4bit_inference_build_the_same_config(tiny_model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def spy(compute_dtype: torch.dtype) -> None:
        seen.append(compute_dtype)
        raise Built

    monkeypatch.setattr(loading, "nf4_config", spy)
    with pytest.raises(Built):
        loading.load_model_for_inference(str(tiny_model_dir), device="cpu", dtype="bf16", load_in_4bit=True)
    args = argparse.Namespace(train_mode="qlora", model_name_or_path=str(tiny_model_dir))
    with pytest.raises(Built):
        train.load_model(args, torch.device("cpu"), torch.float32, tokenizer=None)
    assert seen == [torch.bfloat16, torch.float32]
