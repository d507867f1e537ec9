"""Build the embedded default: a tiny Baichuan2-architecture chat model, trained offline from
the project's own general data (`data/base/`), saved as a folder that every script treats
exactly like Baichuan2-7B-Chat (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, generation_config.json) plus `build_info.json`.

    python tools/build_default.py                    # -> output/tiny-baichuan2-chat, ~2 min on 2 cores

A default already in --out is kept when it was built from the same data files and flags
(`data_fingerprint` in its build_info.json) and rebuilt in place when they changed.

Why it is built like this:
- QLoRA cannot teach a random 4-bit base, so the base is first trained full-parameter on
  general chat data: everyday Q&A, persona replies of made-up personas, and attribute Q&A about
  characters that are NOT in the fine-tuning set. The role data stays out of base training, so
  fine-tuning visibly teaches the roles.
- The sentencepiece tokenizer keeps names apart: character names are their own pieces and
  the training text is pre-segmented into words (jieba), so no piece spans a name and a
  question word. Its vocabulary also covers the role data's characters, so fine-tuning inputs
  never fall back to bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python tools/build_default.py`: the shared modules live in the repo root
    sys.path.insert(0, str(REPO))

import utils  # noqa: E402  (after the path setup)
from roleplay.attributes import TEMPLATES_PER_FACT, TRAIN_TEMPLATE_SETS, expand_attributes  # noqa: E402
from roleplay.devices import bf16_supported  # noqa: E402
from roleplay.packing import PackingCollator, batch_loss  # noqa: E402
from roleplay.sampler import LengthGroupedBatchSampler  # noqa: E402
from utils import TEMPLATES_PATH, UserError  # noqa: E402

BASE_DIR = "data/base"
# what build_info.json's "built_by" holds: a folder without it was not built here and is never replaced
BUILT_BY = "python tools/build_default.py"
LEGACY_BUILT_BY = ("python -m baichuan.build_default",)  # defaults built before the script moved to tools/
# half the fine-tuning data's TEMPLATES_PER_FACT: the base only needs the answer pattern, and its general text
# needs the time
BASE_TEMPLATES_PER_FACT = TEMPLATES_PER_FACT // 2
PERSONA_ROUNDS = (2, 3)  # rounds per persona conversation of the base data (inclusive)
DELIM = "\u241e"  # pre-tokenization delimiter: never in the text, pieces never cross it
# Baichuan2's chat markers are ids 195/196; reserve 3..196 so the tiny model uses the same ids.
RESERVED = [f"<reserved_{i - 89}>" for i in range(3, 197)]
# Baichuan2-7B-Chat's generation defaults (its generation_config.json), with max_new_tokens sized for the
# tiny model, plus our reply-only frequency penalty (roleplay/generation.py): under greedy decoding the
# tiny model otherwise loops on its role's catchphrase ("俺老孙……俺老孙……") in most role replies.
GENERATION = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 195,
              "assistant_token_id": 196, "max_new_tokens": 128, "temperature": 0.3, "top_k": 5,
              "top_p": 0.85, "repetition_penalty": 1.05, "do_sample": True, "reply_frequency_penalty": 1.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=utils.DEFAULT_BASE_DIR, help="output model folder")
    p.add_argument("--base_dir", default=BASE_DIR, help="general (non-role) data for base training")
    p.add_argument("--templates", default=TEMPLATES_PATH, help="attribute question templates")
    p.add_argument("--hidden_size", type=int, default=256, help="multiple of 128 (CPU 4-bit kernels need it)")
    p.add_argument("--intermediate_size", type=int, default=768, help="multiple of 128")
    p.add_argument("--num_hidden_layers", type=int, default=4, help="decoder layers")
    p.add_argument("--num_attention_heads", type=int, default=4, help="attention heads")
    p.add_argument("--merges", type=int, default=1500, help="BPE pieces beyond the single characters")
    p.add_argument("--templates_per_fact", type=int, default=BASE_TEMPLATES_PER_FACT,
                   help="train phrasings per (character, attribute) of the base's own attribute Q&A")
    p.add_argument("--epochs", type=int, default=4, help="passes over the base data")
    p.add_argument("--batch_size", type=int, default=16, help="samples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup, cosine decay)")
    p.add_argument("--max_len", type=int, default=512, help="max tokens per sample")
    p.add_argument("--seed", type=int, default=1234, help="seed for tokenizer data order, init and batches")
    p.add_argument("--force", action="store_true", help="rebuild even when --out is up to date")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def general_files(base_dir: Path) -> list[Path]:
    """The general-text files of the base data: `general_*.jsonl` (everyday Q&A, chat, made-up
    personas), in name order so the build is reproducible."""
    return sorted(base_dir.glob("general_*.jsonl"))


def base_records(base_dir: Path, templates: dict, seed: int, per_fact: int = BASE_TEMPLATES_PER_FACT) -> list[dict]:
    """General corpus (persona records as conversations) + attribute Q&A about the base's own
    characters (train + heldout phrasings)."""
    records = persona_conversations([r for f in general_files(base_dir) for _, r in utils.read_jsonl(f)], seed)
    table = utils.read_json_object(base_dir / "attributes.json", "base attribute table", "restore it from git")
    records += expand_attributes(table, templates, ["train", "heldout"], seed, per_fact=per_fact)
    return records


def persona_conversations(records: list[dict], seed: int) -> list[dict]:
    """The records that share a persona prompt (`instruction`) regrouped, seeded, into conversations of
    PERSONA_ROUNDS rounds in the `messages` form; the rest unchanged. Each record is used once, and
    its long persona prompt is computed once per conversation instead of once per record (a fifth
    fewer base tokens per epoch), and the base meets multi-turn chats under a persona before
    fine-tuning does."""
    rng = random.Random(seed)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    out = []
    for r in records:
        if r.get("instruction"):
            by_prompt[r["instruction"]].append(r)
        else:
            out.append(r)
    for prompt in sorted(by_prompt):
        pool = by_prompt[prompt]
        rng.shuffle(pool)
        while pool:
            n = rng.randint(*PERSONA_ROUNDS)
            rounds, pool = pool[:n], pool[n:]
            messages = [{"role": "system", "content": prompt}]
            for r in rounds:
                messages += [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]
            out.append({"messages": messages})
    return out


def fine_tuning_inputs() -> list[Path]:
    """The shipped fine-tuning inputs whose text the tokenizer covers: the role train files, the
    profiles and the attribute table (the templates come separately, train phrasings only)."""
    data = REPO / utils.DATA_DIR
    files = [*sorted(data.glob("*_train.jsonl")), REPO / utils.PROFILES_PATH, data / "genshin_attributes.json"]
    return [f for f in files if f.is_file()]


def vocabulary_texts(records: list[dict], templates: dict) -> list[str]:
    """Text the tokenizer learns its pieces from: the base data plus the shipped fine-tuning
    inputs (role train files, profiles, attribute tables, train phrasings and answers), for
    coverage only: no weights are trained on role text here. Test files and test phrasings are
    left out, so nothing about the test set shapes the model, not even its pieces."""
    texts = [r[k] for r in records for k in ("instruction", "input", "output") if r.get(k)]
    texts += [m["content"] for r in records for m in r.get("messages", []) if m["content"]]
    for f in fine_tuning_inputs():
        if f.suffix == ".jsonl":
            for _, r in utils.read_jsonl(f):
                texts += [r.get("question", "")] + list(r.get("generated", []))
        else:
            texts.append(f.read_text(encoding="utf-8"))
    for entry in templates.values():
        for key in (*TRAIN_TEMPLATE_SETS, "answer"):
            texts += [t for t in entry.get(key, []) if isinstance(t, str)]
    return [t for t in texts if t]


def character_names() -> list[str]:
    """Every character/role name the project ships, longest first: each becomes one piece."""
    data = REPO / utils.DATA_DIR
    names: set[str] = set()
    profiles = REPO / utils.PROFILES_PATH
    if profiles.is_file():
        names |= set(utils.load_profiles(profiles))
    for table in (data / "genshin_attributes.json", data / "base" / "attributes.json"):
        if table.is_file():
            names |= set(utils.read_json_object(table, "attribute table", "fix the table").get("characters", {}))
    return sorted(names, key=lambda n: (-len(n), n))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], names: list[str], out: Path, merges: int, seed: int) -> Any:
    """Sentencepiece BPE like Baichuan2's (byte fallback, split digits, no dummy prefix, no
    normalisation) on word-segmented text, saved as a BaichuanTokenizer folder in `out`."""
    import jieba
    import sentencepiece as spm

    from baichuan.tokenization_baichuan import BaichuanTokenizer

    jieba.setLogLevel(60)
    for n in names:
        jieba.add_word(n, freq=10**6)
    lines = [DELIM.join(w for w in jieba.lcut(t.replace(DELIM, " ")) if w) for t in texts]
    chars = {c for t in texts for c in t if c not in "\n\r"}
    specials = RESERVED + [n for n in names if n not in RESERVED]
    vocab = 3 + 256 + len(specials) + len(chars) + merges
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), model_type="bpe", vocab_size=vocab,
            character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentencepiece_length=4, pretokenization_delimiter=DELIM, user_defined_symbols=specials,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=2,
            minloglevel=2)
        tokenizer = BaichuanTokenizer(vocab_file=str(Path(tmp) / "sp.model"), add_bos_token=False,
                                      pad_token="<unk>")
        tokenizer.save_pretrained(out)
    return type(tokenizer).from_pretrained(out)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def make_model(args: argparse.Namespace, vocab_size: int) -> Any:
    from baichuan import BaichuanConfig, BaichuanForCausalLM

    for name in ("hidden_size", "intermediate_size"):
        if getattr(args, name) % 128:
            raise UserError(f"--{name} must be a multiple of 128 (bitsandbytes' CPU 4-bit kernels need it)")
    config = BaichuanConfig(vocab_size=vocab_size, hidden_size=args.hidden_size,
                            intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
                            num_attention_heads=args.num_attention_heads, max_position_embeddings=1024,
                            model_max_length=1024, tie_word_embeddings=False)
    config.architectures = ["BaichuanForCausalLM"]
    return BaichuanForCausalLM(config)


def pretrain(model: Any, dataset: Any, args: argparse.Namespace) -> list[float]:
    """Full-parameter training: AdamW, linear warmup then cosine decay, bf16 autocast where native; each
    length-grouped batch packed into one row as train.py --packing does (the same loss, no padding)."""
    import torch

    sampler = LengthGroupedBatchSampler(dataset.lengths, args.batch_size, seed=args.seed)
    collator = PackingCollator()  # train.py's packing: no padding, the head only where there are labels
    steps_per_epoch = len(sampler.micro_batches(0))
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(0.06 * total))
    # fused: one kernel over all tensors, 6 against 18 ms a step on the 6M-parameter base (~10 s of the build)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    use_bf16 = bf16_supported(torch.device("cpu"))
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        epoch_loss = 0.0
        for idx in sampler:
            batch = collator([dataset[i] for i in idx])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = batch_loss(model, batch, len(utils.LOSS_GROUPS))[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            epoch_loss += loss.item()
        losses.append(epoch_loss / steps_per_epoch)
        print(f"  base epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    model.eval()
    return losses


def save_model(model: Any, tokenizer_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(**GENERATION).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())


def build_inputs(base_dir: Path, templates: Path) -> list[Path]:
    """Every file the build reads: a change in any of them makes a built default stale."""
    return [*general_files(base_dir), base_dir / "attributes.json", templates, *fine_tuning_inputs()]


def fingerprint(paths: list[Path], args: argparse.Namespace) -> str:
    """Hash of the build's inputs and of the flags that shape the model (not --out/--force)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    shaping = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "force", "base_dir", "templates")}
    h.update(json.dumps(shaping, sort_keys=True).encode())
    h.update(json.dumps(GENERATION, sort_keys=True).encode())  # a new decoding default also refreshes the folder
    return h.hexdigest()[:16]


def up_to_date(out: Path, stamp: str) -> bool:
    """True when `out` holds a default built from the same inputs; False when there is nothing or a
    stale default there (rebuilt in place). Refuses to replace a folder this script did not build."""
    if not (out / "config.json").is_file():
        return False
    try:
        info = json.loads((out / "build_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("built_by") not in (BUILT_BY, *LEGACY_BUILT_BY):
        raise UserError(f"{out} holds a model that build_default did not build (no build_info.json); "
                        "pass another --out, or move that folder away")
    if info.get("data_fingerprint") == stamp:
        return True
    print(f"{out}: built from other data or flags (fingerprint {info.get('data_fingerprint')} != {stamp}); "
          "rebuilding", flush=True)
    return False


def exit_on_sigterm() -> None:
    """Turn SIGTERM (`kill`, a CI timeout, systemd) into SystemExit, as Ctrl-C is KeyboardInterrupt:
    both unwind through utils.atomic_path, which deletes the half-built `.NAME.tmp-*` folder. By
    default SIGTERM ends the process on the spot and leaves that folder behind."""
    def stop(signum: int, _frame: object) -> None:
        print(f"stopped by signal {signum}; the half-built model is removed", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    out = Path(args.out)
    base_dir, templates = Path(args.base_dir), Path(args.templates)
    for f in (base_dir / "general_corpus.jsonl", base_dir / "attributes.json", templates):
        if not f.is_file():
            raise UserError(f"{f}: missing; the embedded default is built from the shipped data in data/")
    stamp = fingerprint(build_inputs(base_dir, templates), args)
    if not args.force and up_to_date(out, stamp):
        print(f"{out} is up to date with the shipped data (use --force to rebuild anyway)")
        return 0

    import torch

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    templates_json = utils.read_json_object(templates, "attribute templates", "restore it from git")
    records = base_records(base_dir, templates_json, args.seed, args.templates_per_fact)
    print(f"[1/3] base data: {len(records)} records from {base_dir} (+ attribute templates)", flush=True)
    with utils.atomic_path(out) as tmp_out:
        tmp_out.mkdir()
        tok_dir = tmp_out / "_tokenizer"
        tokenizer = train_tokenizer(vocabulary_texts(records, templates_json), character_names(), tok_dir,
                                    args.merges, args.seed)
        print(f"[2/3] tokenizer: {tokenizer.vocab_size} pieces ({time.perf_counter() - t0:.0f}s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            data_path = Path(tmp) / "base.jsonl"
            utils.write_jsonl(data_path, records)
            dataset = utils.Baichuan2PromptDataSet(data_path, tokenizer, args.max_len, args.max_len // 2 + 32)
        model = make_model(args, tokenizer.vocab_size)
        n_params = sum(p.numel() for p in model.parameters())
        n_tokens = sum(dataset.lengths)
        print(f"[3/3] base training: {n_params / 1e6:.2f}M params, {len(dataset)} samples, "
              f"{n_tokens} tokens/epoch, {args.epochs} epochs", flush=True)
        losses = pretrain(model, dataset, args)
        save_model(model, tok_dir, tmp_out)
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
        utils.write_json(tmp_out / "build_info.json", {
            "built_by": BUILT_BY, "args": vars(args), "params": n_params,
            "vocab_size": tokenizer.vocab_size, "base_samples": len(dataset), "tokens_per_epoch": n_tokens,
            "epoch_losses": [round(v, 4) for v in losses], "seconds": round(time.perf_counter() - t0, 1),
            "data_fingerprint": stamp,
            "torch": torch.__version__})
    print(f"built {out} in {time.perf_counter() - t0:.0f}s (final base loss {losses[-1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
