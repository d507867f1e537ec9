"""BaichuanForCausalLM against the Baichuan2 architecture (the parts listed in baichuan/modeling_baichuan.py),
on tiny CPU models.

Reference values come from independent computations (a naive float64 forward written from the architecture,
per-sequence runs, manual loss), never from recorded outputs.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import baichuan  # noqa: F401  (registers the Auto classes)
from baichuan import BaichuanConfig, BaichuanForCausalLM
from baichuan.modeling_baichuan import CACHE_NAME, NormHead, alibi_slopes
from tests.helpers import ATOL, left_pad, random_ids, random_model
from tools.tiny_models import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ---------------------------------------------------------------------------------------------
# Naive float64 forward, written straight from the architecture (loops over heads and positions)
# ---------------------------------------------------------------------------------------------
def naive_logits(model: BaichuanForCausalLM, input_ids: torch.LongTensor) -> torch.Tensor:
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    hd = H // nh
    eps = cfg.rms_norm_eps

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(x: torch.Tensor, pos: int) -> torch.Tensor:
        # Half-split pairs (k, k + hd/2) rotated by pos / 10000^(2k/hd).
        out = x.clone()
        for k in range(hd // 2):
            theta = pos / (10000 ** (2 * k / hd))
            a, b = x[k], x[k + hd // 2]
            out[k] = a * math.cos(theta) - b * math.sin(theta)
            out[k + hd // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    # ALiBi slopes of the paper for a power-of-two head count: 2^(-8/n), 2^(-16/n), ...
    slopes = [2 ** (-8 * (h + 1) / nh) for h in range(nh)]
    batch, T = input_ids.shape
    x = sd["model.embed_tokens.weight"][input_ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        W = sd[p + "self_attn.W_pack.weight"]
        q_all, k_all, v_all = h @ W[:H].T, h @ W[H:2 * H].T, h @ W[2 * H:].T
        attn = torch.zeros_like(x)
        for b in range(batch):
            for head in range(nh):
                sl = slice(head * hd, (head + 1) * hd)
                q = torch.stack([q_all[b, t, sl] for t in range(T)])
                k = torch.stack([k_all[b, t, sl] for t in range(T)])
                if cfg.position_embedding == "rope":
                    q = torch.stack([rope(q[t], t) for t in range(T)])
                    k = torch.stack([rope(k[t], t) for t in range(T)])
                scores = q @ k.T / math.sqrt(hd)
                for i in range(T):
                    for j in range(T):
                        if j > i:
                            scores[i, j] = -math.inf
                        elif cfg.position_embedding == "alibi":
                            scores[i, j] += slopes[head] * (j - i)
                attn[b, :, sl] = torch.softmax(scores, -1) @ v_all[b, :, sl]
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    head = sd["lm_head.weight"]
    return x @ (head / head.norm(dim=1, keepdim=True)).T


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_forward_matches_naive_spec_reference(position_embedding: str) -> None:
    model = random_model(position_embedding)
    ids = random_ids(2, 9)
    expected = naive_logits(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert (logits.double() - expected).abs().max().item() < ATOL
    # The reference must be sensitive: a per-head q|k|v interleave of W_pack moves the logits far.
    sd = model.state_dict()
    W = sd["model.layers.0.self_attn.W_pack.weight"]
    H, hd = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    interleaved = W.view(3, H // hd, hd, H).transpose(0, 1).reshape(3 * H, H)
    with torch.no_grad():
        model.model.layers[0].self_attn.W_pack.weight.copy_(interleaved)
        assert (model(ids).logits.double() - expected).abs().max().item() > 100 * ATOL


def test_config_real_files_and_inference_of_position_embedding() -> None:
    seven_b = {"architectures": ["BaichuanForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig"},
               "tokenizer_class": "BaichuanTokenizer", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
               "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
               "max_position_embeddings": 4096, "model_max_length": 4096, "model_type": "baichuan",
               "num_attention_heads": 32, "num_hidden_layers": 32, "rms_norm_eps": 1e-06,
               "_from_model_config": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "transformers_version": "4.29.2", "use_cache": True, "vocab_size": 125696}
    c7 = BaichuanConfig(**seven_b)
    assert c7.position_embedding == "rope" and c7.model_max_length == 4096 and c7.z_loss_weight == 0
    assert c7.dtype == torch.bfloat16 and c7.tokenizer_class == "BaichuanTokenizer" and c7._from_model_config
    thirteen_b = {**seven_b, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                  "intermediate_size": 13696}
    thirteen_b.pop("max_position_embeddings")
    assert BaichuanConfig(**thirteen_b).position_embedding == "alibi"
    defaults = BaichuanConfig()
    assert (defaults.vocab_size, defaults.hidden_size, defaults.intermediate_size, defaults.num_hidden_layers,
            defaults.num_attention_heads, defaults.max_position_embeddings) == (125696, 4096, 11008, 32, 32, 4096)
    assert (defaults.pad_token_id, defaults.bos_token_id, defaults.eos_token_id) == (0, 1, 2)
    assert not defaults.tie_word_embeddings and defaults.rms_norm_eps == 1e-6
    with pytest.raises(ValueError):
        BaichuanConfig(position_embedding="sinusoidal")


def test_auto_classes_load_saved_config(tmp_path: Path) -> None:
    tiny_config(position_embedding="alibi").save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BaichuanConfig) and loaded.position_embedding == "alibi"
    assert loaded.model_max_length == 512


def test_alibi_slopes_follow_the_paper() -> None:
    # Power of two: the paper's example for 8 heads is 1/2, 1/4, ..., 1/256.
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # Not a power of two (Baichuan2-13B has 40 heads): the 32 slopes of 2^(-8k/32), then the odd-k
    # slopes of 2^(-8k/64) for k = 1, 3, ..., 15.
    expected = [2 ** (-8 * k / 32) for k in range(1, 33)] + [2 ** (-8 * k / 64) for k in range(1, 16, 2)]
    assert torch.allclose(alibi_slopes(40), torch.tensor(expected))
    assert alibi_slopes(12).shape == (12,)


# ---------------------------------------------------------------------------------------------
# Cache, padding, generation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_incremental_decoding_matches_full_forward(position_embedding: str) -> None:
    model = random_model(position_embedding)
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], cache=DynamicCache(), use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], **{CACHE_NAME: getattr(out, CACHE_NAME)}, use_cache=True)
            steps.append(out.logits)
        assert getattr(out, CACHE_NAME).get_seq_length() == 12
        assert (torch.cat(steps, 1) - full).abs().max().item() < ATOL

        # Legacy per-layer (k, v) tuples are accepted and given back as tuples.
        prefix = getattr(model(ids[:, :5], use_cache=True), CACHE_NAME)
        legacy = tuple((layer.keys, layer.values) for layer in prefix.layers)
        out = model(ids[:, 5:], cache=legacy, use_cache=True)
        assert isinstance(getattr(out, CACHE_NAME), tuple) and getattr(out, CACHE_NAME)[0][0].shape[2] == 12
        assert (out.logits - full[:, 5:]).abs().max().item() < ATOL


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_logits_to_keep_equals_the_full_forward_rows(position_embedding: str) -> None:
    """`logits_to_keep` (an int, or an index tensor as train.py passes) prunes the last layer past its
    attention: the kept rows, their gradients and the cache must equal the full forward's."""
    # float64 (the fp32 row-subset matmuls round differently); train mode: the NormHead normalises on the fly
    model = random_model(position_embedding).double().train()
    ids, mask = left_pad([random_ids(1, 10, seed=5)[0], random_ids(1, 7, seed=6)[0]])
    keep = torch.tensor([2, 5, 6, 9])
    full = model(ids, attention_mask=mask).logits
    full[:, keep].square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    kept = model(ids, attention_mask=mask, logits_to_keep=keep).logits
    assert kept.shape == (2, len(keep), full.shape[-1])
    assert (kept - full[:, keep]).abs().max().item() < ATOL
    kept.square().sum().backward()
    for name, ref in ref_grads.items():
        assert (model.get_parameter(name).grad - ref).abs().max().item() < ATOL, name
    pruned = f"model.layers.{model.config.num_hidden_layers - 1}.mlp.down_proj.weight"
    assert ref_grads[pruned].abs().max() > 1e-3  # the pruned layer is trained
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=True)
        last = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        assert (last.logits - whole.logits[:, -1:]).abs().max().item() < ATOL
        for a, b in zip(getattr(last, CACHE_NAME).layers, getattr(whole, CACHE_NAME).layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        # with every layer's hidden states asked for, nothing is pruned and the kept logits still match
        out = model(ids, attention_mask=mask, logits_to_keep=keep, output_hidden_states=True)
        assert out.hidden_states[-1].shape[1] == ids.shape[1]
        assert (out.logits - full[:, keep]).abs().max().item() < ATOL


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_left_padded_batch_equals_each_sequence_alone(position_embedding: str) -> None:
    model = random_model(position_embedding)
    seqs = [random_ids(1, 9, seed=2)[0], random_ids(1, 4, seed=3)[0], random_ids(1, 6, seed=4)[0]]
    ids, mask = left_pad(seqs)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    greedy = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.05,
              "pad_token_id": 0}
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask, position_ids=positions).logits
        batch_gen = model.generate(ids, attention_mask=mask, **greedy)
        for row, seq in enumerate(seqs):
            single = model(seq[None]).logits[0]
            assert (batch_logits[row, -len(seq):] - single).abs().max().item() < ATOL
            single_gen = model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), **greedy)
            assert batch_gen[row, ids.shape[1]:].tolist() == single_gen[0, len(seq):].tolist()
            # ... and generation with the cache equals generation without it.
            no_cache = model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                                      use_cache=False, **greedy)
            assert no_cache[0].tolist() == single_gen[0].tolist()


def test_generation_passes_sliced_mask_positions() -> None:
    model = random_model("rope")
    ids, mask = left_pad([random_ids(1, 7, seed=5)[0], random_ids(1, 3, seed=6)[0]])
    cache = DynamicCache()
    full_positions = torch.arange(ids.shape[1]).expand(2, -1)  # what v5 may pass in kwargs
    first = model.prepare_inputs_for_generation(ids, **{CACHE_NAME: cache}, attention_mask=mask,
                                                position_ids=full_positions, use_cache=True, is_first_iteration=True)
    expected = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    assert torch.equal(first["position_ids"], expected)
    with torch.no_grad():
        model(**first)
    grown = torch.cat([ids, torch.tensor([[5], [6]])], 1)
    grown_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step = model.prepare_inputs_for_generation(grown, **{CACHE_NAME: cache}, attention_mask=grown_mask,
                                               position_ids=torch.arange(grown.shape[1]).expand(2, -1),
                                               next_sequence_length=1, use_cache=True)
    assert step["input_ids"].tolist() == [[5], [6]]
    assert step["position_ids"].tolist() == [[7], [3]]


# ---------------------------------------------------------------------------------------------
# NormHead, loss, gradient checkpointing
# ---------------------------------------------------------------------------------------------
def test_normhead_train_and_eval_behaviour() -> None:
    model = random_model("rope")
    ids = random_ids(2, 6)
    head = model.lm_head
    raw = head.weight.detach().clone()
    assert raw.norm(dim=1).sub(1).abs().max() > 0.1  # stored un-normalised

    model.train()
    with torch.no_grad():
        train_logits = model(ids).logits
    assert torch.equal(head.weight, raw) and head.first_flag  # train mode never touches the weight

    model.eval()
    ptr = head.weight.data_ptr()
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert head.weight.data_ptr() == ptr  # overwritten in place
    assert torch.allclose(head.weight, F.normalize(raw), atol=1e-7)
    assert not head.first_flag
    assert (train_logits - eval_logits).abs().max().item() < 1e-5

    # Later eval calls use the stored weight as is (an edit is not renormalised) ...
    with torch.no_grad():
        head.weight.mul_(2.0)
        assert torch.allclose(model(ids).logits, 2 * eval_logits, atol=1e-5)
    # ... until a train-mode call re-arms the flag.
    model.train()
    with torch.no_grad():
        model(ids)
    assert head.first_flag
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, eval_logits, atol=1e-5)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]), atol=1e-6)


def test_normhead_gradient_flows_through_normalisation() -> None:
    head = NormHead(16, 10)
    head.train()
    hidden = torch.randn(3, 16)
    upstream = torch.randn(3, 10)
    (head(hidden) * upstream).sum().backward()
    w = head.weight.detach().clone().requires_grad_(True)
    (F.linear(hidden, w / w.norm(dim=1, keepdim=True)) * upstream).sum().backward()
    assert torch.allclose(head.weight.grad, w.grad, atol=1e-6)


def test_loss_is_shifted_mean_cross_entropy_plus_z_loss() -> None:
    model = random_model("rope")
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = out.logits
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        keep = shift_labels != -100
        log_probs = torch.log_softmax(shift_logits[keep].double(), -1)
        manual = -log_probs.gather(1, shift_labels[keep, None]).mean()
        assert abs(out.loss.item() - manual.item()) < 1e-5
        model.config.z_loss_weight = 0.01
        z = 0.01 * (shift_logits.double().max(-1).values ** 2).mean()  # over all positions, ignored ones too
        assert abs(model(ids, labels=labels).loss.item() - (manual + z).item()) < 1e-5


def test_gradient_checkpointing_gives_same_loss_and_gradients() -> None:
    def loss_and_grads(model: BaichuanForCausalLM) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        ids = random_ids(2, 10)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = random_model("rope").train()
    plain_loss, plain_grads = loss_and_grads(model)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers) and model.model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model)
    assert abs(plain_loss - ckpt_loss) < 1e-6
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name
    # Training with checkpointing forces use_cache off.
    assert getattr(model(random_ids(1, 4), use_cache=True), CACHE_NAME) is None


def test_embedding_accessors() -> None:
    model = random_model("rope")
    assert model.model.embed_tokens.padding_idx == 0
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    new_embed = torch.nn.Embedding(model.config.vocab_size, model.config.hidden_size)
    model.set_input_embeddings(new_embed)
    assert model.model.get_input_embeddings() is new_embed
    new_head = NormHead(model.config.hidden_size, model.config.vocab_size)
    model.set_output_embeddings(new_head)
    assert model.lm_head is new_head
    assert BaichuanForCausalLM.base_model_prefix == "model" and BaichuanForCausalLM.supports_gradient_checkpointing
    assert "DecoderLayer" in model._no_split_modules


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = random_model("alibi")
    raw_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "raw")
    assert (tmp_path / "raw" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "raw")
    assert isinstance(loaded, BaichuanForCausalLM) and loaded.config.position_embedding == "alibi"
    assert loaded.state_dict().keys() == raw_state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, raw_state[key]), key
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits  # eval call: lm_head now holds unit rows
        assert torch.equal(loaded(ids).logits, expected)
        model.save_pretrained(tmp_path / "after_eval")
        reloaded = BaichuanForCausalLM.from_pretrained(tmp_path / "after_eval")
        saved_head = reloaded.lm_head.weight.detach().clone()
        assert torch.allclose(saved_head.norm(dim=1), torch.ones(saved_head.shape[0]), atol=1e-6)
        # Normalisation is idempotent (up to rounding of the re-normalised unit rows).
        assert (reloaded(ids).logits - expected).abs().max().item() < 1e-5


def write_bin_checkpoint(model: BaichuanForCausalLM, directory: Path, shards: int) -> None:
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_checkpoints_load(tmp_path: Path, shards: int) -> None:
    model = random_model("rope")
    write_bin_checkpoint(model, tmp_path / "ckpt", shards)
    loaded = BaichuanForCausalLM.from_pretrained(tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    bf16 = BaichuanForCausalLM.from_pretrained(tmp_path / "ckpt", torch_dtype=torch.bfloat16, device_map="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = bf16(random_ids(1, 5)).logits
    assert logits.dtype == torch.bfloat16  # logits stay in the model dtype


class _Payload:
    """Pickling this object runs code on load (a file gets written) unless weights_only is enforced."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_bin_loading_never_unpickles_code(tmp_path: Path) -> None:
    model = random_model("rope")
    write_bin_checkpoint(model, tmp_path / "ckpt", 1)
    marker = tmp_path / "marker.txt"
    state = torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        BaichuanForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError):
        BaichuanForCausalLM.from_pretrained(tmp_path / "ckpt", weights_only=False)
    assert not marker.exists()


def test_lazy_rope_tables_follow_the_device_and_length() -> None:
    model = random_model("rope", max_position_embeddings=16)
    ids = random_ids(1, 40)  # longer than max_position_embeddings: the tables grow
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(random_ids(1, 1, seed=9), **{CACHE_NAME: getattr(out, CACHE_NAME)}, use_cache=True)
    assert torch.isfinite(step.logits).all()
    rotary = model.model.rotary_emb
    assert not list(rotary.buffers()) and "rotary" not in " ".join(model.state_dict())
    cos, _ = rotary.tables(torch.device("cpu"), 41)
    assert cos.shape[0] >= 41 and cos.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# 4-bit loading + LoRA
# ---------------------------------------------------------------------------------------------
def test_4bit_load_and_lora_training(tiny_model_dir: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, device_map="cpu")
    targets = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for layer in model.model.layers:
        for name in targets:
            module = layer.self_attn if name in ("W_pack", "o_proj") else layer.mlp
            assert isinstance(getattr(module, name), bnb.nn.Linear4bit), name
    assert type(model.lm_head) is NormHead and model.lm_head.weight.dtype == torch.float32  # not quantized

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seqs = [torch.tensor(tokenizer.encode(t, add_special_tokens=False))
            for t in ["你好，我是孙悟空，齐天大圣。", "Hello world! This is a tiny test corpus."]]
    ids, mask = left_pad(seqs)
    labels = ids.masked_fill(mask == 0, -100)

    torch.manual_seed(0)
    # Reentrant checkpointing is the strict variant (inputs needing grad must be positional).
    model = peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 4)


def test_eager_attention_and_beam_search_and_embeds(tiny_model_dir: Path) -> None:
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert (sdpa(ids).logits - eager(ids).logits).abs().max().item() < ATOL
        greedy = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
        # Beam search reorders the cache (transformers 5 calls `_reorder_cache` with a Cache object).
        beams = sdpa.generate(ids, num_beams=3, **greedy)
        assert beams.tolist() == sdpa.generate(ids, num_beams=3, use_cache=False, **greedy).tolist()
        # inputs_embeds are used on the first step only.
        from_ids = sdpa.generate(ids, repetition_penalty=1.0, **greedy)[:, ids.shape[1]:]
        from_embeds = sdpa.generate(inputs_embeds=sdpa.get_input_embeddings()(ids), repetition_penalty=1.0,
                                    attention_mask=torch.ones_like(ids), **greedy)
        assert from_embeds.tolist() == from_ids.tolist()


def test_real_style_folder_loads_without_remote_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The shipped config.json carries auto_map/torch_dtype and no position field; with the classes
    registered, Auto* uses the local code and never asks for trust_remote_code."""
    import shutil

    folder = tmp_path / "real-style"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("position_embedding", "z_loss_weight", "dtype"):
        config.pop(key, None)
    config.update({"auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
                   "torch_dtype": "bfloat16", "_from_model_config": True, "transformers_version": "4.29.2"})
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is BaichuanForCausalLM and model.dtype == torch.bfloat16
    assert model.config.position_embedding == "rope" and model.config.model_max_length == 512
