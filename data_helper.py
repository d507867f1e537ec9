"""Build the fine-tuning data: `data/train.json` and `data/test.json` (JSON lines).

Inputs (all under `data/` by default):
- RoleBench-zh, flat (`rolebench-zh_general_train.jsonl`, ...) or as published
  (`rolebench-zh/general/train.jsonl`, ...): one record per (question, reference) in train, one
  record per question with all `references` in test; the instruction is the role's system prompt
  from `utils.build_system_prompt` (the one training and inference use). Questions and references
  are trimmed of surrounding whitespace (inner line breaks stay: a general question may carry its
  input after a "\n"). A role-specific record's `type` may be a string (`"script_based"`, as the
  published train file stores it) or a list of strings (`["script_based"]`, as the published test
  file stores it); the output always holds it as one string, a list's items joined with ",".
- The profiles (role -> description): --profiles if given, else the profiles file that comes with
  --data_dir (`profiles-zh_desc.json` or `profiles-zh/desc.json`), else `data/profiles-zh_desc.json`;
  the summary names the file used.
- The attribute table (`genshin_attributes.json`), in either layout:
  `{"attributes": [names], "characters": {name: {attribute: value}}}`, or one flat object
  `{name: {attribute: value}}` whose attribute names are the keys (first-seen order). A character
  without a value (missing or null) for an attribute gets no records for it. Values may be phrases
  ("成年男性", "岩元素"): `normalise_value` turns them into what the answer templates expect.
- Its question/answer templates (`attribute_templates.json`): persona-free fact questions about
  each character; train gets the "train" phrasings, test the "heldout", "dev" and "novel" ones; a
  test phrasing equal to a train phrasing up to punctuation and sentence-final particles is an
  error (`template_key`).

Each output line is {"instruction", "input", "output", "role", "source", "split", ...}. The same
inputs and seed give byte-identical files. A summary (counts per role, output lengths, dropped
records, train/test question overlap) goes to stdout; bad input stops with exit code 2 and one line
`error: <file>:<line>: <what>; <what to do>` unless --skip_bad.

Example (from the repo root, on a downloaded RoleBench folder with its own profiles):
    python data_helper.py --data_dir path/to/RoleBench --roles 孙悟空,李白 --max_replies 2 --strip_address
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import utils
from roleplay import dialogue
from roleplay.attributes import (
    TEMPLATES_PER_FACT,
    TEST_TEMPLATE_SETS,
    TRAIN_TEMPLATE_SETS,
    check_phrasings_disjoint,
    expand_attributes,
)
from utils import TEMPLATES_PATH, DataError

# Multi-turn role conversations per role. On the default data every role reply is then in two to four of
# them (at 80: one or two). On 300 dev questions that alone cut the tiny default's fact-answer leak of role
# replies from 13.7-21.7% to 8.0-11.0% (two seeds), and with train.sh's head lr of 5e-4 to 5.3-9.7% (three
# seeds); at 240 the role replies over-fit and the leak rose again (one seed; README, "Results").
DIALOGUES_PER_ROLE = 160
ATTRIBUTE_DIALOGUES = 600  # multi-turn attribute conversations
# Multi-turn test conversations per depth (and asking one fact twice). At 32 one conversation moved a
# depth's accuracy by 3.1 points and depth 4 scored below depth 5 at three seeds; 100 gives ~3% standard error.
EVAL_DIALOGUES = 100
EVAL_ROLE_DIALOGUES = 4  # multi-turn role test conversations per role and depth (out-of-character by depth)

SPLITS = ("train", "test")
KINDS = ("general", "role_specific")
SOURCES = {"general": "rolebench_general", "role_specific": "rolebench_role_specific"}
ADDRESS_SEP = "，"
MAX_LISTED = 20  # examples listed per summary section; the counts are always complete
# Longest question or reference accepted, in characters. The published RoleBench-zh texts stay far
# below it (the shipped files: under 450 characters a line) and training keeps 512 tokens of a
# sample, so a text this long is a broken line (files pasted together, a missing line break).
MAX_TEXT_CHARS = 20_000


# ---------------------------------------------------------------------------------------------
# Bookkeeping shared by the loaders and the summary
# ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What the build noticed: dropped records by reason, skipped bad records, notes and warnings."""

    dropped: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # likely mistakes that still give a valid build
    skip_bad: bool = False

    def bad_record(self, error: DataError) -> None:
        """Fail on a bad record, or (with --skip_bad) count it and go on."""
        if not self.skip_bad:
            raise error
        self.bad.append(str(error))


@dataclass
class Question:
    """One RoleBench question of one role, with its references in input order (no duplicates)."""

    role: str
    question: str
    source: str
    qtype: str | None
    references: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# RoleBench: finding the files
# ---------------------------------------------------------------------------------------------
def _layouts(data_dir: Path) -> dict[str, dict[tuple[str, str], Path]]:
    """Candidate paths for each (kind, split), per layout, in order of preference."""
    return {
        "flat": {(k, s): data_dir / f"rolebench-zh_{k}_{s}.jsonl" for k in KINDS for s in SPLITS},
        "published": {(k, s): data_dir / "rolebench-zh" / k / f"{s}.jsonl" for k in KINDS for s in SPLITS},
        # --data_dir pointing at the published `rolebench-zh/` folder itself
        "published (rolebench-zh folder)": {(k, s): data_dir / k / f"{s}.jsonl" for k in KINDS for s in SPLITS},
    }


def find_rolebench_files(data_dir: str | Path, report: Report) -> dict[tuple[str, str], Path]:
    """(kind, split) -> file of the first layout that has any file; missing ones go to the report."""
    for name, paths in _layouts(Path(data_dir)).items():
        present = {key: p for key, p in paths.items() if p.is_file()}
        if not present:
            continue
        missing = [str(p) for key, p in paths.items() if key not in present]
        report.notes.append(f"RoleBench layout: {name} in {data_dir} ({len(present)} of 4 files)")
        if missing:
            report.warnings.append("missing RoleBench files (their records are left out): " + ", ".join(missing))
        empty = [str(p) for p in present.values() if p.stat().st_size == 0]
        if empty:  # read as 0 records; a failed download or copy looks exactly like this
            report.warnings.append("empty RoleBench files (0 bytes, no records read): " + ", ".join(empty))
        return present
    return {}


def _no_data_error(data_dir: str | Path, attributes: bool) -> DataError:
    paths = _layouts(Path(data_dir))
    flat, published = paths["flat"][("general", "train")], paths["published"][("general", "train")]
    where = "" if Path(data_dir).is_dir() else "no such folder; "
    fix = ("pass --data_dir '' to build from the attribute table only" if attributes
           else "attributes are disabled too (--attributes '')")
    return DataError(f"{data_dir}: no RoleBench files ({where}looked for {flat.name} and friends, or {published}); "
                     f"check --data_dir (put RoleBench-zh there or point at it), or {fix}")


# ---------------------------------------------------------------------------------------------
# RoleBench: reading and checking records
# ---------------------------------------------------------------------------------------------
def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError | None]]:
    """(line, record) per line, (line, DataError) for a bad line (reading goes on), None if blank.

    Same checks and messages as utils.read_jsonl, which stops at the first bad line; --skip_bad
    needs to skip it and continue. Lines split on b"\\n" only (binary read), so U+2028 and friends
    inside a JSON string stay in their record.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, _parse_line(path, lineno, raw)


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict | DataError | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8")
    if lineno == 1:
        line = line.removeprefix("\ufeff")  # editors on Windows add a BOM; json.loads refuses it
    if not line.strip():
        return None
    try:
        record = json.loads(line.rstrip("\r\n"))  # a line cut short is blamed at its end, not on "column 1"
    except json.JSONDecodeError as e:
        return DataError(f"{path}:{lineno}: malformed JSON ({utils.json_error_text(e)}); fix or remove the line")
    except (ValueError, RecursionError) as e:  # a 5000-digit number or 10^5 nested brackets: valid JSON, still bad
        return DataError(f"{path}:{lineno}: unreadable JSON ({type(e).__name__}); fix or remove the line")
    if not isinstance(record, dict):
        return DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                         "each line must be one RoleBench record")
    return record


def _check_text(value: Any, name: str, where: str) -> str:
    """A non-blank string that can be written as UTF-8 (JSON allows lone surrogate escapes)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}; fix the record")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty; fix or remove the record")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: field {name!r} is {len(value):,} characters, over the {MAX_TEXT_CHARS:,}-character "
                        "cap (a broken line? two records run together?); fix or remove the record")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: field {name!r} holds an unpaired surrogate ({value[e.start]!r}); "
                            "fix the \\u escape in the record") from e
    return value


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}; each record needs role, question and generated")
    return record[name]


def check_rolebench_record(record: dict, where: str) -> tuple[str, str, list[str], str | None]:
    """(role, question, references, type) of one RoleBench record; DataError on anything wrong.

    Question and references come back trimmed (the published questions often begin or end with
    spaces); blank references are left out (counted by the caller); a record with none left is bad.
    """
    role = _check_text(_field(record, "role", where), "role", where)
    question = _check_text(_field(record, "question", where), "question", where).strip()
    generated = _field(record, "generated", where)
    if not isinstance(generated, list):
        raise DataError(f"{where}: field 'generated' must be a list of strings, got {type(generated).__name__}; "
                        "fix the record")
    if not generated:
        raise DataError(f"{where}: field 'generated' is empty; give at least one reference or remove the record")
    refs = []
    for i, ref in enumerate(generated):
        if not isinstance(ref, str):
            raise DataError(f"{where}: generated[{i}] must be a string, got {type(ref).__name__}; fix the record")
        if ref.strip():
            refs.append(_check_text(ref, f"generated[{i}]", where).strip())
    if not refs:
        raise DataError(f"{where}: field 'generated' has only blank references; fix or remove the record")
    return role, question, refs, check_type(record.get("type"), where)


TYPE_JOIN = ","


def check_type(qtype: Any, where: str) -> str | None:
    """A role-specific record's type as one string: the published train file stores a string
    ("script_based"), the test file a list (["script_based"]); a list's items are joined with ","."""
    if qtype is None or isinstance(qtype, str):
        return qtype
    if isinstance(qtype, list) and qtype and all(isinstance(t, str) and t.strip() for t in qtype):
        return TYPE_JOIN.join(_check_text(t, "type", where).strip() for t in qtype)
    got = "an empty list" if qtype == [] else f"{type(qtype).__name__} {json.dumps(qtype, ensure_ascii=False)[:40]}"
    raise DataError(f"{where}: field 'type' must be a string or a non-empty list of non-empty strings, got {got}; "
                    "fix the record")


def strip_address(question: str) -> str:
    """Drop the leading address ("皇上，...") — the text up to and including the first "，"."""
    _, sep, rest = question.partition(ADDRESS_SEP)
    return rest.strip() if sep else question


@dataclass(frozen=True)
class RoleFilter:
    """Which RoleBench roles to keep: the requested ones, or (default) every role with a profile."""

    profiles: dict[str, str]
    profiles_path: str
    requested: frozenset[str] | None

    def keep(self, role: str, where: str) -> bool:
        if self.requested is not None:
            return role in self.requested
        if role not in self.profiles:
            raise DataError(f"{where}: role {role!r} has no profile in {self.profiles_path}; add its description "
                            "there, or choose roles with --roles")
        return True


def load_rolebench_file(
    path: Path, kind: str, roles: RoleFilter, strip: bool, report: Report
) -> dict[tuple[str, str], Question]:
    """Questions of one file keyed by (role, question); repeated questions merge their references."""
    questions: dict[tuple[str, str], Question] = {}
    for lineno, item in iter_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(item, DataError):
                raise item
            if item is None:
                continue
            role, question, refs, qtype = check_rolebench_record(item, where)
            report.dropped["blank reference"] += len(item["generated"]) - len(refs)
            if not roles.keep(role, where):
                report.dropped["role not in --roles"] += 1
                continue
        except DataError as e:
            report.bad_record(e)
            continue
        if strip and kind == "role_specific":
            question = strip_address(question)
            if not question:
                report.dropped["question empty after --strip_address"] += 1
                continue
        _merge(questions, Question(role, question, SOURCES[kind], qtype), refs, report)
    return questions


def _merge(questions: dict[tuple[str, str], Question], new: Question, refs: list[str], report: Report) -> None:
    q = questions.setdefault((new.role, new.question), new)
    for ref in refs:
        if ref in q.references:
            report.dropped["duplicate reference"] += 1
        else:
            q.references.append(ref)


# ---------------------------------------------------------------------------------------------
# RoleBench: output records
# ---------------------------------------------------------------------------------------------
def rolebench_records(questions: Sequence[Question], split: str, prompts: dict[str, str], max_replies: int,
                      report: Report) -> list[dict]:
    """Train: one record per (question, reference), up to max_replies; test: one per question."""
    records = []
    for q in questions:
        base = {"instruction": prompts[q.role], "input": q.question}
        extra = {"role": q.role, "source": q.source, "split": split}
        if q.qtype is not None:
            extra["type"] = q.qtype
        if split == "test":
            records.append({**base, "output": q.references[0], **extra, "references": list(q.references)})
            continue
        kept = q.references[:max_replies]
        report.dropped["reference over --max_replies"] += len(q.references) - len(kept)
        records.extend({**base, "output": ref, **extra} for ref in kept)
    return records


def load_rolebench(files: dict[tuple[str, str], Path], roles: RoleFilter, strip: bool, max_replies: int,
                   report: Report) -> dict[str, list[dict]]:
    """split -> records from every RoleBench file found (general first, then role-specific)."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    prompts: dict[str, str] = {}
    for (kind, split), path in sorted(files.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
        questions = list(load_rolebench_file(path, kind, roles, strip, report).values())
        for q in questions:
            if q.role not in prompts:
                prompts[q.role] = utils.build_system_prompt(q.role, roles.profiles[q.role])
        out[split].extend(rolebench_records(questions, split, prompts, max_replies, report))
    return out


# ---------------------------------------------------------------------------------------------
# Attributes
# ---------------------------------------------------------------------------------------------
def load_attributes(table_path: Path, templates_path: Path, seed: int, report: Report,
                    per_fact: int = 0) -> dict[str, list[dict]]:
    """split -> attribute records: train phrasings in train, the TEST_TEMPLATE_SETS phrasings in test."""
    hint = "pass --attributes '' to build without attributes"
    table = utils.read_json(table_path, "attribute table", f"pass --attributes PATH, or {hint}")
    templates = utils.read_json(templates_path, "attribute templates file", f"pass --templates PATH, or {hint}")
    out, counts = {}, []
    check_phrasings_disjoint(templates, templates_path)
    for split, sets in (("train", TRAIN_TEMPLATE_SETS), ("test", TEST_TEMPLATE_SETS)):
        records = expand_attributes(table, templates, sets, seed, per_fact=per_fact,
                                    table_path=str(table_path), templates_path=str(templates_path))
        out[split] = [{**r, "split": split} for r in records]
        found = Counter(r["template_set"] for r in records)
        counts.append(f"{split} " + ", ".join(f"{found[s]} {s}" for s in sets))
    # a set with 0 records usually means a missing key in the templates file
    report.notes.append(f"attributes: {table_path} + {templates_path}: {'; '.join(counts)} records")
    return out



# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


@dataclass
class Options:
    data_dir: str = utils.DATA_DIR  # "": no RoleBench, an attribute-only build
    profiles: str | None = None  # None: the data_dir's own profiles file, else utils.PROFILES_PATH
    attributes: str = utils.ATTRIBUTES_PATH  # "" disables attributes
    templates: str = TEMPLATES_PATH
    roles: list[str] | None = None
    max_replies: int = 2
    strip_address: bool = False
    seed: int = 42
    templates_per_fact: int = TEMPLATES_PER_FACT
    dialogue_templates: str = utils.DIALOGUE_TEMPLATES_PATH
    # multi-turn conversations: none unless asked (the command line asks, with DIALOGUES_PER_ROLE etc.)
    dialogues_per_role: int = 0
    attribute_dialogues: int = 0
    eval_dialogues: int = 0
    output_dir: str = str(Path(utils.TRAIN_PATH).parent)
    keep_custom: bool = False  # train.sh's call: keep files built from other inputs or flags
    skip_bad: bool = False


def profiles_candidates(data_dir: str | Path) -> list[Path]:
    """Where a RoleBench folder keeps its own profiles: flat, published, or beside the
    `rolebench-zh/` folder when --data_dir names that folder itself."""
    data_dir = Path(data_dir)
    candidates = [data_dir / "profiles-zh_desc.json", data_dir / "profiles-zh" / "desc.json"]
    if any((data_dir / kind).is_dir() for kind in KINDS):
        candidates.append(data_dir.parent / "profiles-zh" / "desc.json")
    return candidates


def profiles_path(opts: Options) -> tuple[Path, str]:
    """(profiles file, why it was chosen): --profiles, else the one that comes with --data_dir (a
    downloaded RoleBench names roles the repo's profiles lack), else utils.PROFILES_PATH."""
    if opts.profiles:
        return Path(opts.profiles), "--profiles"
    for candidate in profiles_candidates(opts.data_dir) if opts.data_dir else []:
        if candidate.is_file():
            return candidate, "the profiles of --data_dir"
    return Path(utils.PROFILES_PATH), "default"


def _role_filter(opts: Options, report: Report) -> RoleFilter:
    path, why = profiles_path(opts)
    profiles = utils.load_profiles(path)
    requested = None
    if opts.roles is not None:
        unknown = [r for r in opts.roles if r not in profiles]
        if unknown:
            raise DataError(f"{path}: no profile for role(s) {', '.join(unknown)} named in --roles; add a description "
                            "there, pass --profiles, or drop them from --roles")
        requested = frozenset(opts.roles)
    report.notes.append(f"profiles: {path} ({len(profiles)} roles; {why})")
    return RoleFilter(profiles, str(path), requested)


def build(opts: Options) -> tuple[list[dict], list[dict], Report]:
    """(train, test, report) from the inputs; nothing is written. Raises DataError on bad input."""
    report = Report(skip_bad=opts.skip_bad)
    files = find_rolebench_files(opts.data_dir, report) if opts.data_dir else {}
    if opts.data_dir and not files:
        # a mistyped --data_dir must not quietly become an attribute-only build (which would then
        # replace data/train.json): that build is asked for explicitly, with --data_dir ''
        raise _no_data_error(opts.data_dir, bool(opts.attributes))
    if not files and not opts.attributes:
        raise DataError("--data_dir '' and --attributes '' leave nothing to build from; pass one of them")
    if not files:
        report.notes.append("--data_dir '': no RoleBench data, building from the attribute table only")
    parts = []
    if files or opts.roles is not None:
        roles = _role_filter(opts, report)
        parts.append(load_rolebench(files, roles, opts.strip_address, opts.max_replies, report))
        _note_roles_without_data(roles, parts[-1], report)
    if opts.attributes:
        parts.append(load_attributes(Path(opts.attributes), Path(opts.templates), opts.seed, report,
                                     opts.templates_per_fact))
    train = _dedupe([r for p in parts for r in p["train"]], report)
    test = _dedupe([r for p in parts for r in p["test"]], report)
    if not train:
        raise DataError(f"{opts.data_dir or '--attributes'}: no training records left after filtering; check --roles "
                        "and the inputs")
    if opts.dialogues_per_role or opts.attribute_dialogues or opts.eval_dialogues:
        # only attribute conversations need the follow-up phrasings
        needed = any(r["source"] == "attribute" for r in (*train, *test))
        templates = dialogue.load_dialogue_templates(opts.dialogue_templates) if needed else {}
        train = dialogue.compose_training_conversations(train, templates, opts.seed, opts.dialogues_per_role,
                                                        opts.attribute_dialogues)
        test += dialogue.compose_eval_conversations(test, templates, opts.seed, opts.eval_dialogues,
                                                    EVAL_ROLE_DIALOGUES if opts.eval_dialogues else 0)
    random.Random(opts.seed).shuffle(train)  # records come grouped by file and role; training wants them mixed
    return train, test, report


def _note_roles_without_data(roles: RoleFilter, records: dict[str, list[dict]], report: Report) -> None:
    seen = {r["role"] for split in records.values() for r in split}
    wanted = roles.requested if roles.requested is not None else roles.profiles.keys()
    missing = sorted(set(wanted) - seen)
    if missing:
        report.notes.append("roles with a profile but no RoleBench records: " + ", ".join(missing))


def _dedupe(records: list[dict], report: Report) -> list[dict]:
    """Drop exact repeats (same role, prompt, question and answer), e.g. a template listed twice."""
    seen: set[tuple[str, str, str, str]] = set()
    out = []
    for r in records:
        key = (r["role"], r["instruction"], r["input"], r["output"])
        if key in seen:
            report.dropped[f"duplicate {r['split']} record"] += 1
            continue
        seen.add(key)
        out.append(r)
    return out


def output_paths(output_dir: str | Path) -> tuple[Path, Path]:
    """train.json and test.json in `output_dir`."""
    return Path(output_dir) / Path(utils.TRAIN_PATH).name, Path(output_dir) / Path(utils.TEST_PATH).name


def write_outputs(output_dir: str | Path, train: list[dict], test: list[dict]) -> tuple[Path, Path]:
    """Write both files, or neither: both are encoded and staged under temporary names first, then
    renamed into place; when a rename fails, the files already replaced get their old content back."""
    paths = output_paths(output_dir)
    payloads = [_encode(records, path) for records, path in zip((train, test), paths, strict=True)]
    utils.make_parent_dir(paths[0])
    with tempfile.TemporaryDirectory(prefix=".data_helper.tmp-", dir=paths[0].parent) as tmp:
        staged = [Path(tmp) / path.name for path in paths]
        for data, temp, path in zip(payloads, staged, paths, strict=True):
            try:
                temp.write_bytes(data)
            except OSError as e:
                raise DataError(f"{path}: cannot be written ({e.strerror or e}); nothing was changed: check free "
                                "space and the folder's permissions") from e
        _replace_together(list(zip(staged, paths, strict=True)))
    return paths


def _replace_together(moves: list[tuple[Path, Path]]) -> None:
    """os.replace each (staged, target) pair; on a failure, undo the ones done (old content back, or
    the new file removed where there was none) and raise a DataError naming the target that failed.
    The old content is kept under a hard link (a copy where links are not supported) beside it."""
    import shutil

    done: list[tuple[Path, Path | None]] = []  # (target, backup of its old content or None)
    try:
        for staged, target in moves:
            backup = None
            if target.exists():
                backup = staged.with_name(staged.name + ".old")
                try:
                    os.link(target, backup)
                except OSError:
                    shutil.copy2(target, backup)
            try:
                os.replace(staged, target)
            except OSError as e:
                raise DataError(f"{target}: cannot be written ({e.strerror or e}); nothing was changed: check "
                                "the folder's permissions and free space") from e
            done.append((target, backup))
    except BaseException:
        for target, backup in reversed(done):
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)
        raise


def _encode(records: list[dict], path: Path) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)  # as utils.write_jsonl writes
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a profile or template (records are checked on read)
        raise DataError(f"{path}: cannot encode output as UTF-8 ({e.reason}: {text[e.start]!r}); "
                        "fix the \\u escape in the profiles or templates") from e


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _length_line(records: Sequence[dict]) -> str:
    lengths = sorted(len(_last_reply(r)) for r in records)
    return (f"n={len(lengths)} p50={percentile(lengths, 0.5)} p90={percentile(lengths, 0.9)} "
            f"max={lengths[-1] if lengths else 0}")


def _last_reply(record: dict) -> str:
    """A record's (last) answer: `output`, the last assistant message, or a dialogue test record's nothing."""
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record.get("output", "")


def find_overlap(train: Sequence[dict], test: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Test records whose question is also a train question: (same role, only under other roles)."""
    train_roles: dict[str, set[str]] = defaultdict(set)
    for r in train:
        if "input" in r:  # composed conversations reuse the single-turn records' questions
            train_roles[r["input"]].add(r["role"])
    same, other = [], []
    for r in test:
        roles = train_roles.get(r.get("input", ""))
        if roles:
            (same if r["role"] in roles else other).append(r)
    return same, other


def summarize(train: Sequence[dict], test: Sequence[dict], report: Report, paths: Sequence[Path],
              elapsed: float) -> str:
    lines = [f"note: {n}" for n in report.notes] + [f"warning: {w}" for w in report.warnings]
    lines += _count_lines(train, test)
    lines.append("output length (characters):")
    for split, records in (("train", train), ("test", test)):
        for source in sorted({r["source"] for r in records}):
            lines.append(f"  {split:5} {source:24} {_length_line([r for r in records if r['source'] == source])}")
    lines += _dropped_lines(report)
    lines += _overlap_lines(*find_overlap(train, test))
    lines.append(f"wrote {paths[0]} ({len(train)} records) and {paths[1]} ({len(test)} records) "
                 f"in {elapsed:.2f} s")
    return "\n".join(lines)


def _count_lines(train: Sequence[dict], test: Sequence[dict]) -> list[str]:
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in (*train, *test):
        counts[(r["source"], r["role"])][r["split"]] += 1
    lines = ["records per role:", f"  {'source':24} {'role':12} {'train':>7} {'test':>7}"]
    for (source, role), c in sorted(counts.items()):
        lines.append(f"  {source:24} {_pad(role, 12)} {c['train']:7} {c['test']:7}")
    lines.append(f"  {'total':24} {'':12} {len(train):7} {len(test):7}")
    return lines


def _pad(text: str, width: int) -> str:
    """Left-align in a terminal column: CJK characters take two cells."""
    cells = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - cells)


def _dropped_lines(report: Report) -> list[str]:
    dropped = {k: v for k, v in sorted(report.dropped.items()) if v}
    lines = ["dropped: " + (", ".join(f"{v} {k}" for k, v in dropped.items()) if dropped else "none")]
    if report.bad:
        lines.append(f"bad records skipped (--skip_bad): {len(report.bad)}")
        lines += [f"  {msg}" for msg in report.bad[:MAX_LISTED]]
        if len(report.bad) > MAX_LISTED:
            lines.append(f"  ... and {len(report.bad) - MAX_LISTED} more")
    return lines


def _overlap_lines(same: list[dict], other: list[dict]) -> list[str]:
    total = len(same) + len(other)
    lines = [f"test questions also in train: {total} ({len(same)} same role, {len(other)} only under other roles)"]
    for label, records in (("same role", same), ("other roles", other)):
        for r in records[:MAX_LISTED]:
            lines.append(f"  [{label}] {r['role']} ({r['source']}): {r['input'][:60]!r}")
        if len(records) > MAX_LISTED:
            lines.append(f"  [{label}] ... and {len(records) - MAX_LISTED} more")
    return lines


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _role_list(text: str) -> list[str]:
    roles = [r.strip() for r in re.split(r"[,，]", text) if r.strip()]
    if not roles:
        raise argparse.ArgumentTypeError("expected comma-separated role names")
    return sorted(set(roles), key=roles.index)


def _whole_number(text: str, minimum: int) -> int:
    # ArgumentTypeError, not ValueError: argparse then prints this text instead of "invalid
    # _positive_int value", the name of a function the user never sees
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description="Build data/train.json and data/test.json (JSON lines) from "
                                "RoleBench-zh and the character attribute table.")
    p.add_argument("--data_dir", default=utils.DATA_DIR,
                   help="folder with RoleBench-zh files, flat (rolebench-zh_general_train.jsonl ...) "
                        "or published (rolebench-zh/general/train.jsonl ...); a folder without them is an "
                        "error; '' for an attribute-only build; default %(default)s")
    p.add_argument("--profiles", default=None,
                   help="JSON object role -> description; default the profiles file of --data_dir "
                        f"(profiles-zh_desc.json or profiles-zh/desc.json), else {utils.PROFILES_PATH}")
    p.add_argument("--attributes", default=utils.ATTRIBUTES_PATH,
                   help="attribute table JSON, {\"attributes\": [...], \"characters\": {...}} or a flat "
                        "{name: {attribute: value}}; '' to leave attributes out; default %(default)s")
    p.add_argument("--templates", default=TEMPLATES_PATH,
                   help="attribute question/answer templates JSON; default %(default)s")
    p.add_argument("--roles", type=_role_list, default=None,
                   help="comma-separated RoleBench roles to keep; default every role with a profile")
    p.add_argument("--max_replies", type=_positive_int, default=2,
                   help="references kept per question in train; default %(default)s")
    p.add_argument("--strip_address", action="store_true",
                   help="drop the leading address (text up to the first '，') from role-specific questions")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the train shuffle and the answer templates; default %(default)s")
    p.add_argument("--templates_per_fact", type=_non_negative_int, default=TEMPLATES_PER_FACT,
                   help="train phrasings drawn per (character, attribute) from the train pool (0: all); "
                        "default %(default)s")
    p.add_argument("--dialogue_templates", default=utils.DIALOGUE_TEMPLATES_PATH,
                   help="follow-up questions for multi-turn attribute conversations; default %(default)s")
    p.add_argument("--dialogues_per_role", type=_non_negative_int, default=DIALOGUES_PER_ROLE,
                   help="multi-turn training conversations (2-5 rounds) composed per RoleBench role from its "
                        "records, in the `messages` form; a record used in one is not also kept alone (0: "
                        "none); default %(default)s")
    p.add_argument("--attribute_dialogues", type=_non_negative_int, default=ATTRIBUTE_DIALOGUES,
                   help="multi-turn attribute conversations for training, with follow-ups that name the "
                        "character only by context (0: none); default %(default)s")
    p.add_argument("--eval_dialogues", type=_non_negative_int, default=EVAL_DIALOGUES,
                   help="multi-turn test conversations per depth 1-5 (a fact asked at round k), the same number "
                        f"asking one fact twice, and {EVAL_ROLE_DIALOGUES} role conversations per role and depth "
                        "(0: none); default %(default)s")
    p.add_argument("--output_dir", default=str(Path(utils.TRAIN_PATH).parent),
                   help="where train.json and test.json go; default %(default)s")
    p.add_argument("--skip_bad", action="store_true", help="count and report bad records instead of failing")
    p.add_argument("--keep_custom", action="store_true",
                   help=f"rebuild from the shipped data, unless --output_dir's files were last built with other inputs "
                        f"or flags ({BUILD_RECORD} there says so): then keep them (how train.sh calls it)")
    return Options(**vars(p.parse_args(argv)))


BUILD_RECORD = ".data_helper_build.json"  # beside train.json: the options of the build that wrote it
NOT_INPUTS = {"output_dir", "keep_custom", "skip_bad"}  # options that do not change what is built


def build_options(opts: Options) -> dict[str, Any]:
    """The options that decide the files' content, and whether they are all the defaults (the shipped data)."""
    chosen = {k: v for k, v in vars(opts).items() if k not in NOT_INPUTS}
    return {"options": chosen, "shipped": chosen == cli_defaults()}


def cli_defaults() -> dict[str, Any]:
    """The command line's defaults (`python data_helper.py` with no flags: the shipped data)."""
    return {k: v for k, v in vars(parse_args([])).items() if k not in NOT_INPUTS}


def custom_build(output_dir: str | Path) -> dict[str, Any] | None:
    """The build record of `output_dir` when its files were built from other inputs or flags, else None
    (no record, an unreadable one, or a shipped-data build)."""
    try:
        record = json.loads((Path(output_dir) / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("shipped") is False else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed why
        return int(e.code or 0)
    start = time.perf_counter()
    custom = custom_build(opts.output_dir) if opts.keep_custom else None
    if custom is not None and all(f.is_file() for f in output_paths(opts.output_dir)):
        defaults = cli_defaults()
        changed = {k: v for k, v in custom["options"].items() if defaults.get(k) != v}
        print(f"data_helper: {opts.output_dir}/ holds a build of your own ({json.dumps(changed, ensure_ascii=False)}), "
              "kept; run `python data_helper.py` to go back to the shipped data")
        return 0
    try:
        train, test, report = build(opts)
        paths = write_outputs(opts.output_dir, train, test)
        utils.write_json(Path(opts.output_dir) / BUILD_RECORD, build_options(opts))
    except utils.UserError as e:  # bad data (DataError) or an output that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input or unwritable output: same one-line contract
        print(f"error: {e.filename or opts.output_dir}: {e.strerror or e}; check the path and its permissions",
              file=sys.stderr)
        return 2
    print(summarize(train, test, report, paths, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
