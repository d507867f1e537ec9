"""The role-play pipeline's shared modules above `utils.py` (which holds paths, errors, JSON I/O,
the system prompt, the one prompt builder, the dataset and the collator):

- `roleplay.sampler`: `LengthGroupedBatchSampler`, length-grouped micro-batches split over ranks;
- `roleplay.devices`: the one device resolver (training and inference), dtype choice, bf16 support,
  the device a model sits on;
- `roleplay.loading`: model-folder checks, the one tokenizer loader, the one NF4 config, loading a
  model (base, merged, base + LoRA adapter, 4-bit) for inference, LoRA target discovery;
- `roleplay.generation`: generation settings, prompt budgets, streamed and batched generation;
- `roleplay.plotting`: the training loss plot;
- `roleplay.profiling`: per-phase step timers for `train.py --profile`;
- `roleplay.attributes`: the attribute-table expansion into fact records and its question templates.
- `roleplay.dialogue`: multi-turn conversations composed for training and evaluation, generated round by
  round, and scored (fact accuracy and out-of-character rate by round, consistency, reply quality);
- `roleplay.packing`: packed micro-batches (`train.py --packing`) and the loss per record kind;
- `roleplay.dropout`: `GapDropout`, LoRA dropout that draws only the dropped positions (train.py on CPU);
- `roleplay.adapters`: one base with one LoRA adapter per role, the per-model adapter switch, mixed batches;
- `roleplay.api`: the OpenAI-compatible API (request checks, schema, SSE, bounded queue) web_demo.py mounts;
- `roleplay.versions`: the start-up warning when an installed package is outside requirements.txt.

Import order runs one way: the stage scripts (data_helper.py, train.py, merge_params.py, predict.py,
web_demo.py, tools/, bench/) import these modules and `utils`; these import `utils`, each other
(without cycles) and `baichuan`; `utils` imports none of them; `baichuan` imports nothing of the
project (tests/test_imports.py checks it). This file imports nothing, so `import roleplay.x` stays cheap.
"""
