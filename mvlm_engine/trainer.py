"""The one training loop of this repository, used by both trainers.

A trainer hands `fit` a TrainingTask: a training module whose forward(batch) returns
(loss, {term name: value}), a batch source with a saveable position, a way to get logits for
evaluation, the FLOPs per token, and a function that exports the final model. Everything
else lives here: optimizer, schedule, precision, compile, DDP, evaluation, logging,
checkpoints, resume, signals and non-finite-loss handling.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import (BEST, load_checkpoint, prune_checkpoints, recover_interrupted_swaps, resolve_resume,
                         save_checkpoint, set_aside_later_checkpoints)
from .config import TrainConfig, save_config_json
from .corpus import load_corpus
from .data import BlockSampler, eval_windows, gather_windows
from .errors import UserError
from .metrics import History, TensorBoard, mfu, peak_flops, plot_history
from .packaging import MODEL_MANIFEST, write_model_manifest
from .runtime import Runtime
from .schedule import get_lr
from .shards import TokenShards, build_token_shards
from .fileio import atomic_write_text
from .tokenizer import get_or_train_tokenizer, token_byte_lengths


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. Carries the exit status to use."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TokenData:
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_path: Path
    shards: TokenShards
    byte_lengths: np.ndarray

    @property
    def tokenizer_hash(self) -> str:
        return self.shards.meta["tokenizer_hash"]


@dataclass
class TrainingTask:
    name: str
    objective: torch.nn.Module  # forward(batch: dict) -> (loss, {"loss/<term>": tensor, ...})
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # for evaluation
    batches: object  # next_batch() -> dict; micro_batches_per_epoch(); state_dict(); load_state_dict()
    flops_per_token: float
    export: Callable[[Path], None]  # writes the final model directory
    config: dict = field(default_factory=dict)


class LMBatches:
    """Language-modelling batches {"input_ids", "labels"} from a BlockSampler."""

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


def prepare_token_data(cfg: TrainConfig, runtime: Runtime, tokenizer_factory=None) -> TokenData:
    """Corpus -> tokenizer -> token shards, all cached. The first process of each node builds
    (nodes may not share a filesystem); the others wait, then read the cache."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data_dir) / ".cache"
    corpus = load_corpus(cfg.data_dir)

    def build():
        if tokenizer_factory is not None:
            tokenizer, path = tokenizer_factory(corpus, cache)
        else:
            tokenizer, path = get_or_train_tokenizer(corpus, cfg.vocab_size, cache)
        return tokenizer, path, build_token_shards(corpus, tokenizer, cache)

    builder = runtime.local_rank == 0
    if not builder:
        runtime.barrier()
    tokenizer, path, shards = build()
    if builder:
        runtime.barrier()
    return TokenData(tokenizer, path, shards, token_byte_lengths(tokenizer))


def build_optimizer(module: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and embeddings (2+ dims), fused on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """--max_steps when given, else --num_epochs passes over the training split."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = micro_batches_per_epoch // cfg.gradient_accumulation_steps
    return max(1, math.ceil(per_epoch * cfg.num_epochs))


@torch.no_grad()
def evaluate(module: torch.nn.Module, logits_fn, tokens: np.ndarray, block_size: int, max_windows: int,
             batch_size: int, runtime: Runtime, byte_lengths: torch.Tensor) -> dict:
    """Held-out loss (nats/token) and bits per byte over evenly spread windows of the split.

    logits_fn(module, input_ids) -> logits. Also used by validate_models.py, so training and
    validation measure the same way.
    """
    was_training = module.training
    module.eval()
    starts = eval_windows(tokens, block_size, max_windows, runtime.rank, runtime.world_size)
    # nll, target tokens, target bytes
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)
    for i in range(0, len(starts), batch_size):
        x, y = gather_windows(tokens, starts[i:i + batch_size], block_size)
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            logits = logits_fn(module, x)
        sums[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums[1] += y.numel()
        sums[2] += byte_lengths[y].sum()
    if runtime.distributed:
        dist.all_reduce(sums)
    module.train(was_training)
    nll, count, n_bytes = sums.tolist()
    return {"val_loss": nll / count, "val_bpb": nll / math.log(2) / max(n_bytes, 1)}


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop at the next step."""

    def __init__(self):
        self.signum, self.first_at = 0, 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        # A second signal more than 3 s later means "stop now". Sooner, it is the same request
        # delivered twice (torchrun forwards what a scheduler may also send to every process).
        if self.signum and time.monotonic() - self.first_at > 3.0:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def fit(cfg: TrainConfig, task: TrainingTask, runtime: Runtime, data: TokenData) -> dict:
    """Train until the step budget is spent; export the model; return the run summary."""
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    objective = task.objective.to(runtime.device)
    optimizer = build_optimizer(objective, cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    steps = total_steps(cfg, task.batches.micro_batches_per_epoch())
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * runtime.world_size
    val_tokens = data.shards.tokens("val")
    byte_lengths = torch.as_tensor(data.byte_lengths, device=runtime.device)
    state = {"step": 0, "best_val_loss": float("inf"), "bad_steps": 0}
    checkpoint_config = {**task.config, "tokenizer_hash": data.tokenizer_hash}

    history = History(out / "training_history.json", checkpoint_config)
    if runtime.is_main:
        recover_interrupted_swaps(ckpt_root)
    if cfg.resume_from:
        folder = resolve_resume(cfg.resume_from, ckpt_root)
        saved = load_checkpoint(folder, objective, optimizer, scaler, data.tokenizer_hash)
        task.batches.load_state_dict(saved["data"])
        state.update({k: saved[k] for k in state})
        history.resume(state["step"])
        if runtime.is_main:
            print(f"[train] resumed from {folder} at step {state['step']}")
            for path in set_aside_later_checkpoints(ckpt_root, folder, state["step"]):
                print(f"[train] later checkpoint {path.name} belongs to the abandoned run: moved to "
                      f"{ckpt_root / 'abandoned'}")
            saved_total = saved.get("schedule", {}).get("total_steps")
            if saved_total not in (None, steps):
                print(f"[train] WARNING: the run was planned for {saved_total} steps and now has {steps}; the "
                      "cosine schedule is stretched from here (same --max_steps / --num_epochs / "
                      "--gradient_accumulation_steps keep it unchanged)")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume_from:
            if cfg.overwrite:
                shutil.rmtree(ckpt_root, ignore_errors=True)  # the user asked to start over
            for marker in ("run_summary.json", MODEL_MANIFEST):  # an earlier run's "finished" markers
                (out / marker).unlink(missing_ok=True)
        save_config_json(task.config, out / "train_config.json")

    # DDP first, then compile: the compiled graph is split at DDP's buckets so gradient
    # all-reduce overlaps the backward pass.
    ddp = None
    if runtime.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    model = ddp or objective
    if runtime.compile:
        model = torch.compile(model)
    board = TensorBoard(out / "tensorboard", enabled=runtime.is_main)
    peak = peak_flops(runtime.device)

    def checkpoint(name: str) -> None:
        if runtime.is_main:
            trainer_state = {**state, "data": task.batches.state_dict(), "tokenizer_hash": data.tokenizer_hash,
                             "schedule": {"kind": "warmup-cosine", "warmup_steps": cfg.warmup_steps,
                                          "total_steps": steps, "max_lr": cfg.learning_rate,
                                          "min_lr_ratio": cfg.min_lr_ratio}}
            save_checkpoint(ckpt_root / name, objective, optimizer, scaler, trainer_state, checkpoint_config)
            if name != BEST:
                prune_checkpoints(ckpt_root, cfg.keep_checkpoints)
        runtime.barrier()

    def run_eval() -> dict:
        result = evaluate(task.objective, task.logits, val_tokens, cfg.block_size, cfg.eval_windows,
                          cfg.batch_size, runtime, byte_lengths)
        record = {"step": state["step"], **result}
        if runtime.is_main:
            history.log("eval", record)
            history.save()
            board.scalars("eval", result, state["step"])
        if result["val_loss"] < state["best_val_loss"]:
            state["best_val_loss"] = result["val_loss"]
            checkpoint(BEST)
        return result

    progress = tqdm(total=steps, initial=state["step"], disable=not runtime.is_main, desc=task.name,
                    dynamic_ncols=True, mininterval=1.0)
    last_eval = {}
    started = time.perf_counter()
    window_start, window_tokens = time.perf_counter(), 0
    loss_window, terms_window, window_steps = 0.0, {}, 0
    with StopSignal() as stop:
        while state["step"] < steps:
            step = state["step"]
            lr = get_lr(step, cfg.learning_rate, cfg.warmup_steps, steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=runtime.device)
            term_sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.gradient_accumulation_steps):
                batch = to_device(task.batches.next_batch(), runtime.device)
                last_micro = micro == cfg.gradient_accumulation_steps - 1
                sync = contextlib.nullcontext() if last_micro or ddp is None else ddp.no_sync()
                with sync:
                    with runtime.autocast():
                        loss, terms = model(batch)
                    scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
                loss_sum += loss.detach().float()
                for key, value in terms.items():
                    term_sums[key] = term_sums.get(key, 0.0) + value.detach().float()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            # One host sync per optimizer step: non-finite loss (and, without a GradScaler,
            # non-finite gradients) and stop requests, agreed across ranks.
            bad = ~torch.isfinite(loss_sum)
            if not scaler.is_enabled():
                bad = bad | ~torch.isfinite(grad_norm)
            flags = torch.stack([bad.float(), torch.tensor(float(stop.signum > 0), device=runtime.device)])
            if runtime.distributed:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            is_bad, stop_requested = (bool(v) for v in flags.tolist())
            if is_bad:
                state["bad_steps"] += 1
                if runtime.is_main:
                    progress.write(f"[train] step {step}: non-finite loss or gradients, step skipped "
                                   f"({state['bad_steps']}/{cfg.max_bad_steps})")
                if state["bad_steps"] >= cfg.max_bad_steps:
                    raise UserError(f"the loss was not finite for {state['bad_steps']} steps in a row at step "
                                    f"{step}; lower --learning_rate or use --precision fp32/bf16, then resume "
                                    f"from the last checkpoint in {ckpt_root}")
            else:
                scaler.step(optimizer)
                state["bad_steps"] = 0
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            progress.update(1)

            if not is_bad:
                loss_window += loss_sum / cfg.gradient_accumulation_steps
                for key, value in term_sums.items():
                    terms_window[key] = terms_window.get(key, 0.0) + value / cfg.gradient_accumulation_steps
                window_steps += 1
            window_tokens += tokens_per_step
            if (step % cfg.log_interval == 0 or step == steps) and window_steps:
                values = torch.stack([loss_window, *terms_window.values()]) / window_steps
                if runtime.distributed:
                    dist.all_reduce(values)
                    values /= runtime.world_size
                values = values.tolist()
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                record = {"step": step, "lr": lr, "loss": values[0], "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens_per_s, "mfu": mfu(task.flops_per_token, tokens_per_s, peak,
                                                                   runtime.world_size),
                          **dict(zip(terms_window, values[1:]))}
                if runtime.is_main:
                    history.log("train", record)
                    history.save()
                    board.scalars("train", record, step)
                    postfix = {"loss": f"{values[0]:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
                    if record["mfu"] is not None:
                        postfix["mfu"] = f"{record['mfu']:.1%}"
                    progress.set_postfix(postfix, refresh=False)
                window_start, window_tokens = time.perf_counter(), 0
                loss_window, terms_window, window_steps = 0.0, {}, 0

            paused = time.perf_counter()
            if step % cfg.eval_interval == 0 or step == steps:
                last_eval = run_eval()
                if runtime.is_main:
                    progress.write(f"[eval] step {step}: held-out loss {last_eval['val_loss']:.4f}, "
                                   f"{last_eval['val_bpb']:.4f} bits/byte")
            if step % cfg.save_interval == 0 or step == steps or stop_requested:
                checkpoint(f"step_{step:06d}")
            window_start += time.perf_counter() - paused  # tokens/s counts training time only
            if stop_requested and step < steps:
                progress.close()
                board.close()
                raise TrainingInterrupted(f"stopped by signal at step {step}/{steps}; checkpoint saved in "
                                          f"{ckpt_root}; continue with --resume_from latest",
                                          128 + (stop.signum or signal.SIGTERM))
    progress.close()
    if not last_eval:  # resumed at (or past) the last step, e.g. after a crash during export
        last_eval = run_eval()
    board.close()
    summary = {"status": "complete", "model": task.name, "steps": steps, "tokens_per_step": tokens_per_step,
               "tokens_seen": steps * tokens_per_step, "wall_seconds_this_process": time.perf_counter() - started,
               "final_val_loss": last_eval.get("val_loss"), "final_val_bpb": last_eval.get("val_bpb"),
               "best_val_loss": state["best_val_loss"], "precision": runtime.precision,
               "compile": runtime.compile, "world_size": runtime.world_size, "device": str(runtime.device),
               "tokenizer_hash": data.tokenizer_hash}
    if runtime.is_main:
        task.export(out)
        try:
            plot_history(history.data, out / "loss_curve.png", task.name)
        except Exception as err:  # a plot must never cost a finished run its summary
            print(f"[train] WARNING: loss_curve.png not written ({err.__class__.__name__}: {err})")
        atomic_write_text(out / "run_summary.json", json.dumps(summary, indent=1) + "\n")
        write_model_manifest(out)  # last: validation checks every file against it
        print(f"[train] done: held-out loss {summary['final_val_loss']:.4f}, {summary['final_val_bpb']:.4f} "
              f"bits/byte; model in {out}")
    runtime.barrier()
    return summary
