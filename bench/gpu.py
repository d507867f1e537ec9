"""The Baichuan2-7B training job on one GPU, with random weights (no download: weight values do not change
speed): QLoRA with the seed's recipe (train.sh's 7B settings: batch 2 x 512, grad accum 4, gradient
checkpointing, DeepSpeed ZeRO-2, LoRA r16 on every linear layer), the same job through the HF Trainer,
and with liger-kernel's fused linear cross-entropy where that package is installed.

Reports tokens/s, MFU against the GPU's bf16 dense peak (6·N·tokens/s, N = all 7.506 B parameters, the
standard convention; beside it the ~4·N that LoRA/QLoRA really computes: no weight gradients for the
frozen base) and peak GPU memory. Each job: --warmup + --steps optimizer steps on fixed 2 x 512 micro-
batches of random tokens (every position a token; answers labelled on the last 3/5 of each row).

`--dry_run` builds the 7B-shaped model on the meta device (no memory, any machine) and prints the plan:
the shapes, the parameter count, the memory estimate of the QLoRA job and the steps it would run.

Examples:
    python bench/gpu.py --dry_run                     # the plan, on any machine
    python bench/gpu.py --out bench/gpu_results.md   # on one CUDA GPU, about 5 minutes on an H100
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import GPU_PEAK_TFLOPS  # noqa: E402  (after the path setup: runnable as a script)

SEQ_LEN, MICRO_BATCH, GRAD_ACCUM = 512, 2, 4  # the seed's recipe (train.sh's defaults)
LABEL_SHARE = 0.6  # answers are labelled, prompts are not
GIB = 2**30


def config_7b() -> Any:
    """Baichuan2-7B's config (BaichuanConfig's defaults are its values)."""
    from baichuan import BaichuanConfig

    return BaichuanConfig(model_max_length=4096)


def meta_model(config: Any) -> Any:
    import torch

    from baichuan import BaichuanForCausalLM

    with torch.device("meta"):
        return BaichuanForCausalLM(config)


def shapes(model: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """(name with the layer index as {i}, shape, how many) of every parameter, layers folded into one line."""
    seen: dict[tuple[str, tuple[int, ...]], int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = (".".join("{i}" if x.isdigit() else x for x in parts), tuple(p.shape))
        seen[key] = seen.get(key, 0) + 1
    return [(n, s, c) for (n, s), c in seen.items()]


def lora_params(config: Any, r: int) -> int:
    """LoRA A and B of every decoder linear layer (W_pack, o_proj, gate/up/down_proj) at rank r."""
    h, i = config.hidden_size, config.intermediate_size
    per_layer = r * ((h + 3 * h) + (h + h) + 2 * (h + i) + (i + h))
    return per_layer * config.num_hidden_layers


def memory_plan(config: Any, total: int, r: int) -> dict[str, float]:
    """Bytes of the QLoRA job on one GPU, by part (an estimate: the allocator and CUDA context add ~1 GiB)."""
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    embed_head = 2 * v * h
    linear = total - embed_head - (2 * layers + 1) * h
    tokens = MICRO_BATCH * SEQ_LEN
    return {
        # NF4: 4 bits per weight, plus double-quantized absmax (8 bits per 64 weights, fp32 per 256 blocks)
        "decoder linear weights, NF4 + double quant": linear * (0.5 + 1 / 64 + 4 / (64 * 256)),
        # prepare_model_for_kbit_training keeps the unquantized embeddings and head in fp32
        "embeddings + head, fp32": embed_head * 4,
        # bf16 weights, fp32 master copy, fp32 gradients, Adam m and v (ZeRO-2, one rank)
        "LoRA weights, gradients, Adam states": lora_params(config, r) * (2 + 4 + 4 + 8),
        # gradient checkpointing: each layer's bf16 input, plus one layer's activations during recompute
        "checkpointed activations": layers * tokens * h * 2 + tokens * (12 * h + 3 * config.intermediate_size) * 2,
        # the head's logits: bf16, their fp32 copy and its gradient, for the labelled positions only
        "logits and their gradient (labelled positions)": LABEL_SHARE * tokens * v * (2 + 4 + 4),
    }


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The dry run: the 7B shape on the meta device, its parameter count and the memory estimate."""
    config = config_7b()
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    memory = memory_plan(config, total, args.lora_r)
    return {"params": total, "shapes": shapes(model), "memory": memory, "memory_total": sum(memory.values()),
            "lora_params": lora_params(config, args.lora_r),
            "tokens_per_step": MICRO_BATCH * SEQ_LEN * GRAD_ACCUM,
            "jobs": ["train.py's loop (QLoRA, DeepSpeed ZeRO-2, --packing)", "HF Trainer + PEFT QLoRA",
                     "train.py's loop with liger-kernel fused linear cross-entropy"
                     + ("" if importlib.util.find_spec("liger_kernel") else " (liger-kernel not installed: skipped)")],
            "steps": f"{args.warmup} warm-up + {args.steps} measured optimizer steps per job"}


def print_plan(p: dict[str, Any]) -> None:
    print(f"Baichuan2-7B shape: {p['params']:,} parameters ({p['params'] / 1e9:.3f} B)")
    for name, shape, count in p["shapes"]:
        print(f"  {name:48s} {str(list(shape)):18s} x{count}")
    print(f"LoRA r16 on every decoder linear layer: {p['lora_params']:,} trainable parameters")
    print(f"QLoRA job: micro-batch {MICRO_BATCH} x {SEQ_LEN}, grad accum {GRAD_ACCUM}: {p['tokens_per_step']} "
          "tokens per optimizer step; gradient checkpointing; DeepSpeed ZeRO-2")
    print("memory estimate on one GPU:")
    for part, size in p["memory"].items():
        print(f"  {part:52s} {size / GIB:6.2f} GiB")
    print(f"  {'total (+ ~1 GiB CUDA context and allocator slack)':52s} {p['memory_total'] / GIB:6.2f} GiB")
    print("jobs: " + "; ".join(p["jobs"]) + f"; {p['steps']}")


# --- the real run (CUDA) ---
def random_qlora_base(config: Any) -> Any:
    """The 7B shape on the GPU with random bf16 weights, its decoder linear layers replaced by NF4 +
    double-quant bitsandbytes layers (what from_pretrained with nf4_config makes of a checkpoint)."""
    import bitsandbytes as bnb
    import torch

    model = meta_model(config).to(torch.bfloat16)
    model.to_empty(device="cuda")  # allocated on the GPU, never on the host
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4").to("cuda")  # quantizes on the move
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what peft's prepare_model_for_kbit_training looks for
    model.config.use_cache = False
    torch.cuda.empty_cache()
    return model


def train_args(folder: Path, out: Path, steps: int) -> argparse.Namespace:
    """train.py's arguments for train.sh's 7B recipe (`bash train.sh --print` with MODEL=<folder>)."""
    import train
    from tools.recipe import train_args as recipe_args

    args = recipe_args({"MODEL": str(folder), "OUTPUT_DIR": str(out)})
    return train.parse_args([*args, "--max_steps", str(steps), "--packing"])


def micro_batches(config: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n packed micro-batches of MICRO_BATCH samples x SEQ_LEN random tokens each (roleplay.packing)."""
    import torch

    from roleplay.packing import PackingCollator

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        samples = []
        for _ in range(MICRO_BATCH):
            ids = torch.randint(3, config.vocab_size, (SEQ_LEN,), generator=g).tolist()
            cut = int(SEQ_LEN * (1 - LABEL_SHARE))
            samples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "group": 1})
        out.append({k: v.cuda() if hasattr(v, "cuda") else v for k, v in PackingCollator()(samples).items()})
    return out


def measure(step_fn: Any, warmup: int, steps: int) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"tok_s": steps * MICRO_BATCH * SEQ_LEN * GRAD_ACCUM / seconds, "step_s": seconds / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def ours_job(config: Any, args: argparse.Namespace, work: Path, liger: bool) -> dict[str, float]:
    """train.py's own pieces: load_model's LoRA wrapping, the DeepSpeed config, batch_loss, the engine."""
    import deepspeed

    import train
    from roleplay.packing import batch_loss

    model = random_qlora_base(config)
    targs = train_args(work, work / "out", args.warmup + args.steps)
    model, _ = train.wrap_lora(model, targs, resized=False)
    train.init_distributed()
    ds = train.build_ds_config(targs, 1, args.warmup + args.steps, bf16=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    batches = micro_batches(config, GRAD_ACCUM)
    loss_fn = liger_loss(engine) if liger else None

    def step() -> None:
        for b in batches:
            loss = loss_fn(b) if loss_fn else batch_loss(engine, b, 2)[0]
            engine.backward(loss)
            engine.step()

    result = measure(step, args.warmup, args.steps)
    engine.destroy()
    return result


def liger_loss(engine: Any) -> Any:
    """Loss through liger-kernel's fused linear cross-entropy: the head's logits are never materialised
    (NormHead: the normalised head rows are passed as the weight)."""
    import torch.nn.functional as F
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from roleplay.packing import label_positions, model_inputs

    fused = LigerFusedLinearCrossEntropyLoss()
    base = engine.module.get_base_model()

    def loss(b: dict[str, Any]) -> Any:
        hidden = base.model(**model_inputs(b)).last_hidden_state[0]
        keep = label_positions(b["labels"])
        return fused(F.normalize(base.lm_head.weight), hidden[keep], b["labels"][0, keep + 1])

    return loss


def trainer_job(config: Any, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """The HF Trainer on the same base, LoRA settings and batches (padded as the Trainer pads: rows of 512)."""
    import torch
    from transformers import Trainer, TrainingArguments

    import train

    model = random_qlora_base(config)
    targs = train_args(work, work / "out", args.warmup + args.steps)
    model, _ = train.wrap_lora(model, targs, resized=False)
    g = torch.Generator().manual_seed(0)
    n = MICRO_BATCH * GRAD_ACCUM * (args.warmup + args.steps)
    rows = [torch.randint(3, config.vocab_size, (SEQ_LEN,), generator=g).tolist() for _ in range(n)]
    cut = int(SEQ_LEN * (1 - LABEL_SHARE))
    data = [{"input_ids": r, "labels": [-100] * cut + r[cut:], "attention_mask": [1] * SEQ_LEN} for r in rows]
    targs_hf = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GRAD_ACCUM, max_steps=args.warmup + args.steps,
        learning_rate=targs.learning_rate, bf16=True, optim="adamw_torch_fused",
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False)
    marks: list[float] = []

    class Clock(__import__("transformers").TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if len(marks) == args.warmup:
                torch.cuda.reset_peak_memory_stats()

    trainer = Trainer(model=model, args=targs_hf, train_dataset=data, callbacks=[Clock()],
                      data_collator=lambda xs: {k: torch.tensor([x[k] for x in xs]) for k in xs[0]})
    trainer.train()
    seconds = marks[-1] - marks[args.warmup - 1]
    return {"tok_s": args.steps * MICRO_BATCH * SEQ_LEN * GRAD_ACCUM / seconds, "step_s": seconds / args.steps,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def mfu(flops_per_param: int, params: int, tok_s: float, peak_tflops: float) -> str:
    """Model-FLOP utilisation: flops_per_param * params * tokens/s over the peak (n/a without a peak)."""
    return f"{100 * flops_per_param * params * tok_s / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"


def run_gpu(args: argparse.Namespace) -> str:
    import gc

    import torch

    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0)
    config = config_7b()
    n = plan(args)["params"]
    work = Path(tempfile.mkdtemp(prefix="rpp-gpu-"))
    config.save_pretrained(work)  # train.sh --print takes MODEL=<folder with a config.json> as real weights
    jobs = {"train.py (QLoRA, ZeRO-2, packed)": lambda: ours_job(config, args, work, liger=False),
            "HF Trainer + PEFT QLoRA": lambda: trainer_job(config, args, work)}
    if importlib.util.find_spec("liger_kernel"):
        jobs["train.py + liger fused linear cross-entropy"] = lambda: ours_job(config, args, work, liger=True)
    lines = [f"# Baichuan2-7B shape on {name}", "", f"random weights, {n / 1e9:.3f} B parameters; micro-batch "
             f"{MICRO_BATCH} x {SEQ_LEN}, grad accum {GRAD_ACCUM}, gradient checkpointing; {args.warmup} warm-up + "
             f"{args.steps} measured steps; bf16 peak {peak:g} TFLOP/s", "",
             "| job | tokens/s | MFU 6·N | MFU 4·N (LoRA) | peak GPU memory | s/step |", "|---|---|---|---|---|---|"]
    for label, job in jobs.items():
        try:
            r = job()
        except Exception as e:  # noqa: BLE001  (one failing job must not hide the others' figures)
            lines.append(f"| {label} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
            continue
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        lines.append(f"| {label} | {r['tok_s']:.0f} | {mfu(6, n, r['tok_s'], peak)} | {mfu(4, n, r['tok_s'], peak)} "
                     f"| {r['peak_gib']:.1f} GiB | "
                     f"{r['step_s']:.2f} |")
        print(lines[-1], flush=True)
    if not importlib.util.find_spec("liger_kernel"):
        lines.append("| train.py + liger fused linear cross-entropy | not measured: liger-kernel is not installed | "
                     "| | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="print the plan from a meta-device model; needs no GPU")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps per job")
    p.add_argument("--warmup", type=int, default=2, help="warm-up optimizer steps per job (not measured)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the plan's estimate (train.sh's LORA_R)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="GPU bf16 dense peak (default: by device name)")
    p.add_argument("--json", default="", help="dry run: also write the plan as JSON here")
    p.add_argument("--out", default="", help="real run: also write the markdown table here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        p = plan(args)
        print_plan(p)
        if args.json:
            Path(args.json).write_text(json.dumps(p, indent=1), encoding="utf-8")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; `--dry_run` prints the plan on any machine", file=sys.stderr)
        return 2
    table = run_gpu(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
