"""Finite weights only: a training step that would leave any weight NaN or infinite is undone.

Before each optimizer step the parameters and the optimizer state are copied on their own
device (one fused copy per device and dtype); after the step, whether every parameter is
still finite is computed on the device and read with the step's other flags, in the one host
sync the step already has. A bad step is then put back exactly as if it had never run, like a
step with a non-finite loss. Memory: one more copy of the parameters and optimizer state.
"""
from __future__ import annotations

import torch

from .optim import optimizers_of


def _grouped(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return groups


class StepGuard:
    """Copies of the trainable parameters and their optimizer state from before the last step."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizers = optimizers_of(optimizer)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.live: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []
        self.had_state: set[tuple[int, int]] = set()

    @property
    def states(self) -> list[dict]:
        """The per-parameter state of each real optimizer, read when used: load_state_dict (a
        resume) replaces an optimizer's state dict with a new one."""
        return [o.state for o in self.optimizers]

    def _tensors(self) -> list[torch.Tensor]:
        tensors = list(self.params)
        for state in self.states:
            for param in self.params:
                tensors += [t for t in state.get(param, {}).values() if torch.is_tensor(t)]
        return tensors

    @torch.no_grad()
    def save(self) -> None:
        """Copy the parameters and optimizer state (buffers are reused from step to step)."""
        live = self._tensors()
        if len(live) != len(self.live) or any(a is not b for a, b in zip(live, self.live)):
            self.live, self.copies = live, [torch.empty_like(t) for t in live]
        self.had_state = {(i, id(p)) for i, state in enumerate(self.states) for p in self.params if state.get(p)}
        for indices in _grouped(live).values():
            torch._foreach_copy_([self.copies[i] for i in indices], [live[i] for i in indices])

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the step since save(): parameters and optimizer state as they were."""
        for indices in _grouped(self.live).values():
            torch._foreach_copy_([self.live[i] for i in indices], [self.copies[i] for i in indices])
        for i, state in enumerate(self.states):  # state that the undone step created (the first step's) goes
            for param in self.params:
                if (i, id(param)) not in self.had_state:
                    state.pop(param, None)

    @torch.no_grad()
    def weights_finite(self, device: torch.device) -> torch.Tensor:
        """A boolean tensor on `device`: every parameter finite. No host sync."""
        flags = [torch.stack(torch._foreach_norm([self.params[i] for i in indices], float("inf"))).isfinite().all()
                 for indices in _grouped(self.params).values()]
        return torch.stack([f.to(device) for f in flags]).all() if flags else torch.ones((), dtype=torch.bool,
                                                                                           device=device)
