"""Child-process measurements for bench/run.py: each subcommand runs in a fresh process (so its
peak RSS and its thread count are its own) and writes one JSON object to `--json`. What follows `--`
are train.py's arguments exactly as bench/run.py runs train.py (train.sh's recipe plus the bench's
flags), parsed by train.parse_args, so a worker sees the values train.py sees.

Subcommands:
- `trainer`: the usual alternative to train.py, Hugging Face `Trainer` + PEFT QLoRA on the same model,
  samples (utils.Baichuan2PromptDataSet), batch size, sequence limits, LoRA settings and modules trained
  in full (train.load_model), padded by `DataCollatorForSeq2Seq` to the longest of each batch, for
  --max_steps optimizer steps. `--sampling group_by_length` is how a speed-minded user configures it
  (`TrainingArguments(train_sampling_strategy="group_by_length")`: batches of similar length);
  `--sampling random` is the default (kept as the reference row). `--attn eager` loads the model with
  `attn_implementation="eager"` (matmul + softmax instead of SDPA: in bf16 on a CPU, SDPA's flash kernel
  is the slower of the two for short and mid-length batches, so a speed-minded user may pick it). Per
  step: non-padding tokens, padded positions, seconds, and where the time went (collation, forward,
  backward, optimizer); plus the padding share of a whole epoch for both batchings.
- `trl`: TRL's `SFTTrainer` on the same model, samples (input_ids + our labels, so the same tokens
  count), batch, limits and optimizer settings, in its padding-free mode (`SFTConfig(padding_free=True)`:
  each batch's samples flattened into one row with restarting position_ids, no padding), which is what
  its docs recommend for speed. TRL's BFD packing (`packing=True`) would also change the number of
  samples per step, so it would no longer be the same job; padding-free is its packing at the same batch.
- `matmul`: this machine's dense matmul FLOP/s at the training dtype (the physical limit MFU is taken
  against) and the model's parameter count.
- `weights`: resident weight bytes of the model loaded NF4 + double quant, bf16 and fp32, whole
  model and decoder linear layers only.
- `generation`: `model.chat` (KV cache) vs `generate(use_cache=False)`, time to the first streamed
  token (model.chat(stream=True) and generation.chat_stream), and generation.generate_batch
  tokens/s at batch 1 vs 8.

Example:
    python bench/workers.py weights --json /tmp/w.json -- --model_name_or_path output/tiny-baichuan2-chat
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


# --- Shared helpers ---
def now() -> float:
    """perf_counter after the accelerator has finished its queued work (CUDA is asynchronous)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def load_training_setup(targs: argparse.Namespace, device: Any, bf16: bool,
                        attn_implementation: str | None = None) -> tuple[Any, Any, Any, dict]:
    """(tokenizer, dataset, model, report) exactly as train.py builds them (a peer may ask for another
    attention implementation: `from_pretrained(attn_implementation=...)`)."""
    import torch
    from transformers import GenerationConfig

    import train
    import utils
    from roleplay import loading

    utils.set_seed(targs.seed)
    tokenizer = loading.load_tokenizer(targs.model_name_or_path, training=True)
    gen_config = train.load_generation_config(targs.model_name_or_path, GenerationConfig)
    dataset = utils.Baichuan2PromptDataSet(targs.train_path, tokenizer, targs.max_len, targs.max_src_len,
                                           targs.is_skip, gen_config)
    model, report = train.load_model(targs, device, torch.bfloat16 if bf16 else torch.float32, tokenizer,
                                     attn_implementation)
    return tokenizer, dataset, model, report


def batch_sizes(lengths: Sequence[int], batches: list[list[int]], multiple: int) -> list[tuple[int, int]]:
    """(non-padding tokens, padded positions) of each batch, padded to a multiple of `multiple`."""
    return [(sum(lengths[i] for i in b), len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple)
            for b in batches]


def epoch_padding(lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int, device: Any) -> dict[str, float]:
    """Padding share over one whole epoch (train.py's profile covers only the steps it ran): train.py's
    length-grouped sampler, padded as train.py pads on `device` (to a multiple of 8 on CUDA for tensor
    cores, to the longest on CPU), vs random batches padded to their longest (the Trainer's default)."""
    import torch

    from roleplay.sampler import LengthGroupedBatchSampler

    def share(sizes: list[tuple[int, int]]) -> float:
        return 1 - sum(t for t, _ in sizes) / sum(p for _, p in sizes)

    ours = LengthGroupedBatchSampler(lengths, batch_size, 1, 0, grad_accum, seed).micro_batches(0)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    rand = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return {"ours": share(batch_sizes(lengths, ours, 8 if device.type == "cuda" else 1)),
            "random_longest": share(batch_sizes(lengths, rand, 1))}


# --- trainer: Hugging Face Trainer + PEFT QLoRA, default collation ---
class PhaseClock:
    """The Trainer's steps in the shape of train.py's profile.json: per optimizer step, seconds (between
    step ends), data (collation), forward, backward, optimizer, non-padding tokens, padded positions."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.current = self.blank()
        self.last = self.opt_start = 0.0

    @staticmethod
    def blank() -> dict:
        return {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "tokens": 0, "positions": 0}

    def collate(self, inner: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
        def timed(samples: list[dict]) -> dict:
            t0 = time.perf_counter()
            out = inner(samples)
            self.current["data"] += time.perf_counter() - t0
            return out

        return timed

    def close(self, step: int) -> None:
        t = now()
        self.steps.append({"step": step, "seconds": t - self.last, **self.current})
        self.current, self.last = self.blank(), t


def timed_trainer(trainer_cls: type, callback_cls: type, clock: PhaseClock) -> tuple[type, Any]:
    """A Trainer subclass timing forward (compute_loss) and backward (the rest of training_step) and
    counting each micro-batch's tokens, and a callback timing the optimizer step and closing each step."""

    class TimedTrainer(trainer_cls):
        def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
            # padding-free batches (TRL) carry no attention mask: every position is a token
            mask = inputs.get("attention_mask")
            clock.current["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            clock.current["positions"] += inputs["input_ids"].numel()
            forward0, t0 = clock.current["forward"], now()
            out = super().training_step(model, inputs, num_items_in_batch)
            clock.current["backward"] += now() - t0 - (clock.current["forward"] - forward0)
            return out

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            t0 = now()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            clock.current["forward"] += now() - t0
            return out

    class StepEnds(callback_cls):
        def on_train_begin(self, *args: Any, **kw: Any) -> None:
            clock.last = now()

        def on_pre_optimizer_step(self, *args: Any, **kw: Any) -> None:
            clock.opt_start = now()

        def on_optimizer_step(self, *args: Any, **kw: Any) -> None:
            clock.current["optimizer"] += now() - clock.opt_start

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.close(state.global_step)

    return TimedTrainer, StepEnds()


def common_training_arguments(a: argparse.Namespace, device: Any, bf16: bool) -> dict[str, Any]:
    """The TrainingArguments both peers share: train.py's batch, limits and seed; an optimizer and schedule
    that mirror ds_zero2_no_offload.json's (AdamW, betas (0.9, 0.95), clipping 1.0, warm-up then decay)."""
    t = a.train
    return dict(
        output_dir=a.workdir, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=t.max_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=max(1, math.ceil(t.max_steps * t.warmup_ratio)),
        bf16=bf16, use_cpu=device.type == "cpu", seed=t.seed, data_seed=t.seed,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5.24's name for gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)


def peer_result(clock: PhaseClock, args: Any, dataset: Any, a: argparse.Namespace, device: Any, bf16: bool,
                label: str) -> dict:
    import torch

    t = a.train
    return {"steps": clock.steps, "threads": torch.get_num_threads(), "precision": "bf16 autocast" if bf16 else "fp32",
            "optimizer": args.optim, "samples": len(dataset), "label": label,
            "samples_per_step": t.per_device_train_batch_size * t.gradient_accumulation_steps,
            "epoch_padding": epoch_padding(dataset.lengths, t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, t.seed, device)}


def run_trainer(a: argparse.Namespace) -> dict:
    """The Trainer on train.py's model, samples and recipe arguments, random or length-grouped batches."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from roleplay.devices import bf16_supported, resolve_device

    device = resolve_device(a.train.device, 0)
    bf16 = bf16_supported(device)
    tokenizer, dataset, model, _ = load_training_setup(a.train, device, bf16, a.attn)
    clock = PhaseClock()
    collator = clock.collate(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    args = TrainingArguments(**common_training_arguments(a, device, bf16), train_sampling_strategy=a.sampling)
    trainer_cls, step_ends = timed_trainer(Trainer, TrainerCallback, clock)
    trainer = trainer_cls(model=model, args=args, train_dataset=PlainSamples(dataset), data_collator=collator,
                          callbacks=[step_ends])
    trainer.train()
    return peer_result(clock, args, dataset, a, device, bf16, f"HF Trainer, {a.sampling} batches, {a.attn} attention")


class PlainSamples:
    """The dataset's samples as the Trainer's collators take them: input_ids and labels, no extra keys."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset[i]
        return {"input_ids": s["input_ids"], "labels": s["labels"]}


def run_trl(a: argparse.Namespace) -> dict:
    """TRL SFTTrainer, padding-free, on train.py's model, samples and recipe arguments."""
    import importlib.metadata

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from roleplay.devices import bf16_supported, resolve_device

    device = resolve_device(a.train.device, 0)
    bf16 = bf16_supported(device)
    tokenizer, dataset, model, _ = load_training_setup(a.train, device, bf16)
    head = model.get_output_embeddings()
    head = getattr(head, "original_module", head)  # PEFT's modules_to_save wrapper around the head
    if not isinstance(head, torch.nn.Linear):
        # SFTTrainer (1.16) always scores through its own chunked LM head, which multiplies by the head's raw
        # `weight` (and reads `.bias`): Baichuan's NormHead normalises the rows first, so TRL would train a
        # different model (and it stops on the missing bias). No setting turns that path off.
        return {"unsupported": f"TRL {importlib.metadata.version('trl')} SFTTrainer scores through its own LM head "
                f"(raw head weight and bias); this model's head is a {type(head).__name__}, so TRL cannot train it"}
    clock = PhaseClock()
    rows = Dataset.from_list([PlainSamples(dataset)[i] for i in range(len(dataset))])
    args = SFTConfig(**common_training_arguments(a, device, bf16), padding_free=True, packing=False, max_length=None,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer_cls, step_ends = timed_trainer(SFTTrainer, TrainerCallback, clock)
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[step_ends])
    trainer.data_collator = clock.collate(trainer.data_collator)
    trainer.train()
    return peer_result(clock, args, dataset, a, device, bf16, "TRL SFTTrainer, padding-free")


# --- matmul: this machine's dense matmul peak at the training dtype ---
def run_matmul(a: argparse.Namespace, size: int = 2048, repeats: int = 7) -> dict:
    """Best-of-`repeats` FLOP/s of a size x size torch.mm in the dtype train.py trains in here (bf16 where
    the device has it natively, else fp32), on this process's threads; and the model's parameter count
    (built on the meta device: nothing loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import baichuan  # noqa: F401  (registers the Baichuan Auto classes)
    from roleplay.devices import bf16_supported, resolve_device

    device = resolve_device(a.train.device, 0)
    dtype = torch.bfloat16 if bf16_supported(device) else torch.float32
    x, y = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        t0 = now()
        torch.mm(x, y)
        best = min(best, now() - t0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.train.model_name_or_path))
    return {"gflops": 2 * size**3 / best / 1e9, "dtype": str(dtype).replace("torch.", ""), "size": size,
            "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
            "params": sum(p.numel() for p in model.parameters()),
            "input_embedding": model.get_input_embeddings().weight.numel()}


# --- weights: resident bytes NF4 vs bf16 vs fp32 ---
def decoder_linears(model: Any) -> list[Any]:
    """The linear layers that 4-bit loading quantizes and LoRA wraps (loading.find_all_linear_names: every
    linear layer but the output head)."""
    from roleplay import loading

    names = set(loading.find_all_linear_names(model))
    return [m for name, m in model.named_modules() if name.split(".")[-1] in names]


def run_weights(a: argparse.Namespace) -> dict:
    """Resident weight bytes loaded as NF4 + double quant (bf16 compute, loading.load_model_for_inference
    with load_in_4bit, as QLoRA trains it), bf16 and fp32."""
    import gc

    import torch

    from baichuan import resident_weight_bytes
    from roleplay import loading

    out: dict[str, Any] = {"cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for kind in ("nf4", "bf16", "fp32"):
        model, _ = loading.load_model_for_inference(a.train.model_name_or_path, dtype="fp32" if kind == "fp32" else
                                                    "bf16", load_in_4bit=kind == "nf4")
        linears = decoder_linears(model)
        out[kind] = {"whole": resident_weight_bytes(model), "linear": sum(resident_weight_bytes(m) for m in linears)}
        if kind == "fp32":
            out["params"] = sum(p.numel() for p in model.parameters())
            out["linear_params"] = sum(m.weight.numel() for m in linears)
        del model
        gc.collect()
    return out


# --- generation: chat (KV cache) vs no cache, first streamed token, batch 1 vs 8 ---
def fixed_length_config(model: Any, new_tokens: int) -> Any:
    """Greedy decoding of exactly `new_tokens` tokens (EOS cannot end it early), so every variant
    produces the same number of tokens."""
    from roleplay import generation

    return generation.generation_config_for(model, do_sample=False, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens)


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
    """The project's inference path (loading.load_model_for_inference with its defaults, as predict.py
    loads), greedy, exactly `new_tokens` tokens per reply. Single-prompt figures use the first record
    with a system prompt (a role-play chat); batch figures run the same first GEN_PROMPTS records at
    batch 1 and at batch GEN_PROMPTS."""
    import torch

    import utils
    from baichuan.generation_utils import build_chat_input
    from roleplay import generation, loading
    from roleplay.devices import model_device

    model, tokenizer = loading.load_model_for_inference(a.train.model_name_or_path)
    records = [r for _, r in utils.read_jsonl(a.train.train_path)]
    chat = generation.record_messages(next((r for r in records if r.get("instruction")), records[0]))
    batch = [generation.record_messages(r) for r in (records * GEN_PROMPTS)[:GEN_PROMPTS]]
    cfg = fixed_length_config(model, a.new_tokens)
    out: dict[str, Any] = {"new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
                           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                           "device": str(model_device(model))}
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
        out["ttft_chat_stream_s"] = first_token_seconds(lambda: generation.chat_stream(model, tokenizer, chat, cfg),
                                                        a.repeats)
        out["batch_prompt_tokens"] = [len(generation.chat_prompt_ids(model, tokenizer, m, cfg)) for m in batch]
        for size in (1, GEN_PROMPTS):
            stats: dict = {}
            out[f"batch{size}_s"] = median_time(
                lambda size=size, stats=stats: generation.generate_batch(model, tokenizer, batch, cfg,
                                                                         batch_size=size, stats=stats), a.repeats)
            out[f"batch{size}_tokens"] = stats["generated_tokens"] // (a.repeats + 1)  # per call
    return out


# --- Command line ---
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The worker's own flags before `--`; train.py's arguments after it (`a.train`, train.parse_args)."""
    import train

    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS), help="what to measure")
    p.add_argument("--json", required=True, help="where to write the result")
    p.add_argument("--workdir", default="", help="trainer, trl: scratch folder (Trainer output_dir)")
    p.add_argument("--sampling", choices=["random", "group_by_length"], default="random",
                   help="trainer: the Trainer's train_sampling_strategy")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="trainer: the model's attention implementation (from_pretrained(attn_implementation=...))")
    p.add_argument("--new_tokens", type=int, default=32, help="generation: tokens per reply")
    p.add_argument("--repeats", type=int, default=3, help="generation: timed repeats (median)")
    a = p.parse_args(argv[:cut])
    a.train = train.parse_args(argv[cut + 1:])
    return a


TASKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "trainer": run_trainer, "trl": run_trl, "matmul": run_matmul, "weights": run_weights,
    "generation": run_generation}


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    import utils

    utils.write_json(a.json, TASKS[a.task](a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
