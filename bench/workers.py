"""Child-process measurements for bench/run.py: each subcommand runs in a fresh process (so its
peak RSS and its thread count are its own) and writes one JSON object to `--json`.

Subcommands:
- `trainer`: the usual alternative to train.py, Hugging Face `Trainer` + PEFT QLoRA on the same model,
  samples (utils.Baichuan2PromptDataSet), batch size, sequence limits and LoRA settings, with the
  common default collation (`DataCollatorForSeq2Seq`, pad to the longest of a randomly sampled
  batch, no length grouping). Per optimizer step: non-padding tokens, padded positions, seconds,
  and where the time went (collation, forward, backward, optimizer).
- `ours`: train.py's own training loop (its model loading, length-grouped sampler, collator and
  DeepSpeed ZeRO-2 engine, called through train.py's functions) with a timer around each phase
  (data, forward, backward, engine step), in any mode (qlora / lora / full). train.py itself
  cannot be timed phase by phase from outside; its headline tokens/s comes from its own run.
- `weights`: resident weight bytes of the model loaded NF4 + double quant, bf16 and fp32, whole
  model and decoder linear layers only.
- `generation`: `model.chat` (KV cache) vs `generate(use_cache=False)`, time to the first streamed
  token (model.chat(stream=True) and utils.chat_stream), and utils.generate_batch tokens/s at batch 1 vs 8.

Example:
    python bench/workers.py weights --model output/tiny-baichuan2-chat --json /tmp/w.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GEN_PROMPTS = 8  # batch size of the large batch-prediction measurement


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def now() -> float:
    """perf_counter after the accelerator has finished its queued work (CUDA is asynchronous)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def train_namespace(a: argparse.Namespace, mode: str) -> argparse.Namespace:
    """train.py's own argument namespace for these settings (so its loaders see what it would see)."""
    import train

    flags = ["--model_name_or_path", a.model, "--train_path", a.train_path, "--test_path", "",
             "--train_mode", mode, "--per_device_train_batch_size", str(a.batch_size),
             "--gradient_accumulation_steps", str(a.grad_accum), "--max_len", str(a.max_len),
             "--max_src_len", str(a.max_src_len), "--learning_rate", str(a.lr), "--weight_decay", str(a.weight_decay),
             "--lora_dim", str(a.lora_r), "--lora_alpha", str(a.lora_alpha), "--lora_dropout", str(a.lora_dropout),
             "--seed", str(a.seed), "--max_steps", str(a.steps), "--warmup_ratio", str(a.warmup_ratio),
             "--ds_file", a.ds_file, "--is_skip"]
    if a.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    return train.parse_args(flags)


def load_training_setup(targs: argparse.Namespace, device: Any, bf16: bool) -> tuple[Any, Any, Any, dict]:
    """(tokenizer, dataset, model, report) exactly as train.py builds them."""
    import torch
    from transformers import GenerationConfig

    import train
    import utils

    utils.set_seed(targs.seed)
    tokenizer = train.load_tokenizer(targs.model_name_or_path)
    gen_config = train.load_generation_config(targs.model_name_or_path, GenerationConfig)
    dataset = utils.Baichuan2PromptDataSet(targs.train_path, tokenizer, targs.max_len, targs.max_src_len,
                                           targs.is_skip, gen_config)
    model, report = train.load_model(targs, device, torch.bfloat16 if bf16 else torch.float32, tokenizer)
    return tokenizer, dataset, model, report


def epoch_padding(lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int) -> dict[str, float]:
    """Padding share over one whole epoch: ours (length-grouped, padded to a multiple of 8) vs a
    random sampler padding to the longest of each batch (the Trainer default, no length grouping)."""
    import torch

    import utils

    def share(batches: list[list[int]], multiple: int) -> float:
        real = sum(lengths[i] for b in batches for i in b)
        padded = sum(len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple for b in batches)
        return 1 - real / padded

    ours = utils.LengthGroupedBatchSampler(lengths, batch_size, 1, 0, grad_accum, seed).micro_batches(0)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    random_batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return {"ours": share(ours, 8), "random_longest": share(random_batches, 1)}


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
            "mean": statistics.fmean(lengths)}


def write_json(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# trainer: Hugging Face Trainer + PEFT QLoRA, default collation
# ---------------------------------------------------------------------------------------------
class CountingCollator:
    """Wraps a collator and adds up the seconds spent collating."""

    def __init__(self, inner: Callable[[list[dict]], dict]) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, samples: list[dict]) -> dict:
        t0 = time.perf_counter()
        out = self.inner(samples)
        self.seconds += time.perf_counter() - t0
        return out


def make_timed_trainer(base: type) -> type:
    """A Trainer subclass that times forward (compute_loss) and forward+backward (training_step) and
    counts the real and padded tokens of every micro-batch it trains on."""

    class TimedTrainer(base):
        fwd_seconds = 0.0
        fwd_bwd_seconds = 0.0
        tokens = 0
        positions = 0

        def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
            mask = inputs["attention_mask"]
            self.tokens += int(mask.sum())
            self.positions += mask.numel()
            t0 = now()
            out = super().training_step(model, inputs, num_items_in_batch)
            self.fwd_bwd_seconds += now() - t0
            return out

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            t0 = now()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.fwd_seconds += now() - t0
            return out

    return TimedTrainer


def make_step_recorder(trainer_ref: list, collator: CountingCollator, steps: list[dict]) -> Any:
    """A TrainerCallback that closes one record per optimizer step (time between step ends)."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.last = self.opt_start = 0.0
            self.opt_seconds = 0.0
            self.prev = {"tokens": 0, "positions": 0, "collate": 0.0, "fwd": 0.0, "fwd_bwd": 0.0}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last = now()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.opt_start = now()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.opt_seconds = now() - self.opt_start

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            t = now()
            tr = trainer_ref[0]
            cur = {"tokens": tr.tokens, "positions": tr.positions, "collate": collator.seconds,
                   "fwd": tr.fwd_seconds, "fwd_bwd": tr.fwd_bwd_seconds}
            d = {k: cur[k] - self.prev[k] for k in cur}
            steps.append({"step": state.global_step, "seconds": t - self.last, "tokens": d["tokens"],
                          "positions": d["positions"], "data": d["collate"], "forward": d["fwd"],
                          "backward": d["fwd_bwd"] - d["fwd"], "optimizer": self.opt_seconds})
            self.prev, self.last = cur, t

    return StepRecorder()


def run_trainer(a: argparse.Namespace) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    import train

    targs = train_namespace(a, "qlora")
    device = train.resolve_device("auto", 0)
    bf16 = train.bf16_supported(device)
    tokenizer, dataset, model, report = load_training_setup(targs, device, bf16)
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    total = a.steps
    args = TrainingArguments(
        output_dir=a.workdir, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
        max_steps=total, learning_rate=a.lr, weight_decay=a.weight_decay, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=max(1, math.ceil(total * a.warmup_ratio)),
        bf16=bf16, use_cpu=device.type == "cpu", seed=a.seed, data_seed=a.seed, train_sampling_strategy="random",
        gradient_checkpointing=a.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.gradient_checkpointing else None,
        save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    steps: list[dict] = []
    trainer_ref: list = []
    trainer = make_timed_trainer(Trainer)(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        callbacks=[make_step_recorder(trainer_ref, collator, steps)])
    trainer_ref.append(trainer)
    t0 = time.perf_counter()
    trainer.train()
    return {"steps": steps, "train_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if bf16 else "fp32", "optimizer": args.optim,
            "trainable_params": report["trainable"], "lengths": length_stats(dataset.lengths),
            "skipped": dataset.skipped,
            "epoch_padding": epoch_padding(dataset.lengths, a.batch_size, a.grad_accum, a.seed)}


# ---------------------------------------------------------------------------------------------
# ours: train.py's loop with a timer around each phase
# ---------------------------------------------------------------------------------------------
def run_ours(a: argparse.Namespace) -> dict:
    import deepspeed
    import torch
    from torch.utils.data import DataLoader

    import train
    import utils

    targs = train_namespace(a, a.mode)
    _, world = train.init_distributed()
    device = train.resolve_device(targs.device, 0)
    enabled = train.load_ds_config(targs.ds_file).get("bf16", {}).get("enabled")
    bf16 = enabled is True or (enabled == "auto" and train.bf16_supported(device))
    _, dataset, model, report = load_training_setup(targs, device, bf16)
    sampler = utils.LengthGroupedBatchSampler(dataset.lengths, targs.per_device_train_batch_size, world, 0,
                                              targs.gradient_accumulation_steps, targs.seed)
    ds_config = train.build_ds_config(targs, world, a.steps, bf16)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    engine.train()
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=utils.DataCollator(0)))
    steps = [ours_step(engine, loader, device, targs.gradient_accumulation_steps) for _ in range(a.steps)]
    return {"steps": steps, "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
            "optimizer": f"DeepSpeed ZeRO-{ds_config['zero_optimization']['stage']} {ds_config['optimizer']['type']}",
            "trainable_params": report["trainable"], "mode": a.mode}


def ours_step(engine: Any, loader: Any, device: Any, grad_accum: int) -> dict:
    """One optimizer step of train.py's loop (same calls, same order), timed per phase."""
    rec = {"seconds": 0.0, "tokens": 0, "positions": 0, "data": 0.0, "forward": 0.0, "backward": 0.0,
           "optimizer": 0.0}
    start = now()
    for _ in range(grad_accum):
        t0 = now()
        batch = {k: v.to(device) for k, v in next(loader).items()}
        t1 = now()
        loss = engine(**batch).loss
        t2 = now()
        engine.backward(loss)
        t3 = now()
        engine.step()
        t4 = now()
        loss.item()
        rec["tokens"] += int(batch["attention_mask"].sum())
        rec["positions"] += batch["attention_mask"].numel()
        for key, dt in (("data", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3)):
            rec[key] += dt
    rec["seconds"] = now() - start
    return rec


# ---------------------------------------------------------------------------------------------
# weights: resident bytes NF4 vs bf16 vs fp32
# ---------------------------------------------------------------------------------------------
def decoder_linears(model: Any) -> list[Any]:
    """The decoder's linear layers (nn.Linear or bitsandbytes), without the output head."""
    import torch

    types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    head = model.get_output_embeddings()
    return [m for name, m in model.named_modules()
            if isinstance(m, types) and m is not head and not name.endswith("lm_head")]


def load_for_weights(model_path: str, kind: str, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import baichuan  # noqa: F401  (registers the Auto classes)

    kwargs: dict[str, Any] = {"device_map": {"": device}, "dtype": torch.float32 if kind == "fp32" else torch.bfloat16}
    if kind == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def run_weights(a: argparse.Namespace) -> dict:
    import gc

    import torch

    from baichuan import resident_weight_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {}
    for kind in ("nf4", "bf16", "fp32"):
        t0 = time.perf_counter()
        model = load_for_weights(a.model, kind, device)
        load_s = time.perf_counter() - t0
        linears = decoder_linears(model)
        out[kind] = {"whole": resident_weight_bytes(model),
                     "linear": sum(resident_weight_bytes(m) for m in linears),
                     "load_seconds": load_s, "linear_layers": len(linears)}
        if kind == "fp32":
            out["params"] = sum(p.numel() for p in model.parameters())
            out["linear_params"] = sum(m.weight.numel() for m in linears)
        del model
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------------
# generation: chat (KV cache) vs no cache, first streamed token, batch 1 vs 8
# ---------------------------------------------------------------------------------------------
def fixed_length_config(model: Any, new_tokens: int) -> Any:
    """Greedy decoding of exactly `new_tokens` tokens (EOS cannot end it early), so every variant
    produces the same number of tokens."""
    import utils

    return utils.generation_config_for(model, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def first_token_seconds(stream_fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds from the call to the first non-empty streamed piece. Each stream is drained
    to its end before the next call, so no generation thread runs on during the next timing."""
    def once() -> float:
        t0 = now()
        first = float("nan")
        for piece in stream_fn():
            if piece and math.isnan(first):
                first = time.perf_counter() - t0
        return first

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def run_generation(a: argparse.Namespace) -> dict:
    """The project's inference path (utils.load_model_for_inference with its defaults, as predict.py
    loads) on the first training records' prompts; greedy, exactly `new_tokens` tokens per reply."""
    import torch

    import utils
    from baichuan.generation_utils import build_chat_input

    model, tokenizer = utils.load_model_for_inference(a.model)
    messages = [utils.record_messages(r) for _, r in utils.read_jsonl(a.train_path)][:GEN_PROMPTS]
    messages = (messages * GEN_PROMPTS)[:GEN_PROMPTS]
    cfg = fixed_length_config(model, a.new_tokens)
    out: dict[str, Any] = {"new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
                           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                           "device": str(utils.model_device(model))}
    with torch.no_grad():
        input_ids = build_chat_input(model, tokenizer, messages[0], a.new_tokens)
        out["prompt_tokens"] = input_ids.shape[1]
        out["chat_s"] = median_time(lambda: model.chat(tokenizer, messages[0], generation_config=cfg), a.repeats)
        out["no_cache_s"] = median_time(
            lambda: model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg,
                                   use_cache=False), a.repeats)
        out["ttft_model_chat_s"] = first_token_seconds(
            lambda: model.chat(tokenizer, messages[0], stream=True, generation_config=cfg), a.repeats)
        out["ttft_chat_stream_s"] = first_token_seconds(
            lambda: utils.chat_stream(model, tokenizer, messages[0], cfg), a.repeats)
        for size in (1, GEN_PROMPTS):
            stats: dict = {}
            out[f"batch{size}_s"] = median_time(
                lambda size=size, stats=stats: utils.generate_batch(
                    model, tokenizer, messages[:size], cfg, batch_size=size, stats=stats), a.repeats)
            out[f"batch{size}_tokens"] = stats["generated_tokens"] // (a.repeats + 1)  # per call
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["trainer", "ours", "weights", "generation"], help="what to measure")
    p.add_argument("--json", required=True, help="where to write the result")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--train_path", default="", help="training records (JSON lines)")
    p.add_argument("--workdir", default="", help="scratch folder (Trainer output_dir)")
    p.add_argument("--mode", default="qlora", choices=["qlora", "lora", "full"], help="ours: train mode")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps, warm-up included")
    p.add_argument("--batch_size", type=int, default=16, help="micro-batch size")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max_len", type=int, default=512, help="max tokens of prompt + answer")
    p.add_argument("--max_src_len", type=int, default=256, help="max tokens of the prompt")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup_ratio", type=float, default=0.06, help="share of steps with LR warm-up")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations")
    p.add_argument("--ds_file", default=str(REPO / "ds_zero2_no_offload.json"), help="DeepSpeed config")
    p.add_argument("--seed", type=int, default=1234, help="seed for init, data order and dropout")
    p.add_argument("--new_tokens", type=int, default=32, help="generation: tokens per reply")
    p.add_argument("--repeats", type=int, default=3, help="generation: timed repeats (median)")
    return p.parse_args(argv)


TASKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "trainer": run_trainer, "ours": run_ours, "weights": run_weights, "generation": run_generation}


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    result = TASKS[a.task](a)
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
