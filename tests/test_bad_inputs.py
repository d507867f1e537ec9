"""Bad input to the pipeline scripts: one table of (script x bad input) cells, each run as a real
subprocess. Every cell must exit with status 2, print exactly one `error:` line naming the problem and
no traceback, and leave its output path absent (or, when it existed, byte-identical) with no temporary
file behind.

Bad input checked in-process, by calling a script's `main` or a function (so not repeated here):
- data_helper.py: tests/test_data_helper.py (bad record lines of every kind, missing/broken profiles,
  attribute tables and templates, test phrasings leaking into training, --max_replies, unknown roles);
- merge_params.py: tests/test_merge_predict.py::test_merge_clear_errors and
  ::test_merge_refuses_nonempty_output_without_overwrite;
- web_demo.py: tests/test_web_demo.py::test_missing_model_folder_is_one_line_exit_2, ::test_compare_needs_adapter,
  ::test_busy_port_fails_before_loading.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    COMMON,
    SCRIPT_PROFILES,
    broken_model,
    data_helper_argv,
    ds_config_file,
    make_inputs,
    profiles_file,
)
from tools.harness import REPO, child_env, dump_jsonl, free_port

ENV = child_env(GRADIO_ANALYTICS_ENABLED="False")
GOOD_RECORD = {"instruction": "你是孙悟空。", "input": "你好", "output": "俺老孙来也"}
NOT_UTF8 = json.dumps(GOOD_RECORD, ensure_ascii=False).encode("gbk") + b"\n"
PROFILES_NOT_UTF8 = json.dumps(SCRIPT_PROFILES, ensure_ascii=False).encode("gbk")
MODEL_FILES = {"no_config": "config.json", "no_weights": "*.safetensors", "no_tokenizer": "tokenizer.model"}
MODEL_NEEDLES = {"no_config": "no config.json", "no_weights": "no model weights",
                 "no_tokenizer": "tokenizer does not load"}


class Cell:
    """Inputs of one bad-input run: the argv after the script, the output path that must stay absent or
    untouched, a substring the one `error:` line must hold, and whether that line must be all of stderr."""

    def __init__(self, argv: list, output: Path | None, needle: str, alone: bool = False) -> None:
        self.argv, self.output, self.needle, self.alone = [str(a) for a in argv], output, needle, alone


def _data_helper(tmp: Path, model: Path, case: str) -> Cell:
    paths = make_inputs(tmp, attributes=case == "missing_profiles")
    bad = {"empty_profiles": b"", "profiles_wrong_type": b'["\xe5\xad\x99"]',
           "profiles_not_utf8": PROFILES_NOT_UTF8, "profile_value_wrong_type": b'{"a": 5}'}
    needles = {"empty_profiles": "malformed JSON", "profiles_wrong_type": "expected a non-empty JSON object",
               "profiles_not_utf8": "not UTF-8", "profile_value_wrong_type": "non-string description",
               "missing_data_dir": "no RoleBench files", "missing_profiles": "profiles file not found"}
    if case == "missing_data_dir":
        paths["data_dir"] = tmp / "no-such-dir"
    elif case == "missing_profiles":
        paths["profiles"] = tmp / "nope.json"
    else:
        profiles_file(paths["profiles"], bad[case])
    out = Path(paths["output_dir"])
    out.mkdir()
    (out / "train.json").write_text("old\n", encoding="utf-8")
    return Cell(data_helper_argv(paths), out, needles[case], alone=case == "missing_profiles")


def _train(tmp: Path, model: Path, case: str) -> Cell:
    data = dump_jsonl(tmp / "train.json", [GOOD_RECORD, GOOD_RECORD])
    ds = ds_config_file(tmp, "ds.json", bf16__enabled=False)
    extra: list = []
    needle = {"malformed": "malformed JSON", "not_utf8": "not UTF-8", "wrong_type": "field 'input'",
              "too_long": "no usable samples", "ds_wrong_type": "must be a JSON object",
              "missing_model": "no-such-model", "empty_train": "has no records",
              "bad_ds_json": "bad.json:1: DeepSpeed config is malformed JSON",
              "ds_contradicts_flag": "gradient_accumulation_steps is 8", "cuda_without_cuda": "CUDA",
              **MODEL_NEEDLES}[case]
    if case == "malformed":
        data.write_text('{"instruction": "x", \n', encoding="utf-8")
    elif case == "not_utf8":
        data.write_bytes(NOT_UTF8)
    elif case == "wrong_type":
        dump_jsonl(data, [{**GOOD_RECORD, "input": 5}])
    elif case == "too_long":
        dump_jsonl(data, [{**GOOD_RECORD, "output": "很长的回答" * 200}])
        extra = ["--is_skip"]
    elif case == "empty_train":
        data.write_text("\n\n", encoding="utf-8")
    elif case == "ds_wrong_type":
        ds.write_text("[]", encoding="utf-8")
    elif case == "bad_ds_json":
        ds = tmp / "bad.json"
        ds.write_text('{"bf16": {"enabled": true},', encoding="utf-8")
    elif case == "ds_contradicts_flag":
        ds = ds_config_file(tmp, "ds.json", gradient_accumulation_steps=8, bf16__enabled=False)
    elif case == "missing_model":
        model = tmp / "no-such-model"
    elif case == "cuda_without_cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible")
        extra = ["--device", "cuda"]
    else:
        model = broken_model(model, tmp / "model", MODEL_FILES[case])
    out = tmp / "out"
    return Cell(["--model_name_or_path", model, "--train_path", data, "--test_path", "", "--output_dir", out,
                 "--ds_file", ds, "--max_steps", "1", *COMMON, *extra], out, needle)


def _merge(tmp: Path, model: Path, case: str) -> Cell:
    base = model
    if case.startswith("base_"):
        base = broken_model(model, tmp / "base", MODEL_FILES[case.removeprefix("base_")])
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}), encoding="utf-8")
    (ckpt / "adapter_model.safetensors").write_bytes(b"\0" * 16)  # never read: every case fails earlier
    needle = {"empty_adapter_config": "malformed JSON", "adapter_config_not_utf8": "not UTF-8",
              "adapter_config_wrong_type": "must be a JSON object", "no_adapter_weights": "adapter weights",
              **{f"base_{k}": v for k, v in MODEL_NEEDLES.items()}}[case]
    if case == "empty_adapter_config":
        (ckpt / "adapter_config.json").write_text("", encoding="utf-8")
    elif case == "adapter_config_not_utf8":
        (ckpt / "adapter_config.json").write_bytes('{"base_model_name_or_path": "模型"}'.encode("gbk"))
    elif case == "adapter_config_wrong_type":
        (ckpt / "adapter_config.json").write_text("[1]", encoding="utf-8")
    elif case == "no_adapter_weights":
        (ckpt / "adapter_model.safetensors").unlink()
    out = tmp / "merged"
    return Cell(["--model_dir", ckpt, "--save_model_dir", out], out, needle)


# predict.py cells whose model folder does not exist: the input is refused before any model is loaded,
# and stderr is that one line
PREDICT_BEFORE_LOADING = {"missing_test", "test_not_utf8", "test_malformed", "test_no_input", "unknown_role",
                          "no_output_path"}


def _predict(tmp: Path, model: Path, case: str) -> Cell:
    test = dump_jsonl(tmp / "test.json", [GOOD_RECORD])
    out = tmp / "pred.jsonl"
    if case in PREDICT_BEFORE_LOADING:
        model = tmp / "no-model"
    argv: list = ["--model_path", model, "--test_path", test, "--output_path", out]
    needle = {"empty_test": "no test records", "wrong_type": f"{test}:1: field 'input'",
              "empty_profiles": "malformed JSON", "profiles_not_utf8": "not UTF-8",
              "profiles_wrong_type": "expected a non-empty JSON object",
              "missing_baseline": "--baseline_metrics file not found",
              "baseline_wrong_type": "--baseline_metrics file must be a JSON object",
              "missing_test": f"{test}: file not found", "test_not_utf8": f"{test}:1: not UTF-8",
              "test_malformed": f"{test}:2: malformed JSON", "test_no_input": f"{test}:1: field 'input'",
              "unknown_role": "unknown role '赵子龙'",
              "no_output_path": "--test_path needs --output_path", **MODEL_NEEDLES}[case]
    if case == "empty_test":
        test.write_text("", encoding="utf-8")
    elif case in ("missing_baseline", "baseline_wrong_type"):
        baseline = tmp / "base.metrics.json"
        if case == "baseline_wrong_type":
            baseline.write_text("[]", encoding="utf-8")
        argv += ["--baseline_metrics", baseline]
    elif case == "wrong_type":
        dump_jsonl(test, [{"instruction": "", "input": ["你好"]}])
    elif case in ("empty_profiles", "profiles_not_utf8", "profiles_wrong_type"):
        content = {"empty_profiles": b"", "profiles_not_utf8": PROFILES_NOT_UTF8, "profiles_wrong_type": b"[]"}[case]
        argv = ["--model_path", model, "--desc_path", profiles_file(tmp / "p.json", content), "--role", "孙悟空"]
    elif case == "missing_test":
        test.unlink()
    elif case == "test_not_utf8":
        test.write_bytes('{"instruction": "", "input": "你好"}\n'.encode("gbk"))
    elif case == "test_malformed":
        test.write_text('{"instruction": "", "input": "a"}\n{"instruction": \n', encoding="utf-8")
    elif case == "test_no_input":
        test.write_text('{"instruction": "", "output": "a"}\n', encoding="utf-8")
    elif case == "unknown_role":
        argv = ["--model_path", model, "--desc_path", profiles_file(tmp / "p.json"), "--role", "赵子龙"]
    elif case == "no_output_path":
        argv = ["--model_path", model, "--test_path", test]
    else:
        argv[1] = broken_model(model, tmp / "model", MODEL_FILES[case])
    return Cell(argv, out, needle, alone=case in PREDICT_BEFORE_LOADING)


def _web_demo(tmp: Path, model: Path, case: str) -> Cell:
    profiles = profiles_file(tmp / "p.json")
    needle = {"missing_profiles": "profiles file not found", "empty_profiles": "malformed JSON",
              "profiles_not_utf8": "not UTF-8", "profiles_wrong_type": "expected a non-empty JSON object",
              "profile_value_wrong_type": "non-string description", "input_cap_zero": "--max_input_chars",
              **MODEL_NEEDLES}[case]
    extra: list = []
    if case == "missing_profiles":
        profiles = tmp / "nope.json"
    elif case in ("empty_profiles", "profiles_not_utf8", "profiles_wrong_type", "profile_value_wrong_type"):
        profiles_file(profiles, {"empty_profiles": b"", "profiles_wrong_type": b'"text"',
                                 "profile_value_wrong_type": b'{"a": ["b"]}',
                                 "profiles_not_utf8": PROFILES_NOT_UTF8}[case])
    elif case == "input_cap_zero":
        extra = ["--max_input_chars", "0"]
    else:
        model = broken_model(model, tmp / "model", MODEL_FILES[case])
    return Cell(["--model_path", model, "--desc_path", profiles, "--device", "cpu", "--port", free_port(), *extra],
                None, needle)


BUILDERS: dict[str, Callable[[Path, Path, str], Cell]] = {
    "data_helper.py": _data_helper, "train.py": _train, "merge_params.py": _merge, "predict.py": _predict,
    "web_demo.py": _web_demo,
}
MATRIX = [
    ("data_helper.py", c) for c in ("empty_profiles", "profiles_wrong_type", "profiles_not_utf8",
                                    "profile_value_wrong_type", "missing_data_dir", "missing_profiles")
] + [
    ("train.py", c) for c in ("malformed", "not_utf8", "wrong_type", "too_long", "no_config", "no_weights",
                              "no_tokenizer", "ds_wrong_type", "missing_model", "empty_train", "bad_ds_json",
                              "ds_contradicts_flag", "cuda_without_cuda")
] + [
    ("merge_params.py", c) for c in ("empty_adapter_config", "adapter_config_not_utf8", "adapter_config_wrong_type",
                                     "no_adapter_weights", "base_no_config", "base_no_weights", "base_no_tokenizer")
] + [
    ("predict.py", c) for c in ("empty_test", "wrong_type", "empty_profiles", "profiles_not_utf8",
                                "profiles_wrong_type", "no_config", "no_weights", "no_tokenizer", "missing_baseline",
                                "baseline_wrong_type", *sorted(PREDICT_BEFORE_LOADING))
] + [
    ("web_demo.py", c) for c in ("missing_profiles", "empty_profiles", "profiles_not_utf8", "profiles_wrong_type",
                                 "profile_value_wrong_type", "input_cap_zero", "no_config", "no_weights",
                                 "no_tokenizer")
]


def _snapshot(path: Path | None) -> dict[str, bytes] | None:
    if path is None or not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in path.rglob("*")}


@pytest.mark.parametrize("script, case", MATRIX, ids=[f"{s}-{c}" for s, c in MATRIX])
def test_bad_input_exits_2_with_one_error_line(script: str, case: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Each (script x bad input) cell, as a real subprocess: exit status 2, exactly one `error:` line
    naming the problem, no traceback, and the output path absent (or, when it existed, byte-identical)."""
    cell = BUILDERS[script](tmp_path, Path(tiny_model_dir), case)
    before = _snapshot(cell.output)
    proc = subprocess.run([sys.executable, str(REPO / script), *cell.argv], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=240, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert len(errors) == 1, proc.stderr
    assert cell.needle in errors[0], errors[0]
    if cell.alone:
        assert proc.stderr == errors[0] + "\n" and errors[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert _snapshot(cell.output) == before, f"{cell.output} was written"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    assert not leftovers, leftovers
