"""Session-wide tiny Baichuan2 artefacts shared by every test module (see `tools/tiny_models.py`).

Fixtures:
- `tiny_tokenizer_dir`: a BaichuanTokenizer folder (tiny sentencepiece model, shipped-style config).
- `tiny_model_dir`: a random tiny BaichuanForCausalLM folder (safetensors + config +
  generation_config.json mirroring Baichuan2-7B-Chat + the tokenizer).
Both are built once per test session in a temporary directory; treat them as read-only.
- `baichuan_tok`, `qwen_tok`: tiny Baichuan / Qwen2 tokenizers, once per module.
- `loaded`: (model, tokenizer) of `tiny_model_dir` loaded for inference, once per module.
- `single_thread_torch`: opt-in fixture running a test with `torch.set_num_threads(1)`.

`pytest_collection_modifyitems` puts the modules that run whole pipelines (train.sh, DeepSpeed,
the browser, the load and soak runs) first, so that with one xdist worker per core (pyproject.toml)
the long runs overlap each other instead of trailing at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.tiny_models import make_tiny_model, make_tiny_tokenizer

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core already fills the CPU: a second OpenMP thread per process (and per child
    # process, which inherits this) only makes the threads wait on each other's barriers; measured on
    # 2 busy cores, a train.py step ran 2-10x slower with 2 threads than with 1.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# the slowest first (whole pipelines, subprocesses); every other module keeps its place after these
LONG_MODULES = ("test_e2e.py", "test_train.py", "test_reliability.py", "test_bench.py", "test_web_browser.py",
                "test_soak.py", "test_packing.py", "test_api.py", "test_merge_predict.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: tests keep their order within a module


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


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple:
    """(model, tokenizer): the tiny model loaded for inference, once per test module."""
    from roleplay import loading

    return loading.load_model_for_inference(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def baichuan_tok(tiny_tokenizer_dir: Path):
    """The tiny BaichuanTokenizer, loaded once per module."""
    from baichuan.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Qwen2 tokenizer (chat-template path), built once per module."""
    from transformers import AutoTokenizer

    from tools.tiny_models import make_tiny_qwen2

    return AutoTokenizer.from_pretrained(make_tiny_qwen2(tmp_path_factory.mktemp("qwen-tok")))
