"""Per-role adapters on one base: mixed batches (PEFT's per-row `adapter_names`, roleplay.adapters.
generate_mixed) against separate per-role batches (one adapter active per batch, generate_grouped), and
the memory of one base + N adapters against N merged models.

Workload: --roles roles x --prompts_per_role prompts, greedy, every reply exactly --new_tokens tokens
(min = max new tokens, so both ways generate the same tokens), batches of --batch_size rows. Mixed:
the prompts interleaved by role, each batch holds several roles. Separate: each role's prompts in their
own batches. Both must give the same replies (checked). Reported: generated tokens/s of each (best of
--repeats), and the weights (tensor bytes) and resident-set growth of loading one base + N adapters
and N copies of the base (what N merged models take: merging does not change the shapes), each
measured in a fresh child process.

The adapters are random LoRA adapters of the recipe's shape (r=16, alpha 64, every linear layer but the
head; `--modules_to_save embed_tokens,lm_head` adds the tiny recipe's fully trained embeddings and
head), on a random base of the embedded default's shape unless --model names a model folder.

Examples:
    python bench/adapters.py                                   # 4 roles x 8 prompts, batch 8, 32 new tokens
    python bench/adapters.py --roles 2 --modules_to_save embed_tokens,lm_head
    python bench/adapters.py --model Baichuan2-7B-Chat --device cuda --roles 8 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.harness import child_env  # noqa: E402  (after the path setup: runnable as `python bench/adapters.py`)

QUESTIONS = ["你好，请问你是谁？", "今天天气很好，我们一起去花果山吧！", "你喜欢吃什么？", "刻晴会用什么元素？",
             "给我讲讲你的故事。", "你最好的朋友是谁？", "Hello world! 1 + 2 = 3", "你的说话风格是怎样的？"]
DEFAULT_SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model folder (default: a random base of the embedded "
                                                 "default's shape, built in a temporary folder)")
    p.add_argument("--roles", type=int, default=4, help="adapters (one per role)")
    p.add_argument("--prompts_per_role", type=int, default=8, help="prompts per role")
    p.add_argument("--batch_size", type=int, default=8, help="rows per generate call")
    p.add_argument("--new_tokens", type=int, default=32, help="tokens generated per reply (exactly)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the random adapters")
    p.add_argument("--modules_to_save", default="",
                   help="modules the adapters train in full, e.g. embed_tokens,lm_head")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each way (best counts)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: a memory measurement
    p.add_argument("--child_specs", default="{}", help=argparse.SUPPRESS)  # internal: its adapters (JSON)
    args = p.parse_args(argv)
    for name in ("roles", "prompts_per_role", "batch_size", "new_tokens", "lora_r", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs: a base and random adapters
# ---------------------------------------------------------------------------------------------
def make_base(folder: Path) -> Path:
    from tools.tiny_models import make_tiny_model

    return make_tiny_model(folder, **DEFAULT_SHAPE)


def make_adapters(base: str, root: Path, n: int, r: int, modules_to_save: str) -> dict[str, str]:
    """`n` random LoRA adapters of `base` ({role: folder}), B matrices non-zero so each one matters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import baichuan  # noqa: F401  (registers the Baichuan classes)
    from roleplay import loading

    folders = {}
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        to_save = [m for m in modules_to_save.split(",") if m] or None
        config = LoraConfig(r=r, lora_alpha=4 * r, target_modules=loading.find_all_linear_names(model),
                            modules_to_save=to_save, task_type="CAUSAL_LM")
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
                elif "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        folder = root / f"role{i}"
        peft_model.save_pretrained(folder)
        folders[f"role{i}"] = str(folder)
    return folders


# ---------------------------------------------------------------------------------------------
# Speed: mixed vs separate batches
# ---------------------------------------------------------------------------------------------
def workload(names: dict[str, str], per_role: int) -> list[tuple[str, list[dict[str, str]]]]:
    """(adapter, messages) rows, interleaved by role: role0 q0, role1 q0, ..., role0 q1, ..."""
    rows = []
    for q in range(per_role):
        for role, name in names.items():
            question = QUESTIONS[q % len(QUESTIONS)]
            rows.append((name, [{"role": "system", "content": f"你是{role}。"}, {"role": "user", "content": question}]))
    return rows


def run_mixed(model: Any, tok: Any, rows: list, config: Any, batch_size: int, stats: dict) -> list[str]:
    from roleplay import adapters

    out = []
    for start in range(0, len(rows), batch_size):
        out += adapters.generate_mixed(model, tok, rows[start:start + batch_size], config, stats=stats)
    return out


def run_separate(model: Any, tok: Any, rows: list, config: Any, batch_size: int, stats: dict) -> list[str]:
    from roleplay import adapters

    return adapters.generate_grouped(model, tok, rows, config, batch_size=batch_size, stats=stats)


def measure_speed(args: argparse.Namespace, base: str, specs: dict[str, str]) -> dict[str, Any]:
    import torch

    from roleplay import adapters, generation

    torch.set_num_threads(args.threads)
    model, tok, names, _ = adapters.load_base_with_adapters(base, specs, device=args.device)
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=args.new_tokens,
                                              min_new_tokens=args.new_tokens)
    rows = workload(names, args.prompts_per_role)
    result: dict[str, Any] = {"mixed_batch_supported": adapters.mixed_batch_supported(model)}
    replies = {}
    run_mixed(model, tok, rows[:args.batch_size], config, args.batch_size, {})  # warm-up
    for way, fn in (("mixed", run_mixed), ("separate", run_separate)):
        best = None
        for _ in range(args.repeats):
            stats: dict[str, Any] = {}
            t0 = time.perf_counter()
            replies[way] = fn(model, tok, rows, config, args.batch_size, stats)
            seconds = time.perf_counter() - t0
            rate = stats["generated_tokens"] / seconds
            best = rate if best is None else max(best, rate)
        result[f"{way}_tokens_per_s"] = best
        result[f"{way}_generated_tokens"] = stats["generated_tokens"]
    result["same_replies"] = replies["mixed"] == replies["separate"]
    result["rows"] = len(rows)
    return result


# ---------------------------------------------------------------------------------------------
# Memory: one base + N adapters vs N merged models (each in a fresh process)
# ---------------------------------------------------------------------------------------------
def tensor_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer (shared tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def current_rss() -> int:
    """This process's resident set size now, in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_memory(kind: str, base: str, specs: dict[str, str], device: str) -> dict[str, Any]:
    """In this (child) process: load what `kind` names; report its tensor bytes and how much the
    resident set grew by loading it (the libraries imported first; their lazy parts load with the first
    model in both kinds alike)."""
    import gc

    import peft  # noqa: F401  (imported before the baseline: only the models should count)
    import torch
    from transformers import AutoModelForCausalLM  # noqa: F401

    import baichuan  # noqa: F401
    from roleplay import adapters, loading

    torch.set_num_threads(1)
    gc.collect()
    rss0 = current_rss()
    if kind == "adapters":
        model, _, _, _ = adapters.load_base_with_adapters(base, specs, device=device)
        weights = tensor_bytes(model)
    else:  # N merged models: N full copies of the base's weights
        models = [loading.load_model_for_inference(base, device=device)[0] for _ in specs]
        weights = sum(tensor_bytes(m) for m in models)
    gc.collect()
    return {"weights_bytes": weights, "rss_growth_bytes": current_rss() - rss0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def baichuan_7b_counts(r: int) -> dict[str, int]:
    """Parameters of a Baichuan2-7B base and of one LoRA adapter of the recipe's shape on it, counted on
    the meta device (no weights are allocated)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from baichuan import BaichuanConfig, BaichuanForCausalLM
    from roleplay import loading

    with torch.device("meta"):
        model = BaichuanForCausalLM(BaichuanConfig())
    base = sum(p.numel() for p in model.parameters())
    targets = loading.find_all_linear_names(model)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=4 * r, target_modules=targets))
    adapter = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    return {"base_params": base, "adapter_params": adapter}


def measure_memory(args: argparse.Namespace, base: str, specs: dict[str, str]) -> dict[str, Any]:
    out = {}
    for kind in ("adapters", "merged"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", base,
               "--device", args.device, "--child_specs", json.dumps(specs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=900, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-3000:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["baichuan_7b"] = baichuan_7b_counts(args.lora_r)
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(args: argparse.Namespace, base: str, speed: dict, memory: dict) -> str:
    a, m = memory["adapters"], memory["merged"]
    n = args.roles
    lines = [
        f"base: {base}; {n} adapters (r={args.lora_r}, modules_to_save={args.modules_to_save or 'none'}); "
        f"{speed['rows']} prompts, batch {args.batch_size}, {args.new_tokens} new tokens each, device {args.device}, "
        f"{args.threads} torch thread(s)",
        f"mixed batches (adapter_names): {speed['mixed_tokens_per_s']:.1f} tokens/s"
        + ("" if speed["mixed_batch_supported"] else "  (PEFT cannot mix these adapters: ran grouped)"),
        f"separate per-role batches:     {speed['separate_tokens_per_s']:.1f} tokens/s",
        f"ratio mixed / separate: {speed['mixed_tokens_per_s'] / speed['separate_tokens_per_s']:.2f}; "
        f"same replies: {speed['same_replies']}",
        f"weights: one base + {n} adapters {mib(a['weights_bytes'])}  vs  {n} merged models {mib(m['weights_bytes'])} "
        f"({a['weights_bytes'] / m['weights_bytes']:.1%})",
        f"resident set growth by loading them: one base + {n} adapters {mib(a['rss_growth_bytes'])}  vs  {n} merged "
        f"models {mib(m['rss_growth_bytes'])} (process peak RSS, libraries included: {mib(a['peak_rss_bytes'])} / "
        f"{mib(m['peak_rss_bytes'])})",
    ]
    c = memory.get("baichuan_7b")
    if c:
        base_b, adapter_b = 2 * c["base_params"], 2 * c["adapter_params"]  # bf16
        lines.append(f"Baichuan2-7B shape (parameters counted on the meta device, bf16): base "
                     f"{base_b / 2**30:.2f} GiB, one r={args.lora_r} adapter {mib(adapter_b)}; one base + {n} adapters "
                     f"{(base_b + n * adapter_b) / 2**30:.2f} GiB vs {n} merged models {n * base_b / 2**30:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_memory(args.child, args.model, json.loads(args.child_specs), args.device)))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        base = args.model or str(make_base(Path(tmp) / "base"))
        specs = make_adapters(base, Path(tmp), args.roles, args.lora_r, args.modules_to_save)
        speed = measure_speed(args, base, specs)
        memory = measure_memory(args, base, specs)
        text = report(args, base if args.model else "random base of the embedded default's shape", speed, memory)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": speed, "memory": memory, "args": vars(args)}, indent=2),
                                   encoding="utf-8")
    return 0 if speed["same_replies"] else 1


if __name__ == "__main__":
    sys.exit(main())
