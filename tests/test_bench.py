"""bench/run.py: its training commands are train.sh's (plus only the declared bench flags), train.py's
--profile leaves training unchanged, a smoke test of `--quick` (every section runs and every row has
a figure; no timing assertions), and the bookkeeping that turns profile.json into figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run  # the repo root is on sys.path (pyproject: pythonpath = ["."])
from bench.synth import synth_train_records, write_jsonl
from tools.harness import child_env, free_port
from tools.recipe import train_command

REPO = Path(__file__).resolve().parent.parent


def without(cmd: list[str], flags: dict[str, str | bool]) -> list[str]:
    """`cmd` less every flag of `flags` (and the value after each valued one)."""
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] in flags:
            i += 1 if isinstance(flags[cmd[i]], bool) else 2
        else:
            out.append(cmd[i])
            i += 1
    return out


@pytest.mark.parametrize("variant", list(bench_run.VARIANTS))
@pytest.mark.parametrize("recipe", ["tiny", "real"])
def test_train_command_is_train_sh_print_plus_bench_flags(tmp_path: Path, recipe: str, variant: str) -> None:
    model = tmp_path / "model"
    if recipe == "real":  # train.sh takes a folder with a config.json for real weights
        model.mkdir()
        (model / "config.json").write_text("{}")
    s = bench_run.Settings(model=str(model), train_path=str(tmp_path / "train.json"), recipe=recipe, work=tmp_path,
                           steps=4, warmup=1, variants=(variant,))
    env = {**bench_run.recipe_env(s, variant), "MASTER_PORT": "12345"}
    printed = train_command(env)
    flags = bench_run.bench_flags(tmp_path / "out", 5)
    for launcher in ("deepspeed", "python"):
        cmd = bench_run.train_py_command(env, tmp_path / "out", 5, launcher)
        if launcher == "deepspeed":
            assert Path(cmd[0]).name == "deepspeed"  # train.sh's launcher, with its arguments
            assert without(cmd[1:], flags) == without(printed[1:], flags)
        else:
            assert cmd[0] == sys.executable and without(cmd[1:], flags) == without(printed[printed.index("train.py"):],
                                                                                   flags)
        for flag, value in flags.items():
            if isinstance(value, bool):
                assert (flag in cmd) is value, flag
            else:
                assert cmd[cmd.index(flag) + 1] == value and cmd.count(flag) == 1, flag
    args = printed[printed.index("train.py") + 1:]
    assert bench_run.arg_value(args, "--model_name_or_path") == str(model)
    assert bench_run.arg_value(args, "--modules_to_save") == (
        "embed_tokens,lm_head" if recipe == "tiny" and variant != "lora-only" else "")
    assert bench_run.arg_value(args, "--train_mode") == {"lora": "lora", "full": "full"}.get(variant, "qlora")


def test_profile_leaves_training_unchanged(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.json", synth_train_records(24, seed=0, scale=0.2))
    base = [sys.executable, "train.py", "--model_name_or_path", str(tiny_model_dir), "--train_path", str(data),
            "--test_path", "", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--max_steps", "2", "--is_skip", "--lora_dropout", "0.1"]
    histories = []
    for name, extra in (("plain", []), ("profiled", ["--profile"])):
        out = tmp_path / name
        proc = subprocess.run([*base, "--output_dir", str(out), *extra], cwd=REPO, env=child_env(free_port()),
                              capture_output=True, text=True, check=False, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        histories.append(json.loads(next(out.glob("epoch-*/trainer_state.json")).read_text())["history"])
    assert histories[0] == histories[1]  # the same losses, bit for bit
    assert not (tmp_path / "plain" / "profile.json").exists()
    profile = json.loads((tmp_path / "profiled" / "profile.json").read_text())
    assert profile["phases"] == list(bench_run.PHASES) and profile["world_size"] == 1
    assert [st["step"] for st in profile["steps"]] == [1, 2]
    for st in profile["steps"]:
        assert st["seconds"] == pytest.approx(sum(st[ph] for ph in bench_run.PHASES))
        assert 0 < st["tokens"] <= st["positions"]


def test_quick_run_writes_every_section(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--threads", "1", "--model",
           str(tiny_model_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert "FAILED" not in report
    for needle in ("## Results", "| train | recipe: non-padding tokens/s, train.py vs HF Trainer, random batches",
                   "train_sampling_strategy=group_by_length", "attn_implementation=eager",
                   "(best-configured peer)", "TRL SFTTrainer",
                   "| train | padding share of a whole epoch", "| train | dense matmul peak of this CPU",
                   "| train | train.py model-FLOP utilisation",
                   "| memory | resident weights, decoder linear layers only", "| memory | peak RSS",
                   "| generation | decode tokens/s", "| generation | time to first streamed token",
                   "| generation | generation.generate_batch", "| data | data_helper.py", "| gpu |",
                   "where the time goes", "- command: `python bench/run.py --quick", "torch ",
                   "bash train.sh --print", "train.py command (qlora): `"):
        assert needle in report, needle
    table = report.split("## Results")[1].split("\n\n")[1].splitlines()[2:]
    assert table and all(row.split("|")[3].strip() for row in table), table  # every row has a figure
    assert "## Results" in proc.stdout  # the table is printed too


def test_measured_steps_and_summary() -> None:
    steps = [{"step": 1, "seconds": 0.2, "tokens": 10, "positions": 20, "data": 0.1, "forward": 0.05,
              "backward": 0.04, "optimizer": 0.01, "other": 0.0},
             {"step": 2, "seconds": 0.15, "tokens": 30, "positions": 40, "data": 0.01, "forward": 0.06,
              "backward": 0.05, "optimizer": 0.02, "other": 0.01},
             {"step": 3, "seconds": 0.2, "tokens": 60, "positions": 60, "data": 0.02, "forward": 0.08,
              "backward": 0.07, "optimizer": 0.02, "other": 0.01}]
    summary = bench_run.summary(steps, warmup=1)
    assert summary["n"] == 2 and summary["tok_s"] == pytest.approx(90 / 0.35)
    assert summary["pad"] == pytest.approx(1 - 90 / 100)
    assert summary["forward"] == pytest.approx(0.07) and summary["other"] == pytest.approx(0.01)
    with pytest.raises(RuntimeError, match="no training step recorded after"):
        bench_run.summary(steps, warmup=3)


def test_with_flags_replaces_appends_and_removes() -> None:
    args = ["--a", "1", "--plot_to_images", "--b", "x"]
    assert bench_run.with_flags(args, {"--a": "2", "--c": "", "--plot_to_images": False, "--profile": True}) == [
        "--a", "2", "--b", "x", "--c", "", "--profile"]


def test_unknown_section_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--skip", "nope"])


def test_gpu_dry_run_prints_the_7b_plan(tmp_path: Path) -> None:
    """bench/gpu.py --dry_run builds the Baichuan2-7B shape on the meta device (no memory, no GPU) and prints
    the plan: shapes, the parameter count (7.506 B, as the published checkpoint) and a memory estimate."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry_run", "--json", str(out)], cwd=REPO,
                          env=child_env(None), capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text(encoding="utf-8"))
    assert round(plan["params"] / 1e9, 3) == 7.506 and "(7.506 B)" in proc.stdout
    shapes = {name: (shape, count) for name, shape, count in plan["shapes"]}
    assert shapes["model.layers.{i}.self_attn.W_pack.weight"] == ([3 * 4096, 4096], 32)
    assert shapes["lm_head.weight"] == ([125696, 4096], 1) and shapes["model.embed_tokens.weight"][0] == [125696, 4096]
    assert sum(s[0][0] * (s[0][1] if len(s[0]) > 1 else 1) * s[1] for s in shapes.values()) == plan["params"]
    # QLoRA of a 7.5 B model on one GPU: more than its 4-bit weights, far less than its bf16 weights (15 GB)
    assert 3.5 * 2**30 < plan["memory_total"] < 15e9
    assert "memory estimate" in proc.stdout and "GiB" in proc.stdout
    assert plan["tokens_per_step"] == 2 * 512 * 4  # the seed's recipe: batch 2 x 512, grad accum 4


def fake_steps(tok_s: float, n: int = 3) -> list[dict]:
    """`n` one-second steps at `tok_s` non-padding tokens/s, no padding."""
    return [{"step": i, "seconds": 1.0, "tokens": tok_s, "positions": tok_s, "data": 0.0, "forward": 0.5,
             "backward": 0.4, "optimizer": 0.1, "other": 0.0} for i in range(1, n + 1)]


def test_compare_peers_interleaves_the_repeats_and_compares_the_fastest(tmp_path: Path, monkeypatch) -> None:
    """With --train_repeats 2: ours, the peers, ours, the configured peers (the random-batch reference and a
    peer that does not run are not repeated); each side's fastest run makes the ratio, not its first, and
    the best-configured peer is the fastest of the configured ones."""
    s = bench_run.Settings(model="m", train_path="t", recipe="tiny", work=tmp_path, steps=2, warmup=1,
                           variants=("qlora",), train_repeats=2)
    bench = bench_run.Bench(s, skip=set())
    child = bench_run.Child("x", 0, 1.0, 1.0, 0, 0.0)
    order: list[str] = []
    speeds = {"ours": [100.0, 140.0], "trainer-random_qlora": [20.0], "trainer-grouped_qlora": [110.0, 90.0],
              "trainer-grouped-eager_qlora": [80.0, 120.0]}

    def train_py(variant: str, repeat: int = 0):
        order.append(f"ours{repeat + 1}")
        return {"steps": fake_steps(speeds["ours"][repeat]), "run_config": {}}, child, ["train.py"]

    def worker(task: str, *extra: str, variant: str = "qlora", name: str = ""):
        order.append(name)
        if task == "trl":
            return {"unsupported": "no NormHead"}, child
        key, _, repeat = name.partition("_qlora")
        tok_s = speeds[f"{key}_qlora"][int(repeat.lstrip("_") or 1) - 1]
        return {"steps": fake_steps(tok_s), "optimizer": "adamw", "precision": "fp32", "samples": 100,
                "samples_per_step": 2, "epoch_padding": {"ours": 0.1, "random_longest": 0.5}}, child

    monkeypatch.setattr(bench, "train_py", train_py)
    monkeypatch.setattr(bench, "worker", worker)
    bench.compare_peers("qlora")
    assert order == ["ours1", "trainer-random_qlora", "trainer-grouped_qlora", "trainer-grouped-eager_qlora",
                     "trl_qlora", "ours2", "trainer-grouped_qlora_2", "trainer-grouped-eager_qlora_2"]
    rows = {r.metric: r for r in bench.rows}
    best = next(r for m, r in rows.items() if "(best-configured peer)" in m)
    assert (best.value, best.reference, best.ratio) == ("140", "120", f"{140 / 120:.2f}x")  # the faster peer
    assert "attn_implementation=eager (best-configured peer)" in next(m for m in rows if "(best-configured" in m)
    spread = next(r for m, r in rows.items() if "of each run" in m)
    assert spread.value == "train.py 100 / 140" and "110 / 90" in spread.reference and "80 / 120" in spread.reference
    assert sum("does not run" in r.value for r in bench.rows) == 1
    assert bench.runs["qlora"][0]["steps"][0]["tokens"] == 140  # the other sections read the fastest run
