"""The one training loop of this repository, used by every trainer (docs/ARCHITECTURE.md).

A trainer hands `fit` a TrainingTask: a training module whose forward(batch) returns
(loss, {term name: value}), a BatchSource with a saveable position, a way to get logits for
evaluation, the FLOPs per token, and a function that exports the final model. Everything
else lives here: optimizer, schedule, precision, compile, DDP, evaluation, logging,
checkpoints, resume, signals and non-finite-loss handling.

    fit = start_or_restore, then per step: optimizer_step, log_window,
          evaluate_and_checkpoint; then finish.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from .averaging import WeightAverage, evaluated_weights, weight_average
from .checkpoint import (BEST, last_good_checkpoint, load_checkpoint, load_weights, prune_checkpoints,
                         recover_interrupted_swaps, refuse_non_finite, resolve_resume, save_checkpoint,
                         set_aside_later_checkpoints, state_bytes)
from .config import TrainConfig, config_dict, save_config_json
from .data import BatchSource, to_device
from .distillation import with_teachers
from .errors import TrainingDiverged, TrainingInterrupted, UserError
from .evaluation import EvaluationStopped, evaluate
from .fileio import atomic_write_text, ensure_free_space, remove_dead_staging, storage_errors
from .guard import StepGuard
from .logs import get_logger
from .memory import out_of_memory_advice
from .metrics import FLOPS_CONVENTION, History, TensorBoard, mfu, peak_flops, plot_history
from .optim import apply_schedule, build_optimizer, optimizers_of
from .packaging import MODEL_MANIFEST, RUN_SUMMARY, write_model_manifest
from .prefetch import with_prefetch
from .runtime import Runtime
from .shards import TokenData
from .stopping import STOP
from .stopping import StopRequest as StopSignal

log = get_logger("train")


@dataclass
class TrainingTask:
    """What a trainer hands the loop; everything model-specific is behind these fields."""

    name: str
    objective: torch.nn.Module  # forward(batch: dict) -> (loss, {"loss/<term>": tensor, ...})
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # for evaluation
    batches: BatchSource
    flops_per_token: float
    export: Callable[[Path], None]  # writes the final model directory
    config: TrainConfig  # the resolved run config, saved as train_config.json
    description: str = ""  # one sentence for run_summary.json, DOWNLOAD.md and the model card
    non_embedding_params: int = 0  # recorded in run_summary.json (the speedrun matches models on it)
    # Checks a --teachers folder before anything of it loads (the trainer's entry point gives release.trust's
    # check); None: teacher folders are refused.
    vet_folder: Callable[[Path], None] | None = None


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """--max_steps when given, else --num_epochs passes over the training split."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = micro_batches_per_epoch // cfg.gradient_accumulation_steps
    return max(1, math.ceil(per_epoch * cfg.num_epochs))


@dataclass
class LogWindow:
    """Sums over the steps since the last training record, kept on the device (skipped steps add
    tokens only): read in a logging step's one host sync, with the step's flags."""

    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    steps: int = 0  # good steps in the window (host count, known after each step's sync)
    sums: torch.Tensor | None = None  # (1 + terms,) fp32: the loss and each term, summed over good steps
    names: list = field(default_factory=list)  # the terms' names, in sums' order after the loss

    def add(self, loss: torch.Tensor, terms: dict, good: torch.Tensor) -> torch.Tensor:
        """Add a step's loss and terms where `good` (a bool tensor on the device): no host sync."""
        values = torch.stack([loss, *terms.values()]).float()
        values = torch.where(good, values, torch.zeros_like(values))
        self.sums, self.names = (values if self.sums is None else self.sums + values), list(terms)
        return self.sums


@dataclass
class StepResult:
    step: int  # the step just completed (1-based count of optimizer steps)
    lr: float
    loss: torch.Tensor  # mean over micro-steps, on the device
    terms: dict
    grad_norm: torch.Tensor
    skipped: bool
    stop_requested: bool
    logged: list[float] | None = None  # logging steps: the window's summed loss and terms, then the grad norm


@dataclass
class Timings:
    """Where a run's time went, for run_summary.json (train_all_models.py adds up the pipeline's)."""

    first_step: float | None = None  # with torch.compile: tracing and compiling, plus one step
    steps: list = field(default_factory=list)  # the next steps' seconds (the first 50)
    loop_seconds: float = 0.0  # the training loop: steps, evaluations, checkpoints
    eval_and_checkpoint_seconds: float = 0.0

    def step_took(self, seconds: float) -> None:
        if self.first_step is None:
            self.first_step = seconds
        elif len(self.steps) < 50:
            self.steps.append(seconds)

    def summary(self) -> dict:
        step = statistics.median(self.steps) if self.steps else None
        return {"first_step_seconds": self.first_step, "median_step_seconds": step,
                "compile_seconds": None if step is None else max(0.0, self.first_step - step),
                "loop_seconds": self.loop_seconds, "eval_and_checkpoint_seconds": self.eval_and_checkpoint_seconds}


@dataclass
class Run:
    """Everything one call of `fit` holds."""

    cfg: TrainConfig
    task: TrainingTask
    runtime: Runtime
    data: TokenData
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    total_steps: int
    history: History
    model: torch.nn.Module = None  # what a step calls: the objective, DDP-wrapped and compiled
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    board: TensorBoard | None = None
    progress: tqdm | None = None
    # eval_pending: a stop cut the evaluation of this step short; it runs first on resume.
    # best_*: the evaluation with the lowest held-out loss; early_stopped: --early_stop_patience ended the run.
    state: dict = field(default_factory=lambda: {"step": 0, "best_val_loss": float("inf"), "bad_steps": 0,
                                                 "eval_pending": False, "best_step": 0, "best_val_bpb": float("inf"),
                                                 "evals_since_best": 0, "early_stopped": False})
    window: LogWindow = field(default_factory=LogWindow)
    last_eval: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    guard: StepGuard | None = None  # undoes a step that leaves a weight non-finite
    average: WeightAverage | None = None  # --ema_decay: what evaluation, best_model and the export see
    timings: Timings = field(default_factory=Timings)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.batch_size * c.block_size * c.gradient_accumulation_steps * self.runtime.world_size

    def checkpoint_config(self) -> dict:
        return {**config_dict(self.task.config), "tokenizer_hash": self.data.tokenizer_hash}


# --------------------------------------------------------------------------- fit


def fit(cfg: TrainConfig, task: TrainingTask, runtime: Runtime, data: TokenData) -> dict:
    """Train until the step budget is spent; export the model; return the run summary."""
    with STOP.deferred() as stop:  # a signal stops at the next step boundary, with a checkpoint
        run = start_or_restore(cfg, task, runtime, data)
        loop_started = time.perf_counter()
        try:
            with out_of_memory_advice(cfg, "a training step", runtime.world_size, run.ckpt_root):
                if run.state["eval_pending"]:
                    finish_pending_eval(run)
                while run.state["step"] < run.total_steps and not run.state["early_stopped"]:
                    step_started = time.perf_counter()
                    result = optimizer_step(run, stop)  # its host sync makes this the step's device time too
                    run.timings.step_took(time.perf_counter() - step_started)
                    log_window(run, result)
                    evaluate_and_checkpoint(run, result, stop)
        finally:  # however the loop ends, the history's background write completes first
            run.history.flush(raise_errors=False)
        run.timings.loop_seconds = time.perf_counter() - loop_started
    return finish(run)


def start_or_restore(cfg: TrainConfig, task: TrainingTask, runtime: Runtime, data: TokenData) -> Run:
    """Build the optimizer and bookkeeping; resume from a checkpoint or start fresh; wrap the model."""
    task = with_prefetch(task, cfg.prefetch_batches, runtime.device)
    objective = task.objective.to(runtime.device).train()  # dropout on; evaluation switches it off and back
    run = Run(cfg, task, runtime, data, optimizer=build_optimizer(objective, cfg, runtime.device),
              scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16"),
              total_steps=total_steps(cfg, task.batches.micro_batches_per_epoch()),
              history=History(Path(cfg.output_dir) / "training_history.json", {}))
    run.history.data["config"] = run.checkpoint_config()
    run.guard = StepGuard(objective, run.optimizer)
    run.average = weight_average(objective, cfg.ema_decay, cfg.ema_start_step)
    run.task = with_teachers(run.task, cfg, runtime, data)  # outside the prefetch: teachers run on this thread
    STOP.check("starting the training", "nothing new to save")
    if runtime.is_main:
        recover_interrupted_swaps(run.ckpt_root)  # under the output dir's lock: no other writer
        remove_dead_staging(run.out)
    if cfg.resume_from:
        restore(run)
    if runtime.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume_from:
            clear_earlier_run(run)
        save_config_json(task.config, run.out / "train_config.json")
    wrap_model(run)
    run.board = TensorBoard(run.out / "tensorboard", enabled=runtime.is_main)
    run.progress = tqdm(total=run.total_steps, initial=run.state["step"], disable=not runtime.is_main,
                        desc=task.name, dynamic_ncols=True, mininterval=1.0)
    run.window = LogWindow()
    return run


def restore(run: Run) -> None:
    """Load weights, optimizer, scaler, RNG and data position from --resume_from."""
    folder = resolve_resume(run.cfg.resume_from, run.ckpt_root)
    saved = load_checkpoint(folder, run.task.objective, run.optimizer, run.scaler, run.data.tokenizer_hash,
                            run.average)
    try:
        run.task.batches.load_state_dict(saved["data"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"checkpoint {folder}: its data position is damaged ({type(err).__name__}: {err}); "
                        "resume from another checkpoint") from None
    run.state.update({k: saved.get(k, run.state[k]) for k in run.state})  # required keys were checked
    run.history.resume(run.state["step"])
    if not run.runtime.is_main:
        return
    log.info(f"resumed from {folder} at step {run.state['step']}")
    log_average_on_resume(run, saved)
    for path in set_aside_later_checkpoints(run.ckpt_root, folder, run.state["step"]):
        log.info(f"later checkpoint {path.name} belongs to the abandoned run: moved to "
                 f"{run.ckpt_root / 'abandoned'}")
    saved_total = saved.get("schedule", {}).get("total_steps")
    if saved_total not in (None, run.total_steps):
        log.warning(f"WARNING: the run was planned for {saved_total} steps and now has {run.total_steps}; the "
                    "schedule is stretched from here (same --max_steps / --num_epochs / "
                    "--gradient_accumulation_steps keep it unchanged)")


def log_average_on_resume(run: Run, saved: dict) -> None:
    if run.average is not None and not saved["average_restored"]:
        log.info(f"the checkpoint holds no weight average: it starts after step {run.average.start_step}")
    elif run.average is None and saved.get("average"):
        log.info("--ema_decay 0: the checkpoint's weight average is dropped; evaluation sees the raw weights")


def clear_earlier_run(run: Run) -> None:
    """A fresh start: drop an earlier run's "finished" markers (and its checkpoints with --overwrite)."""
    if run.cfg.overwrite:
        shutil.rmtree(run.ckpt_root, ignore_errors=True)  # the user asked to start over
    for marker in (RUN_SUMMARY, MODEL_MANIFEST):
        (run.out / marker).unlink(missing_ok=True)


def wrap_model(run: Run) -> None:
    """DDP first, then compile: the compiled graph is split at DDP's buckets so gradient
    all-reduce overlaps the backward pass."""
    model = run.task.objective
    if run.runtime.distributed:
        device_ids = [run.runtime.device.index] if run.runtime.device.type == "cuda" else None
        run.ddp = model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    run.model = torch.compile(model, mode=run.cfg.compile_mode) if run.runtime.compile else model


# --------------------------------------------------------------------------- one step


def optimizer_step(run: Run, stop: StopSignal) -> StepResult:
    """Accumulate gradients over the micro-batches, clip, and step (or skip a non-finite step)."""
    cfg, step = run.cfg, run.state["step"]
    factor = apply_schedule(run.optimizer, cfg, step, run.total_steps)
    loss, terms = accumulate_gradients(run)
    for optimizer in optimizers_of(run.optimizer):
        run.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.task.objective.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.guard.save()
    for optimizer in optimizers_of(run.optimizer):
        run.scaler.step(optimizer)
    logging = (step + 1) % cfg.log_interval == 0 or step + 1 == run.total_steps
    skipped, stop_requested, logged = read_step_flags(run, loss, terms, grad_norm, stop, logging)
    run.window.tokens += run.tokens_per_step
    if skipped:
        run.guard.restore()  # as if the step had never run
        skip_step(run, step, skipped)
    else:
        run.state["bad_steps"] = 0
        run.window.steps += 1
        if run.average is not None:
            run.average.update(step + 1)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["step"] = step + 1
    run.progress.update(1)
    return StepResult(step + 1, cfg.learning_rate * factor, loss, terms, grad_norm, bool(skipped), stop_requested,
                      logged)


def accumulate_gradients(run: Run) -> tuple[torch.Tensor, dict]:
    """Forward and backward over gradient_accumulation_steps micro-batches; mean loss and terms."""
    accumulation = run.cfg.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=run.runtime.device)
    term_sums: dict[str, torch.Tensor] = {}
    for micro in range(accumulation):
        batch = to_device(run.task.batches.next_batch(), run.runtime.device)
        # Gradients are all-reduced on the last micro-step only.
        last = micro == accumulation - 1
        with contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync():
            with run.runtime.autocast():
                loss, terms = run.model(batch)
            run.scaler.scale(loss / accumulation).backward()
        loss_sum += loss.detach().float()
        for key, value in terms.items():
            term_sums[key] = term_sums.get(key, 0.0) + value.detach().float()
    return loss_sum / accumulation, {k: v / accumulation for k, v in term_sums.items()}


def read_step_flags(run: Run, loss: torch.Tensor, terms: dict, grad_norm: torch.Tensor, stop: StopSignal,
                    logging: bool) -> tuple[str, bool, list[float] | None]:
    """(why the step is bad, "" if it is not; stop requested; on a logging step the log window's
    sums and the gradient norm), agreed across ranks. The one host sync of a step. A step is bad
    when the loss or any updated weight is not finite; without a GradScaler, non-finite gradients
    count too (with one, the scaler skips them itself). Its loss joins the window only if good."""
    bad = ~torch.isfinite(loss)
    if not run.scaler.is_enabled():
        bad = bad | ~torch.isfinite(grad_norm)
    flags = torch.stack([bad.float(), (~run.guard.weights_finite(loss.device)).float(),
                         torch.tensor(float(stop.signum > 0), device=run.runtime.device)])
    if run.runtime.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    sums = run.window.add(loss, terms, good=flags[:2].amax() == 0)
    read = flags
    if logging:
        if run.runtime.distributed:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= run.runtime.world_size
        read = torch.cat([flags, sums, grad_norm.detach().float().reshape(1)])
    values = read.tolist()
    bad_loss, bad_weights, stop_requested = (bool(v) for v in values[:3])
    reason = "non-finite loss or gradients" if bad_loss else "the update made weights non-finite" if bad_weights else ""
    return reason, stop_requested, values[3:] if logging else None


def skip_step(run: Run, step: int, reason: str) -> None:
    """Count a non-finite step; too many in a row end the run with the last good checkpoint named."""
    run.state["bad_steps"] += 1
    log.info(f"step {step}: {reason}, step skipped ({run.state['bad_steps']}/{run.cfg.max_bad_steps})")
    if run.state["bad_steps"] >= run.cfg.max_bad_steps:
        raise TrainingDiverged(f"the loss or the updated weights were not finite for {run.state['bad_steps']} steps in a "
                               f"row at step {step}; lower --learning_rate or use --precision fp32/bf16, then resume: "
                               f"{last_good_checkpoint(run.ckpt_root)}")


# --------------------------------------------------------------------------- logging, evaluation, checkpoints


def log_window(run: Run, result: StepResult) -> None:
    """On a logging step, one training record from the values the step's sync read (no device
    reads here); the history file is written in the background, off the step path."""
    window = run.window
    if result.logged is None or not window.steps:
        return
    *sums, grad_norm = result.logged
    values = [v / window.steps for v in sums]
    tokens_per_s = window.tokens / (time.perf_counter() - window.started)
    record = {"step": result.step, "lr": result.lr, "loss": values[0], "grad_norm": grad_norm,
              "tokens_per_s": tokens_per_s, "mfu": mfu(run.task.flops_per_token, tokens_per_s,
                                                       peak_flops(run.runtime.device), run.runtime.world_size),
              **dict(zip(window.names, values[1:]))}
    if run.runtime.is_main:
        run.history.log("train", record)
        run.history.save_soon()
        run.board.scalars("train", record, result.step)
        postfix = {"loss": f"{values[0]:.3f}", "lr": f"{result.lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
        if record["mfu"] is not None:
            postfix["mfu"] = f"{record['mfu']:.1%}"
        run.progress.set_postfix(postfix, refresh=False)
    run.window = LogWindow()


def evaluate_and_checkpoint(run: Run, result: StepResult, stop: StopSignal) -> None:
    """Evaluate and save on schedule and at the end; after a signal, save and stop. A signal
    during the evaluation cuts it short: the step is saved and its evaluation runs on resume."""
    paused = time.perf_counter()
    step, stopping = result.step, result.stop_requested
    if step % run.cfg.eval_interval == 0 or step == run.total_steps:
        run.state["eval_pending"] = not evaluate_step(run, step)
        stopping = stopping or run.state["eval_pending"]
        run.state["early_stopped"] = patience_spent(run)
    last = step == run.total_steps or run.state["early_stopped"]
    if step % run.cfg.save_interval == 0 or last or stopping:
        checkpoint(run, f"step_{step:06d}")
    run.window.started += time.perf_counter() - paused  # tokens/s counts training time only
    run.timings.eval_and_checkpoint_seconds += time.perf_counter() - paused
    if stopping and (not last or run.state["eval_pending"]):
        run.progress.close()
        run.board.close()
        raise TrainingInterrupted(f"stopped by {stop.name} at step {step}/{run.total_steps}; checkpoint saved in "
                                  f"{run.ckpt_root}; continue with --resume_from latest", stop.exit_code)


def evaluate_step(run: Run, step: int) -> bool:
    """Run and log the evaluation of `step`; False if a stop request cut it short."""
    try:
        run.last_eval = run_eval(run)
    except EvaluationStopped:
        log.info(f"step {step}: evaluation stopped by a signal; it runs again on resume")
        return False
    log.info(f"step {step}: held-out loss {run.last_eval['val_loss']:.4f}, {run.last_eval['val_bpb']:.4f} bits/byte")
    return True


def patience_spent(run: Run) -> bool:
    """--early_stop_patience evaluations in a row without a new best: the run ends here."""
    patience = run.cfg.early_stop_patience
    if not patience or run.state["evals_since_best"] < patience:
        return False
    log.info(f"step {run.state['step']}: no new best held-out loss in {patience} evaluations (best "
             f"{run.state['best_val_loss']:.4f} at step {run.state['best_step']}); stopping early "
             "(--early_stop_patience)")
    return True


def finish_pending_eval(run: Run) -> None:
    """The evaluation a stop cut short, run on resume before the next step (as it would have run)."""
    run.state["eval_pending"] = False  # as it was when the original evaluation began (best_model records it)
    if not evaluate_step(run, run.state["step"]):
        raise TrainingInterrupted(f"stopped by {STOP.name} during the evaluation of step {run.state['step']}; its "
                                  f"checkpoint is in {run.ckpt_root}; continue with --resume_from latest",
                                  STOP.exit_code)


def run_eval(run: Run) -> dict:
    """Held-out loss and bits per byte (of the weight average, when the run keeps one); a new best
    is saved as best_model."""
    with evaluated_weights(run.average), out_of_memory_advice(run.cfg, "the held-out evaluation",
                                                              run.runtime.world_size, run.ckpt_root):
        result = evaluate(run.task.objective, run.task.logits, run.data.shards.tokens("val"), run.cfg.block_size,
                          run.cfg.eval_windows, run.cfg.batch_size, run.runtime,
                          torch.as_tensor(run.data.byte_lengths, device=run.runtime.device),
                          should_stop=lambda: STOP.requested)
    if run.runtime.is_main:
        run.history.log("eval", {"step": run.state["step"], **result})
        run.history.save()
        run.board.scalars("eval", result, run.state["step"])
    if result["val_loss"] < run.state["best_val_loss"]:
        run.state.update(best_val_loss=result["val_loss"], best_val_bpb=result["val_bpb"],
                         best_step=run.state["step"], evals_since_best=0)
        checkpoint(run, BEST)
    else:
        run.state["evals_since_best"] += 1
    return result


def checkpoint(run: Run, name: str) -> None:
    """Save the full training state under checkpoints/<name> (rank 0 writes, every rank waits)."""
    if run.runtime.is_main:
        run.history.save()  # every record up to this step is on disk before the checkpoint is
        cfg = run.cfg
        trainer_state = {**run.state, "data": run.task.batches.state_dict(), "tokenizer_hash": run.data.tokenizer_hash,
                         "schedule": {"kind": cfg.schedule, "warmup_steps": cfg.warmup_steps,
                                      "total_steps": run.total_steps, "max_lr": cfg.learning_rate,
                                      "min_lr_ratio": cfg.min_lr_ratio, "decay_fraction": cfg.decay_fraction}}
        save_checkpoint(run.ckpt_root / name, run.task.objective, run.optimizer, run.scaler, trainer_state,
                        run.checkpoint_config(), run.average)
        if name != BEST:
            prune_checkpoints(run.ckpt_root, cfg.keep_checkpoints)
    run.runtime.barrier()


# --------------------------------------------------------------------------- finish


def finish(run: Run) -> dict:
    """Final evaluation if none ran, then export, plot, summary and model manifest (rank 0)."""
    run.progress.close()
    if not run.last_eval:  # resumed at (or past) the last step, e.g. after a crash during export
        run.last_eval = run_eval(run)
    run.board.close()
    exported = choose_export_weights(run) if run.runtime.is_main else run.last_eval
    summary = run_summary(run, exported)
    if run.runtime.is_main:
        refuse_non_finite(run.task.objective, "the final model", run.ckpt_root)
        if not math.isfinite(summary["final_val_loss"]):
            raise TrainingDiverged(f"the final held-out loss is {summary['final_val_loss']}, so the model was not "
                                   f"exported; {last_good_checkpoint(run.ckpt_root)}")
        ensure_free_space(run.out, state_bytes(run.task.objective, run.optimizer) // 3, "the final model")
        exporting = time.perf_counter()
        with storage_errors(run.out, "exporting the model into"):
            run.task.export(run.out)
        summary["timings"]["export_seconds"] = time.perf_counter() - exporting
        try:
            plot_history(run.history.data, run.out / "loss_curve.png", run.task.name)
        except Exception as err:  # noqa: BLE001  (a plot must never cost a finished run its summary)
            log.warning(f"WARNING: loss_curve.png not written ({err.__class__.__name__}: {err})")
        atomic_write_text(run.out / RUN_SUMMARY, json.dumps(summary, indent=1) + "\n")
        write_model_manifest(run.out)  # last: validation checks every file against it
        log.info(f"done: held-out loss {summary['final_val_loss']:.4f}, {summary['final_val_bpb']:.4f} "
                 f"bits/byte; model in {run.out}")
    run.runtime.barrier()
    return summary


def choose_export_weights(run: Run) -> dict:
    """--export_weights best: load the weights of the lowest held-out loss (checkpoints/best_model)
    when an earlier step had it, since later steps have overfit. With a weight average, the
    average that evaluation saw. Returns the exported weights' evaluation."""
    state, best = run.state, run.ckpt_root / BEST
    if run.cfg.export_weights != "best" or state["best_step"] in (0, state["step"]) or not best.is_dir() \
            or not state["best_val_loss"] < run.last_eval["val_loss"]:
        if run.average is not None:
            run.average.copy_to_params()
        return {**run.last_eval, "step": state["step"]}
    load_weights(best, run.task.objective, run.average)
    if run.average is not None:
        run.average.copy_to_params()
    log.info(f"exporting the weights of step {state['best_step']}, the lowest held-out loss seen "
             f"({state['best_val_loss']:.4f} against {run.last_eval['val_loss']:.4f} at the last step; "
             "--export_weights last exports the last step's)")
    return {"val_loss": state["best_val_loss"], "val_bpb": state["best_val_bpb"], "step": state["best_step"]}


def run_summary(run: Run, exported: dict) -> dict:
    r = run.runtime
    return {"status": "complete", "model": run.task.name, "description": run.task.description,
            "non_embedding_params": run.task.non_embedding_params, "steps": run.state["step"],
            "tokens_per_step": run.tokens_per_step, "tokens_seen": run.state["step"] * run.tokens_per_step,
            "wall_seconds_this_process": time.perf_counter() - run.started,
            "final_val_loss": exported.get("val_loss"), "final_val_bpb": exported.get("val_bpb"),
            "exported_step": exported.get("step"), "last_val_loss": run.last_eval.get("val_loss"),
            "last_val_bpb": run.last_eval.get("val_bpb"), "early_stopped": run.state["early_stopped"],
            "best_val_loss": run.state["best_val_loss"], "precision": r.precision, "compile": r.compile,
            "world_size": r.world_size, "device": str(r.device), "tokenizer_hash": run.data.tokenizer_hash,
            "flops_per_token": run.task.flops_per_token, "flops_convention": FLOPS_CONVENTION,
            "peak_memory_bytes": peak_memory_bytes(r.device), "timings": {**run.data.timings, **run.timings.summary()}}


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process held: CUDA's max allocated, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
