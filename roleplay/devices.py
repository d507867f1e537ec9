"""Where and in which precision the pipeline computes: the one device resolver used by training
(train.py, per launcher rank) and inference (predict.py, web_demo.py, merge_params.py), the inference
dtype, whether bf16 is native, and the device a loaded model sits on.

torch is imported inside the functions, so importing this module is cheap.

Example:
    >>> from roleplay.devices import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils import UserError


def resolve_device(choice: str = "auto", local_rank: int | None = None) -> Any:
    """torch.device for a --device value.

    Inference (`local_rank` None): "auto" is cuda when a CUDA device is visible, else cpu; "cpu",
    "cuda" and "cuda:N" are taken as given; anything else is a UserError.
    Training (`local_rank` given, the launcher's LOCAL_RANK): "auto" and "cuda" give cuda:`local_rank`
    and make it the current CUDA device when CUDA is visible ("auto" falls back to cpu), "cpu" gives cpu.
    Asking for cuda where none is visible is a UserError in both cases (worded for the flag in training).
    """
    import torch

    cuda = torch.cuda.is_available()
    if local_rank is not None:
        if choice == "cuda" and not cuda:
            raise UserError("--device cuda asked for, but no CUDA device is visible; use --device cpu or auto")
        if choice != "cpu" and cuda:
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    if choice == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if choice.startswith("cuda") and not cuda:
        raise UserError(f"device {choice!r} asked for, but no CUDA device is visible; use cpu or auto")
    try:
        return torch.device(choice)
    except RuntimeError as e:
        raise UserError(f"bad device {choice!r}: use auto, cpu, cuda or cuda:N") from e


def resolve_inference_dtype(dtype: str, device: Any) -> Any:
    """torch dtype for "auto" (bf16 on cuda, fp32 on cpu), "fp32", "bf16" or "fp16"."""
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    if dtype not in names:
        raise UserError(f"bad dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return names[dtype]


def bf16_supported(device: Any) -> bool:
    """bf16 where the hardware computes it natively, fp32 elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_device(model: Any) -> Any:
    """The torch.device `model` runs on: its `device` attribute, else its first parameter's."""
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
