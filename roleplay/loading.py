"""Model folders in, loaded models out: the checks that a folder is a model or a LoRA checkpoint
(with the hint that says what to do), the one tokenizer loader, the one NF4 4-bit config (QLoRA
training in train.py and 4-bit inference load the same), loading a base / merged model or a base plus
adapter for inference (predict.py, web_demo.py, merge_params.py, bench/), resizing embeddings for an
added pad token, and LoRA target discovery (`find_all_linear_names`).

Nothing here runs remote code: `import baichuan` registers the Baichuan2 classes with the Auto
factories, and a config.json whose model_type neither we nor transformers know is refused (its
`auto_map` code is never imported). Before any library reads a folder, its JSON files must parse and
every safetensors file must have a complete header whose tensors the file covers (a truncated,
zero-filled or cut-off download is one error naming the file, not a traceback from deep inside a
loader). torch, transformers, peft and bitsandbytes are imported inside the functions.

Example:
    >>> from roleplay.loading import load_model_for_inference
    >>> model, tokenizer = load_model_for_inference("output/tiny-baichuan2-chat", device="cpu")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from roleplay.devices import resolve_device, resolve_inference_dtype
from utils import RUN_CONFIG_NAME, UserError, read_json_object

ADAPTER_CONFIG_NAME = "adapter_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILE_NAMES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a PEFT adapter (adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


RERUN_HINT = "re-create it (re-run the step that wrote it)"
INFERENCE_MODEL_HINT = ("pass --model_path/--ori_model_dir with a model folder (Baichuan2-7B-Chat, a merged model, "
                        "or `python tools/build_default.py` for the tiny default)")
TRAIN_MODEL_HINT = ("for real weights download Baichuan2-7B-Chat (or a Qwen2-architecture chat model) into a "
                    "folder and pass it; for the embedded tiny default run `python tools/build_default.py` first")


REFETCH_HINT = "the file is truncated or corrupt: download, merge or build the folder again"


def check_model_dir(path: str, hint: str = INFERENCE_MODEL_HINT) -> None:
    """A clear UserError unless `path` is a model folder: a folder with a config.json that parses (a
    JSON object with a model_type) and weights whose files are complete (`check_weight_files`).
    Cheap: no torch, no transformers (train.py checks before importing them)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model folder {path!r} not found; {hint}")
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: no config.json, so it is not a model folder; {hint}")
    config = read_json_object(p / "config.json", "model config", f"fix or re-download it; {hint}", UserError)
    if not any(any(p.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{path}: no model weights (*.safetensors or pytorch_model*.bin); the download or "
                        "merge is incomplete: fetch/merge again")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UserError(f"{p / 'config.json'}: no \"model_type\" string, so the architecture is unknown; "
                        f"re-download the folder or fix the file; {hint}")
    check_weight_files(p)


def check_weight_files(folder: str | os.PathLike, names: tuple[str, ...] = ("*.safetensors", "*.bin")) -> None:
    """UserError naming the first weight file in `folder` that cannot be whole: an empty file, a
    safetensors file whose header does not parse or whose tensors run past its end (safetensors'
    own header check, reading no tensor data), or a `.bin` that is neither a torch zip archive nor
    a legacy pickle stream. Only headers are read, so this costs milliseconds even for 7B shards."""
    for pattern in names:
        for f in sorted(Path(folder).glob(pattern)):
            if f.stat().st_size == 0:
                raise UserError(f"{f}: empty weight file (0 bytes); {REFETCH_HINT}")
            if f.suffix == ".safetensors":
                _check_safetensors(f)
            else:
                _check_torch_bin(f)


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):  # numpy: parses the header without importing torch
            pass
    except (SafetensorError, OSError) as e:
        detail = str(e).removeprefix("Error while deserializing header: ")
        raise UserError(f"{path}: not a complete safetensors file ({detail}); {REFETCH_HINT}") from e


def _check_torch_bin(path: Path) -> None:
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive; before torch 1.6 a pickle stream (protocol 2: b"\x80\x02")
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise UserError(f"{path}: not a torch weight file (neither a complete zip archive nor a pickle stream); "
                        f"{REFETCH_HINT}")


def check_model_type(path: str | os.PathLike) -> None:
    """UserError unless config.json's model_type is Baichuan2 (ours) or an architecture the installed
    transformers has built in. A folder that needs its own Python code (`auto_map` with an unknown
    model_type) is refused by name: that code is never imported (no trust_remote_code)."""
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    import baichuan  # noqa: F401  (registers "baichuan" with the Auto factories)

    config_path = Path(path) / "config.json"
    if not config_path.is_file():  # not a model folder: check_model_dir's message, where it is called
        return
    config = read_json_object(config_path, "model config", "fix or re-download it", UserError)
    model_type = config.get("model_type")
    if not model_type or model_type in CONFIG_MAPPING_NAMES or model_type in CONFIG_MAPPING:
        return  # known, or absent (check_model_dir refuses a model folder without one)
    remote = ""
    if isinstance(config.get("auto_map"), dict):
        files = sorted({str(v).split(".")[0] + ".py" for v in config["auto_map"].values() if isinstance(v, str)})
        remote = f" (its auto_map names {', '.join(files)}: remote code is never run here)"
    raise UserError(f"{config_path}: model_type {model_type!r} is not an architecture this project or transformers "
                    f"{transformers_version} knows{remote}; use a Baichuan2 folder or a model transformers supports "
                    "(e.g. Qwen2), or a newer transformers if the architecture is newer")


def check_adapter_dir(path: str, flag: str = "adapter folder") -> None:
    """UserError unless `path` is a complete LoRA checkpoint: adapter_config.json that parses as a JSON
    object and adapter weights whose file is whole. `flag` names the argument in the message
    (merge_params.py passes "--model_dir")."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{flag} {path!r} not found; pass a checkpoint folder written by train.py "
                        "(output/qlora/epoch-E-step-S)")
    if not (p / ADAPTER_CONFIG_NAME).is_file():
        raise UserError(f"{path}: no {ADAPTER_CONFIG_NAME}, so it is not a LoRA checkpoint (a full-mode "
                        "checkpoint is a model folder: pass it as the model path, without an adapter)")
    read_json_object(p / ADAPTER_CONFIG_NAME, "adapter config", RERUN_HINT, UserError)
    if not any((p / name).is_file() for name in ADAPTER_WEIGHT_NAMES):
        raise UserError(f"{path}: adapter weights (adapter_model.safetensors) missing; the checkpoint is "
                        "incomplete: pick another one or re-train")
    check_weight_files(p, ADAPTER_WEIGHT_NAMES)


_check_adapter_dir = check_adapter_dir  # the name other modules knew


def resolve_model_paths(model_path: str, adapter_dir: str | None = None) -> tuple[str, str | None]:
    """(base model folder, adapter folder or None) for a model path and optional adapter.

    A `model_path` that is a LoRA checkpoint (holds adapter_config.json) stands for its base model
    (run_config.json's `base_model`, else the adapter config's `base_model_name_or_path`) plus
    itself as the adapter. Raises UserError naming the folder and the fix when something is missing.
    """
    model_path = str(model_path)
    if adapter_dir is None and is_adapter_dir(model_path):
        adapter_dir = model_path
        run_config = Path(model_path) / RUN_CONFIG_NAME
        base = None
        if run_config.is_file():
            base = read_json_object(run_config, "run config", RERUN_HINT, UserError).get("base_model")
        if not base:
            base = read_json_object(Path(model_path) / ADAPTER_CONFIG_NAME, "adapter config", RERUN_HINT,
                                    UserError).get(
                "base_model_name_or_path")
        if not base:
            raise UserError(f"{model_path}: checkpoint names no base model (run_config.json base_model); "
                            "pass the base folder as --model_path and the checkpoint as --adapter_dir")
        model_path = str(base)
    if adapter_dir is not None:
        adapter_dir = str(adapter_dir)
        _check_adapter_dir(adapter_dir)
    check_model_dir(model_path)
    return model_path, adapter_dir


def load_tokenizer(base_dir: str, adapter_dir: str | None = None, *, training: bool = False) -> Any:
    """The tokenizer of a model folder; the one saved with `adapter_dir` (it may carry an added pad
    token) when that folder holds tokenizer files, else the base's. A UserError names the folder when
    it does not load.

    `training=True` (train.py): the error quotes only the first line of the loader's complaint and
    names the files a folder needs, and a tokenizer without an EOS token is refused (every training
    answer ends with EOS).
    """
    from transformers import AutoTokenizer

    import baichuan  # noqa: F401  (registers the Baichuan classes with the Auto factories)
    from roleplay.versions import warn_if_untested

    warn_if_untested()  # every script that loads a model comes through here first, once
    check_model_type(base_dir)  # before AutoTokenizer, which would blame the tokenizer files
    src = base_dir
    if adapter_dir and any((Path(adapter_dir) / n).is_file() for n in TOKENIZER_FILE_NAMES):
        src = adapter_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        detail, files = str(e), ""
        if training:
            detail, files = str(e).splitlines()[0][:200], " (tokenizer.model or tokenizer.json + tokenizer_config.json)"
        raise UserError(f"{src}: tokenizer does not load ({detail}); the folder needs its tokenizer files"
                        f"{files}") from e
    if training and tokenizer.eos_token_id is None:
        raise UserError(f"{src}: tokenizer has no eos token; training needs one to end replies")
    return tokenizer


def nf4_config(compute_dtype: Any) -> Any:
    """The 4-bit quantization of QLoRA, for training (train.py --train_mode qlora) and 4-bit inference
    alike: NF4 weights, double-quantized statistics, matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model_for_inference(
    model_path: str,
    adapter_dir: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a base/merged model folder, or a base plus LoRA adapter.

    `model_path` may also be a train.py checkpoint (see `resolve_model_paths`). Never runs remote
    code. When the adapter's tokenizer has more tokens than the base's embeddings (train.py added a
    pad token), the base embeddings are resized before the adapter (which carries those rows) is
    loaded. `load_in_4bit` loads the base NF4-quantized (as QLoRA trained it; needs bitsandbytes).
    """
    from transformers import AutoModelForCausalLM

    import baichuan  # noqa: F401  (registers the Baichuan classes with the Auto factories)

    base_dir, adapter_dir = resolve_model_paths(model_path, adapter_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_inference_dtype(dtype, dev)
    tokenizer = load_tokenizer(base_dir, adapter_dir)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": {"": dev}}
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if adapter_dir is not None:
        model = attach_adapter(model, tokenizer, adapter_dir)
    model.eval()
    return model, tokenizer


def resize_for_tokenizer(model: Any, tokenizer: Any, rows: int | None = None) -> bool:
    """Resize the input/output embeddings to `rows` (default: the tokenizer's size, when larger).

    train.py resizes the base to `len(tokenizer)` when it adds a pad token (which can also shrink a
    vocabulary padded past the tokenizer, as Qwen2's is); the adapter it saves carries the trained
    embedding and head matrices, which overwrite the placeholder rows. Returns whether it resized.
    """
    current = model.get_input_embeddings().weight.shape[0]
    if rows is None:
        rows = max(current, len(tokenizer))
    if rows == current:
        return False
    model.resize_token_embeddings(rows, mean_resizing=False)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return True


def attach_adapter(model: Any, tokenizer: Any, adapter_dir: str) -> Any:
    """PeftModel of `model` with the adapter in `adapter_dir` (embeddings resized first when needed)."""
    from peft import PeftModel

    saved_rows = _adapter_embedding_rows(adapter_dir)
    resized = resize_for_tokenizer(model, tokenizer, saved_rows)
    if resized and saved_rows is None:
        raise UserError(f"{adapter_dir}: the tokenizer has {len(tokenizer)} tokens but the base model fewer, "
                        "and the adapter does not carry the resized embeddings; re-train with train.py "
                        "(it saves them) or load with the base tokenizer")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{adapter_dir}: adapter does not fit the base model ({str(e).splitlines()[0][:300]}); "
                        "pass the base model it was trained on (run_config.json base_model)") from e


def _adapter_embedding_rows(adapter_dir: str) -> int | None:
    """Rows of the full input-embedding matrix saved with the adapter (train.py saves it when it resized
    the vocabulary), or None when the adapter holds no such matrix."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        for name in names:
            if name.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight", "wte.weight",
                              "wte.base_layer.weight")):
                return int(f.get_slice(name).get_shape()[0])
    return None


def find_all_linear_names(model: Any) -> list[str]:
    """Names (last path component) of every linear layer LoRA should wrap: nn.Linear and
    bitsandbytes 4/8-bit linears, except the output head (it maps to the vocabulary)."""
    import torch

    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:  # bitsandbytes is optional for LoRA/full modes
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, linear_types) and module is not head}
    names.discard("lm_head")
    return sorted(names)
