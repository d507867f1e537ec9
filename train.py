"""Fine-tune a chat model to play roles: QLoRA (NF4 4-bit base + LoRA on every linear layer)
under DeepSpeed ZeRO-2, or plain LoRA / full fine-tuning for comparison.

Launch it through `train.sh` (which holds the recipe's hyperparameters), or directly:

    deepspeed --num_gpus 1 train.py --model_name_or_path output/tiny-baichuan2-chat \
        --train_path data/train.json --test_path data/test.json --output_dir output/qlora

By default (`--packing`, train.sh's PACKING=1) each micro-batch's samples are laid end to end in one
row (roleplay/packing.py): no padding, attention confined to each sample, the same samples per step and
the same loss; the output head, and the last layer past its attention (Baichuan), run only where a label
is. On CPU, PEFT's LoRA dropout is replaced by roleplay/dropout.py's GapDropout (same distribution, a
fraction of the random draws). The loss is logged per record kind
(utils.LOSS_GROUPS: attribute facts, role replies) to TensorBoard and the loss plot, train and eval.

Each checkpoint `output_dir/epoch-{e}-step-{s}/` holds the adapter (or the full model), the
tokenizer, the resolved run config (`run_config.json`, read by merge_params.py and predict.py)
and the DeepSpeed training state that `--resume` continues from. Checkpoint folders appear
only when complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import utils
from roleplay import loading
from roleplay.devices import bf16_supported, resolve_device
from roleplay.packing import PackingCollator, batch_loss
from roleplay.plotting import plot_loss
from roleplay.profiling import StepProfiler
from roleplay.sampler import LengthGroupedBatchSampler
from utils import UserError, print_rank0

CKPT_RE = re.compile(r"^epoch-(\d+)-step-(\d+)$")
# the training loop's state saved as DeepSpeed client_state (and restored by --resume)
STATE_KEYS = ("global_step", "epoch", "micro_in_epoch", "epoch_display", "history", "throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=utils.DEFAULT_BASE_DIR,
                   help="base model folder (Baichuan2 or a transformers causal LM such as Qwen2)")
    p.add_argument("--train_path", default=utils.TRAIN_PATH, help="training records (JSON lines)")
    p.add_argument("--test_path", default=utils.TEST_PATH, help="eval records, scored each epoch ('' to skip)")
    p.add_argument("--roles", default="",
                   help="comma-separated roles: train and eval only on records whose `role` is one of them (one "
                        "adapter per role: ROLES=... bash train.sh); that share is saved in output_dir/role_data/")
    p.add_argument("--output_dir", default="output/qlora", help="where checkpoints go")
    p.add_argument("--train_mode", choices=["qlora", "lora", "full"], default="qlora",
                   help="qlora: 4-bit NF4 base + LoRA; lora: bf16/fp32 base + LoRA; full: all weights")
    p.add_argument("--per_device_train_batch_size", type=int, default=2, help="micro-batch size per process")
    p.add_argument("--per_device_eval_batch_size", type=int, default=8, help="eval batch size per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--max_len", type=int, default=512, help="max tokens of prompt + answer")
    p.add_argument("--max_src_len", type=int, default=256, help="max tokens of the prompt")
    p.add_argument("--is_skip", action="store_true", help="drop samples that would be truncated (and count them)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="lay each micro-batch's samples end to end in one row (no padding; attention stays inside "
                        "each sample, positions restart): the same samples, steps and losses, less compute "
                        "(--no-packing: pad each micro-batch to its longest sample)")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--num_train_epochs", type=int, default=1, help="passes over the training data")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--warmup_ratio", type=float, default=0.03, help="share of steps with linear warmup")
    p.add_argument("--lora_dim", type=int, default=16, help="LoRA rank r")
    p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha")
    p.add_argument("--lora_dropout", type=float, default=0.1, help="LoRA dropout")
    p.add_argument("--lora_targets", default="all-linear",
                   help="'all-linear' (every linear layer but the head) or comma-separated module names; "
                        "add embed_tokens,lm_head to train those too")
    p.add_argument("--modules_to_save", default="",
                   help="comma-separated modules trained in full and saved with the adapter, e.g. lm_head "
                        "(needed when the answers use tokens the base never produced: a frozen head cannot learn them)")
    p.add_argument("--modules_to_save_lr", type=float, default=None,
                   help="peak learning rate of the --modules_to_save weights (default: --learning_rate); "
                        "lower keeps more of the base's own embeddings and head")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--ds_file", default="ds_zero2_no_offload.json",
                   help="DeepSpeed config ('auto' fields are filled from these flags)")
    p.add_argument("--seed", type=int, default=1234, help="seed for init, data order and dropout")
    p.add_argument("--save_model_step", type=int, default=0,
                   help="also save every N optimizer steps (0: per epoch only)")
    p.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="delete checkpoints of an earlier run in output_dir instead of refusing to start")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.add_argument("--plot_to_images", action="store_true",
                   help="also copy the loss plot to images/loss.png (relative to the cwd; train.sh runs in the repo)")
    p.add_argument("--log_steps", type=int, default=1, help="TensorBoard/progress update every N optimizer steps")
    p.add_argument("--profile", action="store_true",
                   help="time each optimizer step's phases (data, forward, backward, optimizer) and write them to "
                        "output_dir/profile.json at the end (on CUDA each phase waits for the GPU: slower steps)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")),
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Setup: devices, precision, model, data, DeepSpeed config
# ---------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; works under the launcher and as plain `python`."""
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(verbose=False)
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def load_model(args: argparse.Namespace, device: Any, compute_dtype: Any, tokenizer: Any,
               attn_implementation: str | None = None) -> tuple[Any, dict]:
    """Base model for the chosen mode, wrapped with LoRA where asked; returns (model, report).
    `attn_implementation` ("sdpa", "eager"; None: the model's default) is for bench/workers.py's peers."""
    import torch
    from transformers import AutoModelForCausalLM

    from roleplay.dropout import use_gap_dropout

    kwargs: dict[str, Any] = {"device_map": {"": device}}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if args.train_mode == "qlora":
        kwargs["quantization_config"] = loading.nf4_config(compute_dtype)
        kwargs["dtype"] = compute_dtype
    else:
        kwargs["dtype"] = compute_dtype if args.train_mode == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    resized = ensure_pad_token(tokenizer, model)
    model.config.use_cache = False
    if args.train_mode == "full":
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, {"trainable": count_params(model, True), "total": count_params(model, False), "resized": resized}
    model, report = wrap_lora(model, args, resized)
    # nn.Dropout draws one number per element, ~12% of a tiny-default step on a CPU; GapDropout draws only
    # the dropped positions, same distribution (roleplay/dropout.py). CUDA's fused dropout is kept.
    report["lora_dropout_kernel"] = "gap" if device.type == "cpu" and use_gap_dropout(model) else "torch"
    return model, report


def ensure_pad_token(tokenizer: Any, model: Any) -> bool:
    """Give a tokenizer without a pad token one, and grow the embeddings to match."""
    if tokenizer.pad_token_id is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return False  # the new id fits an existing (padding) row: never shrink a padded vocabulary
    model.resize_token_embeddings(len(tokenizer))
    return True


def wrap_lora(model: Any, args: argparse.Namespace, resized: bool) -> tuple[Any, dict]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.train_mode == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = lora_targets(model, args.lora_targets)
    if resized:  # new pad row must be trained and saved with the adapter, or merging breaks
        targets = sorted(set(targets) | {"embed_tokens", "lm_head"})
    to_save = [m.strip() for m in args.modules_to_save.split(",") if m.strip()] or None
    config = LoraConfig(r=args.lora_dim, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=to_save, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias inside get_peft_model
        # (a FutureWarning on every run that no flag of ours can avoid); only that message is hidden
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, config)
    return model, {"trainable": count_params(model, True), "total": count_params(model, False),
                   "targets": targets, "resized": resized}


def optimizer_groups(model: Any, modules_to_save_lr: float | None) -> list[Any]:
    """The trainable parameters for the optimizer: one group at the DeepSpeed config's lr, or, with
    `modules_to_save_lr`, the modules trained in full (PEFT's `modules_to_save` copies) in a second group
    at that lr. DeepSpeed's WarmupCosineLR scales every group's own lr, so the ratio holds all run."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = [p for n, p in trainable if ".modules_to_save." in n]
    if modules_to_save_lr is None or not saved:
        return [p for _, p in trainable]
    return [{"params": [p for n, p in trainable if ".modules_to_save." not in n]},
            {"params": saved, "lr": modules_to_save_lr}]


def lora_targets(model: Any, spec: str) -> list[str]:
    if spec == "all-linear":
        return loading.find_all_linear_names(model)
    return [t.strip() for t in spec.split(",") if t.strip()]


def count_params(model: Any, trainable: bool) -> int:
    total = 0
    for p in model.parameters():
        if trainable and not p.requires_grad:
            continue
        # bitsandbytes packs two 4-bit weights per uint8 element
        total += p.numel() * (2 if p.dtype.is_floating_point is False and p.element_size() == 1 else 1)
    return total


def role_data_files(args: argparse.Namespace) -> tuple[str, str]:
    """(train, eval) files holding only the records of `--roles`, written to output_dir/role_data/ (the
    run config then names them). A role without training records is an error naming the roles there."""
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    folder = Path(args.output_dir) / "role_data"
    records = [r for _, r in utils.read_jsonl(args.train_path)]
    present = sorted({str(r.get("role")) for r in records if r.get("role") is not None})
    missing = [role for role in roles if not any(r.get("role") == role for r in records)]
    if missing:
        raise UserError(f"--roles: no records of {', '.join(missing)} in {args.train_path}; roles there: "
                        f"{', '.join(present) or 'none (records without a role field)'}")
    utils.write_jsonl(folder / "train.json", (r for r in records if r.get("role") in roles))
    if not args.test_path:
        return str(folder / "train.json"), ""
    tests = [r for _, r in utils.read_jsonl(args.test_path) if r.get("role") in roles]
    if not tests:
        print_rank0(f"--roles: {args.test_path} has no records of {', '.join(roles)}; no eval loss")
        return str(folder / "train.json"), ""
    utils.write_jsonl(folder / "test.json", tests)
    return str(folder / "train.json"), str(folder / "test.json")


def load_ds_config(path: str) -> dict:
    return utils.read_json_object(path, "DeepSpeed config", "start from ds_zero2_no_offload.json (--ds_file)",
                                  UserError)


def resolve_ds_config(ds: dict, path: str, values: dict[str, Any]) -> dict:
    """Fill the config's "auto" fields from the flags. A concrete value that disagrees with a
    flag is an error: every hyperparameter has exactly one owner, nothing is overridden silently."""
    ds = json.loads(json.dumps(ds))
    for dotted, value in values.items():
        node = ds
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value and not (isinstance(value, float) and math.isclose(float(current), value)):
            raise UserError(f"{path}: {dotted} is {current!r} but the flags give {value!r}; set it to "
                            "\"auto\" in the JSON (the flags own it) or change the flag to match")
    return ds


def build_ds_config(args: argparse.Namespace, world_size: int, total_steps: int, bf16: bool) -> dict:
    values = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "bf16.enabled": bf16,
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.weight_decay": args.weight_decay,
        "scheduler.params.warmup_num_steps": max(1, math.ceil(total_steps * args.warmup_ratio)),
        "scheduler.params.total_num_steps": max(total_steps, 2),
    }
    return resolve_ds_config(load_ds_config(args.ds_file), args.ds_file, values)


def single_rank_zero(ds: dict, world_size: int, resume_from: Path | None) -> tuple[dict, str | None]:
    """(config to run, note): ZeRO stages 1 and 2 split the optimizer state and the gradients across
    data-parallel ranks. On one rank in fp32 there is nothing to split and no low-precision master copy
    to keep, so they only add copies into and out of flat buffers (~5% of a tiny-default step on a CPU,
    measured with bench/run.py): such a run uses stage 0, the same training. The config is kept as
    written with several ranks, bf16/fp16, an offload, or when resuming a checkpoint saved in ZeRO's
    partitioned layout (its optimizer state is in zero_pp_rank_* files that only stages 1-2 read)."""
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    offload = any((zero.get(k) or {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    low_precision = any((ds.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    partitioned = resume_from is not None and any((resume_from / "ds_state" / "state").glob("zero_pp_rank_*"))
    if world_size != 1 or stage not in (1, 2) or offload or low_precision or partitioned:
        return ds, None
    return ({**ds, "zero_optimization": {"stage": 0}},
            f"one fp32 rank: DeepSpeed ZeRO stage {stage} runs as stage 0 (nothing to partition; same training)")


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic save, resume
# ---------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, with a run config) sorted by global step."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for d in root.iterdir():
        m = CKPT_RE.match(d.name)
        if m and d.is_dir() and (d / utils.RUN_CONFIG_NAME).is_file():
            out.append((int(m.group(2)), d))
    return sorted(out)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors, lists, ints and floats only, so that resume can read
    them with `torch.load(weights_only=True)` (no unpickling of arbitrary objects)."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, tokenizer: Any, run_config: dict, state: dict, args: argparse.Namespace) -> Path:
    """Write output_dir/epoch-E-step-S atomically: every rank writes into a temp folder, rank 0
    adds the adapter/model, tokenizer and run config, then renames it into place."""
    import torch
    import torch.distributed as dist

    tag = f"epoch-{state['epoch_display']}-step-{state['global_step']}"
    final = Path(args.output_dir) / tag
    tmp = Path(args.output_dir) / f".tmp-{tag}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "ds_state"), tag="state", client_state=state, exclude_frozen_parameters=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        engine.module.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        utils.write_json(tmp / "trainer_state.json", {k: v for k, v in state.items() if k != "history"}
                         | {"history": state["history"]})
        utils.write_json(tmp / utils.RUN_CONFIG_NAME, run_config)  # last: marks the folder complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(args)
    dist.barrier()
    return final


def clear_output_dir(output_dir: str, rank: int) -> None:
    """Rank 0 deletes an earlier run's checkpoints (and half-written temp folders); all ranks wait."""
    import torch.distributed as dist

    if rank == 0 and Path(output_dir).is_dir():
        for d in Path(output_dir).iterdir():
            if d.is_dir() and (CKPT_RE.match(d.name) or d.name.startswith(".tmp-")):
                shutil.rmtree(d, ignore_errors=True)
    dist.barrier()


def prune_checkpoints(args: argparse.Namespace) -> None:
    if args.save_total_limit > 0:
        for _, d in list_checkpoints(args.output_dir)[: -args.save_total_limit]:
            shutil.rmtree(d, ignore_errors=True)


def deepspeed_state_types() -> list[type]:
    """The only non-tensor classes DeepSpeed 0.19's ZeRO-2 state files hold (what
    `torch.serialization.get_unsafe_globals_in_checkpoint` lists for train.py's checkpoints: the
    optimizer's loss scaler, ZeRO stage enum and parameter-slice mapping; the dynamic scaler of fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_state_file(path: str | os.PathLike, map_location: Any = None) -> Any:
    """torch.load of one DeepSpeed state file with weights_only=True: tensors, containers, numbers and
    the `deepspeed_state_types` allowlisted for this call only (`torch.serialization.safe_globals`), so
    no file can make the load call anything (a pickle's `__reduce__` is refused, not run). A refused or
    unreadable file is a UserError naming it."""
    import torch

    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        detail = found.group(0) if found else str(e).splitlines()[0]
        raise UserError(f"{path}: refused to load: it holds more than tensors and DeepSpeed's own state types "
                        f"({detail[:200]}); train.py never writes such a file, so it was altered or comes from "
                        "elsewhere: delete that checkpoint folder to resume from an older one") from e
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file
        raise UserError(f"{path}: unreadable training state ({str(e).splitlines()[0][:200]}); delete that "
                        "checkpoint folder to resume from an older one") from e


def use_weights_only_loads(engine: Any) -> None:
    """Make the engine read its checkpoints through `load_state_file`. DeepSpeed 0.19.8's default
    TorchCheckpointEngine.load calls torch.load(weights_only=False), which unpickles anything; the
    engine's `checkpoint_engine` is the pluggable reader every load path (model states, ZeRO
    optimizer shards) goes through, so replacing its `load` covers them all. Saving is unchanged."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:  # the others (fast/decoupled writers) call torch.load's default,
        current.load = load_state_file  # weights_only=True since torch 2.6; those need no change


def load_resume_state(engine: Any, args: argparse.Namespace) -> dict | None:
    import torch
    import torch.distributed as dist

    ckpts = list_checkpoints(args.output_dir)
    if not ckpts:
        print_rank0(f"--resume: no complete checkpoint in {args.output_dir}; starting fresh")
        return None
    _, ckpt = ckpts[-1]
    use_weights_only_loads(engine)  # before the first state file is read
    _, state = engine.load_checkpoint(str(ckpt / "ds_state"), tag="state", load_module_strict=False)
    if state is None:
        raise UserError(f"{ckpt}: DeepSpeed state could not be loaded; delete the folder to resume from an older one")
    # DeepSpeed hands back its own metadata too (e.g. checkpoint_parallel_dimensions), which it
    # refuses as client_state on the next save: keep only the training loop's keys
    state = {k: v for k, v in state.items() if k in STATE_KEYS}
    rng_file = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        try:
            rng = torch.load(rng_file, weights_only=True)  # tensors, lists and numbers only: nothing unpickled
        except pickle.UnpicklingError:
            rng = None
            print_rank0(f"warning: {rng_file} is in an older format that needs unpickling; RNG state not restored "
                        "(dropout after the resume may differ from an uninterrupted run)")
        if rng is not None:
            set_rng_state(rng)
    print_rank0(f"resumed from {ckpt} (global step {state['global_step']})")
    return state


# ---------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------
def evaluate(engine: Any, dataset: Any, collator: Any, batch_size: int, device: Any) -> tuple[float, list]:
    """Token-level mean loss over the eval set (each rank scores its share; summed over ranks), and
    the same per LOSS_GROUPS entry (None for a group with no eval tokens)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    total = torch.zeros(len(utils.LOSS_GROUPS), 2, dtype=torch.float64, device=device)
    indices = list(range(rank, len(dataset), world))
    with torch.no_grad():
        for i in range(0, len(indices), batch_size):
            batch = to_device(collator([dataset[j] for j in indices[i:i + batch_size]]), device)
            total += batch_loss(engine, batch, len(utils.LOSS_GROUPS))[1]
    dist.all_reduce(total)
    engine.train()
    total = total.tolist()
    return sum(t[0] for t in total) / max(sum(t[1] for t in total), 1), group_means(total)


def group_means(sums: list[list[float]]) -> list[float | None]:
    """Mean loss per group from [sum, count] pairs (None where a group had no tokens)."""
    return [s / n if n else None for s, n in sums]


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch's tensors on `device`; other values (host-side counts) as they are."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loading.check_model_dir(args.model_name_or_path, loading.TRAIN_MODEL_HINT)
    ds_template = load_ds_config(args.ds_file)  # fail fast on a bad config, before loading a model
    if not os.path.isfile(args.train_path):
        raise UserError(f"train file {args.train_path!r} not found; build it with `python data_helper.py`")
    if next(utils.read_jsonl(args.train_path), None) is None:  # cheap: before torch, DeepSpeed and the model
        raise UserError(f"train file {args.train_path!r} has no records; build it with `python data_helper.py`")
    old_checkpoints = list_checkpoints(args.output_dir)
    if old_checkpoints and not (args.resume or args.overwrite_output_dir):
        raise UserError(f"{args.output_dir} already holds checkpoints of an earlier run (newest: "
                        f"{old_checkpoints[-1][1].name}); pass --resume to continue it, --overwrite_output_dir "
                        "to replace it, or choose another --output_dir")
    if args.roles:
        args.train_path, args.test_path = role_data_files(args)  # from here on the run sees only these roles

    import deepspeed
    import torch
    from torch.utils.data import DataLoader
    from transformers import GenerationConfig

    rank, world_size = init_distributed()
    device = resolve_device(args.device, args.local_rank)
    if args.overwrite_output_dir and not args.resume:
        clear_output_dir(args.output_dir, rank)
    bf16 = bool(ds_template.get("bf16", {}).get("enabled") is True or
                (ds_template.get("bf16", {}).get("enabled") == "auto" and bf16_supported(device)))
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    utils.set_seed(args.seed)

    # --- data
    tokenizer = loading.load_tokenizer(args.model_name_or_path, training=True)
    gen_config = load_generation_config(args.model_name_or_path, GenerationConfig)
    train_ds = utils.Baichuan2PromptDataSet(args.train_path, tokenizer, args.max_len, args.max_src_len,
                                            args.is_skip, gen_config)
    eval_ds = (utils.Baichuan2PromptDataSet(args.test_path, tokenizer, args.max_len, args.max_src_len,
                                            False, gen_config) if args.test_path else None)
    print_rank0(f"train samples: {len(train_ds)} (skipped as too long: {train_ds.skipped}, "
                f"truncated: {train_ds.truncated}); eval samples: {len(eval_ds) if eval_ds else 0}")

    # --- batches and the DeepSpeed config (before the model: a config mistake costs no model load)
    # Grouping by length only saves padding, which packing removes anyway; packed, the batches are drawn at
    # random (megabatch 1), so each step mixes the record kinds instead of alternating all-fact and all-role steps.
    sampler = LengthGroupedBatchSampler(train_ds.lengths, args.per_device_train_batch_size, world_size,
                                        rank, args.gradient_accumulation_steps, args.seed,
                                        megabatch=1 if args.packing else 64)
    micro_per_epoch = len(sampler.micro_batches(0))
    steps_per_epoch = micro_per_epoch // args.gradient_accumulation_steps
    total_steps = steps_per_epoch * args.num_train_epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    resume_from = old_checkpoints[-1][1] if args.resume and old_checkpoints else None
    ds_config, zero_note = single_rank_zero(build_ds_config(args, world_size, total_steps, bf16), world_size,
                                            resume_from)
    if zero_note:
        print_rank0(zero_note)

    # --- model
    model, report = load_model(args, device, compute_dtype, tokenizer)
    print_rank0(f"mode {args.train_mode}: trainable params {report['trainable']:,} / {report['total']:,} "
                f"({100 * report['trainable'] / max(report['total'], 1):.2f}%)"
                + (f"; LoRA targets {report['targets']}" if "targets" in report else ""))
    # After load_model: it may add the pad token. Multiples of 8 suit GPU tensor cores; on CPUs
    # they would only add padding.
    collator = utils.DataCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device.type == "cuda" else 1,
                                  meta=True)
    train_collator = PackingCollator() if args.packing else collator  # eval stays padded: its batches are fixed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, args.modules_to_save_lr), config=ds_config)
    run_config = build_run_config(args, report, ds_config, world_size, bf16, total_steps, train_ds)
    run_config["deepspeed_config_note"] = zero_note  # why deepspeed_config differs from --ds_file, if it does

    # --- state (fresh or resumed)
    state = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0, "epoch_display": 1,
             "history": {"train": [], "eval": [], "train_groups": [], "eval_groups": []}}
    if args.resume:
        state = load_resume_state(engine, args) or state
    writer = make_writer(args.output_dir)
    progress = make_progress(total_steps, state["global_step"])
    window = new_window(device)
    profiler = StepProfiler(device, args.profile)

    engine.train()
    for epoch in range(state["epoch"], args.num_train_epochs):
        sampler.set_epoch(epoch, start=state["micro_in_epoch"] if epoch == state["epoch"] else 0)
        state["epoch"], state["epoch_display"] = epoch, epoch + 1
        # own generator: starting a DataLoader iterator otherwise draws from the global torch RNG,
        # which would shift dropout after --resume (the RNG state is restored before this point)
        loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=train_collator,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        profiler.lap(None)  # the time since the last step (eval, checkpoint, plots) belongs to no step
        for batch in loader:
            batch = to_device(batch, device)
            profiler.lap("data")
            loss, group_sums = batch_loss(engine, batch, len(utils.LOSS_GROUPS))
            profiler.lap("forward")
            engine.backward(loss)
            profiler.lap("backward")
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            profiler.lap("optimizer")
            state["micro_in_epoch"] += 1
            # device-side sums and host-side counts: no read-back from the device until the step's log
            window["loss"] += loss.detach().double()
            window["groups"] += group_sums
            window["micro"] += 1
            window["tokens"] += batch["num_tokens"]
            window["padded"] += batch["input_ids"].numel()
            profiler.lap("other")
            if not boundary:
                continue
            state["global_step"] += 1
            log_step(state, window, scheduler, writer, progress, args)
            if args.save_model_step and state["global_step"] % args.save_model_step == 0:
                save_checkpoint(engine, tokenizer, run_config, state, args)
            profiler.end_step(state["throughput"][-1])
            if args.max_steps and state["global_step"] >= args.max_steps:
                break
        # --- end of epoch: eval, checkpoint, plot
        finished_epoch = state["micro_in_epoch"] >= micro_per_epoch
        state["epoch"], state["micro_in_epoch"] = (epoch + 1, 0) if finished_epoch else (epoch, state["micro_in_epoch"])
        if eval_ds is not None:
            eval_loss, eval_groups = evaluate(engine, eval_ds, collator, args.per_device_eval_batch_size, device)
            state["history"]["eval"].append((state["global_step"], eval_loss))
            state["history"].setdefault("eval_groups", []).append((state["global_step"], eval_groups))
            by_group = ", ".join(f"{g} {v:.4f}" for g, v in zip(utils.LOSS_GROUPS, eval_groups, strict=True)
                                 if v is not None)
            print_rank0(f"epoch {epoch + 1}: eval loss {eval_loss:.4f}  perplexity {math.exp(min(eval_loss, 50)):.2f}"
                        f"  ({by_group})")
            if writer:
                writer.add_scalar("eval/loss", eval_loss, state["global_step"])
                writer.add_scalar("eval/perplexity", math.exp(min(eval_loss, 50)), state["global_step"])
                add_group_scalars(writer, "eval", eval_groups, state["global_step"])
        ckpt = save_checkpoint(engine, tokenizer, run_config, state, args)
        write_plots(state, args, ckpt)
        if args.max_steps and state["global_step"] >= args.max_steps:
            break
    if progress:
        progress.close()
    if writer:
        writer.close()
    if args.profile and utils.is_rank0():
        utils.write_json(Path(args.output_dir) / "profile.json", profiler.report(world_size))
    newest = list_checkpoints(args.output_dir)
    print_rank0(f"done: {state['global_step']} optimizer steps; newest checkpoint: {newest[-1][1] if newest else None}")
    return 0


def load_generation_config(path: str, cls: Any) -> Any:
    try:
        return cls.from_pretrained(path)
    except OSError:
        return None


def build_run_config(args: argparse.Namespace, report: dict, ds_config: dict, world_size: int, bf16: bool,
                     total_steps: int, train_ds: Any) -> dict:
    """Everything a later stage needs to know about this run, resolved (no defaults left implicit)."""
    import peft
    import torch
    import transformers

    cfg = {k: v for k, v in vars(args).items() if k != "local_rank"}
    cfg.update({
        "base_model": os.path.abspath(args.model_name_or_path),
        "train_path": os.path.abspath(args.train_path),
        "test_path": os.path.abspath(args.test_path) if args.test_path else "",
        "world_size": world_size,
        "precision": "bf16" if bf16 else "fp32",
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "total_steps": total_steps,
        "train_samples": len(train_ds),
        "skipped_samples": train_ds.skipped,
        "trainable_params": report["trainable"],
        "lora_target_modules": report.get("targets"),
        "lora_dropout_kernel": report.get("lora_dropout_kernel"),
        "resized_embeddings": report.get("resized", False),
        "deepspeed_config": ds_config,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    })
    return cfg


def make_writer(output_dir: str) -> Any:
    if not utils.is_rank0():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(output_dir, "runs"))


def make_progress(total: int, done: int) -> Any:
    if not utils.is_rank0():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stdout, mininterval=1.0)


def log_step(state: dict, window: dict, scheduler: Any, writer: Any, progress: Any, args: argparse.Namespace) -> None:
    """Average the window's micro-batch losses over ranks; report loss, lr, tokens/s, padding share."""
    import torch
    import torch.distributed as dist

    # one tensor, one all-reduce, one read-back per optimizer step (on the loss's device: NCCL needs CUDA tensors)
    counts = torch.tensor([window["micro"], window["tokens"], window["padded"]], dtype=torch.float64)
    stats = torch.cat([window["loss"].reshape(1), counts.to(window["loss"].device), window["groups"].reshape(-1)])
    dist.all_reduce(stats)
    stats = stats.tolist()
    loss = stats[0] / stats[1]
    elapsed = time.perf_counter() - window["t0"]
    tok_s = stats[2] / max(elapsed, 1e-9)
    pad_share = 1 - stats[2] / max(stats[3], 1)
    lr = scheduler.get_last_lr()[0] if scheduler is not None else float("nan")
    groups = group_means([stats[4 + 2 * g:6 + 2 * g] for g in range(len(utils.LOSS_GROUPS))])
    state["history"]["train"].append((state["global_step"], loss))
    state["history"].setdefault("train_groups", []).append((state["global_step"], groups))
    # [step, tokens/s, padding share, non-pad tokens, padded positions, seconds]: enough to re-derive
    # any aggregate (--profile's per-step records reuse the counts)
    state.setdefault("throughput", []).append(
        (state["global_step"], tok_s, pad_share, int(stats[2]), int(stats[3]), elapsed))
    if writer and state["global_step"] % args.log_steps == 0:
        writer.add_scalar("train/loss", loss, state["global_step"])
        add_group_scalars(writer, "train", groups, state["global_step"])
        writer.add_scalar("train/lr", lr, state["global_step"])
        writer.add_scalar("train/tokens_per_s", tok_s, state["global_step"])
        writer.add_scalar("train/padding_share", pad_share, state["global_step"])
    if progress:
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", pad=f"{pad_share:.1%}")
        progress.update(1)
    window.update(new_window(window["loss"].device))


def new_window(device: Any) -> dict:
    """The statistics of the micro-batches since the last optimizer step (losses kept on the device)."""
    import torch

    return {"loss": torch.zeros((), dtype=torch.float64, device=device), "micro": 0, "tokens": 0, "padded": 0,
            "groups": torch.zeros(len(utils.LOSS_GROUPS), 2, dtype=torch.float64, device=device),
            "t0": time.perf_counter()}


def add_group_scalars(writer: Any, split: str, losses: list[float | None], step: int) -> None:
    """TensorBoard `train/loss_attribute_facts`, `eval/loss_role_replies`, ...: one curve per record kind."""
    for name, value in zip(utils.LOSS_GROUPS, losses, strict=True):
        if value is not None:
            writer.add_scalar(f"{split}/loss_{name.replace(' ', '_')}", value, step)


def write_plots(state: dict, args: argparse.Namespace, ckpt: Path) -> None:
    if utils.is_rank0():
        title = f"{args.train_mode} on {Path(args.model_name_or_path).name}"
        paths = [Path(args.output_dir) / "loss.png", ckpt / "loss.png"]
        if args.plot_to_images:
            paths.append(Path(utils.IMAGES_DIR) / "loss.png")
        plot_loss(state["history"], paths, title, groups=utils.LOSS_GROUPS)


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
