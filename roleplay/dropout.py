"""LoRA dropout that draws only the dropped positions: the same distribution as `nn.Dropout`, less work on CPUs.

`nn.Dropout` draws one random number per element (a Bernoulli mask). With LoRA's small rates (0.05–0.1)
almost every draw says "keep", and on a CPU those draws were ~12% of a tiny-default training step
(20 LoRA inputs per step). The dropped positions of an i.i.d. Bernoulli(p) mask are exactly the
running sums of i.i.d. Geometric(p) gaps, so `GapDropout` draws ~p·n gaps instead of n numbers, then
scales the input by 1/(1-p) and zeroes those positions: the output has nn.Dropout's distribution
(each element kept with probability 1-p, independently, scaled by 1/(1-p)), from fewer random numbers.
It uses the global torch generator like nn.Dropout, so seeds and `--resume` RNG restores cover it.

train.py swaps PEFT's LoRA dropout modules for it on CPU runs (`use_gap_dropout`); on CUDA the
fused dropout kernel is already cheap and is kept. Above `MAX_GAP_P` it falls back to nn.Dropout
(a geometric draw costs more than a Bernoulli one, so gaps only pay when few positions drop).

Example:
    >>> import torch
    >>> from roleplay.dropout import GapDropout
    >>> _ = torch.manual_seed(0)
    >>> y = GapDropout(0.1)(torch.ones(10_000))
    >>> kept = y[y != 0]  # scaled by 1/(1-p); about p of the elements are zeroed
    >>> bool((kept - 1 / 0.9).abs().max() < 1e-6), abs(float((y == 0).float().mean()) - 0.1) < 0.01
    (True, True)
"""

from __future__ import annotations

import functools
import math
from typing import Any

MAX_GAP_P = 0.2  # above this rate a Bernoulli mask is the cheaper draw (measured: geometric ~4x a Bernoulli)


def geometric_gaps(count: int, p: float, device: Any = "cpu") -> Any:
    """`count` i.i.d. Geometric(p) draws on {1, 2, ...} (a float64 tensor), by inversion of 53-bit uniforms:
    ceil(log(1-u) / log(1-p)). Same law as `Tensor.geometric_`, which is ~1.7x slower here (u = 0 would
    give 0, probability 2**-53, and is clamped to 1)."""
    import torch

    u = torch.rand(count, dtype=torch.float64, device=device)
    return u.neg_().log1p_().div_(math.log1p(-p)).ceil_().clamp_min_(1)


def dropped_positions(n: int, p: float, device: Any = "cpu") -> Any:
    """Sorted indices in [0, n) of an i.i.d. Bernoulli(p) draw over n slots (int64), from geometric gaps."""
    import torch

    mean = n * p
    chunk = int(mean + 6 * math.sqrt(mean) + 16)  # enough gaps to pass n almost always in one draw
    ends = geometric_gaps(chunk, p, device).cumsum_(0)  # float64: exact integers far beyond any tensor size
    parts = [ends]
    while float(ends[-1]) < n:  # rare: draw more gaps, continuing from the last position
        ends = geometric_gaps(chunk, p, device).cumsum_(0) + ends[-1]
        parts.append(ends)
    ends = torch.cat(parts) if len(parts) > 1 else ends
    # ends rise strictly (gaps >= 1): a slice up to the count of ends <= n, not a boolean mask (~4x slower)
    kept = int(torch.searchsorted(ends, torch.tensor([float(n)], dtype=ends.dtype, device=ends.device), right=True))
    return ends[:kept].long() - 1  # the k-th success of the process is at slot (sum of the first k gaps) - 1


@functools.cache
def _gap_dropout_class() -> type:
    """GapDropout, built on first use: importing this module must not import torch (tests/test_imports.py)."""
    import torch
    from torch import nn

    class GapDropoutFn(torch.autograd.Function):
        """y = x / (1-p) with the drawn positions zeroed; the backward applies the same positions and scale."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
            scale = 1.0 / (1.0 - p)
            drop = dropped_positions(x.numel(), p, x.device)
            out = (x * scale).contiguous()  # positions index the row-major order, as in the backward
            out.view(-1).index_fill_(0, drop, 0)
            ctx.save_for_backward(drop)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            (drop,) = ctx.saved_tensors
            out = (grad * ctx.scale).contiguous()
            out.view(-1).index_fill_(0, drop, 0)
            return out, None

    class GapDropout(nn.Dropout):
        """nn.Dropout(p) drawn through geometric gaps (see the module docstring); identity in eval mode."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            if self.p > MAX_GAP_P or self.inplace:
                return super().forward(x)
            return GapDropoutFn.apply(x, self.p)

    GapDropout.__qualname__ = GapDropout.__name__
    GapDropout.__module__ = __name__
    return GapDropout


def __getattr__(name: str) -> Any:
    """`roleplay.dropout.GapDropout`, the nn.Dropout subclass (created lazily, see `_gap_dropout_class`)."""
    if name == "GapDropout":
        return _gap_dropout_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_gap_dropout(model: Any) -> int:
    """Replace every nn.Dropout in the model's LoRA layers (PEFT's `lora_dropout` dicts) by a GapDropout
    of the same rate, in place; returns how many were replaced."""
    from torch import nn

    gap = _gap_dropout_class()
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in list(dropouts.items()):
            if type(layer) is nn.Dropout:
                dropouts[name] = gap(layer.p)
                replaced += 1
    return replaced
