"""`train.py --packing` (roleplay/packing.py and the packed path of baichuan/modeling_baichuan.py).

In-process, fp32, tiny models: a packed row and the padded batch of the same samples give the same
per-token losses and the same LoRA gradients (1e-5) for Baichuan with RoPE (7B) and with ALiBi
(13B), and for Qwen2 through the Auto classes (transformers 5 reads packed samples from the
restarting position_ids); the packed labels are the unpacked ones. Baichuan's bf16 CPU path (samples
bucketed by length) equals per-sample attention in float64 and the padded batch in bf16. Then one short
real run: a packed train.py run killed after its first checkpoint and resumed ends where an
uninterrupted packed run ends.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import (
    COMMON,
    adapter,
    assert_tensors_close,
    ds_config_file,
    kill_when,
    newest_checkpoint,
    random_model,
    run_train,
    train_history,
    write_records,
)

torch = pytest.importorskip("torch")
utils = importlib.import_module("utils")
packing = importlib.import_module("roleplay.packing")
tiny_models = importlib.import_module("tools.tiny_models")

TOL = 1e-5
LENGTHS = (9, 23, 5, 17, 12)  # different lengths: the padded batch pads, the packed row does not


def samples(vocab: int, seed: int = 3) -> list[dict]:
    """Samples like Baichuan2PromptDataSet's: a prompt (labels -100), then answer tokens; mixed groups."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = 1 + i % 4
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "group": i % 2})
    return out


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    from roleplay import loading

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=loading.find_all_linear_names(model),
                        init_lora_weights=False)  # random B: the LoRA gradients depend on every path
    return get_peft_model(model, config).train()


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def per_token_unpacked(model, batch: dict) -> torch.Tensor:
    """Reference: the padded batch through the model's own forward, token losses in sample order."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    return torch.nn.functional.cross_entropy(logits[mask].float(), batch["labels"][:, 1:][mask], reduction="none")


def check_packed_equals_unpacked(model, vocab: int) -> None:
    batch = samples(vocab)
    padded = utils.DataCollator(0, pad_to_multiple_of=1, meta=True)(batch)
    packed = packing.PackingCollator()(batch)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and packed["num_tokens"] == sum(LENGTHS)
    assert padded["input_ids"].numel() > sum(LENGTHS)  # the premise: the padded batch has padding

    # the model's own loss on the padded batch (what an unpacked run backpropagates)
    model.zero_grad()
    reference = model(**packing.model_inputs(padded), labels=padded["labels"]).loss
    reference.backward()
    ref_grads = lora_grads(model)
    model.zero_grad()
    loss, sums = packing.batch_loss(model, packed, len(utils.LOSS_GROUPS))
    loss.backward()
    got_grads = lora_grads(model)
    assert loss.item() == pytest.approx(reference.item(), abs=TOL)
    assert ref_grads and ref_grads.keys() == got_grads.keys()
    assert max(r.abs().max().item() for r in ref_grads.values()) > 1e-3  # gradients are not trivially zero
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got_grads[name], ref, rtol=0, atol=TOL, msg=name)

    # per token, in sample order, and per group
    with torch.no_grad():
        expected = per_token_unpacked(model, padded)
        keep = packing.label_positions(packed["labels"])
        logits = model(**packing.model_inputs(packed)).logits[0, keep]
        got = torch.nn.functional.cross_entropy(logits.float(), packed["labels"][0, keep + 1], reduction="none")
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    rows = torch.arange(len(batch))[:, None].expand(-1, padded["labels"].shape[1] - 1)[padded["labels"][:, 1:] != -100]
    for g in range(len(utils.LOSS_GROUPS)):
        in_group = padded["groups"][rows] == g
        assert sums[g, 1].item() == in_group.sum().item()
        assert sums[g, 0].item() == pytest.approx(expected[in_group].sum().item(), abs=10 * TOL)


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_baichuan_packed_equals_unpacked(position_embedding, single_thread_torch):
    model = with_lora(random_model(position_embedding))
    check_packed_equals_unpacked(model, tiny_models.TINY_VOCAB_SIZE)


def test_baichuan_packed_rows_never_see_the_other_samples(single_thread_torch):
    """Changing one sample changes no other sample's logits (RoPE and ALiBi alike)."""
    for pe in ("rope", "alibi"):
        model = random_model(pe)
        batch = samples(tiny_models.TINY_VOCAB_SIZE)
        changed = [dict(s) for s in batch]
        changed[1] = {**batch[1], "input_ids": [7] * LENGTHS[1]}
        with torch.no_grad():
            a = model(**packing.model_inputs(packing.PackingCollator()(batch))).logits[0]
            b = model(**packing.model_inputs(packing.PackingCollator()(changed))).logits[0]
        start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
        torch.testing.assert_close(a[:start], b[:start], rtol=0, atol=TOL)
        torch.testing.assert_close(a[end:], b[end:], rtol=0, atol=TOL)
        assert (a[start:end] - b[start:end]).abs().max() > 1e-2


def test_baichuan_several_packed_rows_use_the_block_diagonal_mask(single_thread_torch):
    """Two packed rows in one batch (the dense block-diagonal mask path) give each sample's own logits."""
    first = samples(tiny_models.TINY_VOCAB_SIZE)[:3]  # lengths 9, 23, 5
    other = samples(tiny_models.TINY_VOCAB_SIZE, seed=4)
    second = [*other[3:5], {**other[1], "input_ids": other[1]["input_ids"][:8], "labels": other[1]["labels"][:8]}]
    rows = [packing.PackingCollator()(x) for x in (first, second)]  # 17, 12, 8: other boundaries, same width
    assert rows[0]["input_ids"].shape == rows[1]["input_ids"].shape == (1, 37)
    for pe in ("rope", "alibi"):
        model = random_model(pe)
        with torch.no_grad():
            both = model(input_ids=torch.cat([r["input_ids"] for r in rows]),
                         position_ids=torch.cat([r["position_ids"] for r in rows])).logits
            for r, batch in enumerate((first, second)):
                start = 0
                for sample in batch:
                    n = len(sample["input_ids"])
                    alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
                    torch.testing.assert_close(both[r, start:start + n], alone, rtol=0, atol=TOL)
                    start += n


def per_sample_reference(q, k, v, lengths, slopes):
    """Each sample's own causal (+ ALiBi) attention, one SDPA call per sample: what packing must equal."""
    from baichuan.modeling_baichuan import build_attention_bias

    parts = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True):
        n = qs.shape[2]
        bias = build_attention_bias(None, 1, n, 0, q.dtype, q.device, slopes)
        parts.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias))
    return torch.cat(parts, 2)


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_bucketed_attention_equals_per_sample_attention(position_embedding, single_thread_torch):
    """The bf16 CPU path (samples grouped into right-padded buckets), run in float64 so that any mix-up of
    samples, padding or heads shows far above rounding: outputs and q/k/v gradients match per-sample SDPA."""
    from baichuan.modeling_baichuan import PackedRows, alibi_slopes, bucketed_attention, length_buckets

    lengths = [1, 19, 3, 15, 17, 120, 16, 2, 64, 18]  # singletons, near-equal short ones, long ones
    assert any(len(b) > 1 for b in length_buckets(lengths)) and len(length_buckets(lengths)) > 1
    nh, hd = 4, 8
    slopes = alibi_slopes(nh).double() if position_embedding == "alibi" else None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, nh, sum(lengths), hd, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    packed = PackedRows(torch.cat([torch.arange(n) for n in lengths])[None])
    got = bucketed_attention(q, k, v, packed, slopes)
    want = per_sample_reference(q, k, v, lengths, slopes)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_length_buckets_is_the_cheapest_grouping():
    """Against brute force over every split of the sorted lengths; every sample in exactly one bucket."""
    import itertools

    from baichuan.modeling_baichuan import length_buckets

    def cost(buckets, lengths, call):
        return sum(call + len(b) * max(lengths[i] for i in b) ** 2 for b in buckets)

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        lengths = torch.randint(1, 400, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        call = (0, 128 * 128, 10**9)[trial % 3]
        got = length_buckets(lengths, call)
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], lengths, call)
                   for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r))
        assert cost(got, lengths, call) == best


def test_baichuan_packed_equals_unpacked_in_bf16(single_thread_torch):
    """In bf16 on a CPU the packed row takes the bucketed path: its token losses match the padded batch's
    (SDPA) within bf16 rounding, and a wrong bucket or gather would be far off."""
    model = random_model("rope").to(torch.bfloat16)
    batch = samples(tiny_models.TINY_VOCAB_SIZE)
    padded = utils.DataCollator(0, pad_to_multiple_of=1, meta=True)(batch)
    packed = packing.PackingCollator()(batch)
    with torch.no_grad():
        expected = per_token_unpacked(model, padded)
        keep = packing.label_positions(packed["labels"])
        logits = model(**packing.model_inputs(packed)).logits[0, keep]
        got = torch.nn.functional.cross_entropy(logits.float(), packed["labels"][0, keep + 1], reduction="none")
    assert (got - expected).abs().mean() < 0.02 and (got - expected).abs().max() < 0.1
    assert expected.std() > 0.5  # the losses differ enough between tokens for a mix-up to show


def test_qwen2_auto_classes_packed_equals_unpacked(tmp_path, single_thread_torch):
    from transformers import AutoModelForCausalLM

    folder = tiny_models.make_tiny_qwen2(tmp_path / "qwen2", with_pad=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    check_packed_equals_unpacked(with_lora(model), model.config.vocab_size)


def test_packed_labels_are_the_unpacked_labels():
    batch = samples(500)
    packed = packing.PackingCollator()(batch)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    flat = [t for s in batch for t in s["labels"]]
    for i, (got, want) in enumerate(zip(packed["labels"][0].tolist(), flat, strict=True)):
        assert got == (-100 if i in starts else want), i  # a sample's first token never a target
    assert packed["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    assert packed["seq_ids"][0].tolist() == [i for i, n in enumerate(LENGTHS) for _ in range(n)]
    assert packed["groups"].tolist() == [s["group"] for s in batch]
    assert packing.segment_lengths(packed["position_ids"]) == list(LENGTHS)


def test_loss_groups_follow_the_record_source():
    assert utils.LOSS_GROUPS[utils.loss_group({"source": "attribute"})] == "attribute facts"
    for source in ("rolebench_general", "rolebench_role_specific", None):
        assert utils.LOSS_GROUPS[utils.loss_group({"source": source})] == "role replies"


# ---------------------------------------------------------------------------------------------
# a real packed run: kill after the first checkpoint, resume, end as the uninterrupted run
# ---------------------------------------------------------------------------------------------
def test_packed_kill_and_resume_matches_uninterrupted(tmp_path):
    model = tiny_models.make_tiny_qwen2(tmp_path / "qwen2")
    args = ["--model_name_or_path", model, "--train_path", write_records(tmp_path / "train.json", 16, seed=0),
            "--test_path", write_records(tmp_path / "test.json", 4, seed=1), *COMMON, "--packing",
            "--max_len", "160", "--max_src_len", "120", "--gradient_accumulation_steps", "1",  # 8 steps an epoch
            "--lora_dropout", "0.1", "--max_steps", "4", "--ds_file", ds_config_file(tmp_path, bf16__enabled=False)]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    run_train(tmp_path, [*args, "--output_dir", ref_out])
    killed_args = [*args, "--output_dir", out, "--save_model_step", "2"]
    train = importlib.import_module("train")
    kill_when(killed_args, tmp_path, tmp_path / "killed.log", lambda: bool(train.list_checkpoints(str(out))), 0.0)
    ckpts = train.list_checkpoints(str(out))
    assert ckpts and ckpts[0][0] == 2, (tmp_path / "killed.log").read_text()[-3000:]
    for _, later in ckpts[1:]:  # as if killed right after the first checkpoint
        shutil.rmtree(later)
    resumed = run_train(tmp_path, [*killed_args, "--resume"])
    assert "resumed from" in resumed.stdout
    ref, final = newest_checkpoint(ref_out), newest_checkpoint(out)
    assert final.name == ref.name
    expected, got = train_history(ref), train_history(final)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5, abs=1e-6)
    assert_tensors_close(adapter(final), adapter(ref), rtol=1e-4, atol=1e-6)
    state = (Path(final) / "trainer_state.json").read_text(encoding="utf-8")
    assert "train_groups" in state and "eval_groups" in state
    # the per-kind curves reach TensorBoard (these records have no source: all are role replies)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(ref_out / "runs")).Reload().Tags()["scalars"]
    assert {"train/loss_role_replies", "eval/loss_role_replies", "train/loss"} <= set(tags), tags
    assert "train/loss_attribute_facts" not in tags  # no attribute record, no curve
