"""predict.fact_matches: how an attribute reply is scored against the record's fact."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
predict = importlib.import_module("predict")


def record(attribute: str, fact: str) -> dict:
    return {"source": "attribute", "role": "钟离", "attribute": attribute, "fact": fact, "template_set": "dev",
            "instruction": "", "input": "问"}


@pytest.mark.parametrize("reply, hit", [
    ("钟离是往生堂客卿，岩神", True),   # the whole fact
    ("钟离是岩神", True),               # one title of the two
    ("他是往生堂客卿。", True),
    ("钟离是璃月七星", False),
    ("", False),
])
def test_an_identity_with_two_titles_counts_when_either_is_given(reply, hit):
    assert predict.fact_matches(record("身份", "往生堂客卿，岩神"), reply) is hit


@pytest.mark.parametrize("attribute, fact, reply, hit", [
    ("性格特征", "沉稳，深知璃月文化底蕴", "钟离很沉稳", False),  # other attributes: the whole fact, as before
    ("性格特征", "沉稳，深知璃月文化底蕴", "沉稳，深知璃月文化底蕴", True),
    ("性别", "男", "钟离是男性", True),
    ("元素力", "岩", "岩元素", True),
    ("身份", "往生堂客卿", "钟离是往生堂的客卿", False),      # one title: still the exact fact
])
def test_other_facts_still_need_the_whole_fact(attribute, fact, reply, hit):
    assert predict.fact_matches(record(attribute, fact), reply) is hit


def test_compute_metrics_scores_with_fact_matches():
    records = [record("身份", "往生堂客卿，岩神"), record("性格特征", "沉稳，深知璃月文化底蕴")]
    metrics = predict.compute_metrics(records, ["钟离是岩神", "钟离很沉稳"], roles=[])
    acc = metrics["attribute_accuracy"]
    assert acc["per_attribute"]["身份"]["accuracy"] == 1.0 and acc["per_attribute"]["性格特征"]["accuracy"] == 0.0
