"""Building blocks shared by every SIM-ONE layer: RMSNorm, rotary embeddings, the MLPs.

Each one follows the Hugging Face Llama implementation exactly (same parameter
names, same rotate-half RoPE convention, same fp32 norm statistics), so that with
the governance mechanisms off a SIM-ONE checkpoint *is* a Llama checkpoint and the
export needs no weight permutation.

Fused layers (`fused`, on by default; `SimOneModel.use_fused_layers` switches them all):
RMSNorm and SwiGLU after its gate and up projections run through small autograd functions
that compute the same forward values but keep fewer tensors for the backward pass. Per token
and layer, plain ops keep each norm's input, its normalised copy and the inverse RMS, and for
the MLP gate, silu(gate), up and silu(gate) * up (the input of down_proj); the functions keep
the norm's input and inverse RMS, and gate and up, recomputing the rest in the backward pass
(element-wise work; no matmul is repeated).

This file imports only torch: the modelling files are copied next to a saved model
and loaded by `trust_remote_code`, so they may not import anything from this repo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), statistics in fp32.

    Same arithmetic as `LlamaRMSNorm`: normalise in fp32, cast back to the input
    dtype, then scale, so bf16 autocast runs match the reference model.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm's arithmetic; saves the input and the (..., 1) fp32 inverse RMS only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inv_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x.float() * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.float() * inv_rms
        grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        g = (grad * weight).to(x.dtype).float()  # the gradient reaching the normalised values
        grad_x = inv_rms * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables (Su et al. 2021), Llama's rotate-half layout.

    `cos`/`sin` have shape (max_positions, head_dim), computed in fp32 (bf16 angles
    lose precision at large positions) and kept fp32 under autocast, where the
    parameters stay fp32. They are non-persistent buffers (never saved; rebuilt from
    the config), so `.to(device)` moves them with the model; a `.to(bfloat16)` casts
    them too, like the bf16 tables HF Llama uses in that case.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Same expression as LlamaRotaryEmbedding.compute_default_rope_parameters.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)                       # (hd/2,)
        positions = torch.arange(self.max_positions, dtype=torch.float, device=device)
        freqs = torch.outer(positions, inv_freq)                         # (P, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (P, hd): rotate-half layout
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Recompute the tables in place (used after meta-device construction by HF loading)."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables at position_ids (B, T) -> cos, sin each (B, T, head_dim), fp32. Per-row
        positions let a left-padded row start at 0 at its first real token. The caller checks
        the range (with plain ints where it can: an export traces no data-dependent check)."""
        return self.cos[position_ids], self.sin[position_ids]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, S, hd) by cos/sin (B, S, hd); the arithmetic runs in fp32.

    Under bf16 autocast the projections come out in bf16 while the tables are fp32;
    rotating in fp32 and casting back keeps q, k and v in one dtype for attention.
    In fp32 the casts are no-ops. (Autograd keeps only the tables here: x times a constant.)
    """
    dtype = x.dtype
    x = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # one table per row, shared by the heads
    return (x * cos + rotate_half(x) * sin).to(dtype)


class SwiGLU(nn.Module):
    """Gated MLP (Shazeer 2020): down(silu(gate(x)) * up(x)), no biases, Llama names."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.down_proj.is_residual_projection = True  # init scaled by 1/sqrt(2 * n_layers)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return _GatedDownFunction.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer runs in here: autocast's when it is on, else t's."""
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else t.dtype


class _GatedDownFunction(torch.autograd.Function):
    """down_proj(silu(gate) * up) keeping gate and up only: the backward recomputes
    silu(gate) * up (element-wise) for down_proj's weight gradient. Element-wise work runs in
    gate's dtype, as autograd's own silu and mul backward would."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.dtype = _matmul_dtype(gate)  # the backward runs outside autocast: it casts by itself
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)  # under autocast, as down_proj would run

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        hidden = (silu * up).to(ctx.dtype)
        grad = grad.to(ctx.dtype)
        grad_weight = (grad.flatten(0, -2).T @ hidden.flatten(0, -2)).to(weight.dtype)
        grad_hidden = (grad @ weight.to(ctx.dtype)).to(gate.dtype)
        grad_up = grad_hidden * silu
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)  # times silu'(gate), one kernel
        return grad_gate, grad_up.to(up.dtype), grad_weight


class ReluSquaredMLP(nn.Module):
    """down(relu(up(x))^2) (So et al. 2021, Primer), no biases; an alternative to SwiGLU.

    Two matrices instead of three, so a hidden size 1.5x SwiGLU's has the same parameters.
    Not expressible by Llama (whose MLP is always gated).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.down_proj.is_residual_projection = True  # init scaled by 1/sqrt(2 * n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


MLPS = {"swiglu": SwiGLU, "relu2": ReluSquaredMLP}
MLP_TYPES = tuple(MLPS)
