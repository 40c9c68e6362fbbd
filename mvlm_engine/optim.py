"""Optimizers and the learning-rate schedule.

--optimizer adamw: AdamW on every parameter, in three groups (below).
--optimizer muon:  Muon (torch.optim.Muon, or with --muon_impl batched the same update batched
                   by shape: muon.py) on the hidden matrices (the weights of nn.Linear layers
                   that are neither tied to an embedding nor an output head) and AdamW on the
                   rest: embeddings, output heads, gains and biases, bare parameters such as
                   learned memory slots.

Each group has its own peak learning rate and its own decoupled weight decay (a step multiplies
the group's weights by 1 - lr * decay, torch's AdamW and Muon alike):

    group                                   peak lr          decay
    Muon: hidden matrices                   muon_lr          muon_weight_decay
    AdamW: untied output heads              head_lr          head_weight_decay (default: weight_decay)
    AdamW: embeddings, other matrices       learning_rate    weight_decay
    AdamW: gains, biases (1-D)              scalar_lr        scalar_weight_decay

The schedule is a pure function of the step that returns a factor in [0, 1]; every parameter
group's learning rate is its own peak times that factor, so one schedule drives all groups.
Muon's momentum may warm up too (muon_momentum_at), also a pure function of the step, so a
resumed run sets exactly what the uninterrupted one did.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError
from .logs import get_logger

log = get_logger("train")


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str = "cosine",
              decay_fraction: float = 0.2) -> float:
    """The learning-rate factor of optimizer step `step` (0-based) of a run of total_steps steps.

    Each step runs at the schedule's value at the end of that step, step + 1: warmup's first step
    at 1 / warmup_steps and its last at 1, and the run's last step, total_steps - 1, at exactly
    min_lr_ratio (so --min_lr_ratio 0 anneals to 0 within the run). After warmup:
    cosine: cosine decay from 1 to min_lr_ratio;
    wsd:    warmup-stable-decay, flat at 1 until the last decay_fraction of the steps, then a
            linear decay to min_lr_ratio (the "trapezoid").
    Steps at or past total_steps stay at min_lr_ratio. A warmup as long as the run never decays."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps - 1:
        return min_lr_ratio
    if schedule == "wsd":
        decay_start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
        if step < decay_start:
            return 1.0
        progress = (step + 1 - decay_start) / (total_steps - decay_start)
        return 1.0 - progress * (1.0 - min_lr_ratio)
    progress = (step + 1 - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)


def muon_momentum_at(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Muon's momentum at optimizer step `step`: linear from `start` at step 0 to `end` at
    warmup_steps, then `end` (modded-nanogpt's warmup, 0.85 to 0.95); warmup_steps 0: `end` throughout."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


# --------------------------------------------------------------------------- parameter groups


def hidden_matrices(module: nn.Module) -> list[nn.Parameter]:
    """Weights of nn.Linear layers that are not tied to an embedding and not marked as an
    output head (`is_output_head = True` on the layer): what Muon is meant for."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    found, seen = [], set()
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and not getattr(layer, "is_output_head", False):
            weight = layer.weight
            if weight.requires_grad and id(weight) not in embeddings and id(weight) not in seen:
                seen.add(id(weight))
                found.append(weight)
    return found


def output_heads(module: nn.Module) -> list[nn.Parameter]:
    """Weights of layers marked `is_output_head = True` that are not tied to an embedding."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return [m.weight for m in module.modules()
            if getattr(m, "is_output_head", False) and id(m.weight) not in embeddings and m.weight.requires_grad]


def adamw_groups(params: list[nn.Parameter], heads: list[nn.Parameter], cfg) -> list[dict]:
    """AdamW groups, each with its peak learning rate and decoupled weight decay: output heads
    (head_lr, head_weight_decay), other matrices and embeddings (learning_rate, weight_decay),
    gains and biases (scalar_lr, scalar_weight_decay)."""
    in_heads = {id(p) for p in heads}
    head_decay = cfg.weight_decay if cfg.head_weight_decay is None else cfg.head_weight_decay
    groups = [{"params": [p for p in params if id(p) in in_heads], "weight_decay": head_decay,
               "peak_lr": cfg.head_lr or cfg.learning_rate},
              {"params": [p for p in params if p.dim() >= 2 and id(p) not in in_heads],
               "weight_decay": cfg.weight_decay, "peak_lr": cfg.learning_rate},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": cfg.scalar_weight_decay,
               "peak_lr": cfg.scalar_lr or cfg.learning_rate}]
    return [g for g in groups if g["params"]]


class OptimizerSet:
    """Several optimizers used as one (Muon + AdamW); its state_dict holds each in turn.
    A GradScaler unscales and steps each of them (optimizers_of)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError("the optimizer state was saved by another --optimizer")
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)


def build_optimizer(module: nn.Module, cfg, device: torch.device):
    """The optimizer named by cfg.optimizer, every group tagged with its peak learning rate."""
    params = [p for p in module.parameters() if p.requires_grad]
    heads = output_heads(module)
    adamw_options = {"betas": (cfg.beta1, cfg.beta2), "fused": device.type == "cuda"}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups(params, heads, cfg), lr=cfg.learning_rate, **adamw_options)
    matrices = hidden_matrices(module)
    if not matrices:
        raise UserError("--optimizer muon found no nn.Linear weight matrices in this model; use --optimizer adamw")
    in_muon = {id(p) for p in matrices}
    if device.type == "cpu":
        use_fp32_newton_schulz_on_cpu()
    muon_options = {"lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay,
                    "nesterov": True, "adjust_lr_fn": "original"}
    if cfg.muon_impl == "batched":
        from .muon import BatchedMuon
        from .runtime import resolve_compile
        muon = BatchedMuon([{"params": matrices, "peak_lr": cfg.muon_lr}], **muon_options,
                           compile=device.type == "cuda" and resolve_compile(cfg.compile, device))
    else:
        muon = torch.optim.Muon([{"params": matrices, "peak_lr": cfg.muon_lr}], **muon_options)
    rest = [p for p in params if id(p) not in in_muon]
    adamw = torch.optim.AdamW(adamw_groups(rest, heads, cfg), lr=cfg.learning_rate, **adamw_options)
    return OptimizerSet([muon, adamw])


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def apply_schedule(optimizer: torch.optim.Optimizer, cfg, step: int, total_steps: int) -> float:
    """Set what the schedule gives optimizer step `step`: every group's learning rate (its peak
    times lr_factor) and the momentum of every group that has one, Muon's (muon_momentum_at;
    AdamW's groups have betas instead). Returns the factor."""
    factor = lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction)
    set_learning_rates(optimizer, factor)
    momentum = muon_momentum_at(step, cfg.muon_momentum_warmup_steps, cfg.muon_momentum_start, cfg.muon_momentum)
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = momentum
    return factor


def optimizers_of(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The real optimizers behind `optimizer` (a GradScaler unscales and steps each one)."""
    return optimizer.optimizers if isinstance(optimizer, OptimizerSet) else [optimizer]


# --------------------------------------------------------------------------- Muon on a CPU


def use_fp32_newton_schulz_on_cpu() -> None:
    """torch.optim.Muon orthogonalises in bf16 (hard-coded). CPUs without native bf16 matmul
    run that about 70x slower than fp32 (measured: 4.06 s vs 0.057 s per step on a tiny model),
    so on CPU tensors the same iteration (coefficients, steps, normalisation) runs in fp32.
    CUDA tensors keep torch's own bf16 path."""
    from torch.optim import _muon

    original = getattr(_muon, "_zeropower_via_newtonschulz", None)
    if original is None or getattr(original, "fp32_on_cpu", False):
        if original is None:
            log.warning("WARNING: this torch has no _zeropower_via_newtonschulz; Muon runs as shipped")
        return

    def zeropower(grad, ns_coefficients, ns_steps, eps):
        if grad.device.type != "cpu":
            return original(grad, ns_coefficients, ns_steps, eps)
        a, b, c = ns_coefficients
        x = grad.float()
        if grad.size(0) > grad.size(1):
            x = x.T
        x = x / x.norm().clamp(min=eps)
        for _ in range(ns_steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)

    zeropower.fp32_on_cpu = True
    _muon._zeropower_via_newtonschulz = zeropower
