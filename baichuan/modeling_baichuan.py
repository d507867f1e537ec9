"""Baichuan2 causal LM for transformers 5: `BaichuanModel` and `BaichuanForCausalLM`.

An independent implementation of the Baichuan2 architecture (7B: RoPE, 13B: ALiBi) that loads the
published checkpoints. The parts that decide numerical parity with the reference implementation:
- the fused `W_pack` projection is split into three contiguous H-sized blocks (q | k | v);
- RoPE uses half-split ("rotate_half") float32 tables, computed lazily on the device in use (never
  registered buffers, so v5's meta-device construction cannot leave them unmaterialised);
- the 13B layout (`position_embedding="alibi"`) adds ALiBi biases (slopes from the ALiBi paper) instead;
- causal and padding masks are additive `finfo.min` masks, added together, fed to SDPA;
- packed rows (no `attention_mask`, `position_ids` restarting at 0 where a sample starts, as
  transformers 5 and TRL's padding-free collators make them) attend only within each sample
  (`PackedRows`): per-sample SDPA calls in fp32, samples batched by length in bf16/fp16 on a CPU
  (`bucketed_attention`), flash-attention's varlen kernel on CUDA where installed;
- `NormHead` normalises the output rows: on the fly in train mode, once and in place in eval mode;
- the loss is the shifted mean cross-entropy (ignore_index -100) plus `z_loss_weight * mean(max_logit**2)`.

Example:
    >>> import baichuan, torch
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("output/tiny-baichuan2-chat", dtype=torch.float32)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from threading import Thread
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_baichuan import BaichuanConfig
from .generation_utils import TextIterStreamer, build_chat_input

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

ROPE_BASE = 10000.0  # fixed in the reference implementation; not a config field

LegacyCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]

# transformers 5.24 renamed the KV-cache argument and output field from `past_key_values` to `cache`
# (the old name is deprecated there). The model takes both names and answers in the installed one.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def pick_cache(cache: Cache | LegacyCache | None, past_key_values: Cache | LegacyCache | None) -> Any:
    """The cache given under either name; both at once is an error (they could disagree)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Root-mean-square layer norm (numerically the LLaMA RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`weight * x / sqrt(mean(x**2) + eps)`, the statistics in fp32."""
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        # The fp32 rsqrt promotes the product to fp32; it is cast back only for half-precision weights
        # (so fp32 norm weights, e.g. after prepare_model_for_kbit_training, keep fp32 activations).
        hidden_states = hidden_states * torch.rsqrt(variance + self.epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.epsilon}"


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin tables ([T, head_dim], float32), built lazily per device.

    The tables are plain tensors kept in a dict, not buffers: transformers 5 builds models on the meta
    device and only materialises parameters and registered buffers, so tables made in `__init__` would
    stay on meta. They are computed on the CPU (as the reference does at init) and then copied to the
    device asked for, so every device sees the same numbers. They grow when a longer sequence appears.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 4096, base: float = ROPE_BASE) -> None:
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _build(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float() / self.dim))
        t = torch.arange(length, dtype=inv_freq.dtype)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: [f0..f(d/2-1), f0..f(d/2-1)]
        return emb.cos(), emb.sin()

    def tables(self, device: torch.device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables on `device` covering at least `length` positions."""
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            size = max(self.max_position_embeddings, length)
            if cached is not None:  # grow geometrically so long generations do not rebuild every step
                size = max(size, 2 * cached[0].shape[0])
            cos, sin = self._build(size)
            cached = (cos.to(device), sin.to(device))
            self._tables[device] = cached
        return cached

    def forward(self, position_ids: torch.LongTensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin gathered at `position_ids` ([b, t] -> [b, 1, t, head_dim], float32).

        Positions must lie in [0, kv_len) as in the reference (which slices the table to kv_len first).
        """
        cos, sin = self.tables(position_ids.device, kv_len)
        return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension, split in halves (not interleaved pairs)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k ([b, nh, t, hd]); the rotation runs in fp32 and the result keeps q/k's dtype."""
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + rotate_half(q32) * sin
    k_out = k32 * cos + rotate_half(k32) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al., "Train Short, Test Long").

    For n a power of 2 the slopes are the geometric sequence starting at 2^(-8/n) with that ratio.
    Otherwise take the slopes of the closest lower power of two, then every other slope of the
    sequence for twice that power until there are n.
    """

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if num_heads <= 0:
        raise ValueError("num_heads must be positive")
    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + alibi_slopes(2 * closest).tolist()[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The additive attention bias: causal mask + padding mask (+ ALiBi when `slopes` is given).

    Shape [b, 1, t, past+t] (or [b, nh, t, past+t] with ALiBi); None when nothing is masked. As in
    the reference, both masks hold `finfo(dtype).min` and are added, so a position masked twice
    becomes -inf; every query row keeps at least one finite entry, so SDPA yields no NaN.
    A 4-D `attention_mask` is taken as ready-made (bool: True = attend; float: additive).
    """
    src_len = past_len + query_len
    min_value = torch.finfo(dtype).min
    bias = None
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(~attention_mask, min_value)
        else:
            bias = attention_mask.to(dtype)
    else:
        if query_len > 1:
            # Causal: query i (absolute position past_len + i) must not see key j > past_len + i.
            bias = torch.full((query_len, src_len), min_value, dtype=dtype, device=device).triu(past_len + 1)
            bias = bias[None, None].expand(batch_size, 1, query_len, src_len)
        if attention_mask is not None:
            if attention_mask.shape[-1] != src_len:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + current = {src_len}"
                )
            inverted = 1.0 - attention_mask[:, None, None, :].to(dtype)
            padding = inverted.masked_fill(inverted.to(torch.bool), min_value)
            padding = padding.expand(batch_size, 1, query_len, src_len)
            bias = padding if bias is None else bias + padding
    if slopes is not None:
        # ALiBi: -slope * distance from the query to the key (in columns, so left padding does not
        # change the distances between real tokens); future keys are masked by the causal part.
        q_pos = torch.arange(past_len, src_len, device=device, dtype=torch.float32)
        k_pos = torch.arange(src_len, device=device, dtype=torch.float32)
        distance = (k_pos[None, :] - q_pos[:, None]).clamp(max=0)
        alibi = (slopes.to(device)[:, None, None] * distance[None]).to(dtype)[None]  # [1, nh, t, src]
        bias = alibi.expand(batch_size, -1, -1, -1) if bias is None else bias + alibi
    return bias


class PackedRows:
    """Where the samples of packed rows start and end, read from `position_ids` [b, t]: a new sample
    begins wherever a position is not its predecessor + 1 (the rule of transformers 5's
    `find_packed_sequence_indices`). Attention then runs per sample, so no token sees another sample
    and the work is that of the unpacked samples (a dense block-diagonal mask over a packed row would
    cost t**2 per row instead of the sum of the samples' squares). `cu_seqlens` are the flat
    cumulative boundaries flash-attention's varlen kernel takes."""

    def __init__(self, position_ids: torch.Tensor) -> None:
        b, t = position_ids.shape
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        flat = starts.reshape(-1).nonzero().squeeze(1)
        bounds = torch.cat([flat, flat.new_tensor([b * t])]).tolist()  # one host read per forward, not per layer
        # (row, start, length) of every sample
        self.segments = [(s // t, s % t, e - s) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=position_ids.device)
        self.max_len = max(n for _, _, n in self.segments)
        self.batch_size, self.length = b, t
        self._buckets: dict[torch.device, tuple[list[tuple[torch.Tensor, int, int]], torch.Tensor]] = {}
        self._biases: dict[tuple, torch.Tensor] = {}

    def buckets(self, device: torch.device) -> tuple[list[tuple[torch.Tensor, int, int]], torch.Tensor]:
        """The samples of one packed row grouped for batched attention: ([(gather, g, L)], inverse).

        Each bucket holds g samples of similar length, right-padded to its longest, L: `gather` ([g * L])
        indexes the row's tokens sample after sample, a padded slot repeating its sample's last token.
        Right padding is exact under the causal mask: a real query only sees keys at or before it, all
        real; the padded queries' outputs are dropped by `inverse` ([t]: where each token of the row is
        in the buckets' concatenated outputs), so no gradient flows through them either.
        Computed once per forward (every layer and the backward reuse it)."""
        if device not in self._buckets:
            lengths = [n for _, _, n in self.segments]
            starts = [start for _, start, _ in self.segments]
            inverse = torch.empty(self.length, dtype=torch.long, device=device)
            plan, offset = [], 0
            for members in length_buckets(lengths):
                longest = max(lengths[i] for i in members)
                step = torch.arange(longest, device=device)
                first = torch.tensor([starts[i] for i in members], device=device)[:, None]
                size = torch.tensor([lengths[i] for i in members], device=device)[:, None]
                gather = first + torch.minimum(step[None], size - 1)
                real = step[None] < size
                slots = offset + torch.arange(len(members), device=device)[:, None] * longest + step[None]
                inverse[gather[real]] = slots[real]
                plan.append((gather.reshape(-1), len(members), longest))
                offset += len(members) * longest
            self._buckets[device] = (plan, inverse)
        return self._buckets[device]

    def causal_bias(self, length: int, dtype: torch.dtype, device: torch.device,
                    slopes: torch.Tensor | None) -> torch.Tensor:
        """The additive causal (+ ALiBi) bias of one sample of `length`: [L, L], or [nh, L, L] with ALiBi
        (the distances are those inside the sample). Cached for the forward: every layer shares it."""
        key = (length, dtype, device, slopes is None)
        if key not in self._biases:
            bias = build_attention_bias(None, 1, length, 0, dtype, device, slopes)  # None: one token, no ALiBi
            self._biases[key] = torch.zeros(1, 1, dtype=dtype, device=device) if bias is None else bias[0]
            if slopes is None:
                self._biases[key] = self._biases[key][0]
        return self._biases[key]

    @staticmethod
    def detect(
        position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past_len: int
    ) -> PackedRows | None:
        """PackedRows for packed input (positions restart inside a row, no mask, no cache), else None."""
        if position_ids is None or attention_mask is not None or past_len or position_ids.shape[-1] < 2:
            return None
        if bool((position_ids[:, 1:] == position_ids[:, :-1] + 1).all()):
            return None  # one sample per row: the ordinary causal path
        return PackedRows(position_ids)


# One attention call's fixed cost, in the units of the work it does (query x key positions): about the
# work of one 128-token sample. Timed on packed micro-batches of the default data (bf16, one thread, a
# 2-core AVX-512 CPU), per layer forward + backward: 8.9 ms with no bucketing (cost 0), 5.9 / 5.4 / 5.8 ms
# at 64**2 / 128**2 / 256**2, 40 ms with everything in one bucket. `length_buckets` pads a sample only
# where that saves more in calls than it costs in padding.
CALL_COST = 128 * 128


def length_buckets(lengths: list[int], call_cost: int = CALL_COST) -> list[list[int]]:
    """Indices of `lengths` grouped into buckets of similar length, minimising
    sum over buckets of (call_cost + size * longest**2): the exact optimum over contiguous runs of the
    sorted lengths, by dynamic programming (a packed row holds a few dozen samples at most)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [None] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + call_cost + (end - start) * longest * longest
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], len(order)
    while end:
        out.append(order[cut[end]:end])
        end = cut[end]
    return out[::-1]


@functools.cache
def flash_varlen() -> Any:
    """flash-attention's `flash_attn_varlen_func` (through transformers' loader) where flash-attn 2 is installed
    and a CUDA device is present, else None. Looked up once."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return None
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    return lazy_import_flash_attention("flash_attention_2")[0][1]


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedRows, slopes: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention confined to each packed sample ([b, nh, t, hd] in, same out).

    CUDA with flash-attention installed (fp16/bf16): one varlen kernel call (ALiBi slopes passed to it).
    One row (what train.py --packing and TRL's padding-free collator make): one SDPA call per sample,
    each exactly the unpacked sample's attention (`is_causal` for RoPE; for ALiBi the causal + ALiBi
    bias of that sample's length, i.e. distances between its own restarted positions). The row is cut
    with `split` (its backward is one concatenation; slicing would add a full-size zero tensor per
    sample). bf16/fp16 on a CPU: `bucketed_attention` (SDPA's CPU flash kernel is slow there, see it).
    Several packed rows: one SDPA call with the block-diagonal causal mask.
    """
    varlen = flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    b, nh, t, hd = q.shape
    if varlen is not None:
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(b * t, nh, hd)

        out = varlen(flat(q), flat(k), flat(v), packed.cu_seqlens, packed.cu_seqlens, packed.max_len,
                     packed.max_len, causal=True,
                     alibi_slopes=None if slopes is None else slopes.to(q.device, torch.float32))
        return out.reshape(b, t, nh, hd).transpose(1, 2)
    if b > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_bias(packed, q.dtype, q.device, slopes))
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return bucketed_attention(q, k, v, packed, slopes)
    lengths = [n for _, _, n in packed.segments]
    parts = []
    for qs, ks, vs in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2), strict=True):
        n = qs.shape[2]
        if slopes is None:
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=n > 1))
        else:
            bias = build_attention_bias(None, 1, n, 0, q.dtype, q.device, slopes)
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias))
    return torch.cat(parts, dim=2)


def bucketed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedRows, slopes: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention confined to each sample of one packed row ([1, nh, t, hd] in and out), computed
    bucket by bucket (`PackedRows.buckets`): per bucket one batched scaled q.kT plus the causal (+ ALiBi)
    bias (`baddbmm`), a softmax and a product with v, as transformers' eager attention does in bf16.

    Why not SDPA here: on a CPU in bf16, its flash kernel's backward has a high fixed cost per call (a
    15-token sample takes as long as a 100-token one) and is 2-3x slower than these three ops at every
    length of the default data; per-sample calls then cost ~12 ms per layer for a packed micro-batch of
    16 samples, against ~5.4 ms bucketed (measured on a 2-core AVX-512 CPU, one thread). In fp32 the
    flash kernel is as fast or faster, so packed_attention keeps per-sample SDPA there."""
    nh, hd = q.shape[1], q.shape[3]
    plan, inverse = packed.buckets(q.device)
    outs = []
    for gather, size, longest in plan:
        qb, kb, vb = (x[0].index_select(1, gather).view(nh * size, longest, hd) for x in (q, k, v))
        bias = packed.causal_bias(longest, q.dtype, q.device, slopes)
        if slopes is not None and size > 1:  # [nh, L, L] -> the batch order of qb: head-major, then sample
            bias = bias[:, None].expand(nh, size, longest, longest).reshape(nh * size, longest, longest)
        scores = torch.baddbmm(bias, qb, kb.transpose(1, 2), alpha=hd ** -0.5)
        outs.append(torch.bmm(torch.softmax(scores, dim=-1), vb).view(nh, size * longest, hd))
    return torch.cat(outs, dim=1).index_select(1, inverse)[None]


def block_diagonal_bias(
    packed: PackedRows, dtype: torch.dtype, device: torch.device, slopes: torch.Tensor | None
) -> torch.Tensor:
    """Additive [b, 1 or nh, t, t] mask of packed rows: key j is visible to query i only in i's own sample
    and not after i; ALiBi (with `slopes`) from the distance inside the sample."""
    b, t = packed.batch_size, packed.length
    seg = torch.empty(b, t, dtype=torch.long, device=device)
    offset = torch.zeros(b, t, dtype=torch.long, device=device)
    for i, (row, start, n) in enumerate(packed.segments):
        seg[row, start:start + n] = i
        offset[row, start:start + n] = start
    pos = torch.arange(t, device=device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])
    bias = torch.zeros(b, 1, t, t, dtype=dtype, device=device).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    if slopes is not None:
        local = (pos[None] - offset).float()  # each token's position inside its sample
        distance = (local[:, None, :] - local[:, :, None]).clamp(max=0)  # [b, t(query), t(key)]
        bias = bias + (slopes.to(device)[None, :, None, None] * distance[:, None]).to(dtype)
    return bias


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP output, same shape as `x`."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head self-attention with the fused q|k|v projection `W_pack` (no GQA, no biases)."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        packed: PackedRows | None = None,
        slopes: torch.Tensor | None = None,
        keep: torch.Tensor | slice | None = None,
    ) -> torch.Tensor:
        """Attention output [b, t, H]; appends this layer's (rotated) keys and values to the cache.
        With `packed` (and ALiBi `slopes`), attention stays inside each packed sample. With `keep`
        (positions), the output projection runs on those positions only: [b, len(keep), H]."""
        bsz, q_len, _ = hidden_states.shape
        proj = self.W_pack(hidden_states)
        # Three contiguous H-sized blocks: rows 0..H-1 are q, H..2H-1 are k, 2H..3H-1 are v.
        q, k, v = proj.split(self.hidden_size, dim=-1)
        q = q.reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # the cache stores rotated keys

        if attention_bias is not None and attention_bias.dtype != q.dtype:
            # Mixed precision (e.g. fp32 norms feeding bf16 projections): re-express the mask in q's
            # dtype without overflowing finite "min" entries to -inf.
            attention_bias = attention_bias.float().clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        if packed is not None:
            out = packed_attention(q, k, v, packed, slopes)
        elif self.config._attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
            if attention_bias is not None:
                scores = scores + attention_bias
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        if keep is not None:
            out = out[:, keep]
        return self.o_proj(out)


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)).

    Inherits transformers 5's `GradientCheckpointingLayer`, which checkpoints `forward` in training once
    `gradient_checkpointing_enable()` ran (hidden_states must be passed positionally for that).
    """

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        packed: PackedRows | None = None,
        slopes: torch.Tensor | None = None,
        keep: torch.Tensor | slice | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The layer output, same shape as `hidden_states`; with `keep` (positions), only those positions'
        outputs ([b, len(keep), H]): every position's keys and values are still computed and cached, so
        the kept positions attend exactly as before, but the output projection, residual and MLP skip the rest."""
        residual = hidden_states if keep is None else hidden_states[:, keep]
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_bias=attention_bias,
            position_embeddings=position_embeddings,
            cache=cache,
            packed=packed,
            slopes=slopes,
            keep=keep,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class NormHead(nn.Module):
    """Output projection whose weight rows are L2-normalised before use.

    Train mode: normalises on the fly every call (gradients flow through the normalisation; the stored
    weight is untouched) and re-arms `first_flag`. Eval mode: the first call (after construction or any
    train-mode call) overwrites the weight in place with its normalised rows; later eval calls use the
    stored weight as is. Normalisation is idempotent, so saving after an eval call is harmless.
    """

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False) -> None:
        super().__init__()
        if bias:
            raise ValueError("NormHead has no bias")
        self.weight = nn.Parameter(torch.empty((vocab_size, hidden_size)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.first_flag = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits `hidden_states @ normalize(weight).T`, in the weight's dtype."""
        if self.training:
            norm_weight = F.normalize(self.weight)
            self.first_flag = True
        else:
            if self.first_flag:
                with torch.no_grad():
                    # In place (same storage), so optimisers, hooks and tied references keep working.
                    self.weight.copy_(F.normalize(self.weight))
                self.first_flag = False
            norm_weight = self.weight
        return F.linear(hidden_states, norm_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class BaichuanPreTrainedModel(PreTrainedModel):
    """Shared loading/saving/initialisation settings of the Baichuan models."""

    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["cache", "past_key_values"]
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"decoder\.version",
        r"rotary_emb\.(inv_freq|cos_cached|sin_cached)",
    ]
    # Attention runs through torch SDPA (or the eager equivalent); no flash/flex kernels.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for Linear/Embedding (padding row zeroed), ones for RMSNorm,
        kaiming-uniform (a=sqrt(5)) for NormHead, as its own constructor does.

        Uses `transformers.initialization`, which skips tensors already loaded from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            loaded = getattr(module.weight, "_is_hf_initialized", False)
            init.normal_(module.weight, mean=0.0, std=std)
            # A slice loses the "already loaded" flag, so check the flag on the whole weight first.
            if module.padding_idx is not None and not loaded:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, NormHead):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, but `.bin` checkpoints are always read with
        `torch.load(weights_only=True)`: a pickled checkpoint can never run code on load.

        Accepts everything the base loader does (`dtype`/`torch_dtype`, `device_map`,
        `quantization_config=BitsAndBytesConfig(...)`, ...); single `pytorch_model.bin`, sharded
        `pytorch_model-*.bin` + index, and safetensors folders all load.
        """
        if kwargs.get("weights_only", True) is not True:
            raise ValueError("BaichuanForCausalLM refuses weights_only=False: checkpoints are never unpickled")
        kwargs["weights_only"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


class BaichuanModel(BaichuanPreTrainedModel):
    """The decoder stack: embeddings -> N x DecoderLayer -> final RMSNorm."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = None
        self._alibi_slopes: torch.Tensor | None = None
        if config.position_embedding == "rope":
            self.rotary_emb = RotaryEmbedding(config.hidden_size // config.num_attention_heads,
                                              config.max_position_embeddings)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding table."""
        self.embed_tokens = value

    def alibi_slopes(self) -> torch.Tensor:
        """ALiBi slopes of this model's heads (cached; plain tensor for the same reason as RoPE)."""
        if self._alibi_slopes is None:
            self._alibi_slopes = alibi_slopes(self.config.num_attention_heads)
        return self._alibi_slopes

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | LegacyCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | LegacyCache | None = None,
        keep: torch.Tensor | slice | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder stack.

        `cache` (called `past_key_values` before transformers 5.24; both names are accepted) may be a
        `Cache` or legacy per-layer (k, v) tuples; legacy in gives legacy out. Without `position_ids`,
        positions are `arange(past, past + t)` (as in the reference, even with left padding; `generate`
        derives them from the mask instead). A `position_ids` longer than the fed tokens is sliced to
        its last t entries. Without `attention_mask` and cache, `position_ids` that restart inside a row
        mark packed samples (`PackedRows`): each attends only to itself, at its own positions.
        `output_attentions` is accepted but attentions are never returned (SDPA does not expose them).
        `keep` (sequence positions, a slice or an index tensor shared by the rows): `last_hidden_state` holds
        only those positions ([b, len(keep), H]), and the last layer computes only them past its attention
        (the output head's callers need no other; ignored with `output_hidden_states`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training:
            # Recomputing a layer in backward would append its keys/values to the cache a second time.
            if use_cache:
                logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False
        use_cache = use_cache if use_cache is not None else self.config.use_cache

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]

        cache = pick_cache(cache, past_key_values)
        legacy_cache = cache is not None and not isinstance(cache, Cache)
        if legacy_cache:
            cache = DynamicCache(ddp_cache_data=cache) if len(cache) else DynamicCache()
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        kv_len = past_len + seq_len
        device = inputs_embeds.device

        position_embeddings = None
        slopes = None
        if self.rotary_emb is not None:
            if position_ids is None:
                position_ids = torch.arange(past_len, kv_len, dtype=torch.long, device=device)
                position_ids = position_ids.unsqueeze(0).expand(batch_size, seq_len)
            else:
                position_ids = position_ids.to(device).reshape(-1, position_ids.shape[-1])[:, -seq_len:]
                position_ids = position_ids.expand(batch_size, seq_len)
            position_embeddings = self.rotary_emb(position_ids, kv_len)
        else:
            slopes = self.alibi_slopes()

        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        packed = None
        if position_ids is not None:
            position_ids = position_ids.to(device).reshape(-1, position_ids.shape[-1])[:, -seq_len:]
            packed = PackedRows.detect(position_ids.expand(batch_size, seq_len), attention_mask, past_len)
        attention_bias = None
        if packed is None:
            attention_bias = build_attention_bias(
                attention_mask, batch_size, seq_len, past_len, inputs_embeds.dtype, device, slopes
            )

        hidden_states = inputs_embeds
        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        if all_hidden_states is not None:
            keep = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_bias=attention_bias,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                packed=packed,
                slopes=slopes if packed is not None else None,
                keep=keep if i == last else None,
            )
        if keep is not None and not self.layers:
            hidden_states = hidden_states[:, keep]
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)

        next_cache = cache if use_cache else None
        if legacy_cache and next_cache is not None:
            next_cache = tuple((layer.keys, layer.values) for layer in next_cache.layers)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=None,
            **{CACHE_NAME: next_cache},
        )
        return output if return_dict else output.to_tuple()


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    """Baichuan2 language model: `BaichuanModel` + `NormHead`, with generation and chat helpers."""

    # The loss is a plain mean over tokens and ignores `num_items_in_batch`; tell the Trainer so it
    # keeps scaling the loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = NormHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding table."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> NormHead:
        """The output head (a NormHead, not an nn.Linear)."""
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Replace the output head."""
        self.lm_head = new_embeddings

    def get_decoder(self) -> BaichuanModel:
        """The decoder stack."""
        return self.model

    def set_decoder(self, decoder: BaichuanModel) -> None:
        """Replace the decoder stack."""
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | LegacyCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | LegacyCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (in the model dtype) and, with `labels`, the loss.

        The KV cache comes in as `cache` (transformers >= 5.24) or `past_key_values` (older 5.x) and
        goes out under the installed version's field name (`CACHE_NAME`).

        loss = mean cross-entropy of shifted logits/labels (ignore_index -100)
               + z_loss_weight * mean over all shifted positions of max_logit**2.
        `logits_to_keep` (used by `generate`) keeps only the last n positions' logits (0 = all), or, as
        an index tensor (train.py's packed batches), the positions listed; the last decoder layer then
        computes only those positions past its attention (`BaichuanModel.forward`'s `keep`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        keep = None
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            keep = slice(-logits_to_keep, None)
        elif labels is None and isinstance(logits_to_keep, torch.Tensor):
            keep = logits_to_keep
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,  # the decoder stack picks between the two names
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            keep=keep,
        )
        hidden_states = outputs.last_hidden_state
        if keep is not None and outputs.hidden_states is not None:  # the stack computed every position
            hidden_states = hidden_states[:, keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            z_loss_weight = getattr(self.config, "z_loss_weight", 0.0) or 0.0
            if z_loss_weight:
                loss = loss + z_loss_weight * (shift_logits.max(-1).values ** 2).mean()

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=None,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """GenerationMixin's inputs, with the reference's position ids.

        The cache travels in `kwargs` under whichever name the installed `generate` uses, and the
        parent method (which knows that name) puts it into the model inputs.
        Positions are `attention_mask.cumsum(-1) - 1` with pad positions set to 1, sliced to the tokens
        actually fed (only the newest one once the cache holds the prompt). transformers 5 passes its
        own full-length `position_ids` (pads set to 0) in kwargs; they are replaced here, which keeps
        left-padded batched generation equal to per-row generation.
        """
        # `inputs_embeds` stays a named parameter: `generate` checks this signature for it.
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        if attention_mask is not None and attention_mask.dim() == 2:
            fed = model_inputs.get("input_ids")
            if fed is None:
                fed = model_inputs["inputs_embeds"]
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 1)
            model_inputs["position_ids"] = position_ids[:, -fed.shape[1]:].to(fed.device)
        return model_inputs

    @staticmethod
    def _reorder_cache(cache: Cache | LegacyCache, beam_idx: torch.LongTensor) -> Cache | LegacyCache:
        """Reorder the cache along the batch for beam search (`Cache` in place; legacy tuples copied).

        transformers 5 calls this hook whenever a model defines it, for `Cache` objects too.
        """
        if isinstance(cache, Cache):
            cache.reorder_cache(beam_idx)
            return cache
        return tuple(tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer) for layer in cache)

    # --- chat helpers -----------------------------------------------------------------------
    def chat(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict[str, str]],
        stream: bool = False,
        generation_config: GenerationConfig | None = None,
    ) -> str | Iterator[str]:
        """Reply to a chat (`[{"role": "system"|"user"|"assistant", "content": ...}, ...]`).

        Builds the Baichuan2 prompt with `build_chat_input` (budgeted with the config's
        `model_max_length` minus `max_new_tokens`) and generates with `generation_config` (default:
        the model's). Returns the decoded reply (special tokens skipped), or with `stream=True` a
        generator of the growing reply text while `generate` runs in a background thread.
        """
        generation_config = generation_config or self.generation_config
        input_ids = build_chat_input(self, tokenizer, messages, generation_config.max_new_tokens)
        if not stream:
            output = self.generate(input_ids, generation_config=generation_config)
            return tokenizer.decode(output[0][input_ids.shape[1]:], skip_special_tokens=True)

        streamer = TextIterStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            try:
                self.generate(input_ids, generation_config=generation_config, streamer=streamer)
            except Exception as exc:  # noqa: BLE001 -- re-raised in the consuming thread instead of hanging it
                streamer.fail(exc)
            finally:
                streamer.end()  # harmless after generate's own end(); unblocks the consumer on any exit

        def iterate() -> Iterator[str]:
            thread = Thread(target=run, daemon=True)
            thread.start()
            yield from streamer
            thread.join()  # reached once the streamer saw the end of generation

        return iterate()

    def quantize(self, bits: int) -> BaichuanForCausalLM:
        """Weight-only quantisation of every Linear layer but the head, in place (see `quantizer.py`)."""
        from .quantizer import quantize_model

        return quantize_model(self, bits)


__all__ = [
    "CACHE_NAME",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "NormHead",
    "PackedRows",
    "RMSNorm",
    "RotaryEmbedding",
    "alibi_slopes",
    "apply_rotary_pos_emb",
    "build_attention_bias",
    "rotate_half",
]
