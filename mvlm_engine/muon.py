"""Muon with the Newton-Schulz iteration batched by shape (`--muon_impl batched`).

torch.optim.Muon orthogonalises one matrix at a time: about twenty small kernels per matrix
per step (momentum, the normalisation, five iterations of three matmuls, the update), so a
12-layer model with eight hidden matrices per layer launches some two thousand kernels per
optimizer step, each too small to fill a GPU. Here the matrices of one shape are stacked and
go through every stage together (nanochat's and modded-nanogpt's approach): the momentum
buffers of a shape live in one (n, rows, cols) tensor, the iteration runs as batched matmuls,
compiled on CUDA, and the update is one foreach add per shape.

The update is torch.optim.Muon's, term for term: the momentum buffer as an EMA of gradients
(`buf.lerp_(grad, 1 - momentum)`), Nesterov (`grad.lerp(buf, momentum)`), the quintic
Newton-Schulz iteration with torch's coefficients on the transposed matrix when it is tall,
decoupled weight decay (`param *= 1 - lr * weight_decay`), and the learning rate scaled by
adjust_lr_fn ("original": sqrt(max(1, rows / cols))). The iteration runs in bf16 on CUDA, as
torch's does, and in fp32 on a CPU (optim.use_fp32_newton_schulz_on_cpu explains why), so on a
CPU the two optimizers agree to rounding (tests/test_speed_muon.py).

State: each parameter's state holds "momentum_buffer" as torch's does, a view into its
shape's stacked buffer, so state_dict() has torch.optim.Muon's layout (a checkpoint of either
loads into the other), the step guard's copies cover it, and a loaded state is stacked again on
the next step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .logs import get_logger

log = get_logger("train")

# torch.optim.Muon's defaults (Keller Jordan's coefficients).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7


def zeropower_batched(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                      dtype: torch.dtype) -> Tensor:
    """torch.optim.Muon's Newton-Schulz orthogonalisation of each matrix of a stack at once:
    update (n, A, B) -> (n, A, B) in `dtype`, each matrix normalised by its own Frobenius norm."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(-2) > update.size(-1)
    if tall:
        x = x.mT  # (n, B, A): the Gram matrix is the smaller one
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT  # (n, A, A)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


_compiled_zeropower = None


def compiled_zeropower():
    """zeropower_batched under torch.compile (one graph per stack shape), built on first use."""
    global _compiled_zeropower
    if _compiled_zeropower is None:
        _compiled_zeropower = torch.compile(zeropower_batched, dynamic=False, fullgraph=True)
    return _compiled_zeropower


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape learning-rate scale."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update with every same-shape matrix of a group stepped together.
    Same arguments and state_dict layout as torch.optim.Muon; `compile`: run the iteration
    through torch.compile (on CUDA: the trainer passes whether the run compiles)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None, compile: bool = False):
        if not 0.0 <= lr or not 0.0 <= momentum or not 0.0 <= weight_decay:
            raise ValueError(f"Muon needs lr, momentum and weight_decay >= 0 (got {lr}, {momentum}, {weight_decay})")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")
        self.compile = compile
        self._stacks: dict[tuple[int, ...], tuple[Tensor, list[Tensor]]] = {}  # param ids -> (buffer, its views)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as any optimizer does, then stack the loaded momentum buffers at once: the state
        tensors a step will update must already be the ones the step guard copied before it."""
        super().load_state_dict(state_dict)
        self._stacks.clear()
        for group in self.param_groups:
            for params in self._same_shape([p for p in group["params"] if "momentum_buffer" in self.state[p]]):
                self._stacked_momentum(params)

    @staticmethod
    def _same_shape(params: list[Tensor]) -> list[list[Tensor]]:
        """params grouped by (shape, dtype, device), in order: the stacks a step works on."""
        stacks: dict[tuple, list[Tensor]] = {}
        for p in params:
            stacks.setdefault((p.shape, p.dtype, p.device), []).append(p)
        return list(stacks.values())

    def _stacked_momentum(self, params: list[Tensor]) -> Tensor:
        """The (n, A, B) momentum buffer of these same-shape parameters. Their state entries are
        views into it; when they are not (first step, a loaded state dict, an undone first step),
        it is built again from what the state holds (zeros where nothing)."""
        key = tuple(id(p) for p in params)
        held = [self.state[p].get("momentum_buffer") for p in params]
        stack = self._stacks.get(key)
        if stack is not None and all(h is v for h, v in zip(held, stack[1])):
            return stack[0]
        buffer = torch.stack([torch.zeros_like(p) if h is None else h.to(p.dtype) for h, p in zip(held, params)])
        views = list(buffer.unbind(0))
        for other in [k for k in self._stacks if set(k) & set(key)]:  # these parameters' earlier stacks
            del self._stacks[other]
        for p, view in zip(params, views):
            self.state[p]["momentum_buffer"] = view
        self._stacks[key] = (buffer, views)
        return buffer

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step for every parameter with a gradient, one stack per shape, dtype and device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse or torch.is_complex(p) for p in with_grad):
                raise RuntimeError("Muon supports dense real gradients only")
            for params in self._same_shape(with_grad):
                self._step_stack(group, params)
        return loss

    def _step_stack(self, group: dict, params: list[Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        buffer = self._stacked_momentum(params)  # (n, A, B)
        grads = torch.stack([p.grad for p in params])  # (n, A, B), a copy: free to overwrite
        buffer.lerp_(grads, 1 - momentum)
        update = grads.lerp_(buffer, momentum) if group["nesterov"] else buffer
        on_cuda = update.device.type == "cuda"
        zeropower = compiled_zeropower() if self.compile and on_cuda else zeropower_batched
        dtype = torch.bfloat16 if on_cuda else torch.float32  # torch's bf16; fp32 on a CPU (optim.py)
        # torch adds the bf16 update into the fp32 weight in fp32: casting it first is the same sum
        ortho = zeropower(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype).to(params[0].dtype)
        if weight_decay:  # times 1.0 when off: skipped, the same values
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-adjusted_lr(lr, group["adjust_lr_fn"],
                                                                               params[0].shape))
