r"""Talk to a fine-tuned role-play model, or score it on the test set.

Interactive (asks for a role from the profiles file, then chats with history):
    python predict.py --model_path output/merged --desc_path data/profiles-zh_desc.json
    python predict.py --model_path output/qlora/epoch-1-step-100          # base + adapter
    python predict.py --model_path Baichuan2-7B-Chat --adapter_dir output/qlora/epoch-1-step-100 --role 孙悟空
    python predict.py --model_path output/tiny-baichuan2-chat \
        --adapter 孙悟空=output/tiny-qlora-roles/孙悟空/epoch-3-step-N \
        --adapter 赵子龙=output/tiny-qlora-roles/赵子龙/epoch-3-step-N
  With --adapter ROLE=PATH (repeatable) one base holds one adapter per role: each role talks with its own
  adapter; roles without one use the shared --adapter_dir when given, else the base (the start says which).
  Commands: /reset (clear history), /role NAME (switch role, clears history), /roles (list roles),
  /quit; Ctrl-D (EOF) quits. Works with piped stdin, e.g. `printf '1\n你好\n' | python predict.py ...`.

Batch (one reply per test record, greedy by default, then metrics):
    python predict.py --model_path output/merged --test_path data/test.json --output_path output/preds.jsonl \
        --batch_size 8 --limit 200
  Writes every input record plus a `prediction` field to --output_path and the metrics to
  `<output_path without suffix>.metrics.json` (e.g. output/preds.metrics.json), and prints them:
  - ROUGE-L F1 (jieba words, LCS-based, best over a record's `references`, else its `output`) per
    role and overall, over RoleBench records (source "rolebench...");
  - exact-fact accuracy (the gold `fact` occurs in the reply) per attribute, per template_set and
    overall, over attribute records (source "attribute");
  - out-of-character rate over RoleBench records: replies that claim to be an AI / language model /
    assistant, or call themselves by another role's name ("我是李白" from 孙悟空);
  - fact-answer leak rate over RoleBench records: replies that reuse the attribute answers' wording
    ("…的身份是…") or name an attribute character other than the role (when the file has both);
  - reply quality of RoleBench replies: degenerate share (some 3-gram three or more times), distinct-2,
    mean length;
  - multi-turn (records with source "dialogue", from data_helper.py): each conversation is generated
    round by round with the model's own replies as history; fact accuracy by depth (a fact asked at
    round k after k-1 other rounds), out-of-character rate by depth, consistency (one fact asked twice);
  - generated tokens per second.
The headline rates (overall fact accuracy, out-of-character, leak and degenerate shares, accuracy by
depth, consistency) are printed with their counts and a 95% Wilson score interval: 25 of 32
conversations is 61–89%, 15 of 105 replies 9–22%, so two runs a few points apart do not differ.
Record prompts are built exactly as training built them: system = record["instruction"] (kept
even when empty, as train.py keeps it), user = record["input"], through utils.build_prompt_ids.
With --adapter ROLE=PATH each record (and conversation) runs with the adapter of its `role` (roles
without one: the shared --adapter_dir, else the base; the counts are printed). Each adapter's records
run as their own batches: on CPU that is faster than batches mixing adapters per row (bench/adapters.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import utils
from roleplay import adapters, dialogue, generation, loading
from utils import DataError, UserError

RESET_CMD, ROLE_CMD, ROLES_CMD, QUIT_CMDS = "/reset", "/role", "/roles", ("/quit", "/exit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_path", default=utils.DEFAULT_BASE_DIR,
                   help="model folder (base or merged), or a train.py LoRA checkpoint (its base is read "
                        "from run_config.json)")
    g.add_argument("--adapter_dir", default=None,
                   help="LoRA checkpoint to apply on top of --model_path (with --adapter: for roles without their own)")
    g.add_argument("--adapter", action="append", default=[], metavar="ROLE=PATH",
                   help="a role's own LoRA checkpoint on the same base (repeatable: one base, one adapter per role)")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute dtype (auto: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--load_in_4bit", action="store_true", help="load the base NF4-quantized (as QLoRA trained it)")
    g = p.add_argument_group("generation (defaults: the model's generation_config.json)")
    g.add_argument("--max_new_tokens", type=int, default=None, help="longest reply in tokens")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    g.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold")
    g.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--repetition_penalty", type=float, default=None, help="penalty for repeated tokens (1 = none)")
    g.add_argument("--frequency_penalty", type=float, default=None,
                   help="logit minus this x the times a token is already in the reply (0 = none; the prompt "
                        "does not count; generation_config.json's reply_frequency_penalty)")
    g.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: off in batch mode, the model's "
                        "setting interactively)")
    g.add_argument("--seed", type=int, default=1234, help="seed for sampling")
    g = p.add_argument_group("interactive mode")
    g.add_argument("--desc_path", default=None,
                   help=f"profiles JSON (role -> description); default {utils.PROFILES_PATH}. In batch mode "
                        "it is optional and only adds role names for the out-of-character check")
    g.add_argument("--role", default=None, help="start with this role instead of asking")
    g = p.add_argument_group("batch mode")
    g.add_argument("--test_path", default=None, help="test records (JSON lines from data_helper.py)")
    g.add_argument("--output_path", default=None, help="predictions (JSON lines); required with --test_path")
    g.add_argument("--batch_size", type=int, default=8, help="prompts generated together (left padding)")
    g.add_argument("--limit", type=int, default=None, help="only the first N test records")
    g.add_argument("--baseline_metrics", default=None,
                   help="metrics JSON of another model (e.g. the untuned base) to print side by side")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# ROUGE-L with jieba words
# ---------------------------------------------------------------------------------------------
def segment(text: str) -> list[str]:
    """jieba words of `text` (lower-cased; whitespace dropped, punctuation kept as words)."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text.lower()) if w.strip()]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (bit-parallel, O(len(a) * len(b) / word size))."""
    if not a or not b:
        return 0
    masks: dict[Any, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_f1(prediction: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """ROUGE-L F1 of two texts (or word lists): 2PR/(P+R) with P = LCS/|pred|, R = LCS/|ref|; 0 if either is empty."""
    pred = segment(prediction) if isinstance(prediction, str) else list(prediction)
    ref = segment(reference) if isinstance(reference, str) else list(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max ROUGE-L F1 over the references."""
    pred = segment(prediction)
    return max((rouge_l_f1(pred, segment(r)) for r in references), default=0.0)


# ---------------------------------------------------------------------------------------------
# Out-of-character detection
# ---------------------------------------------------------------------------------------------
_AI_WORDS = (r"人工智能|语言模型|大模型|机器人|助手|虚拟角色"
             r"|(?<![a-z])(?:ai|assistant|chatbot|language model|artificial intelligence)(?![a-z])")
_NO_BREAK = r"[^，。！？、；：,.!?;:\n]"
AI_PATTERNS: tuple[re.Pattern, ...] = (
    # identity phrases that are out of character wherever they occur
    re.compile(r"(?<![a-z])ai\s*(助手|模型|语言模型|机器人)|人工智能(助手|模型|语言模型)|智能助手|虚拟助手"
               r"|chatgpt|openai|百川大模型|百川智能|as an ai(?![a-z])", re.IGNORECASE),
    # self-claims: 我是(一个)…AI / 作为一个…助手 / I am an AI …
    re.compile(rf"(我|本人)(只|仅|仅仅|其实|不过)?(是|乃){_NO_BREAK}{{0,8}}?({_AI_WORDS})", re.IGNORECASE),
    re.compile(rf"作为(一个|一名|一款|一位)?{_NO_BREAK}{{0,6}}?({_AI_WORDS})", re.IGNORECASE),
    re.compile(r"\b(i am|i'm|as)\s+(an?|your|the)?\s*(ai|assistant|chatbot|artificial intelligence)\b", re.IGNORECASE),
)
_SELF_NAME = r"(?:我|俺|吾|本人|老子|在下|老夫|朕|本宫|本王|洒家)(?:就|便|正|乃|即)?(?:是|乃|叫|名叫|叫做)\s*"


def out_of_character(reply: str, role: str, roles: Iterable[str]) -> str | None:
    """Why `reply` (spoken as `role`) breaks character, or None: a claim to be an AI / language model /
    assistant, or calling itself by another role's name ("我是李白" when playing 孙悟空)."""
    for pattern in AI_PATTERNS:
        m = pattern.search(reply)
        if m:
            return f"claims to be an AI: {m.group(0)!r}"
    for other in roles:
        if not other or other in role or role in other:
            continue
        m = re.search(_SELF_NAME + re.escape(other) + r"(?!的)", reply) or \
            re.search(r"\b(?:i am|i'm|my name is)\s+" + re.escape(other), reply, re.IGNORECASE)
        if m:
            return f"calls itself another role: {m.group(0)!r}"
    return None


def fact_answer_phrases(records: Iterable[dict]) -> tuple[set[str], set[str]]:
    """(answer phrases, character names) of the attribute records: the phrases are the answers'
    wording around the name and the fact ("的性别是", "的身份是"…; 3+ characters), so a role reply
    that reuses them is answering a fact question nobody asked."""
    phrases, names = set(), set()
    for r in records:
        if not is_attribute(r) or not isinstance(r.get("output"), str):
            continue
        names.add(str(r.get("role", "")))
        pieces = [r["output"]]
        for cut in (str(r.get("role", "")), r["fact"]):
            pieces = [part for piece in pieces for part in (piece.split(cut) if cut else [piece])]
        phrases |= {w for w in (re.sub(r"[\W_]+", "", piece) for piece in pieces) if len(w) >= 3}
    return phrases, names - {""}


def leaks_fact_answer(reply: str, role: str, phrases: set[str], names: set[str]) -> str | None:
    """Why a role reply looks like a stray attribute answer, or None: it uses an answer phrase, or
    names an attribute character other than the role. A one-character name counts only as a word of
    its own (jieba): 琴 is also the violin of "拉琴" and "小提琴", which 爱因斯坦 plays."""
    for phrase in sorted(phrases):
        if phrase in reply:
            return f"answer phrase {phrase!r}"
    words: set[str] | None = None
    for name in sorted(names, key=len, reverse=True):
        if name in role or role in name or name not in reply:
            continue
        if len(name) == 1:
            words = set(segment(reply)) if words is None else words
            if name.lower() not in words:
                continue
        return f"names {name!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Test records and metrics
# ---------------------------------------------------------------------------------------------
def is_rolebench(record: dict) -> bool:
    return str(record.get("source", "")).startswith("rolebench")


def is_attribute(record: dict) -> bool:
    return record.get("source") == "attribute"


def is_dialogue(record: dict) -> bool:
    """A multi-turn test conversation (roleplay/dialogue.py), scored round by round."""
    return record.get("source") == dialogue.EVAL_SOURCE


def load_test_records(path: str, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of the test file, validated; DataError names file:line."""
    out = []
    for lineno, record in utils.read_jsonl(path):
        where = f"{path}:{lineno}"
        if is_dialogue(record):
            dialogue.check_eval_record(record, where)
            out.append((lineno, record))
            if limit is not None and len(out) >= limit:
                break
            continue
        for key in ("instruction", "input"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: field {key!r} missing or not a string; test records need "
                                "instruction/input strings (build them with data_helper.py)")
        if not record["input"].strip():
            raise DataError(f"{where}: empty 'input'")
        refs = record.get("references")
        if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
            raise DataError(f"{where}: 'references' must be a list of strings")
        if is_rolebench(record) and not refs and not isinstance(record.get("output"), str):
            raise DataError(f"{where}: RoleBench record without 'references' or 'output' to score against")
        if is_attribute(record):
            for key in ("fact", "attribute", "template_set"):
                if not isinstance(record.get(key), str) or not record[key]:
                    raise DataError(f"{where}: attribute record without a {key!r} string")
        out.append((lineno, record))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no test records")
    return out


def _mean_block(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values) if values else None, "n": len(values)}


def _accuracy_block(hits: list[bool]) -> dict[str, Any]:
    return {"accuracy": sum(hits) / len(hits) if hits else None, "correct": sum(hits), "n": len(hits)}


IDENTITY_ATTRIBUTE = "身份"
IDENTITY_SEP = "，"


def fact_matches(record: dict, reply: str) -> bool:
    """Whether a reply states an attribute record's fact: the fact occurs in it. An identity that
    joins several titles with "，" ("往生堂客卿，岩神") is also right when the reply names any one of
    them: each title alone identifies the character."""
    fact = record["fact"]
    if fact in reply:
        return True
    if record.get("attribute") != IDENTITY_ATTRIBUTE:
        return False
    return any(part in reply for part in (p.strip() for p in fact.split(IDENTITY_SEP)) if part)


def compute_metrics(records: Sequence[dict], predictions: Sequence[str], roles: Iterable[str],
                    stats: dict | None = None, max_examples: int = 10) -> dict[str, Any]:
    """All batch metrics for `records` and their `predictions` (same order)."""
    roles = sorted(set(roles) | {r["role"] for r in records if isinstance(r.get("role"), str)})
    rouge: dict[str, list[float]] = defaultdict(list)
    rouge_source: dict[str, list[float]] = defaultdict(list)
    ooc: dict[str, list[bool]] = defaultdict(list)
    leaks: list[bool] = []
    leak_examples = []
    phrases, fact_names = fact_answer_phrases(records)
    examples = []
    attr: dict[str, list[bool]] = defaultdict(list)
    tset: dict[str, list[bool]] = defaultdict(list)
    for record, pred in zip(records, predictions, strict=True):
        role = str(record.get("role", "?"))
        if is_rolebench(record):
            refs = record.get("references") or [record["output"]]
            score = best_rouge_l(pred, refs)
            rouge[role].append(score)
            rouge_source[record["source"]].append(score)
            reason = out_of_character(pred, role, roles)
            ooc[role].append(reason is not None)
            if reason and len(examples) < max_examples:
                examples.append({"role": role, "input": record["input"], "prediction": pred, "reason": reason})
            leak = leaks_fact_answer(pred, role, phrases, fact_names)
            leaks.append(leak is not None)
            if leak and len(leak_examples) < max_examples:
                leak_examples.append({"role": role, "input": record["input"], "prediction": pred, "reason": leak})
        elif is_attribute(record):
            hit = fact_matches(record, pred)
            attr[record["attribute"]].append(hit)
            tset[record["template_set"]].append(hit)
    role_replies = [p for r, p in zip(records, predictions, strict=True) if is_rolebench(r)]
    all_rouge = [v for vs in rouge.values() for v in vs]
    all_ooc = [v for vs in ooc.values() for v in vs]
    all_attr = [v for vs in attr.values() for v in vs]
    metrics: dict[str, Any] = {
        "records": len(records),
        "rouge_l": {"overall": _mean_block(all_rouge)["mean"], "n": len(all_rouge),
                    "per_role": {k: _mean_block(v) for k, v in sorted(rouge.items())},
                    "per_source": {k: _mean_block(v) for k, v in sorted(rouge_source.items())}},
        "attribute_accuracy": {"overall": _accuracy_block(all_attr),
                               "per_attribute": {k: _accuracy_block(v) for k, v in sorted(attr.items())},
                               "per_template_set": {k: _accuracy_block(v) for k, v in sorted(tset.items())}},
        "out_of_character": {"rate": sum(all_ooc) / len(all_ooc) if all_ooc else None, "flagged": sum(all_ooc),
                             "n": len(all_ooc),
                             "per_role": {k: {"rate": sum(v) / len(v), "flagged": sum(v), "n": len(v)}
                                          for k, v in sorted(ooc.items())},
                             "examples": examples},
        "fact_answer_leak": {"rate": sum(leaks) / len(leaks) if leaks and phrases | fact_names else None,
                             "flagged": sum(leaks), "n": len(leaks), "examples": leak_examples},
        "role_reply_quality": dialogue.reply_quality(role_replies),
    }
    if stats is not None:
        seconds = stats.get("seconds", 0.0)
        tokens = stats.get("generated_tokens", 0)
        metrics["generation"] = {"generated_tokens": tokens, "prompt_tokens": stats.get("prompt_tokens", 0),
                                 "seconds": round(seconds, 3),
                                 "tokens_per_s": tokens / seconds if seconds > 0 else None}
    return metrics


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a rate of `hits` in `n` (z = 1.96: 95%); None for n = 0. Unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or n hits, which matters here:
    most rates are near 0% or 100% and n is small."""
    if n <= 0:
        return None
    p, z2 = hits / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * ((p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5) / (1 + z2 / n)
    # at 0 or n hits a bound is exactly 0 or 1; the closed form only gets there within rounding
    return (0.0 if hits == 0 else center - half), (1.0 if hits == n else center + half)


def counted(hits: int, n: int) -> str:
    """'(hits/n, 95% CI lo–hi%)' for a printed rate."""
    ci = wilson_interval(hits, n)
    return f"({hits}/{n})" if ci is None else f"({hits}/{n}, 95% CI {ci[0]:.1%}–{ci[1]:.1%})"


def format_metrics(m: dict[str, Any]) -> str:
    def num(x: float | None, fmt: str = ".4f") -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = [f"records: {m['records']}"]
    r = m["rouge_l"]
    lines.append(f"ROUGE-L F1 (RoleBench, jieba words): overall {num(r['overall'])} (n={r['n']})")
    lines += [f"  {k}: {num(v['mean'])} (n={v['n']})" for k, v in r["per_role"].items()]
    a = m["attribute_accuracy"]
    lines.append(f"attribute exact-fact accuracy: overall {num(a['overall']['accuracy'], '.2%')} "
                 f"{counted(a['overall']['correct'], a['overall']['n'])}")
    for group in ("per_template_set", "per_attribute"):
        lines += [f"  {group[4:]} {k}: {num(v['accuracy'], '.2%')} ({v['correct']}/{v['n']})"
                  for k, v in a[group].items()]
    o = m["out_of_character"]
    lines.append(f"out-of-character rate (RoleBench): {num(o['rate'], '.2%')} {counted(o['flagged'], o['n'])}")
    lines += [f"  e.g. [{e['role']}] {e['reason']}" for e in o["examples"][:3]]
    leak = m.get("fact_answer_leak")
    if leak and leak["rate"] is not None:
        lines.append(f"fact-answer leak rate (RoleBench replies that answer an attribute question nobody asked): "
                     f"{num(leak['rate'], '.2%')} {counted(leak['flagged'], leak['n'])}")
        lines += [f"  e.g. [{e['role']}] {e['reason']}: {e['prediction'][:40]!r}" for e in leak["examples"][:3]]
    q = m.get("role_reply_quality")
    if q and q["n"]:
        lines.append(f"role replies: degenerate {num(q['degenerate_rate'], '.2%')} {counted(q['degenerate'], q['n'])}, "
                     f"distinct-2 {num(q['distinct_2'])}, mean length {num(q['mean_chars'], '.1f')} characters")
    lines += _multi_turn_lines(m.get("multi_turn"), num)
    if "generation" in m:
        g = m["generation"]
        lines.append(f"generation: {g['generated_tokens']} tokens in {g['seconds']:.1f}s = "
                     f"{num(g['tokens_per_s'], '.1f')} tokens/s")
    return "\n".join(lines)


def _multi_turn_lines(mt: dict[str, Any] | None, num: Any) -> list[str]:
    if not mt:
        return []
    lines = [f"multi-turn ({mt['conversations']} conversations, the model's own replies as history):"]
    lines += [f"  fact accuracy at round {k}: {num(v['accuracy'], '.2%')} {counted(v['correct'], v['n'])}"
              for k, v in mt["fact_accuracy_by_depth"].items()]
    lines += [f"  out-of-character rate at round {k}: {num(v['rate'], '.2%')} ({v['hits']}/{v['n']})"
              for k, v in mt["out_of_character_by_depth"].items()]
    c = mt["consistency"]
    lines.append(f"  consistency (one fact asked twice): {num(c['rate'], '.2%')} {counted(c['hits'], c['n'])}")
    q = mt["role_reply_quality"]
    if q["n"]:
        lines.append(f"  role replies: degenerate {num(q['degenerate_rate'], '.2%')}, distinct-2 "
                     f"{num(q['distinct_2'])}, mean length {num(q['mean_chars'], '.1f')}")
    return lines


def headline(m: dict[str, Any]) -> dict[str, float | None]:
    """The figures a comparison shows: fact accuracy per template set, ROUGE-L per role, OOC and leak rates."""
    a = m["attribute_accuracy"]
    rows = {"fact accuracy (all attribute tests)": a["overall"]["accuracy"]}
    rows |= {f"fact accuracy ({k} phrasings)": v["accuracy"] for k, v in a["per_template_set"].items()}
    rows["ROUGE-L (all roles)"] = m["rouge_l"]["overall"]
    rows |= {f"ROUGE-L {k}": v["mean"] for k, v in m["rouge_l"]["per_role"].items()}
    rows["out-of-character rate"] = m["out_of_character"]["rate"]
    if m.get("fact_answer_leak", {}).get("rate") is not None:
        rows["fact-answer leak rate"] = m["fact_answer_leak"]["rate"]
    q = m.get("role_reply_quality")
    if q and q["n"]:
        rows["degenerate role-reply rate"] = q["degenerate_rate"]
        rows["distinct-2 of role replies"] = q["distinct_2"]
    mt = m.get("multi_turn")
    if mt:
        rows |= {f"fact accuracy at round {k}": v["accuracy"] for k, v in mt["fact_accuracy_by_depth"].items()}
        ooc = [v for v in mt["out_of_character_by_depth"].values() if v["n"]]
        if ooc:
            rows["out-of-character rate, worst round"] = max(v["rate"] for v in ooc)
        rows["consistency rate"] = mt["consistency"]["rate"]
    if m.get("generation"):
        rows["generated tokens/s"] = m["generation"]["tokens_per_s"]
    return rows


def format_comparison(baseline: dict[str, Any], current: dict[str, Any]) -> str:
    """A two-column table: the baseline's figures beside this model's."""
    base, cur = headline(baseline), headline(current)
    lines = [f"{'metric':<40} {'baseline':>10} {'this model':>11}"]
    for key in cur:
        b, c = base.get(key), cur[key]
        fmt = ".1f" if "tokens/s" in key else ".2%" if "accuracy" in key or "rate" in key else ".4f"
        b_text = "n/a" if b is None else format(b, fmt)
        c_text = "n/a" if c is None else format(c, fmt)
        lines.append(f"{key:<40} {b_text:>10} {c_text:>11}")
    return "\n".join(lines)


def metrics_path_for(output_path: str) -> Path:
    return Path(output_path).with_suffix(".metrics.json")


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------
def generation_overrides(args: argparse.Namespace, batch: bool) -> dict[str, Any]:
    do_sample = args.do_sample
    if do_sample is None and batch:
        do_sample = False
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "do_sample": do_sample,
            generation.REPLY_FREQUENCY_PENALTY: args.frequency_penalty}


def batch_plan(lengths: Sequence[int], adapter_of: Sequence[str | None],
               batch_size: int) -> list[tuple[str | None, list[int]]]:
    """(adapter, record indices) batches: each adapter's records apart (one adapter active per batch),
    longest prompts first within each (similar lengths share a batch), adapters in order of appearance."""
    plan = []
    for name in dict.fromkeys(adapter_of):
        order = sorted((i for i, a in enumerate(adapter_of) if a == name), key=lambda i: -lengths[i])
        plan += [(name, order[start:start + batch_size]) for start in range(0, len(order), batch_size)]
    return plan


class RoleAdapters:
    """Which adapter each role runs with: its own (--adapter), else the shared one (--adapter_dir, or a
    checkpoint as --model_path), else none (the base). Without --adapter every role runs the model as
    loaded and `using` does nothing."""

    def __init__(self, model: Any, specs: dict[str, str] | None = None, names: dict[str, str] | None = None,
                 shared: str | None = None, shared_dir: str | None = None) -> None:
        self.specs, self.names, self.shared, self.shared_dir = specs or {}, names or {}, shared, shared_dir
        self.switch = adapters.AdapterSwitch(model) if self.names else None

    def adapter_for(self, role: str) -> str | None:
        return adapters.role_adapter(role, self.names, self.shared)

    def using(self, name: str | None) -> Any:
        import contextlib

        return self.switch.using(name) if self.switch is not None else contextlib.nullcontext()

    def per_adapter(self, records: Sequence[dict], run: Any) -> list[Any]:
        """`run(group)` for each adapter's records (that adapter active), results back in record order."""
        out: list[Any] = [None] * len(records)
        adapter_of = [self.adapter_for(str(r.get("role", ""))) for r in records]
        for name in dict.fromkeys(adapter_of):
            indices = [i for i, a in enumerate(adapter_of) if a == name]
            with self.using(name):
                results = run([records[i] for i in indices])
            for i, result in zip(indices, results, strict=True):
                out[i] = result
        return out

    def fallback(self) -> str:
        return f"the shared adapter {self.shared_dir}" if self.shared else "the base model (no adapter)"

    def describe(self, role: str) -> str:
        """Which weights a role talks with, in words."""
        return f"adapter {self.specs[role]}" if role in self.specs else self.fallback()

    def describe_records(self, records: Sequence[dict]) -> str:
        counts: dict[str, int] = defaultdict(int)
        for r in records:
            counts[str(r.get("role", ""))] += 1
        own = [f"{role} -> {path} ({counts.get(role, 0)} records)" for role, path in self.specs.items()]
        rest = sum(n for role, n in counts.items() if role not in self.specs)
        return f"adapters: {'; '.join(own)}; other roles ({rest} records): {self.fallback()}"


def run_batch(args: argparse.Namespace, model: Any, tokenizer: Any, items: list[tuple[int, dict]],
              extra_roles: Iterable[str], baseline: dict[str, Any] | None = None,
              role_adapters: RoleAdapters | None = None) -> dict[str, Any]:
    """Generate a reply for every record (longest prompts first, in batches; with role adapters, each
    adapter's records in their own batches), write predictions and metrics; with `baseline` (another
    run's metrics), also print the two side by side."""
    from tqdm import tqdm

    role_adapters = role_adapters or RoleAdapters(model)

    config = generation.generation_config_for(model, **generation_overrides(args, batch=True))
    conversations = [r for _, r in items if is_dialogue(r)]
    records = [r for _, r in items if not is_dialogue(r)]
    messages = [generation.record_messages(r) for r in records]
    lengths = [len(generation.chat_prompt_ids(model, tokenizer, m, config)) for m in messages]
    adapter_of = [role_adapters.adapter_for(str(r.get("role", ""))) for r in records]
    if role_adapters.names:
        print(role_adapters.describe_records([r for _, r in items]), file=sys.stderr)
    predictions: list[str] = [""] * len(records)
    stats: dict[str, Any] = {}
    with tqdm(total=len(records), desc="predict", unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        for name, chunk in batch_plan(lengths, adapter_of, args.batch_size):
            with role_adapters.using(name):
                replies = generation.generate_batch(model, tokenizer, [messages[i] for i in chunk], config,
                                                    batch_size=args.batch_size, stats=stats)
            for i, reply in zip(chunk, replies, strict=True):
                predictions[i] = reply
            bar.update(len(chunk))
    said = role_adapters.per_adapter(
        conversations, lambda group: run_dialogues(args, model, tokenizer, group, config, stats))
    scored = [{**r, "prediction": p} for r, p in zip(records, predictions, strict=True)]
    scored += [{**c, "predictions": replies} for c, replies in zip(conversations, said, strict=True)]
    utils.write_jsonl(args.output_path, scored)
    metrics = compute_metrics(records, predictions, extra_roles, stats)
    if conversations:
        roles = sorted(set(extra_roles) | {r["role"] for r in records if isinstance(r.get("role"), str)})
        metrics["multi_turn"] = dialogue.dialogue_metrics(
            conversations, said, fact_matches, lambda reply, role: out_of_character(reply, role, roles))
    metrics["generation"].update(batch_size=args.batch_size, do_sample=bool(config.do_sample),
                                 max_new_tokens=config.max_new_tokens)
    metrics["model"] = {"model_path": args.model_path, "adapter_dir": args.adapter_dir, "test_path": args.test_path}
    if role_adapters.specs:
        metrics["model"]["adapters"] = dict(role_adapters.specs)
    utils.write_json(metrics_path_for(args.output_path), metrics)
    print(format_metrics(metrics))
    print(f"predictions: {args.output_path}\nmetrics: {metrics_path_for(args.output_path)}")
    if baseline is not None:
        print(f"\nbaseline: {baseline.get('model', {}).get('model_path', args.baseline_metrics)}  "
              f"vs  this model: {args.model_path}{' + role adapters' if role_adapters.specs else ''}")
        print(format_comparison(baseline, metrics))
    return metrics


def run_dialogues(args: argparse.Namespace, model: Any, tokenizer: Any, conversations: list[dict], config: Any,
                  stats: dict[str, Any]) -> list[list[str]]:
    """Every test conversation generated round by round (one batch call per round)."""
    if not conversations:
        return []

    def generate(histories: list[list[dict[str, str]]]) -> list[str]:
        return generation.generate_batch(model, tokenizer, histories, config, batch_size=args.batch_size,
                                         stats=stats)

    print(f"multi-turn: {len(conversations)} conversations, round by round", file=sys.stderr)
    return dialogue.run_conversations(generate, conversations)


def choose_role(profiles: dict[str, str], stdin: TextIO, stdout: TextIO) -> str | None:
    """Ask for a role by number or name until a known one is given; None on EOF."""
    names = list(profiles)
    print("roles: " + "  ".join(f"{i}. {n}" for i, n in enumerate(names, 1)), file=stdout)
    while True:
        print("choose a role (number or name): ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return None
        choice = line.strip()
        if choice.isdigit() and 1 <= int(choice) <= len(names):
            return names[int(choice) - 1]
        if choice in profiles:
            return choice
        print(f"unknown role {choice!r}; choose one of: {', '.join(names)}", file=stdout)


def run_interactive(args: argparse.Namespace, model: Any, tokenizer: Any, profiles: dict[str, str],
                    stdin: TextIO | None = None, stdout: TextIO | None = None,
                    role_adapters: RoleAdapters | None = None) -> int:
    """Chat with history in the chosen role (with its own adapter when it has one); /reset, /role NAME,
    /roles, /quit, EOF quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    role_adapters = role_adapters or RoleAdapters(model)
    config = generation.generation_config_for(model, **generation_overrides(args, batch=False))
    role = args.role or choose_role(profiles, stdin, stdout)
    if role is None:
        print("\nbye", file=stdout)
        return 0
    history: list[dict[str, str]] = []
    print(f"[{role}] commands: /reset clears the history, /role NAME switches role, /roles lists roles, "
          "/quit or Ctrl-D quits", file=stdout)
    if role_adapters.names:
        print(f"[{role}] talks with {role_adapters.describe(role)}", file=stdout)
    while True:
        print("user: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print("\nbye", file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in QUIT_CMDS:
            print("bye", file=stdout)
            return 0
        if text == RESET_CMD:
            history = []
            print(f"[{role}] history cleared", file=stdout)
            continue
        if text == ROLES_CMD or text == ROLE_CMD:
            print("roles: " + ", ".join(profiles) + f" (current: {role})", file=stdout)
            continue
        if text.startswith(ROLE_CMD + " "):
            name = text[len(ROLE_CMD) + 1:].strip()
            if name not in profiles:
                print(f"unknown role {name!r}; known roles: {', '.join(profiles)}", file=stdout)
                continue
            role, history = name, []
            print(f"[{role}] role switched, history cleared", file=stdout)
            if role_adapters.names:
                print(f"[{role}] talks with {role_adapters.describe(role)}", file=stdout)
            continue
        messages = [{"role": "system", "content": utils.role_system_prompt(role, profiles)}, *history,
                    {"role": "user", "content": text}]
        try:
            generation.chat_prompt_ids(model, tokenizer, messages, config)  # refused before anything is shown
        except utils.PromptTooLong as e:
            print(f"[{role}] {e}", file=stdout, flush=True)
            continue
        history.append(messages[-1])
        print(f"{role}: ", end="", file=stdout, flush=True)
        shown = reply = ""
        with role_adapters.using(role_adapters.adapter_for(role)):
            for reply in generation.chat_stream(model, tokenizer, messages, config):
                if reply.startswith(shown):
                    print(reply[len(shown):], end="", file=stdout, flush=True)
                else:  # the final exact text differs from what was streamed: show it whole
                    print(f"\n{role}: {reply}", end="", file=stdout, flush=True)
                shown = reply
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batch = args.test_path is not None
    # Validate every input before loading a model.
    if batch:
        if not args.output_path:
            raise UserError("--test_path needs --output_path (where the predictions go)")
        items = load_test_records(args.test_path, args.limit)
        baseline = None
        if args.baseline_metrics:
            baseline = utils.read_json_object(args.baseline_metrics, "--baseline_metrics file",
                                              "run predict.py on the baseline model first", UserError)
        extra_roles: list[str] = []
        desc = args.desc_path or (utils.PROFILES_PATH if Path(utils.PROFILES_PATH).is_file() else None)
        if desc:
            extra_roles = list(utils.load_profiles(desc))
    else:
        profiles = utils.load_profiles(args.desc_path or utils.PROFILES_PATH)
        if args.role is not None:
            utils.role_system_prompt(args.role, profiles)  # unknown role -> DataError
        adapters.check_roles(adapters.parse_adapter_specs(args.adapter), profiles)
    model, tokenizer, role_adapters = load_models(args)
    import torch

    torch.manual_seed(args.seed)
    if batch:
        run_batch(args, model, tokenizer, items, extra_roles, baseline, role_adapters)
        return 0
    return run_interactive(args, model, tokenizer, profiles, role_adapters=role_adapters)


def load_models(args: argparse.Namespace) -> tuple[Any, Any, RoleAdapters]:
    """(model, tokenizer, role adapters): the model as --model_path/--adapter_dir name it, plus one
    adapter per --adapter role on the same base."""
    specs = adapters.parse_adapter_specs(args.adapter)
    if not specs:
        model, tokenizer = loading.load_model_for_inference(args.model_path, args.adapter_dir, args.device,
                                                            args.dtype, args.load_in_4bit)
        return model, tokenizer, RoleAdapters(model)
    model, tokenizer, names, shared = adapters.load_base_with_adapters(
        args.model_path, specs, args.adapter_dir, args.device, args.dtype, args.load_in_4bit)
    _, shared_dir = loading.resolve_model_paths(args.model_path, args.adapter_dir)
    return model, tokenizer, RoleAdapters(model, specs, names, shared, shared_dir)


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
