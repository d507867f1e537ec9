"""End to end: the README's main job (`bash train.sh`) on a shortened embedded default.

train.sh builds the tiny base (fewer epochs here), trains it with QLoRA under the deepspeed
launcher with the recipe's own tiny settings, merges the newest checkpoint and scores the untuned
base and the merged model. The test checks that fine-tuning clearly raises the fact accuracy on
held-out, dev and novel phrasings over the base. A second test runs the real-weights branch
(`MODEL=<folder> bash train.sh`, the 7B recipe unchanged) on tiny Baichuan2 and Qwen2 folders.
Everything goes to a temp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helper import TEST_TEMPLATE_SETS
from tools.harness import dump_jsonl, free_port

REPO = Path(__file__).resolve().parent.parent
MIN_GAIN = 0.30  # absolute fact-accuracy gain the fine-tuned model must show over the base


def build_data(tmp_path: Path) -> Path:
    """data_helper.py's train.json and test.json from the shipped data, in tmp_path/data."""
    data = tmp_path / "data"
    build = subprocess.run([sys.executable, "data_helper.py", "--output_dir", str(data)], cwd=REPO,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    return data


def attribute_slice(test_path: Path, out: Path, per_set: int) -> int:
    """`per_set` attribute records of each test phrasing set, spread over every character."""
    records = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    chosen = []
    for template_set in TEST_TEMPLATE_SETS:
        pool = [r for r in records if r.get("source") == "attribute" and r["template_set"] == template_set]
        chosen += pool[:: max(1, len(pool) // per_set)][:per_set]
    dump_jsonl(out, chosen)
    return len(chosen)


def fact_accuracy(metrics_path: Path) -> float:
    return json.loads(metrics_path.read_text(encoding="utf-8"))["attribute_accuracy"]["overall"]["accuracy"]


def test_train_sh_chain_teaches_facts(tmp_path: Path) -> None:
    data, run_dir = build_data(tmp_path), tmp_path / "run"
    test_slice = tmp_path / "attr_test.json"
    n = attribute_slice(data / "test.json", test_slice, per_set=30)
    env = dict(os.environ, MODEL=str(tmp_path / "no-real-weights"), TINY_MODEL=str(tmp_path / "base"),
               BUILD_ARGS="--epochs 2", OUTPUT_DIR=str(run_dir), TRAIN_PATH=str(data / "train.json"),
               TEST_PATH=str(test_slice), EPOCHS="2", PLOT_TO_IMAGES="0", MASTER_PORT=str(free_port()),
               PYTHONUNBUFFERED="1")
    proc = subprocess.run(["bash", "train.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    assert proc.returncode == 0, f"train.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "not found" in proc.stdout and "embedded tiny default" in proc.stdout
    assert (run_dir / "merged" / "config.json").is_file()
    assert "python web_demo.py --model_path" in proc.stdout
    base_acc = fact_accuracy(run_dir / "preds_base.metrics.json")
    tuned_acc = fact_accuracy(run_dir / "preds_finetuned.metrics.json")
    print(f"fact accuracy on {n} test phrasings: base {base_acc:.2%} -> fine-tuned {tuned_acc:.2%}")
    assert tuned_acc >= base_acc + MIN_GAIN, (base_acc, tuned_acc)


def small_data(tmp_path: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """The shipped data, cut to `n_train` training and `n_test` attribute test records."""
    data = build_data(tmp_path)
    train_lines = (data / "train.json").read_text(encoding="utf-8").splitlines()[:n_train]
    (data / "train_small.json").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    attribute_slice(data / "test.json", data / "test_small.json", per_set=n_test // len(TEST_TEMPLATE_SETS))
    return data / "train_small.json", data / "test_small.json"


@pytest.mark.parametrize("arch", ["baichuan", "qwen2"])
def test_train_sh_runs_the_real_recipe_on_a_real_model_folder(tmp_path: Path, tiny_model_dir: Path, arch: str) -> None:
    """`MODEL=<a model folder> bash train.sh` takes the real-weights branch: the recipe at the top of
    train.sh (batch 2 × accumulation 4, lr 1e-4, gradient checkpointing, QLoRA) runs unchanged
    through train → merge → eval. A tiny random model in the real folder layout stands in for
    Baichuan2-7B-Chat / a Qwen2-architecture model (no weights can be downloaded here)."""
    from tools.tiny_models import make_tiny_qwen2

    model = tiny_model_dir if arch == "baichuan" else make_tiny_qwen2(tmp_path / "qwen2")
    train_path, test_path = small_data(tmp_path, n_train=16, n_test=6)
    run_dir = tmp_path / "run"
    env = dict(os.environ, MODEL=str(model), OUTPUT_DIR=str(run_dir), TRAIN_PATH=str(train_path),
               TEST_PATH=str(test_path), PLOT_TO_IMAGES="0", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    proc = subprocess.run(["bash", "train.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, f"train.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "embedded tiny default" not in proc.stdout
    [ckpt] = sorted(run_dir.glob("epoch-*-step-*"))
    config = json.loads((ckpt / "run_config.json").read_text(encoding="utf-8"))
    recipe = {"train_mode": "qlora", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
              "learning_rate": 1e-4, "weight_decay": 0.1, "num_train_epochs": 1, "gradient_checkpointing": True,
              "lora_dim": 16, "lora_alpha": 64, "lora_dropout": 0.1}
    assert {k: config[k] for k in recipe} == recipe
    assert config["lora_dropout_kernel"] == "gap"  # a CPU run draws LoRA dropout through roleplay/dropout.py
    assert config["total_steps"] == 2  # 16 records / (2 × 4)
    assert (run_dir / "merged" / "config.json").is_file()
    for which in ("base", "finetuned"):
        metrics = json.loads((run_dir / f"preds_{which}.metrics.json").read_text(encoding="utf-8"))
        assert metrics["attribute_accuracy"]["overall"]["n"] == 6
