"""Held-out evaluation: loss in nats per token and bits per byte, the one yardstick that
compares models with different tokenizers. Used by the training loop and by validation."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import eval_windows, gather_windows
from .runtime import Runtime


class EvaluationStopped(Exception):
    """`should_stop` said yes between two batches (every rank agrees under DDP)."""


def stop_agreed(should_stop, runtime: Runtime) -> bool:
    if should_stop is None:
        return False
    if not runtime.distributed:
        return bool(should_stop())  # a Python flag: no device sync
    flag = torch.tensor(float(should_stop()), device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def evaluate(module: torch.nn.Module, logits_fn, tokens: np.ndarray, block_size: int, max_windows: int,
             batch_size: int, runtime: Runtime, byte_lengths: torch.Tensor, should_stop=None) -> dict:
    """Held-out loss (nats/token) and bits per byte over evenly spread windows of the split.

    logits_fn(module, input_ids) -> logits. The module runs in eval mode (no dropout) and is put
    back in the mode it had, however the evaluation ends. Under DDP each rank scores its share
    of the windows and the sums are all-reduced, so every rank returns the same numbers.
    should_stop() is asked between batches; yes raises EvaluationStopped.
    """
    was_training = module.training
    module.eval()
    try:
        sums = _scored_sums(module, logits_fn, tokens, block_size, max_windows, batch_size, runtime, byte_lengths,
                            should_stop)
    finally:
        module.train(was_training)
    nll, count, n_bytes = sums.tolist()
    return {"val_loss": nll / count, "val_bpb": nll / math.log(2) / max(n_bytes, 1)}


def _scored_sums(module, logits_fn, tokens, block_size, max_windows, batch_size, runtime, byte_lengths,
                 should_stop) -> torch.Tensor:
    """(summed nll, target tokens, target bytes) over every rank's windows."""
    every = eval_windows(tokens, block_size, max_windows)
    starts = every[runtime.rank::runtime.world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # nll, target tokens, target bytes
    for i in range(0, len(every[::runtime.world_size]), batch_size):  # the same rounds on every rank
        if i and stop_agreed(should_stop, runtime):
            raise EvaluationStopped
        if not starts[i:i + batch_size]:
            continue
        x, y = gather_windows(tokens, starts[i:i + batch_size], block_size)
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            logits = logits_fn(module, x)
        sums[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums[1] += y.numel()
        sums[2] += byte_lengths[y].sum()
    if runtime.distributed:
        dist.all_reduce(sums)
    return sums
