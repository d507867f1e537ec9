"""Tests for data_helper.py: every input is a small fixture written to a tmp dir by the tests (the input
folder of tests/helpers.py, or the published-format files in tests/fixtures/).

Bad input is checked here in-process, through `data_helper.main`; the script run as a subprocess on bad
input is in the table of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import (
    GENERAL_TEST,
    GENERAL_TRAIN,
    ROLEBENCH_PROFILES,
    SINGLE_TURN,
    SPECIFIC_TEST,
    TABLE,
    TEMPLATES,
    data_helper_argv,
    make_inputs,
    make_rolebench,
    rolebench_path,
)
from tools.harness import dump_jsonl

# the scripts live in the repo root, not in a package: import them from there whatever the cwd
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
data_helper = importlib.import_module("data_helper")
attributes = importlib.import_module("roleplay.attributes")
utils = importlib.import_module("utils")
REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small files in the published formats, with their quirks


# ---------------------------------------------------------------------------------------------
# Fixture builders (the input folder itself: tests/helpers.py)
# ---------------------------------------------------------------------------------------------
def read_out(paths: dict, name: str) -> list[dict]:
    return [r for _, r in utils.read_jsonl(Path(paths["output_dir"]) / name)]


def run_ok(paths: dict, *extra: str) -> tuple[list[dict], list[dict]]:
    assert data_helper.main(data_helper_argv(paths, *extra)) == 0
    return read_out(paths, "train.json"), read_out(paths, "test.json")


# ---------------------------------------------------------------------------------------------
# RoleBench records
# ---------------------------------------------------------------------------------------------
def test_both_layouts_give_identical_files(tmp_path):
    outputs = []
    for layout in ("flat", "published"):
        paths = make_inputs(tmp_path / layout, layout)
        assert data_helper.main(data_helper_argv(paths)) == 0
        outputs.append([(paths["output_dir"] / n).read_bytes() for n in ("train.json", "test.json")])
    assert outputs[0] == outputs[1]


def test_data_dir_may_be_the_published_rolebench_zh_folder(tmp_path):
    paths = make_inputs(tmp_path, "published", attributes=False)
    train, _ = run_ok(paths)
    paths["data_dir"] = paths["data_dir"] / "rolebench-zh"
    paths["output_dir"] = tmp_path / "out2"
    assert run_ok(paths)[0] == train


def test_rolebench_record_fields_and_system_prompt(tmp_path):
    paths = make_inputs(tmp_path, attributes=False)
    train, test = run_ok(paths)
    for r in train + test:
        assert r["instruction"] == utils.build_system_prompt(r["role"], ROLEBENCH_PROFILES[r["role"]])
        assert r["source"] in ("rolebench_general", "rolebench_role_specific")
        assert r["input"] and r["output"]
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"test"}
    specific = [r for r in train if r["source"] == "rolebench_role_specific"]
    assert specific and all(r["type"] == "script_based" for r in specific)


def test_test_split_keeps_one_record_per_question_with_all_references(tmp_path):
    paths = make_inputs(tmp_path, attributes=False)
    _, test = run_ok(paths, "--max_replies", "1")
    li_bai = [r for r in test if r["role"] == "李白"]
    assert len(li_bai) == 1
    assert li_bai[0]["references"] == ["我去了商店，饮酒一杯。", "改好了"]
    assert li_bai[0]["output"] == "我去了商店，饮酒一杯。"
    assert len(test) == len(GENERAL_TEST) + len(SPECIFIC_TEST)


@pytest.mark.parametrize("max_replies, expected", [(1, 1), (2, 2), (5, 3)])
def test_max_replies_limits_train_references(tmp_path, max_replies, expected, capsys):
    paths = make_inputs(tmp_path, attributes=False)
    train, _ = run_ok(paths, "--max_replies", str(max_replies))
    moon = [r["output"] for r in train if r["role"] == "孙悟空" and r["input"] == "写一首关于月亮的诗。"]
    assert sorted(moon) == sorted(["月儿弯弯挂天边", "月亮", "第三个回答"][:expected])
    if max_replies == 1:
        assert "reference over --max_replies" in capsys.readouterr().out


def test_max_replies_must_be_positive(tmp_path, capsys):
    paths = make_inputs(tmp_path, attributes=False)
    assert data_helper.main(data_helper_argv(paths, "--max_replies", "0")) == 2
    assert "--max_replies" in capsys.readouterr().err


def test_duplicate_references_and_repeated_questions_are_merged(tmp_path, capsys):
    files = {("general", "train"): [
        {"role": "李白", "question": "问", "generated": ["答一", "答一", "  "]},
        {"role": "李白", "question": "问", "generated": ["答二", "答一"]},
    ]}
    paths = make_inputs(tmp_path, files=files, attributes=False)
    train, _ = run_ok(paths, "--max_replies", "5")
    assert sorted(r["output"] for r in train) == ["答一", "答二"]
    out = capsys.readouterr().out
    assert "2 duplicate reference" in out and "1 blank reference" in out


def test_role_filter(tmp_path):
    paths = make_inputs(tmp_path, attributes=False)
    train, test = run_ok(paths, "--roles", "李白, 皇帝")
    assert {r["role"] for r in train + test} == {"李白", "皇帝"}
    all_train, _ = run_ok({**paths, "output_dir": tmp_path / "all"})
    assert {r["role"] for r in all_train} == {"孙悟空", "李白", "皇帝"}


def test_roles_filter_applies_to_rolebench_only(tmp_path):
    paths = make_inputs(tmp_path)
    train, _ = run_ok(paths, "--roles", "李白")
    assert {r["role"] for r in train if r["source"] == "attribute"} == {"刻晴", "钟离", "派蒙"}
    assert {r["role"] for r in train if r["source"] != "attribute"} == {"李白"}


def test_requested_role_without_profile_is_an_error(tmp_path, capsys):
    paths = make_inputs(tmp_path, attributes=False)
    assert data_helper.main(data_helper_argv(paths, "--roles", "李白,猪八戒")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "猪八戒" in err and str(paths["profiles"]) in err
    assert not paths["output_dir"].exists()


@pytest.mark.parametrize("strip", [False, True])
def test_strip_address(tmp_path, strip):
    paths = make_inputs(tmp_path, attributes=False)
    train, test = run_ok(paths, *(["--strip_address"] if strip else []))
    specific = {r["input"] for r in train + test if r["source"] == "rolebench_role_specific"}
    general = {r["input"] for r in train + test if r["source"] == "rolebench_general"}
    if strip:
        assert specific == {"您今天批了多少奏折？", "你的金箍棒有多重？", "年羹尧该如何处置？"}
    else:
        assert specific == {"皇上，您今天批了多少奏折？", "大圣，你的金箍棒有多重？", "皇上，年羹尧该如何处置？"}
    assert "我去了商店，饮酒一杯。" not in general  # general questions are never stripped
    assert "编辑以下句子：我去了商店。" in general


def test_strip_address_drops_questions_left_empty(tmp_path, capsys):
    files = {("role_specific", "train"): [
        {"role": "皇帝", "question": "皇上，", "generated": ["嗯"]},
        {"role": "皇帝", "question": "无地址的问题", "generated": ["好"]},
    ]}
    paths = make_inputs(tmp_path, files=files, attributes=False)
    train, _ = run_ok(paths, "--strip_address")
    assert [r["input"] for r in train] == ["无地址的问题"]
    assert "1 question empty after --strip_address" in capsys.readouterr().out


def test_strip_address_function():
    assert data_helper.strip_address("皇上，您好，吃了吗") == "您好，吃了吗"
    assert data_helper.strip_address("没有称呼") == "没有称呼"


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------
def test_byte_identical_twice_and_seed_changes_order(tmp_path):
    paths = make_inputs(tmp_path)
    blobs = []
    for i, seed in enumerate(("42", "42", "7")):
        out = tmp_path / f"out{i}"
        assert data_helper.main(data_helper_argv({**paths, "output_dir": out}, "--seed", seed)) == 0
        blobs.append(((out / "train.json").read_bytes(), (out / "test.json").read_bytes()))
    assert blobs[0] == blobs[1]
    assert blobs[0][0] != blobs[2][0]
    inputs = [[json.loads(x)["input"] for x in b[0].split(b"\n") if x] for b in (blobs[0], blobs[2])]
    assert inputs[0] != inputs[1] and sorted(inputs[0]) == sorted(inputs[1])  # same questions, another order


# ---------------------------------------------------------------------------------------------
# Attributes
# ---------------------------------------------------------------------------------------------
def test_attribute_records_split_by_template_set(tmp_path):
    paths = make_inputs(tmp_path)
    train, test = run_ok(paths)
    attr_train = [r for r in train if r["source"] == "attribute"]
    attr_test = [r for r in test if r["source"] == "attribute"]
    assert {r["template_set"] for r in attr_train} == {"train"}
    assert {r["template_set"] for r in attr_test} == {"heldout", "novel"}
    # 2 characters x (2 + 3) train templates, 1 character (派蒙) x 2 for 性别 only
    assert len(attr_train) == 2 * 5 + 2
    assert len(attr_test) == 2 * 4 + 2
    train_inputs = {r["input"] for r in train}
    assert not any(r["input"] in train_inputs for r in attr_test)
    for r in attr_train + attr_test:
        assert r["instruction"] == ""
        assert r["role"] in r["input"] and r["fact"] in r["output"]
        assert r["fact"] == TABLE["characters"][r["role"]][r["attribute"]]


def test_attribute_characters_need_no_profile_and_rolebench_is_optional(tmp_path, capsys):
    paths = make_inputs(tmp_path, files={})
    paths["profiles"] = tmp_path / "does-not-exist.json"
    paths["data_dir"] = ""  # the explicit attribute-only build
    train, test = run_ok(paths)
    assert {r["source"] for r in train + test} == {"attribute"}
    assert "--data_dir '': no RoleBench data" in capsys.readouterr().out


def test_expand_attributes_public_api():
    table = {"attributes": ["性别"], "characters": {"甲": {"性别": "男"}, "乙": {"性别": "女"}}}
    records = data_helper.expand_attributes(table, TEMPLATES, ("train", "heldout"), seed=1)
    assert [r["template_set"] for r in records] == ["train", "train", "heldout"] * 2
    assert records == data_helper.expand_attributes(table, TEMPLATES, ["train", "heldout"], 1)
    only_train = data_helper.expand_attributes(table, TEMPLATES, ["train"], 1)
    assert only_train == [r for r in records if r["template_set"] == "train"]  # answers stable across sets
    assert records[0] == {"instruction": "", "input": "甲是男是女？", "output": records[0]["output"], "role": "甲",
                          "source": "attribute", "attribute": "性别", "fact": "男", "template_set": "train"}


@pytest.mark.parametrize("table, templates, needle", [
    ({"characters": {}}, TEMPLATES, "attribute table"),
    ({"attributes": ["身高"], "characters": {"甲": {"身高": "高"}}}, TEMPLATES, "身高"),
    ({"attributes": ["性别"], "characters": {"甲": {"性别": 3}}}, TEMPLATES, "甲.性别"),
    (TABLE, {**TEMPLATES, "性别": {**TEMPLATES["性别"], "train": ["没有名字"]}}, "{name}"),
    (TABLE, {**TEMPLATES, "性别": {**TEMPLATES["性别"], "answer": ["没有值"]}}, "{value}"),
    (TABLE, {**TEMPLATES, "性别": {**TEMPLATES["性别"], "answer": []}}, "no answer templates"),
    (TABLE, {**TEMPLATES, "性别": {**TEMPLATES["性别"], "train": ["{name}是{value}吗"]}}, "gives the answer away"),
])
def test_expand_attributes_rejects_bad_tables(table, templates, needle):
    with pytest.raises(utils.DataError, match=r".*" + needle.replace(".", r"\.").replace("{", r"\{")):
        data_helper.expand_attributes(table, templates, ["train"], 0)


def test_a_test_phrasing_also_in_train_is_an_error(tmp_path, capsys):
    paths = make_inputs(tmp_path)
    leaky = {**TEMPLATES, "元素力": {**TEMPLATES["元素力"], "novel": ["告诉我{name}的元素。", "{name}用什么元素？"]}}
    paths["templates"].write_text(json.dumps(leaky, ensure_ascii=False), encoding="utf-8")
    assert data_helper.main(data_helper_argv(paths)) == 2
    err = capsys.readouterr().err
    assert str(paths["templates"]) in err and "元素力.novel" in err and "{name}用什么元素？" in err


@pytest.mark.parametrize("test_phrasing", ["{name}用什么元素呢？", "{name} 用什么元素", "{name}，用什么元素吗"])
def test_a_test_phrasing_equal_to_train_up_to_punctuation_is_an_error(tmp_path, capsys, test_phrasing):
    paths = make_inputs(tmp_path)
    leaky = {**TEMPLATES, "元素力": {**TEMPLATES["元素力"], "train": ["{name}用什么元素？"], "dev": [test_phrasing]}}
    paths["templates"].write_text(json.dumps(leaky, ensure_ascii=False), encoding="utf-8")
    assert data_helper.main(data_helper_argv(paths)) == 2
    err = capsys.readouterr().err
    assert "元素力.dev" in err and test_phrasing in err and "{name}用什么元素？" in err


@pytest.mark.parametrize("a, b, same", [
    ("{name}用什么元素？", "{name}用什么元素呀", True),
    ("请问：{name} 是男是女", "请问{name}是男是女？", True),
    ("{name}用什么元素", "{name}用什么元素力", False),   # a word differs
    ("{name}是男是女", "是男是女{name}", False),          # the name moved
    ("{name}吗是男的", "{name}是男的", False),            # only sentence-final particles go
])
def test_template_key_ignores_only_punctuation_and_final_particles(a, b, same):
    assert (attributes.template_key(a) == attributes.template_key(b)) is same


def test_shipped_test_phrasings_share_no_template_with_training():
    """The shipped templates: no heldout/dev/novel phrasing is a train phrasing in other clothes,
    and the test file carries every test set."""
    templates = json.loads((Path(data_helper.__file__).parent / data_helper.TEMPLATES_PATH).read_text("utf-8"))
    for attr, entry in templates.items():
        train = {attributes.template_key(t) for t in entry["train"]}
        for test_set in data_helper.TEST_TEMPLATE_SETS:
            assert entry[test_set], (attr, test_set)
            assert not train & {attributes.template_key(t) for t in entry[test_set]}, (attr, test_set)


def test_placeholders_are_filled_in_one_pass():
    table = {"attributes": ["性别"], "characters": {"{value}": {"性别": "{name}"}}}
    templates = {"性别": {"train": ["{name}？"], "answer": ["{name}={value}"]}}
    [r] = data_helper.expand_attributes(table, templates, ["train"], 0)
    assert (r["input"], r["output"]) == ("{value}？", "{value}={name}")


def test_attributes_can_be_disabled(tmp_path):
    paths = make_inputs(tmp_path, attributes=False)
    train, test = run_ok(paths)
    assert "attribute" not in {r["source"] for r in train + test}


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def test_summary_lists_counts_lengths_and_overlap(tmp_path, capsys):
    paths = make_inputs(tmp_path)
    run_ok(paths)
    out = capsys.readouterr().out
    assert "records per role:" in out and "孙悟空" in out and "刻晴" in out
    assert "p50=" in out and "p90=" in out and "max=" in out
    # "编辑以下句子：我去了商店。" is a 孙悟空 train question and a 李白 test question
    assert "test questions also in train: 1 (0 same role, 1 only under other roles)" in out
    assert "编辑以下句子：我去了商店。" in out
    assert "赵子龙" in out  # a profile with no RoleBench data is noted
    assert "wrote " in out and " s" in out


def test_summary_reports_same_role_overlap(tmp_path, capsys):
    files = {("general", "train"): [{"role": "李白", "question": "重复的问题", "generated": ["一"]}],
             ("general", "test"): [{"role": "李白", "question": "重复的问题", "generated": ["二"]}]}
    paths = make_inputs(tmp_path, files=files, attributes=False)
    run_ok(paths)
    out = capsys.readouterr().out
    assert "test questions also in train: 1 (1 same role, 0 only under other roles)" in out
    assert "[same role] 李白" in out


def test_missing_files_of_a_layout_are_reported(tmp_path, capsys):
    paths = make_inputs(tmp_path, files={("general", "train"): GENERAL_TRAIN}, attributes=False)
    run_ok(paths)
    out = capsys.readouterr().out
    assert "warning: missing RoleBench files" in out and "rolebench-zh_role_specific_test.jsonl" in out


def test_percentile():
    assert data_helper.percentile([], 0.5) == 0
    assert data_helper.percentile([1, 2, 3, 4], 0.5) == 2
    assert data_helper.percentile(list(range(1, 11)), 0.9) == 9


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming file and line, outputs untouched
# ---------------------------------------------------------------------------------------------
GOOD = json.dumps({"role": "李白", "question": "好问题", "generated": ["好回答"]}, ensure_ascii=False)
BAD_LINES = {
    "malformed": (b"{not json", "malformed JSON"),
    "not_object": (b"[1, 2]", "expected a JSON object"),
    "missing_field": (json.dumps({"role": "李白", "generated": ["x"]}).encode(), "missing field 'question'"),
    "wrong_type": (json.dumps({"role": "李白", "question": 5, "generated": ["x"]}).encode(), "'question' must be"),
    "generated_str": (json.dumps({"role": "李白", "question": "q", "generated": "x"}).encode(), "list of strings"),
    "generated_item": (json.dumps({"role": "李白", "question": "q", "generated": [1]}).encode(), "generated[0]"),
    "empty_generated": (json.dumps({"role": "李白", "question": "q", "generated": []}).encode(),
                        "'generated' is empty"),
    "no_profile": (json.dumps({"role": "猪八戒", "question": "q", "generated": ["x"]}).encode(), "no profile"),
    "not_utf8": ('{"role": "李白", "question": "问", "generated": ["答"]}'.encode("gbk"), "not UTF-8"),
    "surrogate": (b'{"role": "\\u674e\\u767d", "question": "\\ud800", "generated": ["x"]}', "unpaired surrogate"),
    "huge_number": (b'{"role": "x", "question": "q", "generated": ["x"], "n": ' + b"9" * 5000 + b"}",
                    "unreadable JSON"),
    "deep_nesting": (b"[" * 100_000, "unreadable JSON"),
}


def _write_with_bad_line(tmp_path: Path, bad: bytes) -> tuple[dict, Path]:
    paths = make_inputs(tmp_path, attributes=False)
    target = rolebench_path(paths["data_dir"], "flat", "general", "train")
    target.write_bytes(b"\n".join([GOOD.encode(), b"", bad, GOOD.encode()]) + b"\n")
    return paths, target


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_exits_2_with_one_line_and_leaves_outputs_alone(tmp_path, capsys, case):
    bad, what = BAD_LINES[case]
    paths, target = _write_with_bad_line(tmp_path, bad)
    out_dir = paths["output_dir"]
    out_dir.mkdir()
    (out_dir / "train.json").write_text("old train\n")
    assert data_helper.main(data_helper_argv(paths)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {target}:3: ")
    assert what in err and "; " in err and "Traceback" not in err
    assert (out_dir / "train.json").read_text() == "old train\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["train.json"]  # no test.json, no temp files


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_bad_counts_and_reports(tmp_path, capsys, case):
    bad, what = BAD_LINES[case]
    paths, target = _write_with_bad_line(tmp_path, bad)
    train, _ = run_ok(paths, "--skip_bad")
    assert sum(1 for r in train if r["input"] == "好问题") == 1  # the good lines around it survive (merged)
    out = capsys.readouterr().out
    assert "bad records skipped (--skip_bad): 1" in out and f"{target}:3: " in out and what in out


def test_skip_bad_counts_several(tmp_path, capsys):
    paths, target = _write_with_bad_line(tmp_path, b"{oops")
    with open(target, "ab") as f:
        f.write(b"[]\n" + BAD_LINES["no_profile"][0] + b"\n")
    run_ok(paths, "--skip_bad")
    assert "bad records skipped (--skip_bad): 3" in capsys.readouterr().out


def test_a_failed_write_leaves_both_outputs_untouched(tmp_path, monkeypatch):
    paths = make_inputs(tmp_path)
    out = paths["output_dir"]
    out.mkdir()
    for name in ("train.json", "test.json"):
        (out / name).write_text(f"old {name}\n")
    real_write = Path.write_bytes
    calls = []

    def failing_write(self, data):
        calls.append(self.name)
        if len(calls) == 2:  # train.json's temp file is written, test.json's fails (disk full)
            raise OSError(28, "No space left on device", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    assert data_helper.main(data_helper_argv(paths)) == 2
    assert calls == ["train.json", "test.json"]
    assert sorted(p.name for p in out.iterdir()) == ["test.json", "train.json"]  # no temp dirs left behind
    assert [(out / n).read_text() for n in ("train.json", "test.json")] == ["old train.json\n", "old test.json\n"]


def test_bom_and_crlf_are_accepted(tmp_path):
    paths = make_inputs(tmp_path, attributes=False)
    target = rolebench_path(paths["data_dir"], "flat", "general", "train")
    target.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    train, _ = run_ok(paths)
    assert [r["output"] for r in train if r["input"] == "好问题"] == ["好回答"]


@pytest.mark.parametrize("setup, needle", [
    ("no_data", "no RoleBench files"),
    ("no_profiles", "profiles file not found"),
    ("bad_profiles", "malformed JSON"),
    ("no_table", "attribute table not found"),
    ("no_templates", "attribute templates file not found"),
    ("bad_templates_utf8", "not UTF-8"),
])
def test_missing_or_broken_files_exit_2(tmp_path, capsys, setup, needle):
    paths = make_inputs(tmp_path, attributes=setup not in ("no_data",))
    if setup == "no_data":
        paths["data_dir"] = tmp_path / "empty"
        paths["data_dir"].mkdir()
    elif setup == "no_profiles":
        paths["profiles"] = tmp_path / "nope.json"
    elif setup == "bad_profiles":
        paths["profiles"].write_text("{\n oops", encoding="utf-8")
    elif setup == "no_table":
        paths["attributes"] = tmp_path / "nope.json"
    elif setup == "no_templates":
        paths["templates"] = tmp_path / "nope.json"
    else:
        paths["templates"].write_bytes("{\"性别\": 1}".encode("gbk"))
    assert data_helper.main(data_helper_argv(paths, "--skip_bad")) == 2  # files, not records: --skip_bad does not apply
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert not paths["output_dir"].exists()


def test_defaults_work_from_the_repo_root(tmp_path, monkeypatch, capsys):
    """No flags: everything is read from data/ and written to data/ (default file names)."""
    monkeypatch.chdir(tmp_path)
    make_rolebench(tmp_path / "data")
    (tmp_path / utils.PROFILES_PATH).write_text(json.dumps(ROLEBENCH_PROFILES, ensure_ascii=False), encoding="utf-8")
    (tmp_path / utils.ATTRIBUTES_PATH).write_text(json.dumps(TABLE, ensure_ascii=False), encoding="utf-8")
    (tmp_path / data_helper.TEMPLATES_PATH).write_text(json.dumps(TEMPLATES, ensure_ascii=False), encoding="utf-8")
    shutil.copy(REPO / utils.DIALOGUE_TEMPLATES_PATH, tmp_path / utils.DIALOGUE_TEMPLATES_PATH)
    assert data_helper.main([]) == 0
    train = [r for _, r in utils.read_jsonl(tmp_path / utils.TRAIN_PATH)]
    test = [r for _, r in utils.read_jsonl(tmp_path / utils.TEST_PATH)]
    # multi-turn by default: role records go into conversations (the ones left over stay single-turn)
    sources = {r["source"] for r in train}
    assert {"attribute", "role_dialogue", "attribute_dialogue"} <= sources
    assert sources <= {"attribute", "rolebench_general", "rolebench_role_specific", "role_dialogue",
                       "attribute_dialogue"}
    assert test and "--max_replies" in capsys.readouterr().out  # 3 references, 2 kept by default


def test_profiles_default_falls_back_to_the_published_profiles(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/profiles-zh_desc.json here
    root = make_rolebench(tmp_path / "RoleBench", "published")
    (root / "profiles-zh").mkdir()
    (root / "profiles-zh" / "desc.json").write_text(json.dumps(ROLEBENCH_PROFILES, ensure_ascii=False),
                                                    encoding="utf-8")
    assert data_helper.main(["--data_dir", str(root), "--attributes", "", "--output_dir", "out"]) == 0
    assert f"profiles: {root / 'profiles-zh' / 'desc.json'}" in capsys.readouterr().out


def test_main_cli_runs_as_a_script(tmp_path):
    paths = make_inputs(tmp_path)
    script = Path(data_helper.__file__)
    proc = subprocess.run([sys.executable, str(script), *data_helper_argv(paths)], capture_output=True, text=True,
                          cwd=script.parent, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "records per role:" in proc.stdout  # bad input to the script: tests/test_bad_inputs.py


# ---------------------------------------------------------------------------------------------
# Fuzz: arbitrary strings in a RoleBench line give valid records or a clean DataError
# ---------------------------------------------------------------------------------------------
# hypothesis never draws surrogates from characters(): mix them in, with the characters that matter here
# (the address comma, line breaks other than \n, a BOM, JSON punctuation)
TRICKY = ["\ud800", "\udfff", "，", "\u2028", "\x85", "\r", "\n", "\ufeff", "{", "\\", "\"", " "]
any_text = st.text(st.one_of(st.characters(codec=None), st.sampled_from(TRICKY)), max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(question=any_text, answers=st.lists(any_text, max_size=3), ascii_only=st.booleans(),
       strip=st.booleans())
def test_fuzz_rolebench_line(question, answers, ascii_only, strip):
    record = {"role": "皇帝", "question": question, "generated": answers, "type": "script_based"}
    line = json.dumps(record, ensure_ascii=ascii_only)
    if not line.isascii() and not _utf8_ok(line):  # a surrogate can only be written in its \\u form
        line = json.dumps(record)
    # what a JSON reader sees: "\\ud800\\udfff" is one character once parsed
    question, answers = (json.loads(line)[k] for k in ("question", "generated"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "rolebench-zh_role_specific_train.jsonl").write_bytes(line.encode("utf-8") + b"\n")
        opts = data_helper.Options(data_dir=str(data), profiles=_profiles_file(data), attributes="",
                                   output_dir=str(data / "out"), strip_address=strip)
        try:
            train, test, _ = data_helper.build(opts)
            data_helper.write_outputs(opts.output_dir, train, test)
        except utils.DataError as e:
            assert str(e).startswith(str(data)) and "\n" not in str(e).strip()
            return
        written = [r for _, r in utils.read_jsonl(data / "out" / "train.json")]
        assert written == train and test == []
        expected_q = data_helper.strip_address(question.strip()) if strip else question.strip()
        assert all(r["input"] == expected_q and r["output"] in [a.strip() for a in answers] for r in written)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _profiles_file(root: Path) -> str:
    path = root / "profiles.json"
    path.write_text(json.dumps(ROLEBENCH_PROFILES, ensure_ascii=False), encoding="utf-8")
    return str(path)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")))  # one line, so the error is on line 1
def test_fuzz_raw_bytes_line(raw):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "rolebench-zh_general_train.jsonl").write_bytes(raw + b"\n" + GOOD.encode() + b"\n")
        opts = data_helper.Options(data_dir=str(data), profiles=_profiles_file(data), attributes="",
                                   output_dir=str(data / "out"))
        try:
            train, _, _ = data_helper.build(opts)
        except utils.DataError as e:
            assert ":1: " in str(e)
            return
        assert any(r["input"] == "好问题" for r in train)


# ---------------------------------------------------------------------------------------------
# Size: a RoleBench-sized synthetic input (~9k lines) builds; the summary prints the time taken
# ---------------------------------------------------------------------------------------------
def synthetic_rolebench(root: Path, lines: int = 9000) -> Path:
    """Files shaped like RoleBench-zh (general ~80%, role-specific ~20%; train ~80%; 1-5 references)."""
    roles = ["孙悟空", "李白", "皇帝"]
    sizes = {("general", "train"): int(lines * 0.65), ("general", "test"): int(lines * 0.16),
             ("role_specific", "train"): int(lines * 0.165), ("role_specific", "test"): int(lines * 0.025)}
    for (kind, split), n in sizes.items():
        recs = [{"role": roles[i % len(roles)],
                 "question": f"称呼，第{i % (n // 3 + 1)}个{kind}{split}问题：" + "字" * (i % 40),
                 "generated": [f"回答{j}" + "嗯" * ((i * 7 + j) % 200) for j in range(1 + i % 5)]} for i in range(n)]
        dump_jsonl(rolebench_path(root, "flat", kind, split), recs)
    return root


def test_synthetic_rolebench_sized_input(tmp_path, capsys):
    paths = make_inputs(tmp_path)
    synthetic_rolebench(paths["data_dir"])
    profiles = {**ROLEBENCH_PROFILES}
    paths["profiles"].write_text(json.dumps(profiles, ensure_ascii=False), encoding="utf-8")
    train, test = run_ok(paths, "--strip_address")
    assert len(train) > 9000 and len(test) > 1000
    out = capsys.readouterr().out
    assert "wrote " in out
    print(out.splitlines()[-1], file=sys.stderr)  # shows the elapsed time with pytest -s


# ---------------------------------------------------------------------------------------------
# The published files as they are (tests/fixtures/): type as a string or a list, questions with
# spaces around them, the folder's own profiles, the flat attribute table with phrase values
# ---------------------------------------------------------------------------------------------
PUBLISHED = FIXTURES / "rolebench_published"
FLAT = FIXTURES / "rolebench_flat"
FLAT_TABLE = FIXTURES / "genshin_attributes_flat.json"
SEED_TEMPLATES = FIXTURES / "attribute_templates_seed_style.json"


def run_fixture(tmp_path: Path, data_dir: Path, *extra: str, attributes: str | Path = "") -> tuple[list, list, str]:
    """data_helper on a fixture folder into tmp_path/out: (train, test, summary)."""
    out = tmp_path / "out"
    args = ["--data_dir", str(data_dir), "--attributes", str(attributes), "--output_dir", str(out), *SINGLE_TURN,
            *extra]
    proc = subprocess.run([sys.executable, str(REPO / "data_helper.py"), *args], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    paths = {"output_dir": out}
    return read_out(paths, "train.json"), read_out(paths, "test.json"), proc.stdout


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_fixture_published_type_is_a_string_in_train_and_a_list_in_test():
    """The fixture reproduces the published files: every role-specific test line has a list type."""
    specific = PUBLISHED / "rolebench-zh" / "role_specific"
    assert {type(r["type"]) for r in _lines(specific / "train.jsonl")} == {str}
    assert {type(r["type"]) for r in _lines(specific / "test.jsonl")} == {list}


@pytest.mark.parametrize("skip_bad", [False, True])
def test_role_specific_type_string_or_list_is_kept_as_one_string(tmp_path, skip_bad):
    train, test, out = run_fixture(tmp_path, PUBLISHED, *(["--skip_bad"] if skip_bad else []))
    specific_test = [r for r in test if r["source"] == "rolebench_role_specific"]
    specific_train = [r for r in train if r["source"] == "rolebench_role_specific"]
    assert len(specific_test) == 3 and len(specific_train) == 3  # no test record dropped
    assert {r["type"] for r in specific_test + specific_train} == {"script_based"}
    assert "bad records skipped" not in out
    assert all("type" not in r for r in train + test if r["source"] == "rolebench_general")


@pytest.mark.parametrize("value, expected", [
    (None, None), ("script_based", "script_based"), (["script_based"], "script_based"),
    (["script_based", "knowledge"], "script_based,knowledge"), ([" script_based "], "script_based"),
])
def test_check_type_accepts_a_string_or_a_list_of_strings(value, expected):
    assert data_helper.check_type(value, "f:1") == expected


@pytest.mark.parametrize("value", [5, [], [1], [""], {"a": "b"}, ["ok", None]])
def test_a_bad_type_is_one_clear_error_with_file_and_line(tmp_path, capsys, value):
    files = {("role_specific", "test"): [
        {"role": "皇帝", "question": "皇上，好吗？", "generated": ["好"], "type": ["script_based"]},
        {"role": "皇帝", "question": "皇上，坏吗？", "generated": ["坏"], "type": value},
    ], ("general", "train"): GENERAL_TRAIN}
    paths = make_inputs(tmp_path, files=files, attributes=False)
    assert data_helper.main(data_helper_argv(paths)) == 2
    err = capsys.readouterr().err
    target = rolebench_path(paths["data_dir"], "flat", "role_specific", "test")
    assert err.count("\n") == 1 and err.startswith(f"error: {target}:2: field 'type' must be a string or")
    assert "; fix the record" in err
    assert not paths["output_dir"].exists()


def test_questions_and_references_are_trimmed_inner_newline_kept(tmp_path):
    train, test, _ = run_fixture(tmp_path, PUBLISHED, "--max_replies", "5")
    rolebench = [r for r in train + test if r["source"] != "attribute"]
    assert all(r["input"] == r["input"].strip() and r["output"] == r["output"].strip() for r in rolebench)
    assert all(ref == ref.strip() for r in test for ref in r.get("references", []))
    li_bai = {r["output"]: r["input"] for r in train if r["role"] == "李白"}
    assert li_bai["月满西楼，举杯邀之，共醉今宵。"] == "把下面的句子改写得更有诗意。\n今天的月亮很圆。"
    [english] = [r for r in test if r["role"] == "李白" and r["source"] == "rolebench_general"]
    assert english["input"] == "翻译成英文：\n举头望明月"
    assert english["references"] == ["I raise my head to gaze at the bright moon."]
    # trimmed, the test question is the train question of other roles (as published)
    [fruit] = [r for r in test if r["role"] == "张飞" and r["source"] == "rolebench_general"]
    assert fruit["input"] == "给出三种水果的名字。" and fruit["input"] in {r["input"] for r in train}


def test_strip_address_works_on_trimmed_questions(tmp_path):
    _, test, _ = run_fixture(tmp_path, PUBLISHED, "--strip_address")
    assert "年羹尧该如何处置？" in {r["input"] for r in test if r["source"] == "rolebench_role_specific"}


@pytest.mark.parametrize("folder, profiles_file", [
    (PUBLISHED, PUBLISHED / "profiles-zh" / "desc.json"),
    (FLAT, FLAT / "profiles-zh_desc.json"),
    (PUBLISHED / "rolebench-zh", PUBLISHED / "profiles-zh" / "desc.json"),
])
def test_profiles_of_data_dir_win_over_the_repo_default(tmp_path, folder, profiles_file):
    """From the repo root, where data/profiles-zh_desc.json lacks 李白, 华妃 and 张飞."""
    assert (REPO / utils.PROFILES_PATH).is_file()
    train, test, out = run_fixture(tmp_path, folder)
    profiles = json.loads(profiles_file.read_text(encoding="utf-8"))
    assert f"note: profiles: {profiles_file} ({len(profiles)} roles; the profiles of --data_dir)" in out
    for r in train + test:
        assert r["instruction"] == utils.build_system_prompt(r["role"], profiles[r["role"]])


def test_shipped_gender_phrasings_often_ask_by_the_word_alone():
    """Gender train phrasings that name the answers (是男是女) taught the tiny default to read 男/女 as the
    cue, so questions asking by 性别 alone were answered with the identity (README, What 2424846 changed)."""
    pool = json.loads((REPO / utils.TEMPLATES_PATH).read_text(encoding="utf-8"))["性别"]["train"]
    by_word = [t for t in pool if "性别" in t and not any(c in t for c in "男女")]
    assert len(by_word) >= len(pool) // 4, f"{len(by_word)} of {len(pool)} gender phrasings ask by 性别 alone"


def test_shipped_follow_ups_give_each_attribute_ten_train_phrasings():
    follow_ups = json.loads((REPO / utils.DIALOGUE_TEMPLATES_PATH).read_text(encoding="utf-8"))["follow_ups"]
    short = {a: len(e["train"]) for a, e in follow_ups.items() if len(e["train"]) < 10}
    assert follow_ups and not short, f"attributes with fewer than 10 train follow-ups: {short}"


def test_published_profiles_hold_the_five_published_roles():
    profiles = json.loads((PUBLISHED / "profiles-zh" / "desc.json").read_text(encoding="utf-8"))
    assert set(profiles) == {"皇帝", "孙悟空", "华妃", "张飞", "李白"}


def test_explicit_profiles_still_win(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"张飞": "我的张飞", "华妃": "我的华妃"}, ensure_ascii=False), encoding="utf-8")
    train, _, out = run_fixture(tmp_path, FLAT, "--profiles", str(mine))
    assert f"note: profiles: {mine} (2 roles; --profiles)" in out
    assert {r["instruction"] for r in train} == {utils.build_system_prompt("张飞", "我的张飞"),
                                                 utils.build_system_prompt("华妃", "我的华妃")}


def test_module_docstring_example_runs_on_a_rolebench_folder(tmp_path):
    [example] = [line.split("python data_helper.py", 1)[1].split() for line in data_helper.__doc__.splitlines()
                 if "python data_helper.py" in line]
    args = [str(PUBLISHED) if a == "path/to/RoleBench" else a for a in example]
    assert "--roles" in args and str(PUBLISHED) in args
    train, test, out = run_fixture(tmp_path, PUBLISHED, *args[2:], attributes=REPO / utils.ATTRIBUTES_PATH)
    assert {r["role"] for r in train + test if r["source"] != "attribute"} == {"孙悟空", "李白"}
    assert "您的金箍棒是从哪里来的？" in {r["input"] for r in train}  # --strip_address


# attribute tables: the seed's flat layout with phrase values
def _facts(records: list[dict], name: str) -> dict[str, set[str]]:
    """attribute -> answers of one character."""
    out: dict[str, set[str]] = {}
    for r in records:
        if r["source"] == "attribute" and r["role"] == name:
            out.setdefault(r["attribute"], set()).add(r["output"])
    return out


def test_flat_attribute_table_with_the_shipped_templates_reads_right(tmp_path):
    train, test, _ = run_fixture(tmp_path, PUBLISHED, attributes=FLAT_TABLE)
    attr = [r for r in train + test if r["source"] == "attribute"]
    assert {r["role"] for r in attr} == {"丽莎", "钟离", "砂糖"}
    assert list(_facts(test, "钟离")) == ["性别", "国籍", "元素力", "身份", "性格特征"]  # the table's key order
    zhongli = _facts(train + test, "钟离")
    assert zhongli["性别"] == {"钟离是男性角色。", "钟离的性别是男。"}
    assert zhongli["国籍"] == {"钟离来自璃月。", "钟离的国籍是璃月。"}
    assert zhongli["元素力"] == {"钟离使用岩元素。", "钟离的元素力是岩。"}
    assert zhongli["身份"] == {"钟离是往生堂客卿，岩神。", "钟离的身份是往生堂客卿，岩神。"}
    assert zhongli["性格特征"] == {"钟离性格沉稳，深知璃月文化底蕴。", "钟离的性格是沉稳，深知璃月文化底蕴。"}
    assert _facts(attr, "砂糖")["性别"] == {"砂糖是女性角色。", "砂糖的性别是女。"}
    assert not any(w in r["output"] for r in attr for w in ("成年", "少年", "元素元素"))
    assert all(r["fact"] in r["output"] for r in attr)


def test_flat_attribute_table_gives_the_seed_answers(tmp_path):
    """With answer templates in the seed's style, the answers are the seed's own."""
    train, _, _ = run_fixture(tmp_path, PUBLISHED, "--templates", str(SEED_TEMPLATES), attributes=FLAT_TABLE)
    assert _facts(train, "钟离") == {"性别": {"钟离是男性"}, "国籍": {"钟离来自璃月"}, "元素力": {"岩元素"},
                                     "身份": {"钟离是往生堂客卿，岩神"}, "性格特征": {"沉稳，深知璃月文化底蕴"}}
    assert _facts(train, "丽莎")["性别"] == {"丽莎是女性"} and _facts(train, "砂糖")["元素力"] == {"风元素"}


def test_both_table_layouts_give_the_same_records():
    flat = {name: {a: v for a, v in facts.items() if v is not None} for name, facts in TABLE["characters"].items()}
    for sets in (["train"], ["heldout", "novel"]):
        assert data_helper.expand_attributes(flat, TEMPLATES, sets, 3) == \
            data_helper.expand_attributes(TABLE, TEMPLATES, sets, 3)


def test_flat_table_character_without_an_attribute_gets_no_records_for_it():
    table = {"甲": {"性别": "成年男性", "元素力": "雷元素"}, "乙": {"元素力": "冰元素"}}
    records = data_helper.expand_attributes(table, TEMPLATES, ["train"], 0)
    assert {(r["role"], r["attribute"]) for r in records} == {("甲", "性别"), ("甲", "元素力"), ("乙", "元素力")}
    assert {r["fact"] for r in records} == {"男", "雷", "冰"}


@pytest.mark.parametrize("table, blamed, needle", [
    ({}, "attributes", "or a flat {name: {attribute: value}}"),
    ({"甲": {"性别": "男"}, "乙": "女"}, "attributes", "or a flat {name: {attribute: value}}"),
    ({"甲": {}}, "attributes", "no character has any attribute"),
    ({"甲": {"性别": ["男"]}}, "attributes", "甲.性别 must be a non-empty string or null"),
    ({"甲": {"身高": "高"}}, "templates", "no templates for attribute '身高'"),
])
def test_bad_flat_tables_are_one_clear_error(tmp_path, capsys, table, blamed, needle):
    paths = make_inputs(tmp_path, attributes=True)
    paths["attributes"].write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    assert data_helper.main(data_helper_argv(paths)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {paths[blamed]}: ") and needle in err
    assert not paths["output_dir"].exists()


@pytest.mark.parametrize("attribute, value, answers, expected", [
    ("性别", "成年男性", ["{name}是{value}性角色。"], "男"),
    ("性别", "少年女性", ["{name}的性别是{value}。"], "女"),
    ("性别", "少女", ["{name}是{value}性"], "女"),
    ("性别", "男", ["{name}是{value}性角色。"], "男"),      # our own values are kept
    ("性别", "男女皆可", ["{value}"], "男女皆可"),          # no single gender: kept as written
    ("元素力", "岩元素", ["{name}使用{value}元素。", "{value}"], "岩"),
    ("元素力", "岩", ["{name}使用{value}元素。"], "岩"),
    ("元素力", "元素", ["{value}元素"], "元素"),             # never stripped to nothing
    ("元素力", "岩元素", ["{name}的元素力是{value}。"], "岩元素"),  # no template adds it back
    ("身份", " 往生堂客卿，岩神 ", ["{name}是{value}。"], "往生堂客卿，岩神"),
    ("性格特征", "沉稳，深知璃月文化底蕴", ["{name}的性格是{value}。"], "沉稳，深知璃月文化底蕴"),
])
def test_normalise_value(attribute, value, answers, expected):
    assert attributes.normalise_value(attribute, value, answers) == expected


def test_synth_rolebench_has_the_published_proportions_and_type_forms(tmp_path):
    from bench.synth import PUBLISHED_LINES, ROLEBENCH_SPLITS, synth_rolebench

    assert ROLEBENCH_SPLITS == {("general", "train"): 5933, ("general", "test"): 1451,
                                ("role_specific", "train"): 1535, ("role_specific", "test"): 239}
    lines = PUBLISHED_LINES // 10  # the full size takes seconds; the counts scale the same way
    synth_rolebench(tmp_path, lines)
    files = {(k, s): _lines(rolebench_path(tmp_path, "flat", k, s)) for k, s in ROLEBENCH_SPLITS}
    assert {key: len(v) for key, v in files.items()} == \
        {key: round(lines * n / PUBLISHED_LINES) for key, n in ROLEBENCH_SPLITS.items()}
    assert {type(r["type"]) for r in files[("role_specific", "train")]} == {str}
    assert {json.dumps(r["type"]) for r in files[("role_specific", "test")]} == {'["script_based"]'}
    questions = [r["question"] for v in files.values() for r in v]
    assert any(q != q.strip() for q in questions) and any("\n" in q for q in questions)
    train, test, _ = run_fixture(tmp_path / "run", tmp_path)
    assert {r["type"] for r in train + test if r["source"] == "rolebench_role_specific"} == {"script_based"}


def test_keep_custom_keeps_a_build_of_your_own_and_follows_the_shipped_data_otherwise(tmp_path, capsys):
    """train.sh calls `data_helper.py --keep_custom`: files built with other flags survive it; files built
    from the shipped data (or with no build record) are rebuilt."""
    out = str(tmp_path)
    train = tmp_path / "train.json"
    assert data_helper.main(["--output_dir", out, "--templates_per_fact", "3"]) == 0
    custom = train.read_bytes()
    assert data_helper.main(["--output_dir", out, "--keep_custom"]) == 0
    assert train.read_bytes() == custom  # kept
    said = capsys.readouterr().out
    assert "kept" in said and '"templates_per_fact": 3' in said and "python data_helper.py" in said
    assert data_helper.main(["--output_dir", out]) == 0  # back to the shipped data
    shipped = train.read_bytes()
    assert shipped != custom
    (tmp_path / "train.json").write_text("stale\n", encoding="utf-8")
    assert data_helper.main(["--output_dir", out, "--keep_custom"]) == 0
    assert train.read_bytes() == shipped  # a shipped build is rebuilt every time
    (tmp_path / data_helper.BUILD_RECORD).unlink()
    train.write_text("stale\n", encoding="utf-8")
    assert data_helper.main(["--output_dir", out, "--keep_custom"]) == 0
    assert train.read_bytes() == shipped  # no record: rebuilt
