"""Weight averaging: an exponential moving average (EMA) of the trainable parameters.

Training runs on the raw weights; the average is what the held-out evaluation sees, what
checkpoints/best_model records as the best, and what the export writes. It is kept on the
parameters' device in fp32 and updated after every applied optimizer step (never after a
skipped, non-finite one) with one fused lerp and no host sync.

Debiased EMA: with decay d per step, after t updates the average is the weighted mean of the
weights after those t steps with weights proportional to d^(t - i), normalised, i.e. the
zero-initialised EMA divided by 1 - d^t (Adam's bias correction, as in slowrun's EMA). The
recursion is average <- lerp(average, weights, (1 - d) / (1 - d^t)): the first update copies
the weights, so the random initialisation never enters the average and no warm-up of the decay
is needed. --ema_start_step S leaves the first S steps (the fast early descent) out of it;
until the first update, evaluation and export see the raw weights.

Evaluation copies the average into the parameters and the raw weights back (exact copies, so
training resumes on bit-identical weights): the optimizer, the step guard, torch.compile and
DDP all keep holding the same parameter objects, which a second module would not give the
trainer's export. Under DDP every rank averages identical parameters, so the averages agree.

Checkpoints hold the average in averaged_weights.safetensors (fp32, with the step and the
trainer state's hash in its metadata) and its bookkeeping in trainer_state.json ("average").
"""
from __future__ import annotations

import contextlib

import torch

from .logs import get_logger

AVERAGE_FILE = "averaged_weights.safetensors"
log = get_logger("train")


class WeightAverage:
    """The debiased EMA of a module's trainable parameters, on their device, in fp32."""

    def __init__(self, module: torch.nn.Module, decay: float, start_step: int = 0):
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]  # tied ones once
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.decay, self.start_step, self.updates = decay, start_step, 0
        with torch.no_grad():
            self.averaged = [p.detach().float().clone() for p in self.params]

    def weight_of_update(self, t: int) -> float:
        """The share of the newest weights in the t-th update (1 at the first)."""
        return (1 - self.decay) / (1 - self.decay ** t)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based); steps up to start_step are left out."""
        if step <= self.start_step:
            return
        self.updates += 1
        weights = [p.detach().float() for p in self.params]  # the parameters themselves when they are fp32
        torch._foreach_lerp_(self.averaged, weights, self.weight_of_update(self.updates))

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Put the average into the parameters (for the export); nothing before the first update."""
        if self.updates:
            for param, average in zip(self.params, self.averaged):
                param.copy_(average)

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in the parameters inside the block, the raw weights (bit for bit) after it."""
        if not self.updates:
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, kept in zip(self.params, raw):
                    param.copy_(kept)

    def state(self) -> dict:
        """The bookkeeping saved in trainer_state.json."""
        return {"decay": self.decay, "start_step": self.start_step, "updates": self.updates}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.averaged))

    def start_after(self, step: int) -> None:
        """A resumed run whose checkpoint holds no average: the average starts after `step`."""
        self.updates, self.start_step = 0, max(self.start_step, step)

    @torch.no_grad()
    def restore(self, saved_state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """The average and its bookkeeping as a checkpoint saved them (checked by checkpoint.py)."""
        for average, name in zip(self.averaged, self.names):
            average.copy_(tensors[name])
        self.updates = saved_state["updates"]
        if saved_state["decay"] != self.decay or saved_state["start_step"] != self.start_step:
            log.warning(f"WARNING: the weight average was kept with --ema_decay {saved_state['decay']} "
                        f"--ema_start_step {saved_state['start_step']} and continues with {self.decay} and "
                        f"{self.start_step}")


def saved_state_problem(state) -> str | None:
    """Why trainer_state.json's "average" cannot be this run's average's bookkeeping (None: it can)."""
    if not isinstance(state, dict):
        return "'average' is not an object"
    updates, decay, start = state.get("updates"), state.get("decay"), state.get("start_step")
    if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
        return "'updates' is not a count"
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 < decay < 1:
        return "'decay' is not in (0, 1)"
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        return "'start_step' is not a step"
    return None


def weight_average(module: torch.nn.Module, decay: float, start_step: int) -> WeightAverage | None:
    """The run's weight average (None with --ema_decay 0, the default)."""
    return WeightAverage(module, decay, start_step) if decay > 0 else None


def evaluated_weights(average: WeightAverage | None):
    """The weights an evaluation should see: the average when there is one, else the raw ones."""
    return average.swapped_in() if average is not None else contextlib.nullcontext()
