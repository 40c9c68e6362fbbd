"""Running out of memory in a training step or in the held-out evaluation: one line that names the
micro-batch, the flags that make it smaller while keeping the tokens per step, and the last good
checkpoint, which the way out leaves as it was (nothing is saved on the way out; a checkpoint write
that runs out of memory removes its own staging folder)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .checkpoint import step_checkpoints
from .errors import OutOfMemory


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS), Python's MemoryError, or an allocator's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in ("out of memory",
                                                                              "can't allocate memory"))


def smaller_micro_batch(batch_size: int, accumulation: int) -> tuple[int, int] | None:
    """(batch size, accumulation steps) with the largest micro-batch below `batch_size` that keeps
    batch_size x accumulation sequences per step; None when the micro-batch is one sequence."""
    if batch_size <= 1:
        return None
    smaller = max(d for d in range(1, batch_size) if batch_size % d == 0)
    return smaller, accumulation * batch_size // smaller


def out_of_memory_line(err: BaseException, cfg, where: str, world_size: int, checkpoints: Path) -> str:
    """What ran out, at which micro-batch (cfg: a TrainConfig), what to pass instead, what to resume."""
    b, t, g = cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps
    memory = "GPU memory" if isinstance(err, torch.OutOfMemoryError) else "memory"
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
    line = f"out of {memory} in {where}, at a micro-batch of {b} x {t} tokens (--batch_size {b}, --block_size {t}"
    line += f"; {cause})" if cause else ")"
    fix = smaller_micro_batch(b, g)
    if fix:
        line += (f": pass --batch_size {fix[0]} --gradient_accumulation_steps {fix[1]} to keep the "
                 f"{b * t * g * world_size:,} tokens per step, or lower --block_size or the model size")
    else:
        line += ": --batch_size is 1 already; lower --block_size or the model size"
    found = step_checkpoints(checkpoints)
    return line + (f"; the last good checkpoint, {found[-1]}, is untouched: add --resume_from latest to continue "
                   "from it" if found else f"; no checkpoint was written yet in {checkpoints}")


@contextlib.contextmanager
def out_of_memory_advice(cfg, where: str, world_size: int, checkpoints: Path):
    """Turn running out of memory inside the block into OutOfMemory with out_of_memory_line."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as err:  # noqa: BLE001  (re-raised unless it is running out of memory)
        if not is_out_of_memory(err):
            raise
        raise OutOfMemory(out_of_memory_line(err, cfg, where, world_size, checkpoints)) from None
