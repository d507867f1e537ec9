"""`model.quantize(8)` / `model.quantize(4)`: weight-only quantisation on CPU shrinks the resident
weights and keeps the logits close to the float model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import baichuan  # noqa: F401  (registers the Auto classes)
from baichuan import resident_weight_bytes
from baichuan.modeling_baichuan import NormHead

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("single_thread_torch")

LINEAR_NAMES = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name.split(".")[-1] in LINEAR_NAMES}


def dequantise(module: nn.Module) -> torch.Tensor:
    """Float weight represented by a freshly quantised bitsandbytes layer (before any forward)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def float_linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in linears(model).values())


@pytest.mark.parametrize(("bits", "module_type", "max_ratio"), [(8, "Linear8bitLt", 0.30), (4, "Linear4bit", 0.20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_shrinks_weights_and_keeps_logits(tiny_model_dir: Path, bits: int, module_type: str,
                                                   max_ratio: float, dtype: torch.dtype) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits.float()
    total_before = resident_weight_bytes(model)
    linear_before = float_linear_bytes(model)

    assert model.quantize(bits) is model
    quantized = linears(model)
    assert len(quantized) == 5 * model.config.num_hidden_layers
    assert all(type(m).__name__ == module_type for m in quantized.values())
    assert type(model.lm_head) is NormHead and model.lm_head.weight.dtype == dtype  # the head stays float

    # Resident bytes: everything but the Linear weights is unchanged, the Linear part shrinks to at
    # most `max_ratio` of its float size (fp32 -> int8 is ~1/4, -> nf4 ~1/8, statistics included).
    total_after = resident_weight_bytes(model)
    linear_after = total_after - (total_before - linear_before)
    ratio = linear_after / linear_before * (dtype.itemsize / 4)  # express relative to fp32
    assert 0 < linear_after < linear_before and ratio < max_ratio, (linear_after, linear_before)

    # Independent reference for the quantised forward: the float model with every Linear weight
    # replaced by its dequantised value (taken before the first forward, when bitsandbytes still
    # holds the plain layout). Weight-only quantisation must compute exactly x @ dequant(W).T.
    dequantised = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    for name, module in quantized.items():
        original = dequantised.get_submodule(name).weight
        weight = dequantise(module)
        row_scale = original.detach().float().abs().amax(dim=1, keepdim=True)
        # int8 rounds to half a step of absmax/127 (plus the fp16 cast bitsandbytes quantises from);
        # NF4 blocks of 64 have 16 levels, the widest gap being under absmax.
        bound = row_scale / 127 * 0.6 if bits == 8 else row_scale * 0.5
        assert ((weight.float() - original.float()).abs() <= bound + 1e-6).all(), name
        with torch.no_grad():
            original.copy_(weight.to(dtype))

    with torch.no_grad():
        logits = model(ids).logits.float()
        expected = dequantised(ids).logits.float()
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    assert (logits - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())
    # Close to the float model: quantisation noise only (random weights are the worst case for NF4).
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
    assert cosine > (0.999 if bits == 8 else 0.98), cosine
    error, scale = (logits - reference).abs().max().item(), reference.abs().max().item()
    assert error < (0.05 if bits == 8 else 0.3) * scale, (error, scale)
    with torch.no_grad():
        out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 19)


def test_quantize_rejects_bad_requests(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError):
        model.quantize(3)
    model.quantize(8)
    with pytest.raises(RuntimeError):
        model.quantize(4)


def test_resident_weight_bytes_counts_each_storage_once() -> None:
    a = nn.Linear(4, 8, bias=False)
    shared = nn.Sequential(a, a)
    assert resident_weight_bytes(shared) == resident_weight_bytes(a) == 4 * 8 * 4
