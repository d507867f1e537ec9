"""End to end: the README's main job (`bash train.sh`) on a shortened embedded default.

train.sh builds the tiny base (fewer epochs here), trains it with QLoRA under the deepspeed
launcher with the recipe's own tiny settings, merges the newest checkpoint and scores the untuned
base and the merged model. The test checks that fine-tuning clearly raises the fact accuracy on
held-out, dev and novel phrasings over the base. Everything goes to a temp folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from data_helper import TEST_TEMPLATE_SETS

REPO = Path(__file__).resolve().parent.parent
MIN_GAIN = 0.30  # absolute fact-accuracy gain the fine-tuned model must show over the base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attribute_slice(test_path: Path, out: Path, per_set: int) -> int:
    """`per_set` attribute records of each test phrasing set, spread over every character."""
    records = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    chosen = []
    for template_set in TEST_TEMPLATE_SETS:
        pool = [r for r in records if r.get("source") == "attribute" and r["template_set"] == template_set]
        chosen += pool[:: max(1, len(pool) // per_set)][:per_set]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return len(chosen)


def fact_accuracy(metrics_path: Path) -> float:
    return json.loads(metrics_path.read_text(encoding="utf-8"))["attribute_accuracy"]["overall"]["accuracy"]


def test_train_sh_chain_teaches_facts(tmp_path: Path) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    build = subprocess.run([sys.executable, "data_helper.py", "--output_dir", str(data)], cwd=REPO,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    test_slice = tmp_path / "attr_test.json"
    n = attribute_slice(data / "test.json", test_slice, per_set=30)
    env = dict(os.environ, MODEL=str(tmp_path / "no-real-weights"), TINY_MODEL=str(tmp_path / "base"),
               BUILD_ARGS="--epochs 4", OUTPUT_DIR=str(run_dir), TRAIN_PATH=str(data / "train.json"),
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
