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

Every flag a worker does not know itself is a train.py flag (model, data, batch, LoRA, --train_mode,
--max_steps = the optimizer steps to run), so the workers see exactly the settings train.py sees.

Example:
    python bench/workers.py weights --json /tmp/w.json --model_name_or_path output/tiny-baichuan2-chat
"""

from __future__ import annotations

import argparse
import copy
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


def batch_sizes(lengths: Sequence[int], batches: list[list[int]], multiple: int) -> list[tuple[int, int]]:
    """(non-padding tokens, padded positions) of each batch, padded to a multiple of `multiple`."""
    return [(sum(lengths[i] for i in b), len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple)
            for b in batches]


def epoch_padding(lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int, steps: int) -> dict[str, Any]:
    """Padding share over one whole epoch, ours (train.py's length-grouped sampler, utils.DataCollator's
    multiple: 8 on CUDA, 1 on CPU, as train.py) vs random batches padded to their longest (the Trainer's
    default, no length grouping); and the (tokens, positions) of each of train.py's first `steps`
    optimizer steps."""
    import torch

    import utils

    def share(sizes: list[tuple[int, int]]) -> float:
        return 1 - sum(t for t, _ in sizes) / sum(p for _, p in sizes)

    ours_batches = utils.LengthGroupedBatchSampler(lengths, batch_size, 1, 0, grad_accum, seed).micro_batches(0)
    multiple = 8 if torch.cuda.is_available() else 1  # as train.py pads on this device
    ours = batch_sizes(lengths, ours_batches, multiple)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    rand = batch_sizes(lengths, [order[i:i + batch_size] for i in range(0, len(order), batch_size)], 1)
    per_step = [[sum(x) for x in zip(*ours[k * grad_accum:(k + 1) * grad_accum], strict=True)]
                for k in range(min(steps, len(ours) // grad_accum))]
    return {"ours": share(ours), "ours_longest": share(batch_sizes(lengths, ours_batches, 1)),
            "random_longest": share(rand), "ours_step_sizes": per_step}


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
            "mean": statistics.fmean(lengths)}


def vm_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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

    targs = a.train
    device = train.resolve_device(targs.device, 0)
    bf16 = train.bf16_supported(device)
    tokenizer, dataset, model, report = load_training_setup(targs, device, bf16)
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    t = targs
    args = TrainingArguments(
        output_dir=a.workdir, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=t.max_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=max(1, math.ceil(t.max_steps * t.warmup_ratio)),
        bf16=bf16, use_cpu=device.type == "cpu", seed=t.seed, data_seed=t.seed, train_sampling_strategy="random",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
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
            "epoch_padding": epoch_padding(dataset.lengths, t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, t.seed, t.max_steps)}


# ---------------------------------------------------------------------------------------------
# ours: train.py's loop with a timer around each phase
# ---------------------------------------------------------------------------------------------
def run_ours(a: argparse.Namespace) -> dict:
    import deepspeed
    import torch
    from torch.utils.data import DataLoader

    import train
    import utils

    targs = a.train
    rss_after_imports = vm_kib("VmRSS") * 1024
    _, world = train.init_distributed()
    device = train.resolve_device(targs.device, 0)
    enabled = train.load_ds_config(targs.ds_file).get("bf16", {}).get("enabled")
    bf16 = enabled is True or (enabled == "auto" and train.bf16_supported(device))
    tokenizer, dataset, model, report = load_training_setup(targs, device, bf16)
    sampler = utils.LengthGroupedBatchSampler(dataset.lengths, targs.per_device_train_batch_size, world, 0,
                                              targs.gradient_accumulation_steps, targs.seed)
    ds_config = train.build_ds_config(targs, world, targs.max_steps, bf16)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    engine.train()
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=utils.DataCollator(tokenizer.pad_token_id)))
    steps = [ours_step(engine, loader, device, targs.gradient_accumulation_steps) for _ in range(targs.max_steps)]
    return {"steps": steps, "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
            "optimizer": f"DeepSpeed ZeRO-{ds_config['zero_optimization']['stage']} {ds_config['optimizer']['type']}",
            "trainable_params": report["trainable"], "mode": targs.train_mode, "rss_after_imports": rss_after_imports,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


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
    """The linear layers that 4-bit loading quantizes and LoRA wraps (utils.find_all_linear_names: every
    linear layer but the output head)."""
    import utils

    names = set(utils.find_all_linear_names(model))
    return [m for name, m in model.named_modules() if name.split(".")[-1] in names]


def run_weights(a: argparse.Namespace) -> dict:
    """Resident weight bytes loaded as NF4 + double quant (bf16 compute, utils.load_model_for_inference
    with load_in_4bit, as QLoRA trains it), bf16 and fp32."""
    import gc

    import torch

    import utils
    from baichuan import resident_weight_bytes

    out: dict[str, Any] = {"cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for kind in ("nf4", "bf16", "fp32"):
        t0 = time.perf_counter()
        dtype = "fp32" if kind == "fp32" else "bf16"
        model, _ = utils.load_model_for_inference(a.train.model_name_or_path, dtype=dtype, load_in_4bit=kind == "nf4")
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
    loads), greedy, exactly `new_tokens` tokens per reply. Single-prompt figures use the first record
    with a system prompt (a role-play chat); batch figures run the same first GEN_PROMPTS records at
    batch 1 and at batch GEN_PROMPTS."""
    import torch

    import utils
    from baichuan.generation_utils import build_chat_input

    model, tokenizer = utils.load_model_for_inference(a.train.model_name_or_path)
    records = [r for _, r in utils.read_jsonl(a.train.train_path)]
    chat = utils.record_messages(next((r for r in records if r.get("instruction")), records[0]))
    batch = [utils.record_messages(r) for r in (records * GEN_PROMPTS)[:GEN_PROMPTS]]
    cfg = fixed_length_config(model, a.new_tokens)
    out: dict[str, Any] = {"new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
                           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                           "device": str(utils.model_device(model))}
    with torch.no_grad():
        input_ids = build_chat_input(model, tokenizer, chat, a.new_tokens)
        no_cache = copy.deepcopy(cfg)
        no_cache.use_cache = False
        out["prompt_tokens"] = input_ids.shape[1]
        out["chat_s"] = median_time(lambda: model.chat(tokenizer, chat, generation_config=cfg), a.repeats)
        out["no_cache_s"] = median_time(
            lambda: model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=no_cache),
            a.repeats)
        out["ttft_model_chat_s"] = first_token_seconds(
            lambda: model.chat(tokenizer, chat, stream=True, generation_config=cfg), a.repeats)
        out["ttft_chat_stream_s"] = first_token_seconds(lambda: utils.chat_stream(model, tokenizer, chat, cfg),
                                                        a.repeats)
        out["batch_prompt_tokens"] = [len(utils.chat_prompt_ids(model, tokenizer, m, cfg)) for m in batch]
        for size in (1, GEN_PROMPTS):
            stats: dict = {}
            out[f"batch{size}_s"] = median_time(
                lambda size=size, stats=stats: utils.generate_batch(model, tokenizer, batch, cfg, batch_size=size,
                                                                    stats=stats), a.repeats)
            out[f"batch{size}_tokens"] = stats["generated_tokens"] // (a.repeats + 1)  # per call
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The worker's own flags; every other flag is a train.py flag (`a.train`, parsed by train.py)."""
    import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag is passed to train.py's parser (model, data, batch, LoRA, "
                                       "--train_mode, --max_steps = steps run, ...).")
    p.add_argument("task", choices=sorted(TASKS), help="what to measure")
    p.add_argument("--json", required=True, help="where to write the result")
    p.add_argument("--workdir", default="", help="trainer: scratch folder (Trainer output_dir)")
    p.add_argument("--new_tokens", type=int, default=32, help="generation: tokens per reply")
    p.add_argument("--repeats", type=int, default=3, help="generation: timed repeats (median)")
    a, rest = p.parse_known_args(argv)
    a.train = train.parse_args(rest)
    return a


TASKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "trainer": run_trainer, "ours": run_ours, "weights": run_weights, "generation": run_generation}


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    import utils

    utils.write_json(a.json, TASKS[a.task](a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
