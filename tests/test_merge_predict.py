"""Tests for merge_params.py, predict.py and the Inference section of utils.py (CPU, tiny models).

Checkpoints are built the way train.py builds them (its own `load_model`, i.e. the same LoRA
targets, pad-token resize and PEFT save), with random LoRA B matrices so that the adapter visibly
changes the logits; no DeepSpeed run is needed. Bad input to both scripts, run as subprocesses, is in
the table of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import importlib
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.harness import child_env, dump_jsonl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
utils = importlib.import_module("utils")
generation = importlib.import_module("roleplay.generation")
loading = importlib.import_module("roleplay.loading")
predict = importlib.import_module("predict")
merge_params = importlib.import_module("merge_params")

torch = pytest.importorskip("torch")
# train.py's resized-vocabulary checkpoints make PEFT save the embedding layers (wanted); it says so each time
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
pytest.importorskip("peft")

PROFILES = {"孙悟空": "齐天大圣，性格急躁", "李白": "唐代诗人，爱喝酒", "华妃": "后宫妃子"}


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from more; a busy shared CPU makes extra threads slow
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny bases, train.py-style checkpoints, merged models
# ---------------------------------------------------------------------------------------------
def make_checkpoint(base: Path, out: Path, train_mode: str = "lora", seed: int = 0) -> Path:
    """A checkpoint folder as train.py writes it (adapter, tokenizer, run_config.json), random LoRA B."""
    from tests.helpers import make_lora_checkpoint

    return make_lora_checkpoint(base, out, train_mode, seed)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2 without a pad token (train.py adds one and resizes), its checkpoint and merged model."""
    from tools.tiny_models import make_tiny_qwen2

    root = tmp_path_factory.mktemp("qwen")
    base = make_tiny_qwen2(root / "base")
    ckpt = make_checkpoint(base, root / "ckpt" / "epoch-1-step-3", "lora")
    merged = root / "merged"
    assert merge_params.main(["--model_dir", str(ckpt), "--save_model_dir", str(merged)]) == 0
    return {"base": base, "ckpt": ckpt, "merged": merged}


@pytest.fixture(scope="module")
def baichuan_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Baichuan2, a QLoRA checkpoint of it, and the merged model."""
    pytest.importorskip("baichuan")
    pytest.importorskip("bitsandbytes")
    from tools.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("baichuan")
    base = make_tiny_model(root / "base")
    ckpt = make_checkpoint(base, root / "ckpt" / "epoch-1-step-3", "qlora", seed=1)
    merged = root / "merged"
    assert merge_params.main(["--model_dir", str(ckpt), "--save_model_dir", str(merged)]) == 0
    return {"base": base, "ckpt": ckpt, "merged": merged}


@pytest.fixture(params=["qwen", "baichuan"])
def models(request: pytest.FixtureRequest) -> dict[str, Path]:
    return request.getfixturevalue("qwen" if request.param == "qwen" else "baichuan_models")


def logits(model, ids: list[int]):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


MESSAGES = [
    [{"role": "system", "content": utils.build_system_prompt("孙悟空", PROFILES["孙悟空"])},
     {"role": "user", "content": "你好，你是谁？"}],
    [{"role": "user", "content": "刻晴使用什么元素？"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hello world! 1 + 2 = 3"},
     {"role": "assistant", "content": "我叫旅行者"}, {"role": "user", "content": "今天天气很好，我们一起去花果山吧！"}],
]


# ---------------------------------------------------------------------------------------------
# merge_params.py
# ---------------------------------------------------------------------------------------------
def test_merge_equals_base_plus_adapter(models: dict[str, Path]) -> None:
    """Merged logits == base+adapter logits (independently recomputed here), and the folder is complete."""
    from transformers import AutoModelForCausalLM

    merged_dir = models["merged"]
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "run_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(n.endswith(".bin") for n in names)
    assert "adapter_config.json" not in names
    record = json.loads((merged_dir / "run_config.json").read_text(encoding="utf-8"))
    assert record["adapter"] == str(models["ckpt"].resolve()) and record["dtype"] == "fp32"
    check = record["merge_check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["adapter_effect"] > 100 * check["tolerance"]

    adapted, tok = loading.load_model_for_inference(str(models["ckpt"]), device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain Auto class (baichuan registered)
    assert type(merged).__name__ in ("Qwen2ForCausalLM", "BaichuanForCausalLM")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    gc = generation.generation_config_for(adapted, max_new_tokens=16)  # room for the whole system prompt
    for messages in MESSAGES:
        ids = generation.chat_prompt_ids(adapted, tok, messages, gc)
        ref = logits(adapted, ids)
        with adapted.disable_adapter():
            base = logits(adapted, ids)
        assert (ref - base).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(logits(merged, ids), ref, atol=1e-4, rtol=1e-4)


def test_merge_changes_only_adapter_targets(models: dict[str, Path]) -> None:
    """Tensors the adapter does not target are bit-identical to the base checkpoint; Baichuan's NormHead
    is saved raw (not the unit-norm rows its first eval call writes in place), targets did change."""
    from safetensors.torch import load_file

    base = {k: v for f in models["base"].glob("*.safetensors") for k, v in load_file(f).items()}
    merged = {k: v for f in models["merged"].glob("*.safetensors") for k, v in load_file(f).items()}
    targets = json.loads((models["ckpt"] / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"]
    assert set(merged) == set(base)
    changed = {k for k in base if base[k].shape != merged[k].shape or not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2] in targets for k in changed), changed
    assert "lm_head.weight" not in changed or "lm_head" in targets


def test_padded_vocabulary_kept_by_training(tmp_path: Path) -> None:
    """A base whose vocabulary is padded past its tokenizer (as Qwen2's 152064 rows vs ~151.6k tokens):
    the added pad token fits an existing row, so train.py keeps the padded size; loading and merging
    must keep it too."""
    from transformers import AutoModelForCausalLM

    from tools.tiny_models import make_tiny_qwen2

    base = make_tiny_qwen2(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(model.config.vocab_size + 40, mean_resizing=False)
    model.save_pretrained(base)
    ckpt = make_checkpoint(base, tmp_path / "ckpt")
    adapted, tok = loading.load_model_for_inference(str(ckpt), device="cpu")
    assert adapted.get_input_embeddings().weight.shape[0] == model.config.vocab_size > len(tok)
    assert merge_params.main(["--model_dir", str(ckpt), "--save_model_dir", str(tmp_path / "merged")]) == 0
    merged, _ = loading.load_model_for_inference(str(tmp_path / "merged"), device="cpu")
    gc = generation.generation_config_for(merged, max_new_tokens=16)  # room for the whole system prompt
    ids = generation.chat_prompt_ids(merged, tok, MESSAGES[0], gc)
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-4, rtol=1e-4)


def test_merged_baichuan_loads_with_its_class(baichuan_models: dict[str, Path]) -> None:
    from baichuan import BaichuanForCausalLM

    model = BaichuanForCausalLM.from_pretrained(baichuan_models["merged"])
    assert model.config.model_type == "baichuan"


def test_adapter_and_merged_give_same_greedy_replies(models: dict[str, Path]) -> None:
    adapted, tok_a = loading.load_model_for_inference(str(models["ckpt"]), device="cpu")
    merged, tok_m = loading.load_model_for_inference(str(models["merged"]), device="cpu")
    assert len(tok_a) == len(tok_m)
    ga = generation.generation_config_for(adapted, do_sample=False, max_new_tokens=12)
    gm = generation.generation_config_for(merged, do_sample=False, max_new_tokens=12)
    assert generation.generate_batch(adapted, tok_a, MESSAGES, ga) == \
        generation.generate_batch(merged, tok_m, MESSAGES, gm)


def test_merge_refuses_nonempty_output_without_overwrite(qwen: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--model_dir", str(qwen["ckpt"]), "--save_model_dir", str(out)]
    assert utils.run_main(merge_params.main, argv) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # an output overlapping the inputs is refused even with --overwrite
    assert utils.run_main(merge_params.main, ["--model_dir", str(qwen["ckpt"]), "--save_model_dir",
                                              str(qwen["ckpt"]), "--overwrite"]) == 2
    assert (qwen["ckpt"] / "adapter_config.json").is_file()
    assert merge_params.main([*argv, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_merge_failed_check_leaves_no_folder(qwen: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    real = merge_params.check_saved

    def broken(*args, **kwargs):
        return real(*args, **kwargs) | {"max_abs_diff": 1e9}

    monkeypatch.setattr(merge_params, "check_saved", broken)
    out = tmp_path / "merged"
    assert merge_params.main(["--model_dir", str(qwen["ckpt"]), "--save_model_dir", str(out)]) == 1
    assert "error: merged model differs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_merge_interrupted_save_leaves_no_folder(qwen: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    def killed(model, tokenizer, folder):
        model.save_pretrained(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_params, "save_model", killed)
    out = tmp_path / "merged"
    assert utils.run_main(merge_params.main, ["--model_dir", str(qwen["ckpt"]), "--save_model_dir", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_merge_clear_errors(tmp_path: Path, qwen: dict[str, Path]) -> None:
    assert utils.run_main(merge_params.main, ["--model_dir", str(tmp_path / "nope"),
                                              "--save_model_dir", str(tmp_path / "o")]) == 2
    assert utils.run_main(merge_params.main, ["--model_dir", str(qwen["base"]),  # a full model, not an adapter
                                              "--save_model_dir", str(tmp_path / "o")]) == 2
    with pytest.raises(utils.UserError, match="no config.json"):
        loading.resolve_model_paths(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(utils.UserError, match="no model weights"):
        loading.resolve_model_paths(str(empty))
    assert loading.resolve_model_paths(str(qwen["ckpt"])) == (str(qwen["base"].resolve()), str(qwen["ckpt"]))


# ---------------------------------------------------------------------------------------------
# utils Inference: prompts, generation, streaming
# ---------------------------------------------------------------------------------------------
def test_record_prompt_equals_training_prompt(models: dict[str, Path]) -> None:
    model, tok = loading.load_model_for_inference(str(models["merged"]), device="cpu")
    gc = generation.generation_config_for(model, max_new_tokens=16)  # room for the whole prompt
    for instruction in ("", utils.build_system_prompt("李白", PROFILES["李白"])):
        record = {"instruction": instruction, "input": "你喜欢吃什么？", "output": "桃子"}
        ids, labels, _ = utils.build_training_sample(tok, instruction, record["input"], record["output"], 400, 500,
                                                     gc if hasattr(gc, "user_token_id") else None)
        prompt = [i for i, lab in zip(ids, labels, strict=True) if lab == -100]
        assert generation.chat_prompt_ids(model, tok, generation.record_messages(record), gc) == prompt


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.5}, {"reply_frequency_penalty": 1.5}])
def test_generate_batch_equals_per_row(models: dict[str, Path], penalties: dict[str, float]) -> None:
    model, tok = loading.load_model_for_inference(str(models["ckpt"]), device="cpu")
    # a strong penalty: left padding must not change what it penalises
    gc = generation.generation_config_for(model, do_sample=False, max_new_tokens=10, **penalties)
    rows = [generation.chat_once(model, tok, m, gc) for m in MESSAGES]
    stats: dict = {}
    assert generation.generate_batch(model, tok, MESSAGES, gc, batch_size=3, stats=stats) == rows
    assert generation.generate_batch(model, tok, MESSAGES[::-1], gc, batch_size=2) == rows[::-1]
    assert 0 < stats["generated_tokens"] <= 3 * 10 and stats["seconds"] > 0


def test_reply_frequency_penalty_counts_the_reply_only() -> None:
    """logit - penalty x (times in the reply): the prompt's tokens (width 3 here) are not counted."""
    ids = torch.tensor([[5, 5, 7, 7, 7, 9], [0, 5, 7, 9, 9, 9]])  # prompts [5 5 7], [0 5 7]; then the replies
    out = generation.reply_frequency_penalty(0.5, 3)(ids, torch.ones(2, 10))
    expected = torch.ones(2, 10)
    expected[0, 7], expected[0, 9] = 0.0, 0.5
    expected[1, 9] = -0.5
    assert torch.equal(out, expected)
    assert torch.equal(generation.reply_frequency_penalty(0.5, 6)(ids, torch.ones(2, 10)), torch.ones(2, 10))
    with pytest.raises(utils.UserError, match="reply_frequency_penalty"):
        generation.generation_config_for(torch.nn.Linear(1, 1), max_new_tokens=4, reply_frequency_penalty=3.0)


def test_chat_stream_grows_to_chat_once_and_equals_model_chat(baichuan_models: dict[str, Path]) -> None:
    model, tok = loading.load_model_for_inference(str(baichuan_models["merged"]), device="cpu")
    gc = generation.generation_config_for(model, do_sample=False, max_new_tokens=16)
    for messages in MESSAGES:
        once = generation.chat_once(model, tok, messages, gc)
        assert once == model.chat(tok, messages, generation_config=gc)  # Baichuan's own chat, same layout
        stream = list(generation.chat_stream(model, tok, messages, gc))
        assert stream[-1] == once
        assert all(b.startswith(a) for a, b in itertools.pairwise(stream))


def test_chat_stream_close_stops_generation(qwen: dict[str, Path], monkeypatch) -> None:
    import transformers

    # emit text after every token (the random model's bytes rarely end a word, so text would come at the end)
    monkeypatch.setattr(transformers.TextIteratorStreamer, "_is_chinese_char", lambda self, cp: True)
    model, tok = loading.load_model_for_inference(str(qwen["merged"]), device="cpu")
    gc = generation.generation_config_for(model, do_sample=False, max_new_tokens=150, min_new_tokens=150)
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        gen = generation.chat_stream(model, tok, MESSAGES[0], gc)
        next(gen)
        gen.close()  # stops generate after its current token (and joins its thread) instead of running on
        at_close = len(calls)
        assert at_close < 100, at_close
        assert len(calls) == at_close  # nothing runs after close returned
        assert len(list(generation.chat_stream(model, tok, MESSAGES[0], gc))) >= 1 and len(calls) >= at_close + 150
    finally:
        hook.remove()


def test_generation_config_overrides(models: dict[str, Path]) -> None:
    model, _ = loading.load_model_for_inference(str(models["merged"]), device="cpu")
    model.generation_config.update(temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.05, do_sample=True)
    gc = generation.generation_config_for(model, temperature=0.7, max_new_tokens=7, top_p=None)
    assert (gc.temperature, gc.top_p, gc.top_k, gc.max_new_tokens, gc.do_sample) == (0.7, 0.85, 5, 7, True)
    greedy = generation.generation_config_for(model, do_sample=False)
    assert not greedy.do_sample and greedy.repetition_penalty == 1.05
    assert (greedy.temperature, greedy.top_p, greedy.top_k) == (1.0, 1.0, 50)  # neutral, not inherited
    assert generation.max_input_tokens(model, gc) == generation.context_length(model) - 7
    assert model.generation_config.temperature == 0.3  # the model's own config is untouched
    for bad in ({"temperature": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"repetition_penalty": 0.0},
                {"no_such_setting": 1}):
        with pytest.raises(utils.UserError, match="generation setting"):
            generation.generation_config_for(model, **bad)
    assert not generation.generation_config_for(model, temperature=0.0, do_sample=False).do_sample


# ---------------------------------------------------------------------------------------------
# predict.py: metrics
# ---------------------------------------------------------------------------------------------
def dp_lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def ref_rouge(pred: str, ref: str) -> float:
    import jieba

    p = [w for w in jieba.lcut(pred.lower()) if w.strip()]
    r = [w for w in jieba.lcut(ref.lower()) if w.strip()]
    lcs = dp_lcs(p, r)
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))  # F1 = 2PR/(P+R) = 2 LCS / (|p| + |r|)


def test_rouge_l() -> None:
    assert predict.rouge_l_f1("我是孙悟空，齐天大圣！", "我是孙悟空，齐天大圣！") == 1.0
    assert predict.rouge_l_f1("apple banana", "cherry durian") == 0.0
    assert predict.rouge_l_f1("", "abc") == 0.0
    # [the cat sat on the mat] vs [the cat lay on a mat]: LCS the-cat-on-mat = 4, P = R = 4/6
    assert predict.rouge_l_f1("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # word lists: LCS(abcd, ace) = 2, P = 1/2, R = 2/3, F1 = 4/7
    assert predict.rouge_l_f1(list("abcd"), list("ace")) == pytest.approx(4 / 7)
    assert predict.best_rouge_l("the cat", ["a dog", "the cat"]) == 1.0
    import random

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        assert predict.lcs_length(a, b) == dp_lcs(a, b)


@pytest.mark.parametrize("reply, flagged", [
    ("俺老孙是齐天大圣，你这妖怪休走！", None),
    ("我是一个AI语言模型，无法回答这个问题。", "AI"),
    ("作为一个人工智能助手，我不能这样做。", "AI"),
    ("抱歉，我只是一个语言模型。", "AI"),
    ("As an AI, I cannot do that.", "AI"),
    ("I'm an assistant created to help.", "AI"),
    ("我是孙悟空，不是什么人工智能！", None),
    ("人工智能是一门研究让机器思考的学科。", None),
    ("我是说这个主意不错。", None),
    ("我是李白，字太白。", "role"),
    ("朕乃皇帝，谁敢放肆！", "role"),
    ("我是李白的忠实读者。", None),
    ("我是Thailand来的客人。", None),
])
def test_out_of_character(reply: str, flagged: str | None) -> None:
    reason = predict.out_of_character(reply, "孙悟空", ["孙悟空", "李白", "皇帝", "华妃"])
    if flagged is None:
        assert reason is None
    elif flagged == "AI":
        assert reason is not None and reason.startswith("claims to be an AI")
    else:
        assert reason is not None and reason.startswith("calls itself another role")
    assert predict.out_of_character("我是孙悟空！", "孙悟空", ["孙悟空", "李白"]) is None  # own name is fine


def test_compute_metrics_hand_values() -> None:
    records = [
        {"role": "孙悟空", "source": "rolebench_general", "input": "q", "output": "x",
         "references": ["俺老孙 来 也", "完全 不同 的 话"]},
        {"role": "孙悟空", "source": "rolebench_role_specific", "input": "q", "output": "apple banana"},
        {"role": "李白", "source": "rolebench_general", "input": "q", "output": "the cat lay on a mat"},
        {"role": "刻晴", "source": "attribute", "attribute": "元素", "fact": "雷", "template_set": "heldout"},
        {"role": "钟离", "source": "attribute", "attribute": "元素", "fact": "岩", "template_set": "novel"},
        {"role": "钟离", "source": "attribute", "attribute": "国籍", "fact": "璃月", "template_set": "novel"},
    ]
    preds = ["俺老孙 来 也", "我是一个AI，cherry durian", "the cat sat on the mat",
             "刻晴用雷元素", "钟离用火", "他来自璃月"]
    m = predict.compute_metrics(records, preds, ["孙悟空", "李白"], {"generated_tokens": 30, "seconds": 2.0})
    assert m["rouge_l"]["per_role"]["孙悟空"] == {"mean": pytest.approx(0.5), "n": 2}  # (1 + 0) / 2
    assert m["rouge_l"]["per_role"]["李白"]["mean"] == pytest.approx(2 / 3)
    assert m["rouge_l"]["overall"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    acc = m["attribute_accuracy"]
    assert acc["overall"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "n": 3}
    assert acc["per_attribute"]["元素"]["accuracy"] == 0.5 and acc["per_attribute"]["国籍"]["accuracy"] == 1.0
    assert acc["per_template_set"]["heldout"]["accuracy"] == 1.0 and acc["per_template_set"]["novel"]["correct"] == 1
    assert m["out_of_character"]["rate"] == pytest.approx(1 / 3) and m["out_of_character"]["n"] == 3
    assert m["out_of_character"]["per_role"]["孙悟空"]["flagged"] == 1
    assert m["generation"]["tokens_per_s"] == 15.0


def test_a_one_character_name_leaks_only_as_a_word_of_its_own() -> None:
    """琴 is a character and also the violin: "拉小提琴" and "拉琴" name nobody, "琴一起" does."""
    names = {"琴", "钟离"}
    assert predict.leaks_fact_answer("我在那里，它就大地拉琴。", "爱因斯坦", set(), names) is None
    assert predict.leaks_fact_answer("我每天拉小提琴。", "爱因斯坦", set(), names) is None
    assert predict.leaks_fact_answer("我和琴一起去蒙德。", "爱因斯坦", set(), names) == "names '琴'"
    assert predict.leaks_fact_answer("我和钟离一起喝茶。", "爱因斯坦", set(), names) == "names '钟离'"
    assert predict.leaks_fact_answer("琴", "琴", set(), names) is None  # the role's own name


def test_fact_answer_leak_rate() -> None:
    """Role replies that reuse the attribute answers' wording or name an attribute character count as
    leaks; the answer phrases come from the test file's own attribute records."""
    records = [
        {"role": "刻晴", "source": "attribute", "attribute": "身份", "fact": "璃月七星玉衡",
         "template_set": "heldout", "input": "q", "output": "刻晴的身份是璃月七星玉衡。"},
        {"role": "钟离", "source": "attribute", "attribute": "性别", "fact": "男",
         "template_set": "heldout", "input": "q", "output": "钟离是男性角色。"},
        *[{"role": "孙悟空", "source": "rolebench_general", "input": "q", "output": "俺老孙来也"}] * 4,
    ]
    assert predict.fact_answer_phrases(records) == ({"的身份是", "性角色"}, {"刻晴", "钟离"})
    preds = ["刻晴的身份是璃月七星玉衡。", "钟离是男性角色。",
             "俺老孙的身份是齐天大圣！", "俺老孙去找钟离喝茶", "俺老孙来也", "身份？俺老孙不稀罕"]
    leak = predict.compute_metrics(records, preds, ["孙悟空"])["fact_answer_leak"]
    assert (leak["flagged"], leak["n"]) == (2, 4) and leak["rate"] == 0.5
    assert [e["reason"] for e in leak["examples"]] == ["answer phrase '的身份是'", "names '钟离'"]
    # no attribute records: nothing to leak, no figure
    assert predict.compute_metrics(records[2:], preds[2:], ["孙悟空"])["fact_answer_leak"]["rate"] is None
    # the printed line carries the count and its 95% interval
    text = predict.format_metrics(predict.compute_metrics(records, preds, ["孙悟空"]))
    lo, hi = predict.wilson_interval(2, 4)
    assert f"50.00% (2/4, 95% CI {lo:.1%}–{hi:.1%})" in text


@pytest.mark.parametrize("n", [1, 4, 32, 105, 1712])
def test_wilson_interval_solves_the_score_test(n: int) -> None:
    """Each bound inside (0, 1) is a rate p0 at which the score statistic |k/n - p0| / sqrt(p0(1-p0)/n)
    equals z (the interval's definition, checked here without its closed form); a bound at 0 or 1 comes
    only with 0 or n hits; the interval holds k/n, mirrors under k -> n-k, and narrows as n grows."""
    z = 1.96
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1))):
        lo, hi = predict.wilson_interval(k, n, z)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
        for bound in (lo, hi):
            if 0.0 < bound < 1.0:
                assert abs(k / n - bound) == pytest.approx(z * (bound * (1 - bound) / n) ** 0.5, rel=1e-9)
        assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)
        mlo, mhi = predict.wilson_interval(n - k, n, z)
        assert (mlo, mhi) == (pytest.approx(1 - hi), pytest.approx(1 - lo))
        wlo, whi = predict.wilson_interval(4 * k, 4 * n, z)
        assert whi - wlo < hi - lo
    assert predict.wilson_interval(0, 0) is None


# ---------------------------------------------------------------------------------------------
# predict.py: batch and interactive modes
# ---------------------------------------------------------------------------------------------
def write_test_file(path: Path) -> list[dict]:
    records = []
    for role, q in [("孙悟空", "你好"), ("孙悟空", "你的金箍棒有多重？"), ("李白", "写一首关于月亮的诗。")]:
        records.append({"instruction": utils.build_system_prompt(role, PROFILES[role]), "input": q,
                        "output": "俺老孙来也", "role": role, "source": "rolebench_general", "split": "test",
                        "references": ["俺老孙来也", "我是孙悟空，齐天大圣。"]})
    records[-1].pop("references")  # scored against `output`
    for name, attr, fact, ts in [("刻晴", "元素", "雷", "heldout"), ("钟离", "元素", "岩", "novel"),
                                 ("钟离", "国籍", "璃月", "novel")]:
        records.append({"instruction": "", "input": f"{name}的{attr}是什么？", "output": f"{name}的{attr}是{fact}。",
                        "role": name, "source": "attribute", "attribute": attr, "fact": fact, "template_set": ts})
    dump_jsonl(path, records)
    return records


def test_predict_batch(qwen: dict[str, Path], tmp_path: Path, capsys) -> None:
    test_file = tmp_path / "test.json"
    records = write_test_file(test_file)
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(PROFILES, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "preds.jsonl"
    argv = ["--model_path", str(qwen["merged"]), "--test_path", str(test_file), "--output_path", str(out),
            "--desc_path", str(profiles), "--batch_size", "4", "--max_new_tokens", "12", "--device", "cpu"]
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ROUGE-L" in printed and "tokens/s" in printed and "out-of-character" in printed
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in rows] == records
    preds = [r["prediction"] for r in rows]

    # greedy batch predictions == one-by-one chat_once on the same records
    model, tok = loading.load_model_for_inference(str(qwen["merged"]), device="cpu")
    gc = generation.generation_config_for(model, do_sample=False, max_new_tokens=12)
    assert preds == [generation.chat_once(model, tok, generation.record_messages(r), gc) for r in records]

    m = json.loads((tmp_path / "preds.metrics.json").read_text(encoding="utf-8"))
    # independent recomputation: DP LCS ROUGE-L, plain counting
    expected = {role: [] for role in ("孙悟空", "李白")}
    for r, p in zip(records[:3], preds[:3], strict=True):
        expected[r["role"]].append(max(ref_rouge(p, ref) for ref in r.get("references", [r["output"]])))
    for role, scores in expected.items():
        assert m["rouge_l"]["per_role"][role]["mean"] == pytest.approx(sum(scores) / len(scores))
        assert m["rouge_l"]["per_role"][role]["n"] == len(scores)
    assert m["rouge_l"]["overall"] == pytest.approx(sum(sum(v) for v in expected.values()) / 3)
    hits = [r["fact"] in p for r, p in zip(records[3:], preds[3:], strict=True)]
    assert m["attribute_accuracy"]["overall"]["correct"] == sum(hits)
    assert m["attribute_accuracy"]["per_attribute"]["元素"]["n"] == 2
    assert m["attribute_accuracy"]["per_attribute"]["国籍"]["correct"] == int(hits[2])
    assert m["attribute_accuracy"]["per_template_set"]["novel"]["n"] == 2
    assert m["attribute_accuracy"]["per_template_set"]["heldout"]["correct"] == int(hits[0])
    flagged = sum(predict.out_of_character(p, r["role"], PROFILES) is not None for r, p in zip(records[:3], preds[:3],
                                                                                             strict=True))
    assert m["out_of_character"]["n"] == 3 and m["out_of_character"]["rate"] == pytest.approx(flagged / 3)
    gen = m["generation"]
    assert 6 <= gen["generated_tokens"] <= 6 * 12 and gen["tokens_per_s"] > 0 and gen["do_sample"] is False

    # --limit
    assert predict.main([*argv, "--limit", "2"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_predict_interactive(qwen: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(PROFILES, ensure_ascii=False), encoding="utf-8")
    script = "9\n2\n你好\n你是谁？\n/reset\n你好\n/role 孙悟空\n/role 不存在\n你好\n"  # then EOF
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["--model_path", str(qwen["ckpt"]), "--desc_path", str(profiles), "--max_new_tokens", "8",
            "--no-do_sample", "--device", "cpu"]
    assert predict.main(argv) == 0
    out = capsys.readouterr().out

    model, tok = loading.load_model_for_inference(str(qwen["ckpt"]), device="cpu")
    gc = generation.generation_config_for(model, do_sample=False, max_new_tokens=8)

    def reply(role: str, history: list[dict]) -> str:
        system = {"role": "system", "content": utils.role_system_prompt(role, PROFILES)}
        return generation.chat_once(model, tok, [system, *history], gc)

    first = reply("李白", [{"role": "user", "content": "你好"}])
    second = reply("李白", [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "你是谁？"}])
    wukong = reply("孙悟空", [{"role": "user", "content": "你好"}])
    assert "unknown role '9'" in out and "unknown role '不存在'" in out
    # split on "\n" only: str.splitlines() also breaks at \x0c, \x1c and the like, which a random model may say
    replies = [line.split("user: ")[-1] for line in out.split("\n") if ": " in line and not line.startswith("[")]
    spoken = [r for r in replies if r.startswith(("李白: ", "孙悟空: "))]
    # after /reset the first question gets the first answer again; /role switches the speaker
    assert spoken == [f"李白: {first}", f"李白: {second}", f"李白: {first}", f"孙悟空: {wukong}"]
    assert "history cleared" in out and out.rstrip().endswith("bye")


def test_predict_interactive_piped_stdin(qwen: dict[str, Path], tmp_path: Path) -> None:
    """The real CLI with a pipe: role by name, one turn, EOF quits with status 0."""
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(PROFILES, ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run([sys.executable, "predict.py", "--model_path", str(qwen["merged"]), "--desc_path",
                           str(profiles), "--max_new_tokens", "4", "--device", "cpu"],
                          input="华妃\n你好\n", check=False, capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "华妃: " in proc.stdout and proc.stdout.rstrip().endswith("bye")


# ---------------------------------------------------------------------------------------------
# predict.py --adapter ROLE=PATH: one base, one adapter per role
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def role_adapters(baichuan_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA checkpoints of the tiny Baichuan2 base, one per role (孙悟空, 李白)."""
    from tests.helpers import make_lora_checkpoint

    root = tmp_path_factory.mktemp("role-adapters")
    base = baichuan_models["base"]
    return {"base": base, "孙悟空": make_lora_checkpoint(base, root / "wukong" / "epoch-1-step-2", seed=5, scale=0.3),
            "李白": make_lora_checkpoint(base, root / "libai" / "epoch-1-step-2", seed=6, scale=0.3)}


def replies_alone(base: Path, adapter: Path | None, chats: list[list[dict]], max_new_tokens: int) -> list[str]:
    model, tok = loading.load_model_for_inference(str(base), None if adapter is None else str(adapter), device="cpu")
    gc = generation.generation_config_for(model, do_sample=False, max_new_tokens=max_new_tokens)
    return [generation.chat_once(model, tok, m, gc) for m in chats]


@pytest.mark.parametrize("shared", [False, True], ids=["others-base", "others-shared-adapter"])
def test_predict_batch_with_role_adapters(role_adapters: dict[str, Path], baichuan_models: dict[str, Path],
                                          tmp_path: Path, capsys, shared: bool) -> None:
    """Each record is scored with its role's adapter; records of other roles with the shared
    --adapter_dir (or the base without one), as each loaded alone would answer them."""
    test_file = tmp_path / "test.json"
    records = write_test_file(test_file)
    out = tmp_path / "preds.jsonl"
    argv = ["--model_path", str(role_adapters["base"]), "--test_path", str(test_file), "--output_path", str(out),
            "--batch_size", "2", "--max_new_tokens", "8", "--device", "cpu",
            "--adapter", f"孙悟空={role_adapters['孙悟空']}", "--adapter", f"李白={role_adapters['李白']}"]
    if shared:
        argv += ["--adapter_dir", str(baichuan_models["ckpt"])]
    assert predict.main(argv) == 0
    said = capsys.readouterr()
    fallback = f"the shared adapter {baichuan_models['ckpt']}" if shared else "the base model (no adapter)"
    assert f"孙悟空 -> {role_adapters['孙悟空']} (2 records)" in said.err
    assert f"other roles (3 records): {fallback}" in said.err
    preds = [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]
    other = baichuan_models["ckpt"] if shared else None
    expected = []
    for r in records:
        folder = role_adapters.get(r["role"], other) if r["role"] in ("孙悟空", "李白") else other
        expected += replies_alone(role_adapters["base"], folder, [generation.record_messages(r)], 8)
    assert preds == expected
    # the adapters matter: 孙悟空's records read differently with 李白's adapter
    assert replies_alone(role_adapters["base"], role_adapters["李白"], [generation.record_messages(records[0])],
                         8) != preds[:1]
    m = json.loads((tmp_path / "preds.metrics.json").read_text(encoding="utf-8"))
    assert m["model"]["adapters"] == {"孙悟空": str(role_adapters["孙悟空"]), "李白": str(role_adapters["李白"])}


def test_predict_interactive_uses_the_roles_adapter(role_adapters: dict[str, Path], tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(PROFILES, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("孙悟空\n你好\n/role 李白\n你好\n/role 华妃\n你好\n"))
    argv = ["--model_path", str(role_adapters["base"]), "--desc_path", str(profiles), "--max_new_tokens", "8",
            "--no-do_sample", "--device", "cpu",
            "--adapter", f"孙悟空={role_adapters['孙悟空']}", "--adapter", f"李白={role_adapters['李白']}"]
    assert predict.main(argv) == 0
    out = capsys.readouterr().out
    assert f"[孙悟空] talks with adapter {role_adapters['孙悟空']}" in out
    assert "[华妃] talks with the base model (no adapter)" in out
    spoken = [line.split("user: ")[-1] for line in out.split("\n") if ": " in line and not line.startswith("[")]
    spoken = [s for s in spoken if s.startswith(("孙悟空: ", "李白: ", "华妃: "))]
    expected = []
    for role, folder in (("孙悟空", role_adapters["孙悟空"]), ("李白", role_adapters["李白"]), ("华妃", None)):
        messages = [{"role": "system", "content": utils.role_system_prompt(role, PROFILES)},
                    {"role": "user", "content": "你好"}]
        expected.append(f"{role}: " + replies_alone(role_adapters["base"], folder, [messages], 8)[0])
    assert spoken == expected


def test_predict_refuses_bad_adapter_specs(role_adapters: dict[str, Path], tmp_path: Path) -> None:
    """Bad --adapter input: exit 2 with one error line naming the spec, before any model loads."""
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps(PROFILES, ensure_ascii=False), encoding="utf-8")
    for spec, why in [("孙悟空", "no '='"), (f"不存在={role_adapters['孙悟空']}", "unknown role"),
                      (f"孙悟空={role_adapters['孙悟空'].parent}", "training output folder")]:
        proc = subprocess.run([sys.executable, "predict.py", "--model_path", str(role_adapters["base"]), "--desc_path",
                               str(profiles), "--adapter", spec], input="", check=False, capture_output=True,
                              text=True, cwd=REPO, timeout=120, env=child_env())
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], proc.stderr
