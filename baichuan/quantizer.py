"""Online weight-only quantisation of a loaded float Baichuan model: `model.quantize(8)` / `model.quantize(4)`.

Every `nn.Linear` of the decoder (W_pack, o_proj, gate/up/down_proj) is swapped for a bitsandbytes
module: `Linear8bitLt` (int8 rows with one fp scale each; measured to run on this CPU build, as the
GPU build does) or `Linear4bit` (NF4, double-quantised statistics, compute in the model's dtype). The
NormHead `lm_head` is not an `nn.Linear` and is never touched: its row normalisation needs the float
weight. This is for low-memory inference; for QLoRA training load with `BitsAndBytesConfig` instead.

Example:
    >>> model = BaichuanForCausalLM.from_pretrained(path, dtype=torch.bfloat16).quantize(4)
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

# any nn.Module (BaichuanForCausalLM.quantize passes itself): annotated without importing
# modeling_baichuan, which imports this module
ModelT = TypeVar("ModelT", bound=nn.Module)

SUPPORTED_BITS = (4, 8)
SKIP_MODULES = ("lm_head",)


def _int8_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    # Built on meta so no float weight of the full size is allocated a second time.
    new = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=0.0, device="meta",
    )
    # Int8Params quantises when moved from the CPU to a real device, so hand it a CPU copy.
    new.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return new.to(device)


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    dtype = linear.weight.dtype
    new = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4", module=new
    )
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return new.to(device)  # Params4bit quantises on the move to a real device


def quantize_model(model: ModelT, bits: int) -> ModelT:
    """Replace the decoder's Linear layers by `bits`-bit bitsandbytes layers, in place; returns `model`.

    Raises ValueError for bits other than 4/8 and RuntimeError if the model is already quantised
    (online, or loaded with a quantization_config).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if getattr(model, "quantization_bits", None) or getattr(model, "is_quantized", False):
        raise RuntimeError("model is already quantized")
    convert = _int8_linear if bits == 8 else _nf4_linear
    targets = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and name.split(".")[0] not in SKIP_MODULES
    ]
    with torch.no_grad():
        for name in targets:
            model.set_submodule(name, convert(model.get_submodule(name)))
    model.quantization_bits = bits
    return model


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, quantisation statistics included.

    Counts each storage once; for bitsandbytes layers also counts the int8 row scales (SCB, kept on
    the weight or, after the first forward, on the module's matmul state) and the 4-bit quant-state
    tensors (absmax, code, nested statistics), which live outside `parameters()`.
    """
    seen: set[int] = set()
    total = 0

    def add(t: object) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        total += storage.nbytes()

    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        state = getattr(module, "state", None)
        for name in ("CB", "SCB"):
            add(getattr(state, name, None))
        for tensor in tensors:
            add(tensor)
            add(getattr(tensor, "SCB", None))
            quant_state = getattr(tensor, "quant_state", None)
            while quant_state is not None:
                for name in ("absmax", "code", "offset"):
                    add(getattr(quant_state, name, None))
                quant_state = getattr(quant_state, "state2", None)
    return total


__all__ = ["SUPPORTED_BITS", "quantize_model", "resident_weight_bytes"]
