"""`LengthGroupedBatchSampler`: the training batches of train.py (and of the embedded default's
base training in tools/build_default.py): micro-batches of similar length, split over ranks; with
`megabatch=1` (train.py --packing, where padding costs nothing) random micro-batches.

Example:
    >>> from roleplay.sampler import LengthGroupedBatchSampler
    >>> LengthGroupedBatchSampler([5, 9, 3, 7], batch_size=2, seed=0).micro_batches(0)
    [[1, 3], [0, 2]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class LengthGroupedBatchSampler:
    """Micro-batches of similar length, reshuffled every epoch, split over data-parallel ranks.

    One optimizer step consumes a *global batch* of `batch_size * world_size * grad_accum`
    samples. Global batches are drawn from a seeded permutation, sorted by length (so little
    compute goes to padding), cut into micro-batches, and micro-batch `a * world_size + rank`
    goes to `rank` at accumulation step `a`. So one process with grad_accum=2 sees exactly the
    micro-batches two processes with grad_accum=1 see. The order of global batches is shuffled
    so that lengths are mixed over the epoch. `start` skips micro-batches already consumed (resume).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0, megabatch: int = 64) -> None:
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.grad_accum, self.seed, self.megabatch = grad_accum, seed, megabatch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_batches(self, epoch: int) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.world_size * self.grad_accum
        if len(order) % size:  # repeat samples (cyclically: the data may be smaller than the padding)
            pad = size - len(order) % size  # so that every rank gets full, equal batches
            order += (order * (pad // len(order) + 1))[:pad]
        chunk = size * self.megabatch
        batches = []
        for i in range(0, len(order), chunk):
            group = sorted(order[i:i + chunk], key=lambda j: -self.lengths[j])
            batches += [group[k:k + size] for k in range(0, len(group), size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[p] for p in perm]

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches for `epoch`, in training order."""
        out = []
        bs = self.batch_size
        for gb in self.global_batches(epoch):
            for a in range(self.grad_accum):
                k = a * self.world_size + self.rank
                out.append(gb[k * bs:(k + 1) * bs])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.micro_batches(self.epoch)[self.start:]

    def __len__(self) -> int:
        return len(self.micro_batches(self.epoch)) - self.start
