"""Per-phase timing of training steps for `train.py --profile` (read by bench/run.py).

Each optimizer step's wall seconds are split into data, forward, backward, optimizer and other, and
written with the step's token counts to `<output_dir>/profile.json`.
"""

from __future__ import annotations

import time
from typing import Any


class StepProfiler:
    """--profile: each optimizer step's wall seconds split into data (fetch, collate, copy to the device),
    forward, backward, optimizer (engine.step) and other (the loop's bookkeeping, logging, saving), on rank 0,
    with the step's non-padding tokens and padded positions over all ranks (its log_step entry). Without
    --profile every call returns at once. CUDA runs asynchronously, so there each lap waits for the GPU."""

    PHASES = ("data", "forward", "backward", "optimizer", "other")

    def __init__(self, device: Any, enabled: bool) -> None:
        import torch

        self.enabled, self.device, self.steps = enabled, str(device), []
        self.sync = torch.cuda.synchronize if enabled and device.type == "cuda" else None
        self.phases, self.t = dict.fromkeys(self.PHASES, 0.0), time.perf_counter()

    def lap(self, phase: str | None) -> None:
        """Add the time since the last lap to `phase` (None: to no phase)."""
        if self.enabled:
            if self.sync:
                self.sync()
            t = time.perf_counter()
            if phase:
                self.phases[phase] += t - self.t
            self.t = t

    def end_step(self, throughput: tuple) -> None:
        if self.enabled:
            self.lap("other")
            step, _, _, tokens, positions, _ = throughput
            self.steps.append({"step": step, "seconds": sum(self.phases.values()), **self.phases,
                               "tokens": tokens, "positions": positions})
            self.phases = dict.fromkeys(self.PHASES, 0.0)

    def report(self, world_size: int) -> dict:
        return {"device": self.device, "cuda_synchronize": self.sync is not None, "world_size": world_size,
                "phases": list(self.PHASES), "steps": self.steps}
