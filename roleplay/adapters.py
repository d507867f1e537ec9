"""Per-role LoRA adapters on one base model: one base in memory, one adapter per role, the adapter
picked per request (predict.py, web_demo.py, bench/adapters.py).

- `parse_adapter_specs(["孙悟空=output/a", ...])` -> {role: adapter folder}, checked before any model loads;
- `load_role_adapters(model, {role: folder})` attaches every adapter to the loaded base under its own
  PEFT adapter name -> (peft model, {role: adapter name});
- `load_base_with_adapters(...)`: the base (and an optional shared adapter) plus the role adapters, with
  the tokenizer they were trained with, in one call;
- `AdapterSwitch(peft_model).using(name)`: a lock held for the whole `with` block while `name` is the
  active adapter (`None`: the base, adapters disabled). PEFT keeps one active adapter per model, so
  every generation that needs a particular adapter runs inside `using(...)`, and concurrent requests for
  different roles never see each other's adapter;
- `generate_mixed(model, tokenizer, [(adapter name | None, messages), ...], config)`: one batch whose row
  i runs adapter i (PEFT's per-row `adapter_names`), prompts from the one prompt builder; greedy replies
  equal each row generated alone with its adapter. Where PEFT cannot mix a batch (a module trained in
  full next to LoRA that is no Linear/Embedding, such as Baichuan's NormHead under the tiny recipe's
  `MODULES_TO_SAVE=embed_tokens,lm_head`, or adapters that disagree on such modules), the rows are
  grouped by adapter and each group runs as its own batch: same replies, `mixed_batch_supported` says
  which path a model takes.

Adapters of one base must have been trained on that base with the same tokenizer (train.py saves it
next to the adapter); a resized vocabulary (train.py's added pad token) must be the same size in all.

Example (tiny default, two role adapters trained by `ROLES=孙悟空,赵子龙 bash train.sh`):
    >>> from roleplay import adapters, generation
    >>> specs = adapters.parse_adapter_specs(["孙悟空=output/tiny-qlora-roles/孙悟空/epoch-3-step-N"])
    >>> model, tokenizer, names, shared = adapters.load_base_with_adapters("output/tiny-baichuan2-chat", specs)
    >>> switch = adapters.AdapterSwitch(model)
    >>> with switch.using(names["孙悟空"]):
    ...     generation.chat_once(model, tokenizer, messages, generation.generation_config_for(model))
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from roleplay import generation, loading
from utils import UserError

BASE = "__base__"  # PEFT's per-row name for "no adapter" in `adapter_names`
SHARED_ADAPTER_NAME = "default"  # PEFT's name for the one adapter of `PeftModel.from_pretrained` (--adapter_dir)
_CHECKPOINT_RE = re.compile(r"^epoch-(\d+)-step-(\d+)$")  # train.py's checkpoint folder names
SPEC_HINT = "write it as ROLE=ADAPTER_FOLDER, e.g. --adapter 孙悟空=output/qlora-roles/孙悟空/epoch-1-step-N"


# ---------------------------------------------------------------------------------------------
# Specs: ROLE=FOLDER
# ---------------------------------------------------------------------------------------------
def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """{role: adapter folder} of `ROLE=PATH` specs, in the order given. A spec without "=", with an
    empty role or path, a role given twice, or a folder that is not a LoRA checkpoint raises UserError
    naming the spec and the fix."""
    adapters: dict[str, str] = {}
    for spec in specs:
        role, sep, path = str(spec).partition("=")
        role, path = role.strip(), path.strip()
        if not sep:
            raise UserError(f"--adapter {spec!r}: no '='; {SPEC_HINT}")
        if not role or not path:
            raise UserError(f"--adapter {spec!r}: empty {'role' if not role else 'adapter folder'}; {SPEC_HINT}")
        if role in adapters:
            raise UserError(f"--adapter {spec!r}: role {role!r} was already given an adapter ({adapters[role]}); "
                            "give each role one adapter")
        _check_adapter_folder(spec, path)
        adapters[role] = path
    return adapters


def _check_adapter_folder(spec: str, path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--adapter {spec!r}: folder {path!r} not found; {SPEC_HINT}")
    if not loading.is_adapter_dir(p):
        newest = newest_checkpoint(p)
        if newest is not None:
            raise UserError(f"--adapter {spec!r}: {path} is a training output folder, not an adapter; pass one "
                            f"of its checkpoints, e.g. the newest: {newest}")
        raise UserError(f"--adapter {spec!r}: {path} holds no {loading.ADAPTER_CONFIG_NAME}, so it is not a LoRA "
                        "checkpoint; pass a checkpoint folder written by train.py (epoch-E-step-S)")
    if not any((p / name).is_file() for name in loading.ADAPTER_WEIGHT_NAMES):
        raise UserError(f"--adapter {spec!r}: {path} has no adapter weights (adapter_model.safetensors); the "
                        "checkpoint is incomplete: pick another one or re-train")


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint folder (epoch-E-step-S) of a train.py output folder, or None."""
    found = []
    for child in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and loading.is_adapter_dir(child):
            found.append((int(m.group(2)), child))
    return max(found)[1] if found else None


def check_roles(adapters: dict[str, str], profiles: dict[str, str]) -> None:
    """UserError when an adapter is given for a role the profiles file does not know."""
    unknown = [role for role in adapters if role not in profiles]
    if unknown:
        raise UserError(f"--adapter for unknown role(s) {', '.join(unknown)}; known roles: {', '.join(profiles)}. "
                        "Use a role name of the profiles file (--desc_path)")


# ---------------------------------------------------------------------------------------------
# Loading: one base, several adapters
# ---------------------------------------------------------------------------------------------
def adapter_name_for(index: int) -> str:
    """The PEFT adapter name of the `index`-th role adapter (ASCII, no dots: PEFT keys modules by it)."""
    return f"role{index}"


def load_role_adapters(model: Any, adapters: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """Attach every adapter of `adapters` ({role: folder}) to `model` (a loaded base, or a PeftModel that
    already holds a shared adapter) under its own adapter name; returns (peft model in eval mode,
    {role: adapter name}). An adapter that does not fit the base raises UserError naming its folder."""
    from peft import PeftModel

    if not adapters:
        raise UserError("no role adapters given; pass --adapter ROLE=FOLDER")
    _resize_for_adapters(model, adapters)
    names: dict[str, str] = {}
    peft_model = model if isinstance(model, PeftModel) else None
    for i, (role, folder) in enumerate(adapters.items()):
        name = adapter_name_for(i)
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(folder, adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--adapter {role}={folder}: adapter does not fit the base model "
                            f"({str(e).splitlines()[0][:300]}); pass the base it was trained on "
                            "(its run_config.json base_model)") from e
        names[role] = name
    peft_model.eval()
    return peft_model, names


def _resize_for_adapters(model: Any, adapters: dict[str, str]) -> None:
    """Grow the base's embeddings to the vocabulary the adapters were trained with (train.py adds a pad
    token to tokenizers without one and saves the resized matrices with the adapter)."""
    from peft import PeftModel

    rows = {folder: loading._adapter_embedding_rows(folder) for folder in adapters.values()}
    sizes = {n for n in rows.values() if n is not None}
    if len(sizes) > 1:
        listing = ", ".join(f"{folder}: {n}" for folder, n in rows.items())
        raise UserError(f"the adapters were trained with different vocabulary sizes ({listing}); adapters "
                        "served on one base must come from the same base and tokenizer")
    if not sizes:
        return
    size = sizes.pop()
    current = model.get_input_embeddings().weight.shape[0]
    if size == current:
        return
    if isinstance(model, PeftModel):
        raise UserError(f"the role adapters need {size} embedding rows but the shared adapter's model has "
                        f"{current}; use adapters trained with the same tokenizer")
    model.resize_token_embeddings(size, mean_resizing=False)


def load_base_with_adapters(
    model_path: str,
    adapters: dict[str, str],
    adapter_dir: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
) -> tuple[Any, Any, dict[str, str], str | None]:
    """(peft model, tokenizer, {role: adapter name}, shared adapter name or None): the base of
    `model_path` (plus the shared `adapter_dir`, PEFT name "default", for roles without their own
    adapter) with every role adapter attached. The tokenizer is the one saved with the adapters
    (they must agree: same size and pad token), else the base's."""
    model, base_tokenizer = loading.load_model_for_inference(model_path, adapter_dir, device, dtype, load_in_4bit)
    base_dir, _ = loading.resolve_model_paths(model_path, adapter_dir)
    tokenizer = adapters_tokenizer(base_dir, adapters, base_tokenizer)
    model, names = load_role_adapters(model, adapters)
    if tokenizer.pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    shared = SHARED_ADAPTER_NAME if SHARED_ADAPTER_NAME in getattr(model, "peft_config", {}) else None
    return model, tokenizer, names, shared


def adapters_tokenizer(base_dir: str, adapters: dict[str, str], fallback: Any) -> Any:
    """The tokenizer saved with the adapters (all must have the same size and pad token), else `fallback`."""
    found = {}
    for role, folder in adapters.items():
        if any((Path(folder) / n).is_file() for n in loading.TOKENIZER_FILE_NAMES):
            found[role] = loading.load_tokenizer(base_dir, folder)
    if not found:
        return fallback
    shapes = {role: (len(t), t.pad_token) for role, t in found.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{role}: {n} tokens, pad {pad!r}" for role, (n, pad) in shapes.items())
        raise UserError(f"the adapters' tokenizers differ ({listing}); adapters served on one base must be "
                        "trained from the same base and tokenizer")
    return next(iter(found.values()))


# ---------------------------------------------------------------------------------------------
# Which adapter is active: one lock per model
# ---------------------------------------------------------------------------------------------
class _ModelState:
    """The lock of one model and the adapters of the `using` blocks open on it (lock holder only)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.active: list[str | None] = []


_STATES: weakref.WeakKeyDictionary[Any, _ModelState] = weakref.WeakKeyDictionary()
_STATES_GUARD = threading.Lock()


def _state(peft_model: Any) -> _ModelState:
    with _STATES_GUARD:
        state = _STATES.get(peft_model)
        if state is None:
            state = _STATES[peft_model] = _ModelState()
        return state


def model_lock(peft_model: Any) -> threading.RLock:
    """The one lock of `peft_model`, shared by every AdapterSwitch of it and by `generate_mixed`."""
    return _state(peft_model).lock


class AdapterSwitch:
    """Thread-safe choice of a PeftModel's active adapter.

    `with switch.using(name):` holds the model's lock for the whole block and makes `name` the active
    adapter (`None`: the base, every adapter disabled). Requests for other adapters wait until the
    block ends, so a generation inside it (also one streamed from a background thread, as long as the
    block lasts until the stream ends) only ever sees its own adapter. Enter and leave the block in
    the same thread; nesting is allowed only with the same adapter.
    """

    def __init__(self, peft_model: Any) -> None:
        self.model = peft_model
        self._state = _state(peft_model)  # shared by every switch of this model

    @property
    def adapter_names(self) -> list[str]:
        """The adapters the model holds."""
        return list(getattr(self.model, "peft_config", {}))

    @contextmanager
    def using(self, adapter_name: str | None) -> Iterator[Any]:
        """Run the block with `adapter_name` active (None: the base); yields the model."""
        if adapter_name is not None and adapter_name not in self.adapter_names:
            raise UserError(f"unknown adapter {adapter_name!r}; loaded: {', '.join(self.adapter_names) or 'none'}")
        active = self._state.active
        with self._state.lock:
            if active:
                if active[-1] != adapter_name:
                    raise RuntimeError(f"nested AdapterSwitch.using({adapter_name!r}) inside "
                                       f"using({active[-1]!r}): one adapter per block")
                active.append(adapter_name)
                try:
                    yield self.model
                finally:
                    active.pop()
                return
            active.append(adapter_name)
            try:
                if adapter_name is None:
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    self.model.set_adapter(adapter_name, inference_mode=True)
                    yield self.model
            finally:
                active.pop()


# ---------------------------------------------------------------------------------------------
# Mixed batches
# ---------------------------------------------------------------------------------------------
def mixed_batch_supported(model: Any, adapter_names: Sequence[str | None] | None = None) -> bool:
    """Whether PEFT can run rows of `adapter_names` (default: all the model's adapters) in one batch.

    LoRA layers mix any adapters (a layer an adapter does not target gives that row the base output).
    A module trained in full next to LoRA (`modules_to_save`) mixes only when it is a Linear/Embedding
    and every adapter of the batch has its own copy or none has one: PEFT skips such a module for the
    whole batch when the active adapter has no copy.
    """
    import torch
    from peft.utils import ModulesToSaveWrapper

    names = {n for n in (adapter_names if adapter_names is not None else getattr(model, "peft_config", {}))
             if n is not None and n != BASE}
    mixable = (torch.nn.Linear, torch.nn.Embedding)
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        present = names & set(module.modules_to_save.keys())
        if not present:
            continue
        if present != names or not isinstance(module.original_module, mixable):
            return False
    return True


class _RowAdapters:
    """`model` seen by `generation.generate_batch` with PEFT's per-row `adapter_names` added to every
    `generate` call: the batched path (left padding, stop criteria, the padding-aware repetition
    penalty) is the one every other reply takes."""

    def __init__(self, model: Any, adapter_names: list[str]) -> None:
        self._model = model
        self._adapter_names = adapter_names

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._model.generate(*args, adapter_names=self._adapter_names, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def generate_mixed(
    model: Any,
    tokenizer: Any,
    rows: Sequence[tuple[str | None, list[dict[str, str]]]],
    generation_config: Any,
    stats: dict | None = None,
) -> list[str]:
    """Replies to `rows` = [(adapter name or None for the base, messages), ...], in order, as one batch
    where row i runs its own adapter (PEFT's `adapter_names`). Prompts come from the one prompt builder
    (`generation.chat_prompt_ids` -> `utils.build_prompt_ids`). Greedy replies equal each row generated
    alone with its adapter. Where PEFT cannot mix these adapters (`mixed_batch_supported`), each
    adapter's rows run as their own batch instead. Holds the model's lock (see AdapterSwitch)."""
    if not rows:
        return []
    names = [name for name, _ in rows]
    messages = [m for _, m in rows]
    switch = AdapterSwitch(model)
    distinct = list(dict.fromkeys(names))
    unknown = [n for n in distinct if n is not None and n not in switch.adapter_names]
    if unknown:
        raise UserError(f"unknown adapter(s) {unknown}; loaded: {', '.join(switch.adapter_names) or 'none'}")
    with model_lock(model):
        if len(distinct) == 1:
            with switch.using(distinct[0]):
                return generation.generate_batch(model, tokenizer, messages, generation_config,
                                                 batch_size=len(rows), stats=stats)
        if not mixed_batch_supported(model, names):
            return generate_grouped(model, tokenizer, rows, generation_config, stats=stats)
        loaded = [n for n in distinct if n is not None]
        # PEFT passes a full-trained module through for the whole batch unless the active adapter has it
        with switch.using(loaded[0]):
            proxy = _RowAdapters(model, [BASE if n is None else n for n in names])
            return generation.generate_batch(proxy, tokenizer, messages, generation_config,
                                             batch_size=len(rows), stats=stats)


def generate_grouped(
    model: Any,
    tokenizer: Any,
    rows: Sequence[tuple[str | None, list[dict[str, str]]]],
    generation_config: Any,
    batch_size: int | None = None,
    stats: dict | None = None,
) -> list[str]:
    """Replies to `rows` (as `generate_mixed`), one adapter at a time: each adapter's rows run as their
    own batches (`batch_size` rows each; default all of them) with that adapter active."""
    switch = AdapterSwitch(model)
    replies: list[str] = [""] * len(rows)
    groups: dict[str | None, list[int]] = {}
    for i, (name, _) in enumerate(rows):
        groups.setdefault(name, []).append(i)
    for name, indices in groups.items():
        with switch.using(name):
            out = generation.generate_batch(model, tokenizer, [rows[i][1] for i in indices], generation_config,
                                            batch_size=batch_size or len(indices), stats=stats)
        for i, reply in zip(indices, out, strict=True):
            replies[i] = reply
    return replies


def role_adapter(role: str, names: dict[str, str], shared: str | None) -> str | None:
    """The adapter a role's requests run with: its own, else the shared one (--adapter_dir), else None (base)."""
    return names.get(role, shared)


__all__ = [
    "BASE",
    "SHARED_ADAPTER_NAME",
    "AdapterSwitch",
    "adapter_name_for",
    "adapters_tokenizer",
    "check_roles",
    "generate_grouped",
    "generate_mixed",
    "load_base_with_adapters",
    "load_role_adapters",
    "mixed_batch_supported",
    "model_lock",
    "newest_checkpoint",
    "parse_adapter_specs",
    "role_adapter",
]
