"""The measuring pieces of benchmarks/run.py: interleaved timers, peak memory, training runs
built through the real trainers and the real engine, and the model-level comparisons.

Every comparison runs its variants round-robin in one process (warm-up first, then `repeats`
rounds) and reports, per pair, the median of the per-round ratios: a machine shared with other
work slows adjacent timings alike, so the ratio survives noise that the absolute figures do not.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common import REPO

# --------------------------------------------------------------------------- timing

# What the timers read: wall time, or this process's CPU time (all its threads). On a CPU
# shared with other work, with one intra-op thread, CPU time counts the work a variant does
# and not the time the scheduler gave to other processes, so it is steady where wall time is
# not; on an otherwise idle machine the two agree (one busy thread: CPU time = wall time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = [time.perf_counter]


def use_clock(name: str) -> None:
    _clock[0] = CLOCKS[name]


def now() -> float:
    return _clock[0]()



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each timer once to warm up, then all of them round-robin `repeats` times."""
    for timer in timers.values():
        timer()
    samples = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer())
    return samples


def median(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratio(samples: dict[str, list[float]], ours: str, reference: str) -> float:
    """Median over rounds of ours / reference (throughputs: > 1 means ours is faster)."""
    return statistics.median(a / b for a, b in zip(samples[ours], samples[reference]))


# --------------------------------------------------------------------------- memory


def current_rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """VmHWM: the most resident bytes since the process started or since reset_peak_rss."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> bool:
    """Give freed heap back to the system, then restart VmHWM from the current RSS (Linux:
    writing 5 to /proc/self/clear_refs). False where the kernel does not allow it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on a GPU, RSS (VmHWM) on a CPU; `before`
    is what was held when it started, `peak` the most held during it, both in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.kind = "rss" if reset_peak_rss() else "rss_since_start"
            self.before = current_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss()


# --------------------------------------------------------------------------- training runs through the engine


def resolve_run_config(model: str, flags: dict):
    """The run's settings as the model's trainer resolves them (model: a name in model_registry.MODELS)."""
    from model_registry import MODELS
    from mvlm_engine.cli import resolve_settings

    return resolve_settings(MODELS[model].run_config(), flags, {})


def engine_run(model: str, flags: dict, runtime, output_dir: Path):
    """A training run of `model` (a name in model_registry.MODELS) as the trainer builds it, started by the
    engine (optimizer, DDP/compile wrapping, prefetch) and ready for `engine_timer`."""
    from tqdm import tqdm

    from mvlm_engine.trainer import start_or_restore

    flags = {"max_steps": 10 ** 6, "log_interval": 10 ** 6, "eval_interval": 10 ** 6, "save_interval": 10 ** 6,
             "warmup_steps": 10, "output_dir": str(output_dir), "overwrite": True, **flags}
    from model_registry import MODELS

    cfg = resolve_run_config(model, flags)
    task, data = MODELS[model].build_task(cfg, runtime)
    with contextlib.redirect_stderr(io.StringIO()):  # the engine's progress bar: not wanted here
        run = start_or_restore(cfg, task, runtime, data)
        run.progress.close()
    run.progress = tqdm(disable=True)
    return run


def engine_timer(run, steps: int) -> Callable[[], float]:
    """Tokens/s of `steps` engine optimizer steps (micro-batches, forward, backward, clip,
    step flags, optimizer): the per-step path of mvlm_engine.trainer.fit."""
    from mvlm_engine.trainer import StopSignal, optimizer_step

    stop = StopSignal()  # never entered: no handler installed, no stop requested

    def timer() -> float:
        started = now()
        for _ in range(steps):
            optimizer_step(run, stop)
        sync(run.runtime.device)
        return steps * run.tokens_per_step / (now() - started)

    return timer


def bare_loop_timer(run, steps: int) -> Callable[[], float]:
    """The same HF model, weights and batches in a plain loop: full logits, F.cross_entropy,
    backward, clip, AdamW (the loop a user would write around the model without our engine)."""
    cfg, device = run.cfg, run.runtime.device
    model = copy.deepcopy(run.task.objective.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sampler = copy.deepcopy(run.task.batches.source if hasattr(run.task.batches, "source") else run.task.batches)

    def timer() -> float:
        started = now()
        for _ in range(steps):
            batch = sampler.next_batch()
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)
            with run.runtime.autocast():
                logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return steps * x.numel() / (now() - started)

    return timer


def attention_backend(model: str, cfg, runtime) -> str:
    """The attention kernel this run's model uses here (flash-attn, or SDPA's pick, probed by its
    registry hook)."""
    from model_registry import MODELS

    hook = MODELS[model].attention_backend
    return hook(cfg, runtime) if hook else "n/a (no attention_backend hook in model_registry.py)"


def build_objective(model: str, cfg):
    """The training module exactly as the trainer builds it, for the vocabulary the run config
    asks for (no corpus or tokenizer needed)."""
    from model_registry import MODELS

    return MODELS[model].build_objective(cfg)


def synthetic_batch(model: str, cfg, generator: torch.Generator) -> dict:
    """A micro-batch of the run's shapes with random token ids: (batch, block) inputs and labels,
    plus whatever else the model's objective reads (its registry hook: SIM-ONE's verse pairs)."""
    from model_registry import MODELS

    shape = (cfg.batch_size, cfg.block_size)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, shape, generator=generator),
             "labels": torch.randint(0, cfg.vocab_size, shape, generator=generator)}
    extras = MODELS[model].synthetic_extras
    return {**batch, **(extras(cfg, generator) if extras else {})}


def flops_per_token(model: str, run) -> float:
    """Matmul and attention FLOPs of one training micro-step (forward and backward of the run's
    objective on a batch of its shapes), per language-modelling token, as torch's FlopCounterMode
    counts them. It does not count the chunked cross-entropy's in-place weight-gradient
    accumulation but does count its recompute, so each head counts three (rows x D x V) matmuls,
    as a plain LM head would: model arithmetic, comparable between models."""
    from torch.utils.flop_counter import FlopCounterMode

    objective = run.task.objective
    batch = synthetic_batch(model, run.cfg, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        loss, _ = objective(batch)
        loss.backward()
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["input_ids"].numel()


def micro_step_memory(objective, batch: dict, runtime) -> dict:
    """Peak memory of one training micro-step (forward and backward of the objective, as
    the engine runs it), in a process that has done nothing else since building it."""
    from mvlm_engine.data import to_device

    device = runtime.device
    batch = to_device(batch, device)
    with PeakMemory(device) as memory:
        with runtime.autocast():
            loss, _ = objective(batch)
        loss.backward()
        del loss
    return {"memory_kind": memory.kind, "held_before_bytes": memory.before, "peak_bytes": memory.peak,
            "micro_step_bytes": memory.peak - memory.before}


def repo_paths() -> None:
    """Make the trainers importable (the repository root and SIM-ONE's folder)."""
    import sys
    for path in (REPO, REPO / "SIM-ONE Training"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
