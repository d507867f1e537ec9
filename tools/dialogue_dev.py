"""Judge multi-turn training choices on a dev set, never on data/test.json: fact conversations composed
from the attribute records of data/train.json with the train follow-ups of data/dialogue_templates.json,
the same way data_helper.py composes the multi-turn test set (a fact asked at round k after k-1 other
rounds, and one fact asked twice). `predict.py` scores each model; this prints fact accuracy by depth
and consistency side by side.

    python tools/dialogue_dev.py --model_paths output/tiny-qlora/merged,output/other/merged

Every phrasing here was trained on (alone, not in these conversations), so the figures measure how
well a model keeps track of the conversation as it grows, not how it meets new phrasings; the blind
phrasings stay in data/test.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python tools/dialogue_dev.py`
    sys.path.insert(0, str(REPO))

import utils  # noqa: E402  (after the path setup)
from roleplay import dialogue  # noqa: E402
from tools.harness import predict_metrics  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_paths", default="output/tiny-qlora/merged", help="comma-separated merged model folders")
    p.add_argument("--per_depth", type=int, default=100, help="conversations per depth 1-5 (and asking one fact twice)")
    p.add_argument("--train_path", default=utils.TRAIN_PATH, help="training records (for the attribute records)")
    p.add_argument("--templates", default=utils.DIALOGUE_TEMPLATES_PATH, help="follow-up templates")
    p.add_argument("--seed", type=int, default=99, help="seed of the composition (not data_helper.py's)")
    return p.parse_args(argv)


def dev_conversations(args: argparse.Namespace) -> list[dict]:
    """Fact and consistency conversations from the training file's attribute records."""
    records = [r for _, r in utils.read_jsonl(args.train_path) if r.get("source") == "attribute"]
    if not records:
        raise utils.UserError(f"{args.train_path}: no attribute records; build it with data_helper.py")
    templates = dialogue.load_dialogue_templates(args.templates)
    return dialogue.compose_eval_conversations(records, templates, args.seed, args.per_depth, 0, split="train")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dialogue-dev-") as tmp:
        dev_path = Path(tmp) / "dev.jsonl"
        utils.write_jsonl(dev_path, dev_conversations(args))
        print("model | fact accuracy at depth 1 / 2 / 3 / 4 / 5 | consistency")
        for i, model_path in enumerate(p.strip() for p in args.model_paths.split(",")):
            m = predict_metrics(model_path, dev_path, Path(tmp) / f"preds_{i}.jsonl")["multi_turn"]
            depths = " / ".join(f"{v['accuracy']:.1%}" for v in m["fact_accuracy_by_depth"].values())
            print(f"{model_path} | {depths} | {m['consistency']['rate']:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
