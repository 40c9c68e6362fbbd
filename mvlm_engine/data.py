"""Batches of (input, target) token blocks from memory-mapped shards.

Training: each epoch cuts the token stream into non-overlapping windows of block_size + 1
tokens at a seeded random offset and visits them in a seeded random order. The position is
(epoch, next window), so a checkpoint restores it exactly. Under DDP every rank walks the
same global order and takes its own slice of each global micro-batch, so N ranks with batch
B see exactly what one process with batch N*B sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .errors import UserError


class BatchSource(Protocol):
    """What the training loop draws micro-batches from; its position is saved in checkpoints."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch: {"input_ids", "labels", ...} tensors on the CPU."""

    def micro_batches_per_epoch(self) -> int:
        """Global micro-batches in one pass over the training split (sets the step budget)."""

    def state_dict(self) -> dict:
        """JSON-serialisable position, restored exactly by load_state_dict."""

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # index of the next window in this epoch's order


class BlockSampler:
    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        if self.windows_in_epoch(0) < self.global_batch:
            raise UserError(f"the training split has {len(tokens):,} tokens: too few for one batch of "
                            f"{self.global_batch} x {block_size + 1}-token blocks; lower --batch_size or "
                            "--block_size, or add text")
        self.state = SamplerState()
        self._order_epoch, self._offset, self._order = -1, 0, np.empty(0, dtype=np.int64)

    def windows_in_epoch(self, epoch: int) -> int:
        return (len(self.tokens) - 1 - self._epoch_offset(epoch)) // self.block_size

    def micro_batches_per_epoch(self) -> int:
        """Global micro-batches in one epoch (the same for every epoch, up to one)."""
        return (len(self.tokens) - self.block_size) // self.block_size // self.global_batch

    def _epoch_offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch, 0]).integers(self.block_size))

    def _ensure_order(self) -> None:
        if self._order_epoch != self.state.epoch:
            self._offset = self._epoch_offset(self.state.epoch)
            count = self.windows_in_epoch(self.state.epoch)
            self._order = np.random.default_rng([self.seed, self.state.epoch, 1]).permutation(count)
            self._order_epoch = self.state.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) int64 tensors of shape (batch_size, block_size)."""
        self._ensure_order()
        if self.state.position + self.global_batch > len(self._order):
            self.state = SamplerState(self.state.epoch + 1, 0)
            self._ensure_order()
        first = self.state.position + self.rank * self.batch_size
        starts = self._offset + self._order[first:first + self.batch_size] * self.block_size
        self.state.position += self.global_batch
        return gather_windows(self.tokens, starts.tolist(), self.block_size)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.seed,
                "global_batch": self.global_batch, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        keys = ("epoch", "position", "seed", "global_batch", "block_size")
        if not isinstance(state, dict) or not all(
                isinstance(state.get(k), int) and not isinstance(state[k], bool) and state[k] >= 0 for k in keys):
            raise UserError(f"the checkpoint's data position is damaged (it needs {', '.join(keys)} as counts); "
                            "resume from another checkpoint")
        if (state["global_batch"], state["block_size"]) != (self.global_batch, self.block_size):
            raise UserError(f"the checkpoint was written with global batch {state['global_batch']} and "
                            f"block size {state['block_size']}; resume with the same --batch_size x "
                            "GPUs and --block_size")
        self.seed = state["seed"]
        self.state = SamplerState(state["epoch"], state["position"])
        self._order_epoch = -1


def eval_windows(tokens: np.ndarray, block_size: int, max_windows: int, rank: int = 0,
                 world_size: int = 1) -> list[int]:
    """Start offsets of up to `max_windows` evenly spread held-out windows; this rank's share."""
    available = (len(tokens) - 1) // block_size
    if available == 0:
        raise UserError(f"the held-out split has {len(tokens):,} tokens, fewer than one "
                        f"{block_size + 1}-token block; lower --block_size or hold out more text")
    count = min(available, max_windows)
    starts = (np.linspace(0, available - 1, count).round().astype(np.int64) * block_size).tolist()
    return starts[rank::world_size]


def gather_windows(tokens: np.ndarray, starts: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for windows starting at `starts`: y is x shifted by one token."""
    # (len(starts), block_size + 1) copied out of the memmap
    windows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


class LMBatches:
    """A BatchSource of language-modelling batches {"input_ids", "labels"} from a BlockSampler."""

    def __init__(self, sampler: BlockSampler):
        self.sampler = sampler

    def next_batch(self) -> dict:
        x, y = self.sampler.next_batch()
        return {"input_ids": x, "labels": y}

    def micro_batches_per_epoch(self) -> int:
        return self.sampler.micro_batches_per_epoch()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch to the device; on CUDA through pinned memory so the copy does not block.
    Tensors already there (a distillation target, say) stay as they are."""
    if device.type == "cuda":
        return {k: v if v.device == device else (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
                for k, v in batch.items()}
    return batch
