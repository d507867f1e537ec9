"""A merged Baichuan folder loads without this repository: merge_params.py writes our own model code and
`auto_map` into it, so transformers alone (`trust_remote_code=True`), vLLM and other tools open it, and a
chat template derived from the prompt builder, so an OpenAI-compatible server prompts the model as
training did. Checked in a fresh Python process whose sys.path cannot reach the repository (same
logits as our own loader); our own loaders keep loading it with no remote code and no warning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import merge_params
import utils
from roleplay import generation, loading
from tests.helpers import make_lora_checkpoint

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.usefixtures("single_thread_torch"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")]

REPO = Path(__file__).resolve().parents[1]
CONVERSATIONS = [
    [{"role": "system", "content": utils.build_system_prompt("孙悟空", "齐天大圣，性格急躁")},
     {"role": "user", "content": "大圣，你最近在忙些什么？"}],
    [{"role": "user", "content": "Hello world! 1 + 2 = 3"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "刻晴会用什么元素？"}],
    [{"role": "system", "content": "你是李白。"}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "我是李白，一个爱喝酒写诗的人。"},
     {"role": "user", "content": "写一首关于月亮的诗 🌙"}],
    [{"role": "user", "content": "  两个空格  and tabs\t和换行\n"}, {"role": "assistant", "content": "好的"},
     {"role": "user", "content": "再说一遍"}],
]
# the child: no repository on sys.path (cwd elsewhere, PYTHONPATH empty), transformers alone
CHILD = r"""
import importlib.util, json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out, prompts, conversations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
assert all(importlib.util.find_spec(name) is None for name in ("baichuan", "utils", "roleplay")), sys.path
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    logits = {str(i): model(input_ids=torch.tensor([ids])).logits[0].contiguous() for i, ids in enumerate(prompts)}
save_file(logits, out)
ids = []
for messages in conversations:
    rendered = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids.append(list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered))
print(json.dumps({"model": type(model).__module__, "tokenizer": type(tok).__module__, "chat_ids": ids,
                  "reply": tok.decode(model.generate(torch.tensor([ids[0]]), max_new_tokens=6, do_sample=False)[0])}))
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("remote-code")
    base = make_tiny_model(root / "base")
    ckpt = make_lora_checkpoint(base, root / "ckpt" / "epoch-1-step-2", seed=3, scale=0.3)
    out = root / "merged"
    assert merge_params.main(["--model_dir", str(ckpt), "--save_model_dir", str(out)]) == 0
    return out


def test_merged_folder_has_the_layout_other_tools_load(merged: Path) -> None:
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
            "model.safetensors", *merge_params.REMOTE_CODE_FILES} <= names
    for name in merge_params.REMOTE_CODE_FILES:  # our own code, unchanged
        assert (merged / name).read_bytes() == (REPO / "baichuan" / name).read_bytes()
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    assert config["auto_map"] == merge_params.MODEL_AUTO_MAP and config["architectures"] == ["BaichuanForCausalLM"]
    tok_config = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["auto_map"] == merge_params.TOKENIZER_AUTO_MAP and tok_config["add_bos_token"] is False
    template = (merged / "chat_template.jinja").read_text(encoding="utf-8") if "chat_template.jinja" in names \
        else tok_config["chat_template"]
    assert "<reserved_106>" in template and "<reserved_107>" in template


def test_fresh_process_without_the_repo_loads_it(merged: Path, tmp_path: Path) -> None:
    """transformers alone, trust_remote_code=True, in a process that cannot import our code: the
    folder's own files run, with the logits of our loader and the prompt builder's chat ids."""
    ours, tok = loading.load_model_for_inference(str(merged), device="cpu")
    config = generation.generation_config_for(ours, do_sample=False, max_new_tokens=6)
    prompts = [generation.chat_prompt_ids(ours, tok, m, config) for m in CONVERSATIONS]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = tmp_path / "logits.safetensors"
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(merged), str(out), json.dumps(prompts),
                           json.dumps(CONVERSATIONS, ensure_ascii=False)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["model"].startswith("transformers_modules.") and child["tokenizer"].startswith("transformers_modules.")
    from safetensors.torch import load_file

    theirs = load_file(str(out))
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            torch.testing.assert_close(theirs[str(i)], ours(input_ids=torch.tensor([ids])).logits[0], atol=1e-5,
                                       rtol=1e-5)
    assert child["chat_ids"] == prompts  # the folder's chat template == our prompt builder
    reply = ours.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False)[0]
    assert child["reply"] == tok.decode(reply)


def test_our_loaders_need_no_remote_code_and_say_nothing(merged: Path) -> None:
    """auto_map in the folder changes nothing for us: our registered classes load it, silently."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import baichuan

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record)

    handler = Keep()
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model, tok = loading.load_model_for_inference(str(merged), device="cpu")
            plain_tok = AutoTokenizer.from_pretrained(merged)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    assert type(model) is baichuan.BaichuanForCausalLM and type(tok) is baichuan.BaichuanTokenizer
    assert type(plain_tok) is baichuan.BaichuanTokenizer


def test_chat_template_equals_the_prompt_builder(merged: Path) -> None:
    tok = loading.load_tokenizer(str(merged))
    model, _ = loading.load_model_for_inference(str(merged), device="cpu")
    config = generation.generation_config_for(model)
    for messages in CONVERSATIONS:
        assert utils._apply_template(tok, messages, add_generation_prompt=True) == \
            utils.build_prompt_ids(tok, messages, 10**9, config)
    ends_with_reply = [*CONVERSATIONS[3], {"role": "assistant", "content": "床前明月光"}]
    assert utils._apply_template(tok, ends_with_reply, add_generation_prompt=True) == \
        utils.build_prompt_ids(tok, ends_with_reply, 10**9, config)
    late_system = [{"role": "user", "content": "你好"}, {"role": "system", "content": "你是李白。"}]
    with pytest.raises(Exception, match="only allowed first"):
        utils._apply_template(tok, late_system, add_generation_prompt=True)
