"""End-to-end tests of train.py on CPU: real subprocesses (plain `python train.py` for one process,
the DeepSpeed launcher for two), tiny models, tiny data written to tmp dirs.

Most runs use the tiny Qwen2 model of tools/tiny_models.py (no pad token: exercises the resize
path); the Baichuan variant uses the `tiny_model_dir` fixture of tests/conftest.py and skips while
`baichuan` (or that fixture) does not exist. Every child runs with OMP_NUM_THREADS=1 in its own
tmp cwd and its own master port. The run helpers are in tests/helpers.py; bad input to train.py
(exit status 2, one `error:` line) is in the table of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
train = importlib.import_module("train")  # top level imports only utils and roleplay: cheap
utils = importlib.import_module("utils")
tiny_models = importlib.import_module("tools.tiny_models")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def walk_values(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_values(v)
    else:
        yield obj


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen2 model (no pad token), train/test data, an fp32 DeepSpeed config."""
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "model": tiny_models.make_tiny_qwen2(root / "qwen2"),
        "train": write_records(root / "train.json", 24, seed=0),
        "test": write_records(root / "test.json", 6, seed=1),
        "ds_fp32": ds_config_file(root, "ds_fp32.json", bf16__enabled=False),
    }


def base_args(work: dict[str, Path], out: Path, *extra) -> list:
    return ["--model_name_or_path", work["model"], "--train_path", work["train"], "--test_path", work["test"],
            "--output_dir", out, *COMMON, *extra]


@pytest.fixture(scope="module")
def reference_run(work) -> dict:
    """Uninterrupted QLoRA run (the recipe's mode and DeepSpeed config): 2 epochs x 6 steps, eval per
    epoch, lora_dropout 0.1 (so the RNG state matters for the resume test)."""
    cwd = work["root"] / "ref-cwd"
    cwd.mkdir()
    out = work["root"] / "ref"
    args = base_args(work, out, "--gradient_accumulation_steps", "2", "--num_train_epochs", "2",
                     "--lora_dropout", "0.1", "--ds_file", REPO / "ds_zero2_no_offload.json")
    proc = run_train(cwd, args)
    return {"args": args, "out": out, "cwd": cwd, "proc": proc, "ckpt": newest_checkpoint(out)}


# ---------------------------------------------------------------------------------------------
# in-process pieces: DeepSpeed config resolution, checkpoint listing
# ---------------------------------------------------------------------------------------------
def test_resolve_ds_config_fills_auto_and_rejects_contradictions():
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
          "optimizer": {"params": {"lr": 1e-4, "weight_decay": "auto"}}}
    out = train.resolve_ds_config(ds, "x.json", {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                                                 "optimizer.params.lr": 1e-4, "optimizer.params.weight_decay": 0.1,
                                                 "bf16.enabled": False})
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["optimizer"]["params"]["weight_decay"] == 0.1
    assert out["bf16"] == {"enabled": False}  # missing keys are added
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # input untouched
    with pytest.raises(utils.UserError, match=r"x\.json: gradient_accumulation_steps is 4 but the flags give 2"):
        train.resolve_ds_config(ds, "x.json", {"gradient_accumulation_steps": 2})
    with pytest.raises(utils.UserError, match="optimizer.params.lr"):
        train.resolve_ds_config(ds, "x.json", {"optimizer.params.lr": 3e-4})


def test_build_ds_config_leaves_no_auto_in_repo_config():
    args = train.parse_args(["--ds_file", str(REPO / "ds_zero2_no_offload.json"), "--gradient_accumulation_steps", "3",
                             "--per_device_train_batch_size", "5"])
    cfg = train.build_ds_config(args, world_size=2, total_steps=100, bf16=True)
    assert "auto" not in list(walk_values(cfg))
    assert cfg["train_batch_size"] == 5 * 3 * 2
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 3  # ceil(100 * 0.03)
    assert cfg["zero_optimization"]["stage"] == 2


def test_one_fp32_rank_runs_zero_as_stage_0_and_everything_else_as_written(tmp_path):
    """ZeRO 1-2 has nothing to partition on one fp32 rank: stage 0. Several ranks, bf16, an offload, or a
    resume from a checkpoint in ZeRO's partitioned layout keep the config exactly as written."""
    args = train.parse_args(["--ds_file", str(REPO / "ds_zero2_no_offload.json")])
    fp32 = train.build_ds_config(args, world_size=1, total_steps=10, bf16=False)
    ran, note = train.single_rank_zero(fp32, 1, None)
    assert ran["zero_optimization"] == {"stage": 0} and "stage 2 runs as stage 0" in note
    assert {k: v for k, v in ran.items() if k != "zero_optimization"} == \
        {k: v for k, v in fp32.items() if k != "zero_optimization"}
    assert fp32["zero_optimization"]["stage"] == 2  # the caller's dict is not changed
    bf16 = train.build_ds_config(args, world_size=1, total_steps=10, bf16=True)
    offload = json.loads(json.dumps(fp32))
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    for ds, world in ((fp32, 2), (bf16, 1), (offload, 1)):
        assert train.single_rank_zero(ds, world, None) == (ds, None)
    partitioned = tmp_path / "epoch-1-step-4"
    (partitioned / "ds_state" / "state").mkdir(parents=True)
    (partitioned / "ds_state" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert train.single_rank_zero(fp32, 1, partitioned) == (fp32, None)
    (partitioned / "ds_state" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert train.single_rank_zero(fp32, 1, partitioned)[0]["zero_optimization"] == {"stage": 0}


def test_list_checkpoints_ignores_temp_and_incomplete_folders(tmp_path):
    for name in ["epoch-1-step-4", "epoch-2-step-10", ".tmp-epoch-2-step-12", "epoch-2-step-11", "runs"]:
        (tmp_path / name).mkdir()
    for name in ["epoch-1-step-4", "epoch-2-step-10", ".tmp-epoch-2-step-12", "runs"]:
        (tmp_path / name / utils.RUN_CONFIG_NAME).write_text("{}")
    assert [(s, p.name) for s, p in train.list_checkpoints(str(tmp_path))] == [
        (4, "epoch-1-step-4"), (10, "epoch-2-step-10")]
    assert train.list_checkpoints(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------------------------
# data parallel: 2 processes under ZeRO-2 == 1 process with gradient accumulation
# ---------------------------------------------------------------------------------------------
def test_two_process_zero2_matches_one_process_grad_accum(work):
    """Same global batch (1 x 2 x accum 2 vs 2 x 2 x accum 1), fp32, no dropout: same loss curve and
    the same adapter. The sampler gives rank r at accumulation step a the micro-batch a*world+r. The one
    fp32 process runs ZeRO as stage 0 (`single_rank_zero`), the two run stage 2: the same training."""
    runs = {}
    for nproc, accum in [(1, 2), (2, 1)]:
        cwd = work["root"] / f"dp{nproc}-cwd"
        cwd.mkdir()
        out = work["root"] / f"dp{nproc}"
        args = base_args(work, out, "--gradient_accumulation_steps", accum, "--lora_dropout", "0.0",
                         "--ds_file", work["ds_fp32"], "--test_path", "")
        proc = run_train(cwd, args, nproc=nproc)
        runs[nproc] = newest_checkpoint(out)
        cfg = json.loads((runs[nproc] / utils.RUN_CONFIG_NAME).read_text(encoding="utf-8"))
        assert cfg["world_size"] == nproc and cfg["global_batch_size"] == 4 and cfg["precision"] == "fp32"
        assert cfg["deepspeed_config"]["gradient_accumulation_steps"] == accum
        assert cfg["deepspeed_config"]["zero_optimization"]["stage"] == (0 if nproc == 1 else 2)
        if nproc == 2:
            assert "world size 2" in proc.stdout or cfg["world_size"] == 2
    one, two = train_history(runs[1]), train_history(runs[2])
    assert [s for s, _ in one] == list(range(1, 7)) == [s for s, _ in two]
    losses1, losses2 = [v for _, v in one], [v for _, v in two]
    assert max(losses1) - min(losses1) > 1e-3, losses1  # the curve moves: equality is not trivial
    assert losses1 == pytest.approx(losses2, rel=1e-4, abs=1e-5)
    assert_tensors_close(adapter(runs[1]), adapter(runs[2]), rtol=1e-3, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# kill and resume
# ---------------------------------------------------------------------------------------------
def test_kill_and_resume_matches_uninterrupted(work, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [*reference_run["args"], "--save_model_step", "3"]
    args[args.index("--output_dir") + 1] = out
    kill_when(args, tmp_path, tmp_path / "killed.log", lambda: bool(train.list_checkpoints(str(out))), delay=0.0)
    ckpts = train.list_checkpoints(str(out))
    assert ckpts, (tmp_path / "killed.log").read_text()
    # If the run outpaced the kill, drop the later checkpoints: the disk then looks like a kill right
    # after the first one.
    for _, later in ckpts[1:]:
        shutil.rmtree(later)
    first_step = ckpts[0][0]
    assert first_step == 3
    # a save that was killed half-way: a temp folder that even looks complete must be ignored
    junk = out / ".tmp-epoch-2-step-11"
    (junk / "ds_state").mkdir(parents=True)
    (junk / utils.RUN_CONFIG_NAME).write_text("{}")
    (junk / "trainer_state.json").write_text('{"global_step": 11}')

    resumed = run_train(tmp_path, [*args, "--resume"])
    assert re.search(r"resumed from .*epoch-1-step-3 \(global step 3\)", resumed.stdout), resumed.stdout[-3000:]
    final = newest_checkpoint(out)
    ref = reference_run["ckpt"]
    assert final.name == ref.name == "epoch-2-step-12"
    expected, got = train_history(ref), train_history(final)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 13))
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5, abs=1e-6)
    ref_state = json.loads((ref / "trainer_state.json").read_text(encoding="utf-8"))
    got_state = json.loads((final / "trainer_state.json").read_text(encoding="utf-8"))
    assert len(got_state["history"]["eval"]) == len(ref_state["history"]["eval"]) == 2
    assert [v for _, v in got_state["history"]["eval"]] == pytest.approx(
        [v for _, v in ref_state["history"]["eval"]], rel=1e-5)
    assert_tensors_close(adapter(final), adapter(ref), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# what a checkpoint holds
# ---------------------------------------------------------------------------------------------
def test_checkpoint_has_what_merge_and_predict_need(work, reference_run):
    from transformers import AutoTokenizer

    out, ckpt = reference_run["out"], reference_run["ckpt"]
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", utils.RUN_CONFIG_NAME,
            "trainer_state.json", "loss.png"} <= names, names
    assert "tokenizer.json" in names or "tokenizer.model" in names
    assert (ckpt / "ds_state" / "state").is_dir()  # what --resume loads
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None

    cfg = json.loads((ckpt / utils.RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    assert cfg["base_model"] == str(Path(work["model"]).resolve())
    assert cfg["train_mode"] == "qlora"
    assert (cfg["lora_dim"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.1)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert linear <= set(cfg["lora_target_modules"])
    ds = cfg["deepspeed_config"]
    assert "auto" not in list(walk_values(ds)), ds
    assert ds["train_batch_size"] == cfg["global_batch_size"] == 4
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(3e-3)
    assert cfg["precision"] == ("bf16" if ds["bf16"]["enabled"] else "fp32")
    assert cfg["total_steps"] == 12 and cfg["world_size"] == 1

    adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    for png in (out / "loss.png", ckpt / "loss.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    # the repo's images/ copy is opt-in (train.sh passes --plot_to_images): nothing lands in the cwd
    assert not (reference_run["cwd"] / "images").exists()


def test_qwen2_without_pad_token_gets_one_and_adapter_saves_embeddings(work, reference_run):
    from transformers import AutoConfig, AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(work["model"])
    assert base_tok.pad_token_id is None  # the premise
    vocab = AutoConfig.from_pretrained(work["model"]).vocab_size
    ckpt = reference_run["ckpt"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.pad_token_id == vocab and len(tok) == vocab + 1
    cfg = json.loads((ckpt / utils.RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    assert cfg["resized_embeddings"] is True
    assert {"embed_tokens", "lm_head"} <= set(cfg["lora_target_modules"])
    weights = adapter(ckpt)
    embed = [k for k in weights if "embed_tokens" in k and k.endswith("base_layer.weight")]
    head = [k for k in weights if "lm_head" in k and k.endswith("base_layer.weight")]
    assert embed and head, sorted(weights)
    # the saved embedding/head matrices have the new pad row: merging can rebuild the resized model
    assert weights[embed[0]].shape[0] == weights[head[0]].shape[0] == vocab + 1
    assert any("lora_embedding_A" in k for k in weights)


# ---------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_modes_train_and_save(work, tmp_path, mode):
    import torch

    out = tmp_path / "out"
    proc = run_train(tmp_path, base_args(work, out, "--train_mode", mode, "--max_steps", "3", "--test_path", "",
                                         "--gradient_accumulation_steps", "1", "--ds_file", work["ds_fp32"],
                                         "--plot_to_images"))
    assert f"mode {mode}:" in proc.stdout
    ckpt = newest_checkpoint(out)
    assert ckpt.name == "epoch-1-step-3"
    cfg = json.loads((ckpt / utils.RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    assert cfg["train_mode"] == mode and cfg["total_steps"] == 3
    assert (tmp_path / "images" / "loss.png").read_bytes()[:8] == PNG_MAGIC  # --plot_to_images
    if mode == "lora":
        weights = adapter(ckpt)
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it trained
        assert not (ckpt / "model.safetensors").exists()
        return
    from transformers import AutoModelForCausalLM

    assert not (ckpt / "adapter_model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    assert model.config.vocab_size == base.config.vocab_size + 1  # resized for the pad token
    changed = [n for n, p in base.named_parameters()
               if not torch.equal(p, dict(model.named_parameters())[n])]
    assert changed, "full fine-tuning changed no weight"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, base.config.vocab_size + 1) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# Baichuan2
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baichuan_model_dir(request) -> Path:
    pytest.importorskip("baichuan", reason="baichuan/ is not importable yet")
    try:
        return Path(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_model_dir fixture yet")


def test_baichuan_qlora_run_saves_checkpoint(work, baichuan_model_dir, tmp_path):
    out = tmp_path / "out"
    args = base_args(work, out, "--max_steps", "3", "--gradient_accumulation_steps", "1",
                     "--ds_file", REPO / "ds_zero2_no_offload.json")
    args[args.index("--model_name_or_path") + 1] = baichuan_model_dir
    proc = run_train(tmp_path, args)
    assert "mode qlora:" in proc.stdout
    ckpt = newest_checkpoint(out)
    cfg = json.loads((ckpt / utils.RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    assert cfg["resized_embeddings"] is False  # Baichuan2 ships a pad token
    assert "W_pack" in cfg["lora_target_modules"]  # the fused QKV projection is a LoRA target
    assert "lm_head" not in cfg["lora_target_modules"]
    weights = adapter(ckpt)
    assert not any("embed_tokens" in k for k in weights)
    assert (ckpt / "tokenizer.model").is_file()
    assert len(train_history(ckpt)) == 3
    assert len(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["history"]["eval"]) == 1


def test_modules_to_save_get_their_own_learning_rate() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_model(), LoraConfig(r=4, target_modules=["W_pack"], modules_to_save=["lm_head"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert train.optimizer_groups(model, None) == trainable  # one group at the config's lr
    lora, saved = train.optimizer_groups(model, 3e-4)
    assert "lr" not in lora and saved["lr"] == 3e-4
    names = {id(p): n for n, p in model.named_parameters()}
    assert saved["params"] and all(".modules_to_save." in names[id(p)] and "lm_head" in names[id(p)]
                                   for p in saved["params"])
    assert all("lora_" in names[id(p)] for p in lora["params"])
    assert len(lora["params"]) + len(saved["params"]) == len(trainable)
