"""Helpers that several test files share (and nothing outside tests/ uses). What the benchmarks share
with the tests (free ports, JSON-lines files, the environment of a child process, waiting for a
server) is in tools/harness.py; pytest fixtures are in tests/conftest.py.

Sections: tiny random Baichuan models and inputs; data_helper.py input folders; train.py runs;
broken inputs for the scripts. Heavy libraries (torch, safetensors, baichuan) are imported inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tools.harness import REPO, child_env, dump_jsonl, free_port
from tools.tiny_models import TINY_VOCAB_SIZE

if TYPE_CHECKING:
    import torch

    from baichuan import BaichuanForCausalLM

TRAIN = REPO / "train.py"


# ---------------------------------------------------------------------------------------------
# Tiny random Baichuan models and inputs (test_baichuan_model.py, test_generate_contract.py)
# ---------------------------------------------------------------------------------------------
ATOL = 1e-4  # fp32 tolerance against the float64 reference


def random_model(position_embedding: str = "rope", seed: int = 0, **overrides) -> BaichuanForCausalLM:
    """A tiny fp32 model with larger-than-default weights, so attention is sharp enough for a wrong
    rotation, split or mask to move the logits well beyond the tolerance."""
    import torch

    from baichuan import BaichuanForCausalLM
    from tools.tiny_models import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(position_embedding=position_embedding, initializer_range=0.15, **overrides)
    return BaichuanForCausalLM(config).eval()


def random_ids(batch: int, length: int, seed: int = 1, vocab: int = TINY_VOCAB_SIZE) -> torch.LongTensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences as one left-padded batch: (input ids, attention mask)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# data_helper.py inputs (test_data_helper.py, test_bad_inputs.py): a small RoleBench folder, profiles,
# an attribute table and its templates
# ---------------------------------------------------------------------------------------------
ROLEBENCH_PROFILES = {
    "孙悟空": "美猴王，齐天大圣，说话豪爽",
    "李白": "唐代诗人，好饮酒。",
    "皇帝": "雍正皇帝",
    "赵子龙": "常山赵子龙",  # has a profile, no RoleBench data
}
GENERAL_TRAIN = [
    {"role": "孙悟空", "question": "编辑以下句子：我去了商店。",
     "generated": ["俺老孙改好了：我去了商店。", "俺老孙说：好！"]},
    {"role": "孙悟空", "question": "写一首关于月亮的诗。", "generated": ["月儿弯弯挂天边", "月亮", "第三个回答"]},
    {"role": "李白", "question": "写一首关于月亮的诗。", "generated": ["床前明月光"]},
    {"role": "皇帝", "question": "给出三个水果。", "generated": ["苹果、香蕉、橘子，朕都爱吃。"]},
]
GENERAL_TEST = [
    {"role": "李白", "question": "编辑以下句子：我去了商店。", "generated": ["我去了商店，饮酒一杯。", "改好了"]},
    {"role": "孙悟空", "question": "今天天气如何？", "generated": ["晴空万里！"]},
]
SPECIFIC_TRAIN = [
    {"role": "皇帝", "question": "皇上，您今天批了多少奏折？", "generated": ["朕批了一百本。"], "type": "script_based"},
    {"role": "孙悟空", "question": "大圣，你的金箍棒有多重？", "generated": ["一万三千五百斤！"],
     "type": "script_based"},
]
SPECIFIC_TEST = [
    {"role": "皇帝", "question": "皇上，年羹尧该如何处置？", "generated": ["朕自有分寸。"], "type": "script_based"},
]
ROLEBENCH_FILES = {
    ("general", "train"): GENERAL_TRAIN,
    ("general", "test"): GENERAL_TEST,
    ("role_specific", "train"): SPECIFIC_TRAIN,
    ("role_specific", "test"): SPECIFIC_TEST,
}
TABLE = {
    "attributes": ["性别", "元素力"],
    "characters": {
        "刻晴": {"性别": "女", "元素力": "雷"},
        "钟离": {"性别": "男", "元素力": "岩"},
        "派蒙": {"性别": "女", "元素力": None},  # unknown: no records for it
    },
}
TEMPLATES = {
    "性别": {
        "train": ["{name}是男是女？", "{name}的性别是什么？"],
        "heldout": ["请问{name}是男性还是女性？"],
        "novel": ["说说{name}的性别。"],
        "answer": ["{name}是{value}性。", "{value}。"],
    },
    "元素力": {
        "train": ["{name}用什么元素？", "{name}的元素力是什么？", "{name}的神之眼是什么元素？"],
        "heldout": ["{name}掌握哪种元素力？"],
        "novel": ["告诉我{name}的元素。"],
        "answer": ["{name}的元素力是{value}。", "是{value}元素。", "{value}"],
    },
}


def rolebench_path(root: Path, layout: str, kind: str, split: str) -> Path:
    """Where a RoleBench file lies in the flat layout or the published one (rolebench-zh/<kind>/<split>)."""
    if layout == "flat":
        return root / f"rolebench-zh_{kind}_{split}.jsonl"
    return root / "rolebench-zh" / kind / f"{split}.jsonl"


def make_rolebench(root: Path, layout: str = "flat", files: dict | None = None) -> Path:
    for (kind, split), records in (ROLEBENCH_FILES if files is None else files).items():
        dump_jsonl(rolebench_path(root, layout, kind, split), records)
    return root


def make_inputs(tmp_path: Path, layout: str = "flat", files: dict | None = None, attributes: bool = True) -> dict:
    """A full set of data_helper.py inputs in tmp_path; returns the paths the CLI needs."""
    data = make_rolebench(tmp_path / "data", layout, files)
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(ROLEBENCH_PROFILES, ensure_ascii=False), encoding="utf-8")
    table = tmp_path / "attributes.json"
    table.write_text(json.dumps(TABLE, ensure_ascii=False), encoding="utf-8")
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(TEMPLATES, ensure_ascii=False), encoding="utf-8")
    return {"data_dir": data, "profiles": profiles, "attributes": table if attributes else "",
            "templates": templates, "output_dir": tmp_path / "out"}


# single-turn output only: the tests of the single-turn records read every record's input/output;
# tests/test_dialogue.py covers the multi-turn conversations the defaults add
SINGLE_TURN = ("--dialogues_per_role", "0", "--attribute_dialogues", "0", "--eval_dialogues", "0")


def data_helper_argv(paths: dict, *extra: str) -> list[str]:
    """data_helper.py's command line for the paths of `make_inputs` (single-turn records only)."""
    args = []
    for key in ("data_dir", "profiles", "attributes", "templates", "output_dir"):
        args += [f"--{key}", str(paths[key])]
    return args + list(SINGLE_TURN) + list(extra)


# ---------------------------------------------------------------------------------------------
# train.py runs (test_train.py, test_reliability.py, test_bad_inputs.py)
# ---------------------------------------------------------------------------------------------
ROLES = [("刻晴", "璃月七星之一的玉衡星，使用雷元素"), ("孙悟空", "齐天大圣，会七十二变"),
         ("钟离", "往生堂客卿，岩元素")]
QUESTIONS = ["你好，请问你是谁？", "你会用什么元素？", "今天天气很好，我们一起去吧！", "你喜欢吃什么？"]
ANSWERS = ["我是{role}。", "{role}使用雷元素，今天天气很好。", "我喜欢吃桃子，你好！", "问题 回答 角色 性格 身份"]
# small, quick settings shared by the runs (prompts fit max_src_len; some answers get cut at max_len)
COMMON = ["--max_len", "80", "--max_src_len", "56", "--per_device_train_batch_size", "2",
          "--learning_rate", "3e-3", "--weight_decay", "0.0", "--warmup_ratio", "0.1",
          "--lora_dim", "8", "--lora_alpha", "16", "--per_device_eval_batch_size", "4"]
RUN_TIMEOUT = 300


def write_records(path: Path, n: int, seed: int) -> Path:
    """`n` seeded training records (instruction, input, output) of the roles above, as JSON lines."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        role, desc = rng.choice(ROLES)
        answer = rng.choice(ANSWERS).format(role=role) * rng.randint(1, 3)
        records.append({"instruction": f"你是{role}，{desc[: rng.randint(4, len(desc))]}。",
                        "input": rng.choice(QUESTIONS), "output": answer})
    return dump_jsonl(path, records)


def train_cmd(args: list[str], nproc: int = 1, port: int = 0) -> list[str]:
    """`python train.py ...` for one process, the DeepSpeed launcher for more."""
    if nproc == 1:
        return [sys.executable, str(TRAIN), *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
            str(TRAIN), *args]


def run_train(cwd: Path, args: list, nproc: int = 1, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    port = free_port()
    proc = subprocess.run(train_cmd([str(a) for a in args], nproc, port), cwd=cwd, env=child_env(port, **env),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if check:
        assert proc.returncode == 0, (
            f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def kill_when(args: list, cwd: Path, log: Path, ready: Callable[[], bool], delay: float) -> bool:
    """Start train.py, SIGKILL its process group `delay` s after `ready()` turns true; False if it finished first."""
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd([str(a) for a in args]), cwd=cwd, env=child_env(free_port()), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and anything it started
        proc.wait()
    return killed


def newest_checkpoint(output_dir: Path) -> Path:
    import train

    ckpts = train.list_checkpoints(str(output_dir))
    assert ckpts, f"no complete checkpoint in {output_dir}: {sorted(p.name for p in output_dir.iterdir())}"
    return ckpts[-1][1]


def train_history(ckpt: Path) -> list[tuple[int, float]]:
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return [(int(s), float(v)) for s, v in state["history"]["train"]]


def adapter(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def assert_tensors_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    import torch

    assert a.keys() == b.keys()
    for k, x in a.items():
        x, y = x.float(), b[k].float()
        assert torch.allclose(x, y, rtol=rtol, atol=atol), (k, (x - y).abs().max().item())


def make_lora_checkpoint(base: Path, out: Path, train_mode: str = "lora", seed: int = 0, scale: float = 0.05,
                         modules_to_save: str = "") -> Path:
    """A checkpoint folder as train.py writes it (adapter, tokenizer, run_config.json) without a training
    run: train.py's own `load_model` (same LoRA targets, pad-token resize, PEFT save), random LoRA B
    (and fully trained modules shifted) with `scale`, so the adapter visibly changes the replies."""
    import torch

    import train
    import utils
    from roleplay import loading

    args = train.parse_args(["--model_name_or_path", str(base), "--train_mode", train_mode, "--output_dir", str(out),
                             "--modules_to_save", modules_to_save])
    tokenizer = loading.load_tokenizer(str(base), training=True)
    torch.manual_seed(seed)
    model, report = train.load_model(args, torch.device("cpu"), torch.float32, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * scale)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    utils.write_json(out / utils.RUN_CONFIG_NAME, {"base_model": str(base.resolve()), "train_mode": train_mode,
                                                   "resized_embeddings": report["resized"],
                                                   "lora_target_modules": report["targets"]})
    return out


def ds_config_file(tmp: Path, name: str = "ds.json", **edits) -> Path:
    """The repo's DeepSpeed config with dotted-key edits (`bf16__enabled=False`), written to tmp."""
    cfg = json.loads((REPO / "ds_zero2_no_offload.json").read_text(encoding="utf-8"))
    for dotted, value in edits.items():
        node = cfg
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp / name
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Broken inputs for the scripts (test_bad_inputs.py, test_reliability.py)
# ---------------------------------------------------------------------------------------------
SCRIPT_PROFILES = {"孙悟空": "齐天大圣，性格急躁", "刻晴": "璃月七星之一的玉衡星"}


def broken_model(src: Path, dst: Path, drop: str) -> Path:
    """A copy of the model folder `src` without the files matching `drop`."""
    shutil.copytree(src, dst)
    for p in dst.glob(drop):
        p.unlink()
    return dst


def profiles_file(path: Path, content: bytes | None = None) -> Path:
    """A profiles file at `path`: SCRIPT_PROFILES, or the raw bytes `content`."""
    path.write_bytes(json.dumps(SCRIPT_PROFILES, ensure_ascii=False).encode() if content is None else content)
    return path


MARKER_NAME = "remote-code-ran"  # the file an `auto_map` module would create if anything imported it


def corrupt_model(src: Path, dst: Path, how: str) -> Path:
    """A copy of the model folder `src`, broken one way: "truncated_weights" (model.safetensors cut in
    half), "zero_weights" (as long, all zero bytes), "malformed_config" (config.json cut in half) or
    "unknown_model_type" (a model_type nobody knows, with an `auto_map` to a module in the folder that
    would write MARKER_NAME beside it if it were ever imported)."""
    shutil.copytree(src, dst)
    weights, config = dst / "model.safetensors", dst / "config.json"
    if how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "zero_weights":
        weights.write_bytes(b"\0" * weights.stat().st_size)
    elif how == "malformed_config":
        text = config.read_text(encoding="utf-8")
        config.write_text(text[: len(text) // 2], encoding="utf-8")
    elif how == "unknown_model_type":
        cfg = json.loads(config.read_text(encoding="utf-8"))
        cfg.update(model_type="evil_arch", auto_map={"AutoConfig": "evil_arch.EvilConfig",
                                                     "AutoModelForCausalLM": "evil_arch.EvilModel"})
        config.write_text(json.dumps(cfg), encoding="utf-8")
        (dst / "evil_arch.py").write_text(f"open({str(dst / MARKER_NAME)!r}, 'w').close()\n", encoding="utf-8")
    else:
        raise ValueError(how)
    return dst


def tiny_safetensors(path: Path) -> Path:
    """A valid one-tensor safetensors file (a stand-in adapter for cells that fail before reading it)."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, dtype=np.float32)}, str(path))
    return path
