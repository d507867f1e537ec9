"""Session-wide tiny Baichuan2 artefacts shared by every test module (see `tools/tiny_models.py`).

Fixtures:
- `tiny_tokenizer_dir`: a BaichuanTokenizer folder (tiny sentencepiece model, shipped-style config).
- `tiny_model_dir`: a random tiny BaichuanForCausalLM folder (safetensors + config +
  generation_config.json mirroring Baichuan2-7B-Chat + the tokenizer).
Both are built once per test session in a temporary directory; treat them as read-only.
- `single_thread_torch`: opt-in fixture running a test with `torch.set_num_threads(1)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.tiny_models import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding the tiny BaichuanTokenizer (tokenizer.model + tokenizer_config.json)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-baichuan-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding a random tiny Baichuan2 chat model with its tokenizer and generation config."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-baichuan-model"))


@pytest.fixture()
def single_thread_torch() -> Iterator[None]:
    """Run a test with one torch thread: tiny models gain nothing from more, and on a busy shared
    CPU oversubscribed torch threads make them 10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
