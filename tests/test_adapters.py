"""Per-role adapters on one base (roleplay/adapters.py): specs, loading several adapters, the thread-safe
switch, mixed batches equal to each row alone, and concurrent requests for different roles (CPU, tiny
random models; adapters are train.py-style checkpoints with random LoRA weights, no training run)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from roleplay import adapters, generation, loading
from tests.helpers import make_lora_checkpoint
from utils import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("single_thread_torch"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")]

QUESTIONS = ["你好，请问你是谁？", "今天天气很好，我们一起去花果山吧！", "你喜欢吃什么？", "刻晴会用什么元素？"]
ROLES = ("孙悟空", "赵子龙")


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "你是一个角色。"}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Baichuan2 base and two LoRA-only adapters of it (the 7B recipe's shape)."""
    from tools.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_model(root / "base")
    return {"base": base, "孙悟空": make_lora_checkpoint(base, root / "a" / "epoch-1-step-2", seed=1, scale=0.3),
            "赵子龙": make_lora_checkpoint(base, root / "b" / "epoch-1-step-2", seed=2, scale=0.3)}


@pytest.fixture(scope="module")
def loaded(lora_pair: dict[str, Path]) -> dict:
    specs = adapters.parse_adapter_specs([f"{role}={lora_pair[role]}" for role in ROLES])
    model, tok, names, shared = adapters.load_base_with_adapters(str(lora_pair["base"]), specs, device="cpu")
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=10)
    return {"model": model, "tok": tok, "names": names, "shared": shared, "config": config}


def alone(folder: Path | None, base: Path, questions: list[str], max_new_tokens: int = 10) -> list[str]:
    """Greedy replies of the base + one adapter loaded by itself (the reference)."""
    model, tok = loading.load_model_for_inference(str(base), None if folder is None else str(folder), device="cpu")
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=max_new_tokens)
    return [generation.chat_once(model, tok, chat(q), config) for q in questions]


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def test_parse_adapter_specs(lora_pair: dict[str, Path], tmp_path: Path) -> None:
    a, b = lora_pair["孙悟空"], lora_pair["赵子龙"]
    assert adapters.parse_adapter_specs([f"孙悟空={a}", f" 赵子龙 = {b}"]) == {"孙悟空": str(a), "赵子龙": str(b)}
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text("{}")
    bad = {
        "孙悟空": "no '='",
        f"={a}": "empty role",
        "孙悟空=": "empty adapter folder",
        f"孙悟空={tmp_path / 'missing'}": "not found",
        f"孙悟空={tmp_path / 'empty'}": "not a LoRA checkpoint",
        f"孙悟空={no_weights}": "no adapter weights",
        f"孙悟空={a.parent}": f"the newest: {a}",  # a train.py output folder: names its newest checkpoint
    }
    for spec, why in bad.items():
        with pytest.raises(UserError, match="--adapter") as e:
            adapters.parse_adapter_specs([spec])
        assert why in str(e.value) and spec.split("=")[0] in str(e.value), (spec, str(e.value))
    with pytest.raises(UserError, match="already given"):
        adapters.parse_adapter_specs([f"孙悟空={a}", f"孙悟空={b}"])
    with pytest.raises(UserError, match="unknown role"):
        adapters.check_roles({"不存在": str(a)}, {"孙悟空": "齐天大圣"})


# ---------------------------------------------------------------------------------------------
# One base, several adapters, the switch
# ---------------------------------------------------------------------------------------------
def test_each_role_gets_its_own_adapter(loaded: dict, lora_pair: dict[str, Path]) -> None:
    """Through the switch, each adapter answers as that adapter loaded alone, and None as the bare base;
    the three differ, so a mix-up could not pass."""
    model, tok, names, config = loaded["model"], loaded["tok"], loaded["names"], loaded["config"]
    assert set(names) == set(ROLES) and len(set(names.values())) == 2 and loaded["shared"] is None
    switch = adapters.AdapterSwitch(model)
    got = {}
    for role in (*ROLES, None):
        with switch.using(names[role] if role else None):
            got[role] = [generation.chat_once(model, tok, chat(q), config) for q in QUESTIONS[:2]]
    for role in ROLES:
        assert got[role] == alone(lora_pair[role], lora_pair["base"], QUESTIONS[:2])
    assert got[None] == alone(None, lora_pair["base"], QUESTIONS[:2])
    assert len({tuple(v) for v in got.values()}) == 3


def test_generate_mixed_equals_each_row_alone(loaded: dict) -> None:
    model, tok, names, config = loaded["model"], loaded["tok"], loaded["names"], loaded["config"]
    assert adapters.mixed_batch_supported(model)
    rows = [(name, chat(q)) for q in QUESTIONS for name in (names["孙悟空"], names["赵子龙"], None)]
    switch = adapters.AdapterSwitch(model)
    expected = []
    for name, messages in rows:
        with switch.using(name):
            expected.append(generation.chat_once(model, tok, messages, config))
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("adapter_names"))
        return original(*args, **kwargs)

    model.generate = spy
    try:
        stats: dict = {}
        assert adapters.generate_mixed(model, tok, rows, config, stats=stats) == expected
    finally:
        del model.generate
    assert len(calls) == 1 and calls[0] == [adapters.BASE if n is None else n for n, _ in rows]  # one batch
    assert stats["generated_tokens"] > 0
    assert adapters.generate_grouped(model, tok, rows, config) == expected
    assert len(set(expected[:3])) == 3  # the same question, three different answers


def test_concurrent_requests_for_different_roles(loaded: dict) -> None:
    """20 threads, mixed roles, streamed and whole replies: each equals its role's adapter alone."""
    model, tok, names, config = loaded["model"], loaded["tok"], loaded["names"], loaded["config"]
    switch = adapters.AdapterSwitch(model)
    jobs = [(ROLES[i % 2] if i % 5 else None, QUESTIONS[i % len(QUESTIONS)], i % 3 == 0) for i in range(20)]
    expected = {}
    for role, q, _ in jobs:
        with switch.using(names.get(role)):
            expected[role, q] = generation.chat_once(model, tok, chat(q), config)
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(i: int, role: str | None, q: str, stream: bool) -> None:
        try:
            start.wait()
            with switch.using(names.get(role)):
                if stream:
                    text = list(generation.chat_stream(model, tok, chat(q), config))[-1]
                else:
                    text = generation.chat_once(model, tok, chat(q), config)
            results[i] = text
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [results[i] for i in range(len(jobs))] == [expected[role, q] for role, q, _ in jobs]


def test_switch_refuses_misuse(loaded: dict) -> None:
    switch = adapters.AdapterSwitch(loaded["model"])
    with pytest.raises(UserError, match="unknown adapter"), switch.using("nope"):
        pass
    with switch.using(loaded["names"]["孙悟空"]):
        with switch.using(loaded["names"]["孙悟空"]):  # the same adapter may nest
            pass
        with pytest.raises(RuntimeError, match="one adapter per block"), switch.using(None):
            pass


# ---------------------------------------------------------------------------------------------
# Adapters PEFT cannot mix in one batch; resized vocabularies; adapters that do not fit
# ---------------------------------------------------------------------------------------------
def test_full_trained_head_falls_back_to_grouped_batches(lora_pair: dict[str, Path], tmp_path: Path) -> None:
    """The tiny recipe trains embeddings and Baichuan's NormHead in full next to LoRA: PEFT cannot mix
    a NormHead per row, so generate_mixed runs one batch per adapter, with the same replies."""
    base = lora_pair["base"]
    specs = {role: str(make_lora_checkpoint(base, tmp_path / role, seed=i + 3, scale=0.3,
                                            modules_to_save="embed_tokens,lm_head"))
             for i, role in enumerate(ROLES)}
    model, tok, names, _ = adapters.load_base_with_adapters(str(base), specs, device="cpu")
    assert not adapters.mixed_batch_supported(model)
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=8)
    rows = [(names[ROLES[i % 2]], chat(q)) for i, q in enumerate(QUESTIONS)] + [(None, chat(QUESTIONS[0]))]
    got = adapters.generate_mixed(model, tok, rows, config)
    for (name, messages), reply in zip(rows, got, strict=True):
        role = next((r for r, n in names.items() if n == name), None)
        assert [reply] == alone(specs[role] if role else None, base, [messages[-1]["content"]], 8)


def test_resized_vocabulary_adapters_mix(tmp_path: Path) -> None:
    """Qwen2 without a pad token: train.py adds one, and each adapter carries the resized embeddings and
    head (LoRA on both); one base takes both adapters, and a mixed batch equals each alone."""
    from tools.tiny_models import make_tiny_qwen2

    base = make_tiny_qwen2(tmp_path / "base")
    specs = {role: str(make_lora_checkpoint(base, tmp_path / role, seed=i, scale=0.3)) for i, role in enumerate(ROLES)}
    model, tok, names, _ = adapters.load_base_with_adapters(str(base), specs, device="cpu")
    assert tok.pad_token is not None and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert adapters.mixed_batch_supported(model)
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=8)
    rows = [(names[ROLES[i % 2]], chat(q)) for i, q in enumerate(QUESTIONS[:2])]
    got = adapters.generate_mixed(model, tok, rows, config)
    assert got == [alone(Path(specs[ROLES[i % 2]]), base, [q], 8)[0] for i, q in enumerate(QUESTIONS[:2])]


def test_adapter_of_another_base_is_refused(lora_pair: dict[str, Path], tmp_path: Path) -> None:
    from tools.tiny_models import make_tiny_model

    other = make_tiny_model(tmp_path / "other", hidden_size=256, intermediate_size=512)
    model, _ = loading.load_model_for_inference(str(other), device="cpu")
    with pytest.raises(UserError, match="does not fit the base model"):
        adapters.load_role_adapters(model, {"孙悟空": str(lora_pair["孙悟空"])})


def test_shared_adapter_serves_roles_without_their_own(lora_pair: dict[str, Path]) -> None:
    specs = {"孙悟空": str(lora_pair["孙悟空"])}
    model, tok, names, shared = adapters.load_base_with_adapters(str(lora_pair["base"]), specs,
                                                                 adapter_dir=str(lora_pair["赵子龙"]), device="cpu")
    assert shared == adapters.SHARED_ADAPTER_NAME
    assert adapters.role_adapter("孙悟空", names, shared) == names["孙悟空"]
    assert adapters.role_adapter("李白", names, shared) == shared
    config = generation.generation_config_for(model, do_sample=False, max_new_tokens=10)
    with adapters.AdapterSwitch(model).using(shared):
        got = generation.chat_once(model, tok, chat(QUESTIONS[0]), config)
    assert [got] == alone(lora_pair["赵子龙"], lora_pair["base"], QUESTIONS[:1])


# ---------------------------------------------------------------------------------------------
# train.py --roles: a role's adapter trains on that role's records only
# ---------------------------------------------------------------------------------------------
def role_records(path: Path) -> Path:
    from tools.harness import dump_jsonl

    records = [{"instruction": f"你是{role}。", "input": q, "output": f"{role}说：{q}", "role": role}
               for role in ("孙悟空", "刻晴") for q in QUESTIONS * (3 if role == "孙悟空" else 2)]
    return dump_jsonl(path, records)


def test_train_roles_trains_on_the_roles_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    from tests.helpers import COMMON, ds_config_file, run_train

    data = role_records(tmp_path / "train.json")
    out = tmp_path / "out"
    run_train(tmp_path, ["--model_name_or_path", tiny_model_dir, "--train_path", data, "--test_path", data,
                         "--output_dir", out, "--train_mode", "lora", "--roles", "孙悟空", "--max_steps", "2",
                         "--ds_file", ds_config_file(tmp_path, bf16__enabled=False), *COMMON])
    kept = [json.loads(line) for line in (out / "role_data" / "train.json").read_text(encoding="utf-8").splitlines()]
    assert len(kept) == 3 * len(QUESTIONS) and {r["role"] for r in kept} == {"孙悟空"}
    ckpt = adapters.newest_checkpoint(out)
    run = json.loads((ckpt / "run_config.json").read_text(encoding="utf-8"))
    assert run["roles"] == "孙悟空" and run["train_samples"] == len(kept)
    assert run["train_path"] == str((out / "role_data" / "train.json").resolve())
    specs = adapters.parse_adapter_specs([f"孙悟空={ckpt}"])
    model, _ = loading.load_model_for_inference(str(tiny_model_dir), device="cpu")
    _, names = adapters.load_role_adapters(model, specs)
    assert list(names) == ["孙悟空"]


def test_train_roles_refuses_a_role_without_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    import train

    data = role_records(tmp_path / "train.json")
    with pytest.raises(UserError, match="no records of 赵子龙.*roles there: 刻晴, 孙悟空"):
        train.main(["--model_name_or_path", str(tiny_model_dir), "--train_path", str(data), "--output_dir",
                    str(tmp_path / "out"), "--roles", "孙悟空,赵子龙"])
    assert not (tmp_path / "out").exists()


def test_bench_compares_mixed_and_separate_batches(lora_pair: dict[str, Path]) -> None:
    """bench/adapters.py's speed part on a small workload: both ways answer alike; the 7B count is the
    recipe's LoRA shape (r=16 on W_pack, o_proj, gate/up/down of 32 layers)."""
    import argparse

    from bench import adapters as bench

    args = argparse.Namespace(device="cpu", threads=1, new_tokens=4, prompts_per_role=2, batch_size=4, repeats=1)
    specs = {role: str(lora_pair[role]) for role in ROLES}
    speed = bench.measure_speed(args, str(lora_pair["base"]), specs)
    assert speed["same_replies"] and speed["rows"] == 4 and speed["mixed_batch_supported"]
    assert speed["mixed_generated_tokens"] == speed["separate_generated_tokens"] == 4 * 4
    counts = bench.baichuan_7b_counts(16)
    per_layer = 16 * ((4096 + 3 * 4096) + (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert counts["adapter_params"] == 32 * per_layer and counts["base_params"] > 7 * 10**9
