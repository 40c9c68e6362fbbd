"""The next micro-batch prepared while the current step runs.

PrefetchedBatches wraps any BatchSource: when the loop takes batch i, batch i + 1 is already
being drawn in one worker thread (and, for a CUDA device, copied into pinned memory, so that
`data.to_device` sends it with a non-blocking copy). The draw releases the GIL in numpy and
torch, so it overlaps the step's forward and backward.

Exact resume: state_dict() is the wrapped source's position *after the last batch handed
out*, captured while the worker is idle, never the position after the prefetched batch; so a
checkpoint's next micro-batch is the prefetched one, drawn again after a resume, not skipped.
"""
from __future__ import annotations

import dataclasses
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .data import BatchSource


class PrefetchedBatches:
    """A BatchSource that draws from `source` one micro-batch ahead, in a worker thread."""

    def __init__(self, source: BatchSource, device: torch.device):
        self.source = source
        self.pin = device.type == "cuda"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        weakref.finalize(self, self.executor.shutdown, wait=False)
        self.pending: Future | None = None
        self.position: dict | None = None  # source state after the last batch handed out

    def _draw(self) -> dict:
        batch = self.source.next_batch()
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def next_batch(self) -> dict:
        batch = (self.pending or self.executor.submit(self._draw)).result()
        self.position = self.source.state_dict()  # the worker is idle: nothing is being drawn
        self.pending = self.executor.submit(self._draw)
        return batch

    def micro_batches_per_epoch(self) -> int:
        return self.source.micro_batches_per_epoch()

    def state_dict(self) -> dict:
        if self.pending is None:
            return self.source.state_dict()
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.discard_pending()
        self.source.load_state_dict(state)

    def discard_pending(self) -> None:
        """Wait for the batch being drawn and drop it; the source is rewound to the position
        after the last batch handed out (the prefetched one will be drawn again)."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
            self.source.load_state_dict(self.position)


def with_prefetch(task, enabled: bool | None, device: torch.device):
    """The training task (a dataclass with a `batches` BatchSource), its batches prefetched when
    enabled (None: on a CUDA device only)."""
    if enabled is None:
        enabled = device.type == "cuda"
    return dataclasses.replace(task, batches=PrefetchedBatches(task.batches, device)) if enabled else task
