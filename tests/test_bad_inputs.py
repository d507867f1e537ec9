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
  ::test_busy_port_fails_before_loading, ::test_non_loopback_host_needs_a_key_or_insecure;
- web_demo.py's OpenAI-compatible API (bad HTTP requests: HTTP 400/404 with an OpenAI error object, the
  server keeps serving): the table `BAD_REQUESTS` in tests/test_api.py.
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
    MARKER_NAME,
    SCRIPT_PROFILES,
    broken_model,
    corrupt_model,
    data_helper_argv,
    ds_config_file,
    make_inputs,
    profiles_file,
    tiny_safetensors,
)
from tools.harness import REPO, child_env, dump_jsonl, free_port

ENV = {k: v for k, v in child_env(GRADIO_ANALYTICS_ENABLED="False").items() if k != "ROLEPLAY_API_KEY"}
GOOD_RECORD = {"instruction": "你是孙悟空。", "input": "你好", "output": "俺老孙来也"}
NOT_UTF8 = json.dumps(GOOD_RECORD, ensure_ascii=False).encode("gbk") + b"\n"
PROFILES_NOT_UTF8 = json.dumps(SCRIPT_PROFILES, ensure_ascii=False).encode("gbk")
MODEL_FILES = {"no_config": "config.json", "no_weights": "*.safetensors", "no_tokenizer": "tokenizer.model"}
MODEL_NEEDLES = {"no_config": "no config.json", "no_weights": "no model weights",
                 "no_tokenizer": "tokenizer does not load"}
# model folders that are present but damaged (tests.helpers.corrupt_model): the one error line names the file
CORRUPT_NEEDLES = {"truncated_weights": "model.safetensors: not a complete safetensors file",
                   "zero_weights": "model.safetensors: not a complete safetensors file",
                   "malformed_config": "model config is malformed JSON",
                   "unknown_model_type": "model_type 'evil_arch' is not an architecture"}
MODEL_NEEDLES_ALL = {**MODEL_NEEDLES, **CORRUPT_NEEDLES}
CUT_AFTER_COLON = '{"instruction": "你是孙悟空。", "input":'  # a JSON line cut short after a colon
GOOD_RECORD_LINE = json.dumps(GOOD_RECORD, ensure_ascii=False)


class Cell:
    """Inputs of one bad-input run: the argv after the script, the output path that must stay absent or
    untouched, a substring the one `error:` line must hold, whether that line must be all of stderr, and
    substrings it must not hold (a wrong blame)."""

    def __init__(self, argv: list, output: Path | None, needle: str, alone: bool = False,
                 not_in: tuple[str, ...] = ()) -> None:
        self.argv, self.output, self.needle, self.alone = [str(a) for a in argv], output, needle, alone
        self.not_in = not_in


def _model_case(model: Path, tmp: Path, case: str) -> Path:
    """The model folder of a model cell: missing files (MODEL_FILES) or damaged ones (CORRUPT_NEEDLES)."""
    if case in CORRUPT_NEEDLES:
        return corrupt_model(model, tmp / "model", case)
    return broken_model(model, tmp / "model", MODEL_FILES[case])


def _data_helper(tmp: Path, model: Path, case: str) -> Cell:
    paths = make_inputs(tmp, attributes=case in ("missing_profiles", "mistyped_data_dir"))
    bad = {"empty_profiles": b"", "profiles_wrong_type": b'["\xe5\xad\x99"]',
           "profiles_not_utf8": PROFILES_NOT_UTF8, "profile_value_wrong_type": b'{"a": 5}'}
    needles = {"empty_profiles": "malformed JSON", "profiles_wrong_type": "expected a non-empty JSON object",
               "profiles_not_utf8": "not UTF-8", "profile_value_wrong_type": "non-string description",
               "missing_data_dir": "no RoleBench files", "missing_profiles": "profiles file not found",
               "mistyped_data_dir": "no-such-dir: no RoleBench files (no such folder;",
               "output_dir_is_file": "out/train.json: cannot be written because", "over_long_record": "cap",
               "line_cut_after_colon": f":1: malformed JSON (Expecting value at column {len(CUT_AFTER_COLON) + 1})",
               "unterminated_string": "(Unterminated string starting at column 29)"}
    out = Path(paths["output_dir"])
    if case in ("missing_data_dir", "mistyped_data_dir"):  # mistyped: attributes on, the build would succeed
        paths["data_dir"] = tmp / "no-such-dir"
    elif case == "missing_profiles":
        paths["profiles"] = tmp / "nope.json"
    elif case == "output_dir_is_file":
        out.write_text("a file where the output folder should be\n", encoding="utf-8")
        dialogue = REPO / "data" / "dialogue_templates.json"  # the build runs to the end: its inputs by full path
        extra = ["--dialogue_templates", str(dialogue)] if dialogue.is_file() else []
        return Cell(data_helper_argv(paths, *extra), out, needles[case], alone=True)
    elif case in ("over_long_record", "line_cut_after_colon", "unterminated_string"):
        target = Path(paths["data_dir"]) / "rolebench-zh_general_train.jsonl"
        line = {"over_long_record": json.dumps({"role": "孙悟空", "question": "问" * 350_000, "generated": ["答"]},
                                               ensure_ascii=False),
                "line_cut_after_colon": CUT_AFTER_COLON.replace("instruction", "role_______"),
                "unterminated_string": '{"role": "孙悟空", "question": "问题'}[case]
        target.write_text(line + "\n", encoding="utf-8")
    else:
        profiles_file(paths["profiles"], bad[case])
    out.mkdir()
    (out / "train.json").write_text("old\n", encoding="utf-8")
    return Cell(data_helper_argv(paths), out, needles[case], alone=case == "missing_profiles",
                not_in=("at at column", ".tmp-"))


def _train(tmp: Path, model: Path, case: str) -> Cell:
    data = dump_jsonl(tmp / "train.json", [GOOD_RECORD, GOOD_RECORD])
    ds = ds_config_file(tmp, "ds.json", bf16__enabled=False)
    extra: list = []
    needle = {"malformed": "malformed JSON", "not_utf8": "not UTF-8", "wrong_type": "field 'input'",
              "too_long": "no usable samples", "ds_wrong_type": "must be a JSON object",
              "missing_model": "no-such-model", "empty_train": "has no records",
              "bad_ds_json": "bad.json:1: DeepSpeed config is malformed JSON",
              "ds_contradicts_flag": "gradient_accumulation_steps is 8", "cuda_without_cuda": "CUDA",
              "cut_after_colon": "", **MODEL_NEEDLES_ALL}[case]
    if case == "malformed":
        data.write_text('{"instruction": "x", \n', encoding="utf-8")
    elif case == "cut_after_colon":
        data.write_text(GOOD_RECORD_LINE + "\n" + CUT_AFTER_COLON + "\n", encoding="utf-8")
        needle = f"{data}:2: malformed JSON (Expecting value at column {len(CUT_AFTER_COLON) + 1})"
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
        model = _model_case(model, tmp, case)
    out = tmp / "out"
    return Cell(["--model_name_or_path", model, "--train_path", data, "--test_path", "", "--output_dir", out,
                 "--ds_file", ds, "--max_steps", "1", *COMMON, *extra], out, needle)


def _merge(tmp: Path, model: Path, case: str) -> Cell:
    base = model
    if case.startswith("base_"):
        base = _model_case(model, tmp, case.removeprefix("base_"))
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}), encoding="utf-8")
    tiny_safetensors(ckpt / "adapter_model.safetensors")  # whole, never loaded: every case fails earlier
    needle = {"empty_adapter_config": "malformed JSON", "adapter_config_not_utf8": "not UTF-8",
              "adapter_config_wrong_type": "must be a JSON object", "no_adapter_weights": "adapter weights",
              "truncated_adapter": "adapter_model.safetensors: not a complete safetensors file",
              "malformed_adapter_config": "adapter_config.json:1: adapter config is malformed JSON",
              "missing_model_dir": "--model_dir", "output_parent_is_file": "is a file, not a folder",
              **{f"base_{k}": v for k, v in MODEL_NEEDLES_ALL.items()}}[case]
    not_in: tuple[str, ...] = ("does not fit", "--model_path") if case in ("malformed_adapter_config",
                                                                           "missing_model_dir") else ()
    out = tmp / "merged"
    if case == "empty_adapter_config":
        (ckpt / "adapter_config.json").write_text("", encoding="utf-8")
    elif case == "adapter_config_not_utf8":
        (ckpt / "adapter_config.json").write_bytes('{"base_model_name_or_path": "模型"}'.encode("gbk"))
    elif case == "adapter_config_wrong_type":
        (ckpt / "adapter_config.json").write_text("[1]", encoding="utf-8")
    elif case == "no_adapter_weights":
        (ckpt / "adapter_model.safetensors").unlink()
    elif case == "truncated_adapter":
        (ckpt / "adapter_model.safetensors").write_bytes((ckpt / "adapter_model.safetensors").read_bytes()[:40])
    elif case == "malformed_adapter_config":  # the base comes from run_config.json, so only peft would read it
        (ckpt / "run_config.json").write_text(json.dumps({"base_model": str(base)}), encoding="utf-8")
        (ckpt / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ', encoding="utf-8")
    elif case == "missing_model_dir":
        ckpt = tmp / "no-such-ckpt"
    elif case == "output_parent_is_file":
        (tmp / "afile").write_text("x", encoding="utf-8")
        out = tmp / "afile" / "merged"
    return Cell(["--model_dir", ckpt, "--save_model_dir", out], out, needle, not_in=not_in)


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
              "no_output_path": "--test_path needs --output_path",
              "output_parent_is_file": f"{out}: cannot be written because {tmp / 'afile'} is a file",
              "output_is_dir": f"{tmp / 'taken'}: cannot be replaced", **MODEL_NEEDLES_ALL}[case]
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
    elif case == "output_parent_is_file":
        (tmp / "afile").write_text("x", encoding="utf-8")
        argv[-1] = out = tmp / "afile" / "pred.jsonl"
        needle = f"{out}: cannot be written because {tmp / 'afile'} is a file"
    elif case == "output_is_dir":  # a folder in the way: the error names it, not the temporary file
        argv[-1] = out = tmp / "taken"
        (out / "inner").mkdir(parents=True)
    else:
        argv[1] = _model_case(model, tmp, case)
    return Cell(argv, out, needle, alone=case in PREDICT_BEFORE_LOADING, not_in=(".tmp-", "File exists"))


# web_demo.py flags refused before any model loads: the argv to add, and the needle of the one error line
WEB_DEMO_FLAGS = {
    "public_host_without_key": lambda: ["--host", "0.0.0.0"],
    "bad_adapter_spec": lambda: ["--adapter", "孙悟空"],
    "api_base_not_a_url": lambda: ["--api_base", "localhost:8000/v1"],
    "api_base_unreachable": lambda: ["--api_base", f"http://127.0.0.1:{free_port()}/v1"],
    "queue_size_negative": lambda: ["--queue_size", "-1"],
}
WEB_DEMO_FLAG_NEEDLES = {"public_host_without_key": "no API key is set", "bad_adapter_spec": "no '='",
                         "api_base_not_a_url": "give an http:// or https:// URL",
                         "api_base_unreachable": "cannot reach the server", "queue_size_negative": "--queue_size"}


def _web_demo(tmp: Path, model: Path, case: str) -> Cell:
    profiles = profiles_file(tmp / "p.json")
    needle = {"missing_profiles": "profiles file not found", "empty_profiles": "malformed JSON",
              "profiles_not_utf8": "not UTF-8", "profiles_wrong_type": "expected a non-empty JSON object",
              "profile_value_wrong_type": "non-string description", "input_cap_zero": "--max_input_chars",
              **WEB_DEMO_FLAG_NEEDLES, **MODEL_NEEDLES_ALL}[case]
    extra: list = []
    if case == "missing_profiles":
        profiles = tmp / "nope.json"
    elif case in ("empty_profiles", "profiles_not_utf8", "profiles_wrong_type", "profile_value_wrong_type"):
        profiles_file(profiles, {"empty_profiles": b"", "profiles_wrong_type": b'"text"',
                                 "profile_value_wrong_type": b'{"a": ["b"]}',
                                 "profiles_not_utf8": PROFILES_NOT_UTF8}[case])
    elif case == "input_cap_zero":
        extra = ["--max_input_chars", "0"]
    elif case in WEB_DEMO_FLAGS:
        extra = WEB_DEMO_FLAGS[case]()
    else:
        model = _model_case(model, tmp, case)
    return Cell(["--model_path", model, "--desc_path", profiles, "--device", "cpu", "--port", free_port(), *extra],
                None, needle)


def _build_default(tmp: Path, model: Path, case: str) -> Cell:
    out = tmp / "tiny"
    if case == "missing_base_data":
        return Cell(["--out", out, "--base_dir", tmp / "no-base"], out, "no-base/general_corpus.jsonl: missing")
    (tmp / "afile").write_text("x", encoding="utf-8")  # out_parent_is_file
    out = tmp / "afile" / "tiny"
    data = REPO / "data"
    return Cell(["--out", out, "--base_dir", data / "base", "--templates", data / "attribute_templates.json",
                 "--epochs", "1", "--merges", "50"], out, f"{out}: cannot be written because")


BUILDERS: dict[str, Callable[[Path, Path, str], Cell]] = {
    "data_helper.py": _data_helper, "train.py": _train, "merge_params.py": _merge, "predict.py": _predict,
    "web_demo.py": _web_demo, "tools/build_default.py": _build_default,
}
CORRUPT = tuple(CORRUPT_NEEDLES)
MATRIX = [
    ("data_helper.py", c) for c in ("empty_profiles", "profiles_wrong_type", "profiles_not_utf8",
                                    "profile_value_wrong_type", "missing_data_dir", "missing_profiles",
                                    "mistyped_data_dir", "output_dir_is_file", "over_long_record",
                                    "line_cut_after_colon", "unterminated_string")
] + [
    ("train.py", c) for c in ("malformed", "not_utf8", "wrong_type", "too_long", "no_config", "no_weights",
                              "no_tokenizer", "ds_wrong_type", "missing_model", "empty_train", "bad_ds_json",
                              "ds_contradicts_flag", "cuda_without_cuda", "cut_after_colon", *CORRUPT)
] + [
    ("merge_params.py", c) for c in ("empty_adapter_config", "adapter_config_not_utf8", "adapter_config_wrong_type",
                                     "no_adapter_weights", "base_no_config", "base_no_weights", "base_no_tokenizer",
                                     "truncated_adapter", "malformed_adapter_config", "missing_model_dir",
                                     "output_parent_is_file", *(f"base_{c}" for c in CORRUPT))
] + [
    ("predict.py", c) for c in ("empty_test", "wrong_type", "empty_profiles", "profiles_not_utf8",
                                "profiles_wrong_type", "no_config", "no_weights", "no_tokenizer", "missing_baseline",
                                "baseline_wrong_type", *sorted(PREDICT_BEFORE_LOADING), *CORRUPT,
                                "output_parent_is_file", "output_is_dir")
] + [
    ("web_demo.py", c) for c in ("missing_profiles", "empty_profiles", "profiles_not_utf8", "profiles_wrong_type",
                                 "profile_value_wrong_type", "input_cap_zero", "no_config", "no_weights",
                                 "no_tokenizer", *CORRUPT, *WEB_DEMO_FLAGS)
] + [
    ("tools/build_default.py", c) for c in ("missing_base_data", "out_parent_is_file")
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
    assert not [s for s in cell.not_in if s in errors[0]], errors[0]
    if cell.alone:
        assert proc.stderr == errors[0] + "\n" and errors[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert _snapshot(cell.output) == before, f"{cell.output} was written"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    assert not leftovers, leftovers
    assert not list(tmp_path.rglob(MARKER_NAME)), "an auto_map module was imported"
