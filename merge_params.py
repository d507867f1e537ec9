r"""Merge a LoRA/QLoRA checkpoint into its base model and save one complete model folder.

The base is loaded *unquantized* (even for QLoRA checkpoints), the adapter is applied and folded
into the weights in place (`merge_and_unload`), and the result is written as a normal model folder
(safetensors weights, config, generation config, tokenizer with its chat template, and a
run_config.json recording the merge) that `AutoModelForCausalLM` (after `import baichuan` for
Baichuan2), predict.py and the web demo load directly. A Baichuan folder also holds our own model
code (configuration/modeling/tokenization files from baichuan/) named by `auto_map`, and a chat
template derived from the prompt builder, so tools that know nothing of this repository open it:
transformers with remote code allowed (`trust_remote_code`), vLLM's OpenAI server (see the README; not verified here).
The folder appears only when complete: it is written under a temporary name,
reloaded, checked (on a few prompts the merged model's logits must match base + adapter within a
tolerance, the max abs difference is printed), and only then renamed into place. A failed check
exits with status 1 and leaves no output folder.

Memory: one copy of the model plus one layer (the merge is done in place; the PEFT wrapper is
dropped before the reload check).

Note: a QLoRA adapter was trained against the NF4-quantized base; merged into the full-precision
base it behaves slightly differently than during training (quantization error). The check
compares with the same unquantized base + adapter.

Examples:
    python merge_params.py --model_dir output/qlora/epoch-1-step-100 --save_model_dir output/merged
    python merge_params.py --ori_model_dir Baichuan2-7B-Chat --model_dir output/qlora/epoch-1-step-100 \
        --save_model_dir output/merged --dtype bf16 --overwrite
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import utils
from roleplay import loading
from roleplay.devices import model_device, resolve_device, resolve_inference_dtype
from utils import UserError

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
# Max abs logit difference allowed, relative to the largest |logit| of the reference (at least 1).
# bf16/fp16 merged weights are rounded once more than base + adapter computed separately.
DEFAULT_RTOL = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
CHECK_PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "system", "content": utils.build_system_prompt("孙悟空", "齐天大圣，性格急躁，敢作敢为")},
     {"role": "user", "content": "大圣，你最近在忙些什么？"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "刻晴使用什么元素？"}],
    [{"role": "user", "content": "你好，请介绍一下你自己。"},
     {"role": "assistant", "content": "我是李白，一个爱喝酒写诗的人。"},
     {"role": "user", "content": "Write one line about the moon."}],
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ori_model_dir", default=None,
                   help="base model folder (default: the checkpoint's run_config.json base_model)")
    p.add_argument("--model_dir", required=True, help="LoRA/QLoRA checkpoint folder written by train.py")
    p.add_argument("--save_model_dir", required=True, help="where the merged model folder goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_model_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights dtype to merge and save in (auto: the base model's stored dtype)")
    p.add_argument("--device", default="cpu", help="where to merge: cpu (default), cuda, cuda:N or auto")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit difference allowed (default: relative to the logit scale, by dtype: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RTOL.items()) + ")")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Paths and checks before any model is loaded
# ---------------------------------------------------------------------------------------------
def resolve_inputs(args: argparse.Namespace) -> tuple[str, str]:
    """(base folder, adapter folder), validated."""
    ckpt = Path(args.model_dir)
    if ckpt.is_dir() and not loading.is_adapter_dir(ckpt) and (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt}: a full-model checkpoint (no adapter_config.json): it is already a complete "
                        "model folder, nothing to merge; load it directly")
    loading.check_adapter_dir(str(ckpt), "--model_dir")  # names the flag this script has
    base = args.ori_model_dir
    if base is None:
        base, _ = loading.resolve_model_paths(str(ckpt))  # the checkpoint's run_config base_model
    return loading.resolve_model_paths(base, str(ckpt))


def check_output_dir(out: Path, overwrite: bool, inputs: list[str]) -> None:
    resolved = out.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if resolved == s or s.is_relative_to(resolved) or resolved.is_relative_to(s):
            raise UserError(f"--save_model_dir {out} overlaps an input folder ({src}); pick a separate folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--save_model_dir {out} exists and is not a folder; pick another path")
    utils.check_output_parent(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--save_model_dir {out} exists and is not empty; pass --overwrite to replace it "
                        "or pick another folder")


def resolve_dtype_name(choice: str, base_dir: str) -> str:
    """auto -> the base config's stored dtype (fp32 when unknown)."""
    if choice != "auto":
        return choice
    config = utils.read_json_object(Path(base_dir) / "config.json", "model config", "re-download the base model",
                                    UserError)
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(stored, "fp32")


# ---------------------------------------------------------------------------------------------
# Logits on the check prompts
# ---------------------------------------------------------------------------------------------
def check_prompt_ids(tokenizer: Any, generation_config: Any) -> list[list[int]]:
    markers = generation_config if hasattr(generation_config, "user_token_id") else None
    # the newest 256 ids of each: the check compares logits, any prompt fits a model's context that way
    return [utils.build_prompt_ids(tokenizer, m, 10**9, markers)[-256:] for m in CHECK_PROMPTS]


def prompt_logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    """fp32 CPU logits for every position of every prompt (eval mode, one prompt at a time)."""
    import torch

    device = model_device(model)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            out.append(model(input_ids=x, use_cache=False).logits[0].float().cpu())
    return out


def compare(reference: list[Any], other: list[Any]) -> dict[str, float]:
    """Max abs difference, the reference's logit scale, and the share of positions with equal argmax."""
    diffs = [float((a - b).abs().max()) for a, b in zip(reference, other, strict=True)]
    scale = max(float(a.abs().max()) for a in reference)
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other, strict=True))
    positions = sum(a.shape[0] for a in reference)
    return {"max_abs_diff": max(diffs), "logit_scale": scale, "argmax_agreement": same / max(positions, 1)}


def snapshot_norm_heads(model: Any) -> list[tuple[Any, Any]]:
    """(module, raw weight copy) of every Baichuan NormHead, taken before any eval forward.

    A NormHead (baichuan/modeling_baichuan.py) overwrites its weight in place with unit-norm rows on
    its first eval call, and the check prompts run in eval mode; restoring the raw weight before saving
    keeps every tensor the adapter does not touch bit-identical to the base checkpoint (one [V, H] copy).
    """
    return [(m, m.weight.detach().clone()) for m in model.modules() if hasattr(m, "first_flag")]


def restore_norm_heads(model: Any, snapshots: list[tuple[Any, Any]]) -> None:
    """Put the raw head weights back (heads the merge replaced are left alone) and re-arm the
    normalisation, so the next eval call normalises whatever weight the head now holds."""
    import torch

    present = {id(m) for m in model.modules()}
    for module, raw in snapshots:
        if id(module) in present:
            with torch.no_grad():
                module.weight.copy_(raw)
    for module in model.modules():
        if hasattr(module, "first_flag"):
            module.first_flag = True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Collect dropped models now (and return cached CUDA blocks)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_dir, adapter_dir = resolve_inputs(args)
    out = Path(args.save_model_dir)
    check_output_dir(out, args.overwrite, [base_dir, adapter_dir])
    dtype_name = resolve_dtype_name(args.dtype, base_dir)
    if args.tolerance is not None and not args.tolerance > 0:
        raise UserError(f"--tolerance must be > 0, got {args.tolerance}")
    print(f"base: {base_dir}\nadapter: {adapter_dir}\ndtype: {dtype_name}", flush=True)

    from transformers import AutoModelForCausalLM

    import baichuan  # noqa: F401  (registers the Baichuan classes with the Auto factories)

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    torch_dtype = resolve_inference_dtype(dtype_name, device)
    tokenizer = loading.load_tokenizer(base_dir, adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, device_map={"": device})
    peft_model = loading.attach_adapter(model, tokenizer, adapter_dir)
    heads = snapshot_norm_heads(model)
    del model
    peft_model.eval()
    prompts = check_prompt_ids(tokenizer, peft_model.generation_config)
    reference = prompt_logits(peft_model, prompts)
    with peft_model.disable_adapter():
        adapter_effect = compare(reference, prompt_logits(peft_model, prompts))["max_abs_diff"]

    merged = peft_model.merge_and_unload(progressbar=False, safe_merge=True)  # in place, layer by layer
    del peft_model  # drop the PEFT wrapper (LoRA matrices); `merged` is the base model, merged in place
    release_memory()
    restore_norm_heads(merged, heads)
    del heads
    merged.config.use_cache = True
    if tokenizer.pad_token_id is not None and merged.config.pad_token_id is None:
        merged.config.pad_token_id = tokenizer.pad_token_id
    print(f"merged in {time.perf_counter() - t0:.1f}s; saving", flush=True)

    record = {
        "train_mode": "merged",
        "base_model": os.path.abspath(base_dir),
        "adapter": os.path.abspath(adapter_dir),
        "dtype": dtype_name,
        "adapter_run_config": _adapter_run_summary(adapter_dir),
    }
    try:
        with utils.atomic_path(out) as tmp:
            save_model(merged, tokenizer, tmp)
            del merged  # at most one model copy: the merged one goes before the reload
            release_memory()
            check = check_saved(tmp, torch_dtype, device, prompts, reference, dtype_name, args.tolerance)
            check["adapter_effect"] = adapter_effect
            print(f"check on {len(prompts)} prompts: max abs logit difference merged vs base+adapter "
                  f"{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}; logit scale "
                  f"{check['logit_scale']:.3g}; adapter effect {adapter_effect:.3g}; argmax agreement "
                  f"{check['argmax_agreement']:.1%})", flush=True)
            if not check["max_abs_diff"] <= check["tolerance"]:  # also catches NaN
                raise _CheckFailed(f"merged model differs from base+adapter by {check['max_abs_diff']:.3g} > "
                                   f"{check['tolerance']:.3g}; nothing written to {out}. Check that --ori_model_dir "
                                   "is the base the adapter was trained on, or merge in fp32 (--dtype fp32)")
            utils.write_json(tmp / utils.RUN_CONFIG_NAME, record | {"merge_check": check, "versions": _versions()})
    except _CheckFailed as e:  # the temporary folder is already gone
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved merged model to {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Weights (safetensors), config, generation config and tokenizer (with its chat template) into
    `folder`; a Baichuan folder also gets the model code and `auto_map` other tools load it through."""
    generation_config = getattr(model, "generation_config", None)
    baichuan_model = utils.is_baichuan_tokenizer(tokenizer)
    if baichuan_model:
        tokenizer.chat_template = baichuan_chat_template(tokenizer, generation_config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if generation_config is not None and not (folder / "generation_config.json").is_file():
        generation_config.save_pretrained(folder)
    if baichuan_model:
        add_remote_code(folder)


# ---------------------------------------------------------------------------------------------
# A folder other tools load: Baichuan's code and auto_map, the chat template
# ---------------------------------------------------------------------------------------------
# What transformers (with remote code allowed), vLLM and other tools import a Baichuan folder through: our
# own baichuan/ files (they import only libraries and each other, relatively), named by `auto_map`.
REMOTE_CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py",
                     "generation_utils.py", "quantizer.py")
MODEL_AUTO_MAP = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                  "AutoModel": "modeling_baichuan.BaichuanModel",
                  "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}


def add_remote_code(folder: Path) -> None:
    """Copy the Baichuan model code into `folder` and name it in config.json / tokenizer_config.json
    (`auto_map`). Our own loaders keep using the registered classes (`import baichuan`) without
    trust_remote_code: a model type transformers knows locally wins over a folder's code."""
    import shutil

    import baichuan

    source = Path(baichuan.__file__).resolve().parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(source / name, folder / name)
    for file_name, auto_map in (("config.json", MODEL_AUTO_MAP), ("tokenizer_config.json", TOKENIZER_AUTO_MAP)):
        path = folder / file_name
        config = utils.read_json_object(path, file_name, "re-run merge_params.py", UserError)
        config["auto_map"] = auto_map
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


CHAT_PROBE = ("\u0391", "\u0392", "\u0393", "\u0394")  # four contents the builder's output is split at


def baichuan_chat_template(tokenizer: Any, generation_config: Any = None) -> str:
    """A Jinja chat template that renders a conversation to exactly the ids of the one prompt builder
    (`utils.build_prompt_ids`, the Baichuan2 layout), so an OpenAI-compatible server (vLLM) chats with
    the folder the way training prompted the model. Derived from the builder, not written a second
    time: the builder's ids for a probe conversation (system, user, assistant, user) are split at the
    probe contents, and the ids between them (the turn markers) become the template's literals.

    What it cannot copy: the builder cuts the oldest rounds to the context budget (a server refuses an
    over-long prompt instead) and encodes message text that spells a marker as plain text (a template
    passes text through, so such text becomes the marker).
    """
    def probe(messages: list[dict[str, str]]) -> list[list[int]]:
        ids = utils.build_prompt_ids(tokenizer, messages, 10**9, generation_config)
        pieces, pos = [], 0
        for m in messages:
            content = utils.encode_text(tokenizer, m["content"])
            start = next((i for i in range(pos, len(ids) - len(content) + 1) if ids[i:i + len(content)] == content),
                         None)
            if start is None:
                raise UserError("the chat layout cannot be expressed as a template (a message's text is not "
                                "encoded on its own); the folder is written without a chat template")
            pieces.append(ids[pos:start])
            pos = start + len(content)
        return [*pieces, ids[pos:]]

    roles = ("system", "user", "assistant", "user")
    system_prefix, user, assistant, user_again, generation_prompt = probe(
        [{"role": r, "content": c} for r, c in zip(roles, CHAT_PROBE, strict=True)])
    user_first, generation_prompt_again = probe([{"role": "user", "content": CHAT_PROBE[1]}])
    if user != user_again or user != user_first or generation_prompt != generation_prompt_again:
        raise UserError("the chat layout's turn markers depend on the position; no template written")
    literal = {name: _ids_literal(tokenizer, ids) for name, ids in
               (("system", system_prefix), ("user", user), ("assistant", assistant), ("prompt", generation_prompt))}
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{ raise_exception('a system message is only allowed first') }}{%- endif -%}"
        f"{literal['system']}{{{{ message['content'] }}}}"
        f"{{%- elif message['role'] == 'user' -%}}{literal['user']}{{{{ message['content'] }}}}"
        f"{{%- else -%}}{literal['assistant']}{{{{ message['content'] }}}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
        f"{literal['prompt']}{{%- endif -%}}"
    )


def _ids_literal(tokenizer: Any, ids: list[int]) -> str:
    """A Jinja expression for the token strings that the tokenizer encodes back to exactly `ids` (turn
    markers are whole pieces)."""
    text = "".join(tokenizer.convert_ids_to_tokens(ids)) if ids else ""
    if utils.encode_text(tokenizer, text) != list(ids):
        raise UserError(f"turn-marker ids {ids} have no text that encodes back to them; no chat template written")
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # a Jinja string literal: no text is markup


def check_saved(folder: Path, torch_dtype: Any, device: Any, prompts: list[list[int]], reference: list[Any],
                dtype_name: str, tolerance: float | None) -> dict[str, float]:
    """Reload the saved folder and compare its logits with base+adapter's (the reference)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map={"": device})
    result = compare(reference, prompt_logits(reloaded, prompts))
    del reloaded
    release_memory()
    if tolerance is None:
        tolerance = DEFAULT_RTOL[dtype_name] * max(1.0, result["logit_scale"])
    return result | {"prompts": len(prompts), "tolerance": tolerance}


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


class _CheckFailed(Exception):
    """The merged model failed the logit check (exit status 1)."""


def _adapter_run_summary(adapter_dir: str) -> dict:
    """The training settings worth keeping with the merged model (from the checkpoint's run_config)."""
    path = Path(adapter_dir) / utils.RUN_CONFIG_NAME
    try:
        run = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    keys = ("train_mode", "lora_dim", "lora_alpha", "lora_target_modules", "resized_embeddings", "total_steps",
            "precision", "train_path")
    return {k: run[k] for k in keys if k in run}


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
