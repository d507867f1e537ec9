"""The attribute table expanded into single-turn fact records, shared by data_helper.py (the
fine-tuning data) and tools/build_default.py (the embedded default's base data about its own characters).

A table maps characters to attribute values, in either layout:
`{"attributes": [names], "characters": {name: {attribute: value}}}`, or one flat object
`{name: {attribute: value}}` whose attribute names are the keys (first-seen order). Its templates
map each attribute to question phrasings per set ("train" for training; "heldout", "dev" and "novel"
for testing) and answer templates. `normalise_value` turns phrase values into what the answer
templates expect; `template_key` is a phrasing up to punctuation and sentence-final particles, and
`check_phrasings_disjoint` refuses a test phrasing that equals a train phrasing that way.

Example:
    >>> from roleplay.attributes import expand_attributes
    >>> table = {"钟离": {"元素": "岩"}}
    >>> templates = {"元素": {"train": ["{name}是什么元素？"], "answer": ["{name}是{value}元素。"]}}
    >>> expand_attributes(table, templates, ["train"], seed=0)[0]["output"]
    '钟离是岩元素。'
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from typing import Any

from utils import DataError

TRAIN_TEMPLATE_SETS = ("train",)
# heldout: phrasings the base saw for its own characters, never in fine-tuning; dev: new phrasings
# the recipe was developed against; novel: new phrasings written blind after the recipe was fixed.
TEST_TEMPLATE_SETS = ("heldout", "dev", "novel")
TEMPLATES_PER_FACT = 24  # train phrasings per (character, attribute), drawn from the train pool
_PLACEHOLDER = re.compile(r"\{(name|value)\}")


def _is_flat_table(table: Any) -> bool:
    """The published layout: {name: {attribute: value}}. Our own layout's "attributes" is a list,
    so no table is both."""
    return isinstance(table, dict) and bool(table) and all(isinstance(facts, dict) for facts in table.values())


def _flat_attributes(characters: dict[str, dict], where: str) -> list[str]:
    """The attribute names of a flat table: its keys, in first-seen order."""
    attributes = list(dict.fromkeys(attr for facts in characters.values() for attr in facts))
    if not attributes:
        raise DataError(f"{where}: no character has any attribute; expected {{name: {{attribute: value}}}}, "
                        "fix the attribute table")
    if not all(isinstance(a, str) and a.strip() for a in attributes):
        raise DataError(f"{where}: attribute names must be non-empty strings; fix the attribute table")
    return attributes


def _check_table(table: Any, where: str) -> tuple[list[str], dict[str, dict]]:
    """(attribute names, characters) of a table in either layout (see the module docstring)."""
    if _is_flat_table(table):
        attributes, characters = _flat_attributes(table, where), table
    elif isinstance(table, dict) and isinstance(table.get("attributes"), list) \
            and isinstance(table.get("characters"), dict):
        attributes, characters = table["attributes"], table["characters"]
    else:
        raise DataError(f"{where}: expected {{\"attributes\": [names], \"characters\": {{name: {{attribute: value}}}}}}"
                        " or a flat {name: {attribute: value}}; fix the attribute table")
    if not all(isinstance(a, str) and a for a in attributes):
        raise DataError(f"{where}: \"attributes\" must be a list of non-empty strings; fix the attribute table")
    for name, facts in characters.items():
        if not name.strip():
            raise DataError(f"{where}: a character has an empty name; fix the attribute table")
        if not isinstance(facts, dict):
            raise DataError(f"{where}: character {name!r} must map to an object of attribute -> value; "
                            "fix the attribute table")
    return attributes, characters


GENDER_ATTRIBUTE = "性别"
_GENDERS = "男女"
_VALUE_SUFFIX = re.compile(r"\{value\}(\w+)")  # the word an answer template writes right after {value}


def normalise_value(attribute: str, value: str, answers: Sequence[str]) -> str:
    """A table value as the answer templates expect it, so phrase values read right.

    The published table holds phrases where our templates expect a word: a gender carries an age
    ("成年男性" -> "男", as templates add "性"), and a value may end with the word a template writes
    after {value} ("岩元素" with "{value}元素" -> "岩", so no "岩元素元素"). Single-word values
    ("男", "岩") and other phrases ("往生堂客卿，岩神") are kept as given, surrounding spaces trimmed.
    """
    value = value.strip()
    if attribute == GENDER_ATTRIBUTE:
        genders = {c for c in value if c in _GENDERS}
        if len(genders) == 1:  # "男女皆可" or "无" stay as written
            value = genders.pop()
    for suffix in dict.fromkeys(m.group(1) for t in answers for m in _VALUE_SUFFIX.finditer(t)):
        if len(value) > len(suffix) and value.endswith(suffix):
            value = value[: -len(suffix)]
    return value


def _check_templates(templates: Any, attributes: Sequence[str], sets: Sequence[str], where: str) -> None:
    if not isinstance(templates, dict):
        raise DataError(f"{where}: expected an object mapping attribute -> {{set: [templates]}}; fix the templates")
    for attr in attributes:
        entry = templates.get(attr)
        if not isinstance(entry, dict):
            raise DataError(f"{where}: no templates for attribute {attr!r}; add an entry with "
                            "train/heldout/dev/novel questions and answers")
        for key in (*sets, "answer"):
            _check_template_list(entry.get(key, []), attr, key, where)
        if not entry.get("answer"):
            raise DataError(f"{where}: attribute {attr!r} has no answer templates; add some under \"answer\"")


def _check_template_list(items: Any, attr: str, key: str, where: str) -> None:
    needed = "{value}" if key == "answer" else "{name}"
    if not isinstance(items, list):
        raise DataError(f"{where}: {attr}.{key} must be a list of strings; fix the templates")
    for t in items:
        if not isinstance(t, str) or needed not in t:
            raise DataError(f"{where}: {attr}.{key} template {t!r} must be a string containing {needed}; "
                            "fix the templates")
        if key != "answer" and "{value}" in t:
            raise DataError(f"{where}: {attr}.{key} question {t!r} contains {{value}}, which gives the answer away; "
                            "remove it from the question")


def _fill(template: str, name: str, value: str = "") -> str:
    # one pass, so a name or value containing "{value}" is not substituted again
    return _PLACEHOLDER.sub(lambda m: name if m.group(1) == "name" else value, template)


def expand_attributes(
    table: dict,
    templates: dict,
    template_sets: Sequence[str],
    seed: int,
    *,
    table_path: str = "attribute table",
    templates_path: str = "attribute templates",
    per_fact: int = 0,
) -> list[dict]:
    """Single-turn fact records: every character x attribute x question template of `template_sets`.

    With `per_fact` > 0, each (character, attribute) gets only `per_fact` phrasings drawn (seeded)
    from the "train" pool: a large pool then adds wording variety across characters without
    multiplying the records. Test sets (TEST_TEMPLATE_SETS) always use every phrasing.

    `table` is {"attributes": [...], "characters": {name: {attribute: value}}} or a flat
    {name: {attribute: value}}; values go through `normalise_value`, and a record's "fact" is the
    normalised value (what its answer states); `templates` maps
    attribute -> {"train"|"heldout"|"dev"|"novel": [questions with {name}], "answer": [answers with
    {name} and {value}]}. A character without a value (missing or null) for an attribute gets no
    records for it. The answer template is drawn from an RNG seeded by (seed, character, attribute,
    question), so a record's answer does not change when other characters or sets are added.
    Records are in table order; the caller shuffles. Raises DataError on a malformed table/templates.
    """
    attributes, characters = _check_table(table, table_path)
    _check_templates(templates, attributes, template_sets, templates_path)
    records = []
    for name, facts in characters.items():
        for attr in attributes:
            value = facts.get(attr)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{table_path}: {name}.{attr} must be a non-empty string or null, got {value!r}; "
                                "fix the attribute table")
            value = normalise_value(attr, value, templates[attr]["answer"])
            records.extend(_fact_records(name, attr, value, templates[attr], template_sets, seed, per_fact))
    return records


def _fact_records(name: str, attr: str, value: str, entry: dict, sets: Sequence[str], seed: int,
                  per_fact: int = 0) -> list[dict]:
    records = []
    for template_set in sets:
        questions = list(entry.get(template_set, []))
        if template_set == "train" and 0 < per_fact < len(questions):
            questions = random.Random(f"{seed}\x00{name}\x00{attr}").sample(questions, per_fact)
        for question in questions:
            rng = random.Random(f"{seed}\x00{name}\x00{attr}\x00{question}")  # str seeds hash stably (sha512)
            records.append({
                "instruction": "",  # no persona: a neutral question about the character
                "input": _fill(question, name),
                "output": _fill(rng.choice(entry["answer"]), name, value),
                "role": name, "source": "attribute", "attribute": attr, "fact": value,
                "template_set": template_set,
            })
    return records


def check_phrasings_disjoint(templates: Any, where: str | os.PathLike) -> None:
    """A test question template that is also a train template (up to punctuation, spaces and
    sentence-final particles) would make the held-out score meaningless."""
    if not isinstance(templates, dict):
        return  # expand_attributes reports the shape
    for attr, entry in templates.items():
        if not isinstance(entry, dict):
            continue
        train = {template_key(t): t for s in TRAIN_TEMPLATE_SETS for t in _as_list(entry.get(s))}
        for test_set in TEST_TEMPLATE_SETS:
            for t in _as_list(entry.get(test_set)):
                if template_key(t) in train:
                    raise DataError(f"{where}: {attr}.{test_set} question {t!r} is train question "
                                    f"{train[template_key(t)]!r} up to punctuation/particles; test phrasings must "
                                    "not be trained on: reword or remove one of them")


_PUNCTUATION = re.compile(r"[\s\W_]+")
_TRAILING_PARTICLES = re.compile(r"[呢呀啊吗吧嘛哦呐]+$")


def template_key(template: str) -> str:
    """A question template's wording: punctuation, spaces and sentence-final particles removed."""
    key = "{name}".join(_PUNCTUATION.sub("", part) for part in template.split("{name}"))
    return _TRAILING_PARTICLES.sub("", key)


def _as_list(value: Any) -> list:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
