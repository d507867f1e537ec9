"""Sequence packing for `train.py --packing`: a micro-batch's samples laid end to end in one row.

`PackingCollator` turns the sampler's micro-batch (the same samples an unpacked run would pad into a
[batch, longest] block) into one row of exactly their total length: no padding at all. Each sample
keeps its own token positions (`position_ids` restart at 0 where a sample starts), and `seq_ids`
says which sample each token belongs to. Attention must stay inside each sample; the models see
this from the restarting `position_ids` with no `attention_mask` (transformers 5 builds a
block-diagonal causal mask from them for Qwen2 and the other Auto-class models; our Baichuan does the
same, see `baichuan.modeling_baichuan.packed_segments`). Labels are the samples' own labels, with
each sample's first token masked (-100): no token is ever trained to predict the next sample's start.

Because a packed micro-batch holds exactly the samples of the unpacked one, the optimizer steps,
the learning-rate schedule and the per-token loss are those of an unpacked run (tests/test_packing.py
checks loss and LoRA gradients to 1e-5 in fp32): packing changes the speed, not the training.

`label_positions` lists the positions whose next token is a label: train.py computes the output head
and the loss only there (the prompt positions' logits would be computed and thrown away).

Example:
    >>> from roleplay.packing import PackingCollator
    >>> b = PackingCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                        {"input_ids": [8, 9], "labels": [-100, 9]}])
    >>> b["position_ids"].tolist(), b["labels"].tolist()
    ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE = -100


class PackingCollator:
    """Packs a micro-batch of samples ({"input_ids", "labels"[, "group"]}) into one row [1, total].

    Returns the model inputs `input_ids`, `position_ids` and `labels` (no `attention_mask`: the
    restarting positions are the mask), and for the training loop `seq_ids` ([1, total], the sample
    index of every token), `groups` (each sample's LOSS_GROUPS index, 1 when it has none) and
    `num_tokens` (a host-side int, so the loop's statistics need no read-back from the device).
    """

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(s["input_ids"]) for s in batch]
        ids = torch.tensor([t for s in batch for t in s["input_ids"]], dtype=torch.long)[None]
        labels = torch.tensor([t for s in batch for t in s["labels"]], dtype=torch.long)[None]
        seq_ids = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lengths))[None]
        starts = torch.tensor(lengths).cumsum(0) - torch.tensor(lengths)
        positions = torch.arange(ids.shape[1]) - starts[seq_ids[0]]
        labels[0, starts] = IGNORE  # a sample's first token is never a target (unpacked, nothing precedes it)
        return {"input_ids": ids, "position_ids": positions[None], "labels": labels, "seq_ids": seq_ids,
                "groups": torch.tensor([s.get("group", 1) for s in batch], dtype=torch.long),
                "num_tokens": sum(lengths)}


def label_positions(labels: Any) -> Any:
    """Indices i of a packed row ([1, T] labels) whose next token is a target: the logits that count."""
    return (labels[0, 1:] != IGNORE).nonzero().squeeze(1)


def segment_lengths(position_ids: Any) -> list[int]:
    """Lengths of the samples in one packed row, read from its restarting positions ([T] or [1, T])."""
    import torch

    pos = position_ids.reshape(-1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=pos.device),
                        (pos[1:] != pos[:-1] + 1).nonzero().squeeze(1) + 1])
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()], device=pos.device)])
    return (ends - starts).tolist()


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model takes (the rest is for the training loop), and
    `use_cache=False`: transformers 5 reads packed samples from `position_ids` only when there is no
    attention mask *and no cache* (with the config's default use_cache=True it would build a cache and
    let every packed sample attend to the ones before it)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch} | {"use_cache": False}


def batch_loss(model: Any, batch: dict[str, Any], n_groups: int) -> tuple[Any, Any]:
    """(loss, group_sums) of a collated batch on the model's device.

    loss: the mean next-token cross-entropy over the batch's target tokens (fp32), what the models'
    own loss computes (the mean over labels != -100 of the shifted logits), backpropagated by train.py.
    group_sums: [n_groups, 2] float64, detached: per LOSS_GROUPS index, the summed token losses and the
    token count (the per-source loss curves, with no read-back from the device here).

    A packed batch (`seq_ids`) asks the model for the logits at the target positions only
    (`logits_to_keep` as an index tensor, which Baichuan and the transformers models take): the output
    head and the softmax over the vocabulary then run on ~1/3 of the positions on the default data, and
    Baichuan's last layer computes its output projection and MLP only there (every position's keys and
    values are still computed, so the kept positions attend as before).
    A model whose loss adds a z-loss (Baichuan's `z_loss_weight`) keeps its own loss for the backward pass.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    config = getattr(getattr(model, "module", model), "config", None)  # a DeepSpeed engine's .config is its own
    z_loss = bool(getattr(config, "z_loss_weight", 0.0) or 0.0)
    if "seq_ids" in batch and not z_loss:
        keep = label_positions(labels)
        logits = model(**model_inputs(batch), logits_to_keep=keep).logits[0]
        targets, sample = labels[0, keep + 1], batch["seq_ids"][0, keep + 1]
        own = None
    else:
        out = model(**model_inputs(batch), labels=labels if z_loss else None)
        mask = labels[:, 1:] != IGNORE
        logits, targets = out.logits[:, :-1][mask], labels[:, 1:][mask]
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)
        sample = batch["seq_ids"][:, 1:][mask] if "seq_ids" in batch else rows[mask]
        own = out.loss
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = own if own is not None else token_loss.mean()
    group = batch["groups"].to(token_loss.device)[sample]
    values = torch.stack([token_loss.detach().double(), torch.ones_like(token_loss, dtype=torch.float64)], dim=1)
    sums = torch.zeros(n_groups, 2, dtype=torch.float64, device=token_loss.device).index_add_(0, group, values)
    return loss, sums
