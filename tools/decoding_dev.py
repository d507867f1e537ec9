"""Choose decoding settings on a dev set, never on data/test.json: general questions of the base data
(data/base/general_chat.jsonl and general_knowledge.jsonl, seeded sample) asked to each RoleBench role
under its system prompt, plus attribute records of data/train.json; `predict.py` scores the set once per
`--frequency_penalty` value and this prints degenerate share, distinct-2, mean length, fact-answer leak
rate and fact accuracy side by side.

    python tools/decoding_dev.py --model_path output/tiny-qlora/merged --penalties 0,1,1.5,2

The role questions have no reference replies, so ROUGE-L means nothing here; the other figures do not
need one.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python tools/decoding_dev.py`
    sys.path.insert(0, str(REPO))

import utils  # noqa: E402  (after the path setup)
from tools.harness import predict_metrics  # noqa: E402

QUESTION_FILES = ("data/base/general_chat.jsonl", "data/base/general_knowledge.jsonl")
ROLES = ("孙悟空", "赵子龙", "爱因斯坦")  # the shipped RoleBench roles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="output/tiny-qlora/merged", help="merged model folder")
    p.add_argument("--penalties", default="0,1,1.5,2", help="comma-separated --frequency_penalty values")
    p.add_argument("--questions_per_role", type=int, default=40, help="general questions asked to each role")
    p.add_argument("--facts", type=int, default=60, help="attribute records of the training file")
    p.add_argument("--train_path", default=utils.TRAIN_PATH, help="training records (for the attribute records)")
    p.add_argument("--seed", type=int, default=7, help="seed of the samples")
    return p.parse_args(argv)


def dev_records(args: argparse.Namespace) -> list[dict]:
    """The dev set: role questions without references (source rolebench_dev) and attribute records."""
    rng = random.Random(args.seed)
    questions = [r["input"] for f in QUESTION_FILES for _, r in utils.read_jsonl(REPO / f)]
    profiles = utils.load_profiles(REPO / utils.PROFILES_PATH)
    out = []
    for role in ROLES:
        system = utils.role_system_prompt(role, profiles)
        out += [{"instruction": system, "input": q, "output": "（无参考）", "role": role, "source": "rolebench_dev",
                 "split": "test"} for q in rng.sample(questions, args.questions_per_role)]
    facts = [r for _, r in utils.read_jsonl(args.train_path) if r.get("source") == "attribute"]
    return out + rng.sample(facts, min(args.facts, len(facts)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decoding-dev-") as tmp:
        dev_path = Path(tmp) / "dev.jsonl"
        utils.write_jsonl(dev_path, dev_records(args))
        print("frequency_penalty | degenerate | distinct-2 | mean chars | leak | fact accuracy")
        for penalty in args.penalties.split(","):
            m = predict_metrics(args.model_path, dev_path, Path(tmp) / f"preds_{penalty.strip()}.jsonl",
                                "--frequency_penalty", penalty.strip())
            q, leak, facts = m["role_reply_quality"], m["fact_answer_leak"], m["attribute_accuracy"]["overall"]
            print(f"{penalty.strip():>17} | {q['degenerate_rate']:.2%} | {q['distinct_2']:.3f} | "
                  f"{q['mean_chars']:.1f} | {leak['rate']:.2%} | {facts['accuracy']:.2%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
