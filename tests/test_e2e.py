"""End to end on a shortened embedded default: build the base → data_helper → train (QLoRA under
DeepSpeed ZeRO-2) → merge → batch predict, and check that fine-tuning clearly raises the fact
accuracy on held-out phrasings over the untuned base (the chain `bash train.sh` runs, made
smaller: fewer base epochs, one fine-tuning epoch, a slice of the test file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_GAIN = 0.30  # absolute fact-accuracy gain the fine-tuned model must show over the base


def run(args: list[str], cwd: Path, timeout: int = 900) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def attribute_slice(test_path: Path, out: Path, per_set: int) -> int:
    """The first `per_set` heldout and novel attribute records, spread over every character."""
    records = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    chosen = []
    for template_set in ("heldout", "novel"):
        pool = [r for r in records if r.get("source") == "attribute" and r["template_set"] == template_set]
        step = max(1, len(pool) // per_set)
        chosen += pool[::step][:per_set]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return len(chosen)


def fact_accuracy(metrics_path: Path) -> float:
    return json.loads(metrics_path.read_text(encoding="utf-8"))["attribute_accuracy"]["overall"]["accuracy"]


def test_chain_fine_tuning_teaches_facts(tmp_path: Path) -> None:
    base, data, run_dir = tmp_path / "base", tmp_path / "data", tmp_path / "run"
    run(["-m", "baichuan.build_default", "--out", str(base), "--epochs", "4"], REPO)
    run(["data_helper.py", "--output_dir", str(data)], REPO)
    run(["train.py", "--model_name_or_path", str(base), "--train_path", str(data / "train.json"), "--test_path", "",
         "--output_dir", str(run_dir), "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
         "--learning_rate", "2e-3", "--num_train_epochs", "2", "--warmup_ratio", "0.06", "--weight_decay", "0",
         "--lora_dropout", "0.05", "--max_len", "512", "--max_src_len", "256", "--is_skip"], REPO)
    ckpts = sorted(run_dir.glob("epoch-*-step-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    assert ckpts, "training wrote no checkpoint"
    merged = tmp_path / "merged"
    run(["merge_params.py", "--model_dir", str(ckpts[-1]), "--save_model_dir", str(merged)], REPO)
    test_slice = tmp_path / "attr_test.json"
    n = attribute_slice(data / "test.json", test_slice, per_set=40)
    for name, model in (("base", base), ("tuned", merged)):
        run(["predict.py", "--model_path", str(model), "--test_path", str(test_slice),
             "--output_path", str(tmp_path / f"{name}.jsonl"), "--batch_size", "16", "--max_new_tokens", "24"], REPO)
    base_acc = fact_accuracy(tmp_path / "base.metrics.json")
    tuned_acc = fact_accuracy(tmp_path / "tuned.metrics.json")
    print(f"fact accuracy on {n} held-out/novel phrasings: base {base_acc:.2%} -> fine-tuned {tuned_acc:.2%}")
    assert tuned_acc >= base_acc + MIN_GAIN, (base_acc, tuned_acc)
