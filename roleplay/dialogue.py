"""Multi-turn conversations: composed for training from single-turn records, composed for evaluation
from test records, generated round by round, and scored.

- `compose_training_conversations`: data_helper.py turns a role's RoleBench records into 2-5 round
  conversations under the role's system prompt (each record in one conversation or alone), and
  attribute records into conversations about one to three characters in which a follow-up names the
  character only by context ("那她是哪国人？", from data/dialogue_templates.json). Records come out in
  the common `messages` form.
- `compose_eval_conversations`: the multi-turn test set: a fact asked at round k (1-5) after k-1 other
  fact rounds (sometimes as a follow-up), the same fact asked twice in one conversation (consistency),
  and role conversations of 1-5 rounds (out-of-character rate by depth). Only test phrasings are used
  (train ones for tools/dialogue_dev.py's dev set).
- `run_conversations`: predict.py generates every conversation round by round with the model's own
  earlier replies as the history, batching the same round of many conversations.
- `dialogue_metrics`, `reply_quality`: fact accuracy and out-of-character rate by depth, consistency;
  degenerate share (some 3-gram three or more times), distinct-2 and mean length of replies.

Everything is seeded, so a data build is reproducible.

Example:
    >>> from roleplay.dialogue import is_degenerate
    >>> is_degenerate("末将以为，末将以为，末将以为，")
    True
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from roleplay.attributes import template_key
from utils import DataError, read_json_object

ROUNDS = (2, 5)  # training conversations have this many rounds (inclusive)
EVAL_DEPTHS = (1, 2, 3, 4, 5)
ROLE_SOURCE, ATTRIBUTE_SOURCE = "role_dialogue", "attribute_dialogue"  # training records' "source"
EVAL_SOURCE = "dialogue"  # evaluation conversations' "source"
FOLLOW_UP_SHARE = 0.5  # how often a next round stays with the same character, asked by context


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
def load_dialogue_templates(path: str) -> dict[str, Any]:
    """The follow-up templates file, checked: every attribute has train and test phrasings, and no
    test phrasing is a train phrasing up to punctuation and sentence-final particles."""
    hint = "see data/dialogue_templates.json for the layout"
    t = read_json_object(path, "dialogue templates", hint)
    follow_ups, pronouns = t.get("follow_ups"), t.get("pronouns")
    if not isinstance(follow_ups, dict) or not isinstance(pronouns, dict) or not isinstance(
            t.get("pronoun_attribute"), str):
        raise DataError(f"{path}: needs 'follow_ups', 'pronouns' and 'pronoun_attribute'; {hint}")
    for attr, sets in follow_ups.items():
        if not isinstance(sets, dict) or not all(
                isinstance(sets.get(s), list) and sets[s] and all(isinstance(q, str) and q.strip() for q in sets[s])
                for s in ("train", "test")):
            raise DataError(f"{path}: follow_ups.{attr} needs non-empty 'train' and 'test' lists of strings; {hint}")
        train = {template_key(q) for q in sets["train"]}
        for q in sets["test"]:
            if template_key(q) in train:
                raise DataError(f"{path}: follow_ups.{attr} test phrasing {q!r} is also a train phrasing up to "
                                "punctuation/particles; reword one of them")
    return t


def _pronoun(templates: dict[str, Any], facts: dict[str, str]) -> str:
    value = facts.get(templates["pronoun_attribute"], "")
    for key, pronoun in templates["pronouns"].items():
        if key in value:
            return pronoun
    return templates.get("fallback_pronoun", "ta")


def _follow_up(templates: dict[str, Any], attribute: str, facts: dict[str, str], split: str,
               rng: random.Random) -> str | None:
    phrasings = templates["follow_ups"].get(attribute, {}).get(split)
    if not phrasings:
        return None
    return rng.choice(phrasings).replace("{ref}", _pronoun(templates, facts))


def character_facts(records: Sequence[dict]) -> dict[str, dict[str, str]]:
    """{character: {attribute: fact}} from attribute records."""
    facts: dict[str, dict[str, str]] = defaultdict(dict)
    for r in records:
        if r.get("source") == "attribute":
            facts[r["role"]][r["attribute"]] = r["fact"]
    return dict(facts)


# ---------------------------------------------------------------------------------------------
# Training conversations
# ---------------------------------------------------------------------------------------------
def compose_training_conversations(records: Sequence[dict], templates: dict[str, Any], seed: int,
                                   per_role: int, attribute_conversations: int) -> list[dict]:
    """The training records with up to `per_role` role conversations per RoleBench role and
    `attribute_conversations` attribute conversations added, each of ROUNDS rounds.

    A role conversation is made of that role's single-turn records, drawn in seeded passes over
    them (`_passes`), and a record used in a conversation leaves the single-turn set: the role's
    long system prompt (~60% of a single-turn role record's tokens) is computed once per
    conversation instead of once per reply, so the same compute trains more replies. With enough
    conversations every record is in one (or two), and none is left alone. Attribute conversations are added next to the
    single-turn attribute records (they have no system prompt to share)."""
    rng = random.Random(seed)
    out = []
    by_role: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if str(r.get("source", "")).startswith("rolebench"):
            by_role[r["role"]].append(r)
    consumed: set[int] = set()
    for role in sorted(by_role):
        pool = by_role[role]
        draws = _passes(pool, rng)
        for _ in range(per_role if len(pool) >= ROUNDS[0] else 0):
            n, picked = min(len(pool), rng.randint(*ROUNDS)), []
            for r in draws:
                if all(r is not p for p in picked):  # at a pass boundary a record could come twice
                    picked.append(r)
                if len(picked) == n:
                    break
            consumed.update(id(r) for r in picked)
            out.append(_messages_record(picked[0]["instruction"], [(r["input"], r["output"]) for r in picked],
                                        role, ROLE_SOURCE))
    out = [r for r in records if id(r) not in consumed] + out
    attribute_records = [r for r in records if r.get("source") == "attribute"]
    if attribute_records:
        facts = character_facts(attribute_records)
        by_character: dict[str, list[dict]] = defaultdict(list)
        for r in attribute_records:
            by_character[r["role"]].append(r)
        for _ in range(attribute_conversations):
            rounds = _attribute_rounds(by_character, facts, templates, rng.randint(*ROUNDS), "train", rng)
            out.append(_messages_record("", [(q, r["output"]) for q, r in rounds],
                                        rounds[-1][1]["role"], ATTRIBUTE_SOURCE))
    return out


def _passes(records: Sequence[dict], rng: random.Random) -> Iterator[dict]:
    """The records in one seeded shuffle after another, without end: a record joins a second
    conversation only once every record of the role has joined one."""
    while True:
        order = list(records)
        rng.shuffle(order)
        yield from order


def _messages_record(system: str, pairs: Sequence[tuple[str, str]], role: str, source: str) -> dict:
    messages = [{"role": "system", "content": system}]
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "role": role, "source": source, "rounds": len(pairs), "split": "train"}


def _attribute_rounds(by_character: dict[str, list[dict]], facts: dict[str, dict[str, str]],
                      templates: dict[str, Any], n: int, split: str,
                      rng: random.Random) -> list[tuple[str, dict]]:
    """`n` (question, record) rounds: each next round either asks the same character another
    attribute by context (a follow-up) or moves to another character, asked by name."""
    characters = sorted(by_character)
    rounds: list[tuple[str, dict]] = []
    for _ in range(n):
        previous = rounds[-1][1] if rounds else None
        if previous is not None and rng.random() < FOLLOW_UP_SHARE:
            asked = {r["attribute"] for q, r in rounds if r["role"] == previous["role"]}
            options = [r for r in by_character[previous["role"]] if r["attribute"] not in asked]
            if options:
                record = rng.choice(options)
                question = _follow_up(templates, record["attribute"], facts[record["role"]], split, rng)
                if question:
                    rounds.append((question, record))
                    continue
        record = rng.choice(by_character[rng.choice(characters)])
        rounds.append((record["input"], record))
    return rounds


# ---------------------------------------------------------------------------------------------
# Evaluation conversations
# ---------------------------------------------------------------------------------------------
def compose_eval_conversations(test_records: Sequence[dict], templates: dict[str, Any], seed: int,
                               per_depth: int, role_per_depth: int, split: str = "test") -> list[dict]:
    """The multi-turn test set from the single-turn test records (test follow-ups):
    `per_depth` fact conversations per depth k (the target fact at round k), `per_depth`
    consistency conversations (one fact asked twice), and `role_per_depth` role conversations per
    RoleBench role and depth. `split="train"` takes the train follow-ups instead: a dev set built
    from training records (tools/dialogue_dev.py)."""
    rng = random.Random(seed)
    attribute_records = [r for r in test_records if r.get("source") == "attribute"]
    out: list[dict] = []
    if attribute_records:
        facts = character_facts(attribute_records)
        by_character: dict[str, list[dict]] = defaultdict(list)
        for r in attribute_records:
            by_character[r["role"]].append(r)
        for depth in EVAL_DEPTHS:
            for _ in range(per_depth):
                rounds = _attribute_rounds(by_character, facts, templates, depth, split, rng)
                out.append(_eval_record("fact", "", [_fact_turn(q, r) for q, r in rounds], rounds[-1][1]["role"]))
        for _ in range(per_depth):
            out.append(_consistency_record(by_character, facts, templates, rng, split))
    by_role: dict[str, list[dict]] = defaultdict(list)
    for r in test_records:
        if str(r.get("source", "")).startswith("rolebench"):
            by_role[r["role"]].append(r)
    for role in sorted(by_role):
        for depth in EVAL_DEPTHS:
            for _ in range(role_per_depth if len(by_role[role]) >= depth else 0):
                picked = rng.sample(by_role[role], depth)
                turns = [{"user": r["input"], "references": r.get("references") or [r["output"]]} for r in picked]
                out.append(_eval_record("role", picked[0]["instruction"], turns, role))
    return out


def _fact_turn(question: str, record: dict) -> dict:
    return {"user": question, "name": record["role"], "attribute": record["attribute"], "fact": record["fact"]}


def _eval_record(kind: str, system: str, turns: list[dict], role: str) -> dict:
    return {"source": EVAL_SOURCE, "kind": kind, "role": role, "instruction": system, "turns": turns,
            "depth": len(turns), "split": "test"}


def _consistency_record(by_character: dict[str, list[dict]], facts: dict[str, dict[str, str]],
                        templates: dict[str, Any], rng: random.Random, split: str) -> dict:
    """A fact asked by name, one or two other rounds, then the same fact asked again (another
    phrasing, by name)."""
    name = rng.choice(sorted(by_character))
    first = rng.choice(by_character[name])
    again = [r for r in by_character[name] if r["attribute"] == first["attribute"] and r["input"] != first["input"]]
    second = rng.choice(again or [first])
    middle = _attribute_rounds({k: v for k, v in by_character.items() if k != name} or by_character, facts,
                               templates, rng.randint(1, 2), split, rng)
    turns = [_fact_turn(first["input"], first), *(_fact_turn(q, r) for q, r in middle),
             _fact_turn(second["input"], second)]
    return _eval_record("consistency", "", turns, name)


# ---------------------------------------------------------------------------------------------
# Generation, round by round
# ---------------------------------------------------------------------------------------------
def run_conversations(generate: Callable[[list[list[dict[str, str]]]], list[str]],
                      conversations: Sequence[dict]) -> list[list[str]]:
    """Each conversation's replies, one per turn. Round r of every conversation that has one is
    generated in one call of `generate` (a list of message lists -> replies), with the model's own
    replies of earlier rounds as the history."""
    histories = [[{"role": "system", "content": c.get("instruction", "")}] for c in conversations]
    replies: list[list[str]] = [[] for _ in conversations]
    for r in range(max((len(c["turns"]) for c in conversations), default=0)):
        active = [i for i, c in enumerate(conversations) if r < len(c["turns"])]
        for i in active:
            histories[i].append({"role": "user", "content": conversations[i]["turns"][r]["user"]})
        for i, reply in zip(active, generate([histories[i] for i in active]), strict=True):
            histories[i].append({"role": "assistant", "content": reply})
            replies[i].append(reply)
    return replies


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def is_degenerate(reply: str, n: int = 3, times: int = 3) -> bool:
    """Some character n-gram (punctuation and spaces ignored) occurs `times` or more times."""
    text = "".join(ch for ch in reply if ch.isalnum())
    counts: dict[str, int] = defaultdict(int)
    for i in range(len(text) - n + 1):
        counts[text[i:i + n]] += 1
        if counts[text[i:i + n]] >= times:
            return True
    return False


def distinct_n(replies: Sequence[str], n: int = 2) -> float | None:
    """Distinct character n-grams over all n-grams of `replies` (higher: more varied)."""
    grams = [r[i:i + n] for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def reply_quality(replies: Sequence[str]) -> dict[str, Any]:
    """Degenerate share, distinct-2 and mean length (characters) of role replies."""
    n = len(replies)
    degenerate = sum(is_degenerate(r) for r in replies)
    return {"n": n, "degenerate_rate": degenerate / n if n else None, "degenerate": degenerate,
            "distinct_2": distinct_n(replies), "mean_chars": sum(map(len, replies)) / n if n else None}


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    return {"rate": sum(flags) / len(flags) if flags else None, "hits": sum(flags), "n": len(flags)}


def dialogue_metrics(conversations: Sequence[dict], replies: Sequence[Sequence[str]],
                     fact_matches: Callable[[dict, str], bool],
                     out_of_character: Callable[[str, str], str | None]) -> dict[str, Any]:
    """Fact accuracy by depth (the last round of fact conversations), out-of-character rate by depth
    (every round of role conversations), consistency (the repeated fact: both replies right, or both
    the same text), and the reply quality of the role rounds."""
    fact_by_depth: dict[int, list[bool]] = defaultdict(list)
    ooc_by_depth: dict[int, list[bool]] = defaultdict(list)
    consistent: list[bool] = []
    role_replies: list[str] = []
    for convo, said in zip(conversations, replies, strict=True):
        turns = convo["turns"]
        if convo["kind"] == "fact":
            fact_by_depth[len(turns)].append(fact_matches(turns[-1], said[-1]))
        elif convo["kind"] == "consistency":
            a, b = (fact_matches(turns[0], said[0]), fact_matches(turns[-1], said[-1]))
            consistent.append((a and b) or said[0].strip() == said[-1].strip())
        else:
            for depth, reply in enumerate(said, 1):
                ooc_by_depth[depth].append(out_of_character(reply, convo["role"]) is not None)
                role_replies.append(reply)
    return {
        "fact_accuracy_by_depth": {str(k): _accuracy(v) for k, v in sorted(fact_by_depth.items())},
        "out_of_character_by_depth": {str(k): _rate(v) for k, v in sorted(ooc_by_depth.items())},
        "consistency": _rate(consistent),
        "role_reply_quality": reply_quality(role_replies),
        "conversations": len(conversations),
    }


def _accuracy(hits: Sequence[bool]) -> dict[str, Any]:
    return {"accuracy": sum(hits) / len(hits) if hits else None, "correct": sum(hits), "n": len(hits)}


def check_eval_record(record: dict, where: str) -> None:
    """DataError unless `record` is a well-formed evaluation conversation (see `_eval_record`)."""
    turns = record.get("turns")
    if record.get("kind") not in ("fact", "consistency", "role") or not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: a dialogue record needs 'kind' (fact/consistency/role) and a non-empty 'turns' "
                        "list; build it with data_helper.py")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not t["user"].strip():
            raise DataError(f"{where}: turn {i} needs a non-empty 'user' string")
        if record["kind"] != "role" and not all(isinstance(t.get(k), str) and t[k] for k in ("attribute", "fact")):
            raise DataError(f"{where}: turn {i} of a {record['kind']} conversation needs 'attribute' and 'fact'")
    if not isinstance(record.get("instruction", ""), str) or not isinstance(record.get("role"), str):
        raise DataError(f"{where}: a dialogue record needs 'role' and 'instruction' strings")
