"""Causal self-attention with RoPE, grouped-query heads, a KV cache and the policy gate.

Attention runs through `torch.nn.functional.scaled_dot_product_attention`, or through
`flash_attn.flash_attn_func` when the `flash-attn` package is installed, the config asks
for it (`attention_backend="flash"`) and the tensors are CUDA bf16/fp16.

Policy gate (Qiu et al. 2025, arXiv 2505.06708, head-wise variant): each head's output
is multiplied by sigmoid(W_g x + b_g), one scalar per head per token, computed from the
same normed hidden state x that feeds q/k/v, before the output projection. A gate at 0
silences its head exactly.

QK-norm (`qk_norm`, as in OLMo 2 / Qwen3, whose parameter names q_norm/k_norm it uses):
each head's q and k are RMS-normalised with a learned gain before RoPE, which bounds the
attention logits and lets the optimizer use larger learning rates.

Value mixing (`value_mix`): the values become (1 - lambda) v + lambda e, with a learned
scalar lambda (init 0.5) and e supplied by the model: the first layer's values (value
residual, Zhou et al. 2024, arXiv 2410.17897) or a per-token learned vector (value
embeddings, modded-nanogpt). Mixed values are what the KV cache stores, so cached decoding
needs e only for the new tokens.

Imports only torch (and optionally flash_attn): see modern_layers.py for why.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modern_layers import RMSNorm, apply_rope

try:  # optional dependency; only used on CUDA with bf16/fp16 tensors
    from flash_attn import flash_attn_func
except ImportError:  # the usual case on CPU boxes
    flash_attn_func = None

ATTENTION_BACKENDS = ("sdpa", "flash")


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel family runs for tensors on `device` in `dtype`: "flash" or "sdpa".

    "flash" needs the flash-attn package, a CUDA device and a half-precision dtype;
    anything else falls back to SDPA (which picks its own flash/cuDNN/math kernel).
    Trainers call this to log what actually ran.
    """
    if (
        requested == "flash"
        and flash_attn_func is not None
        and torch.device(device).type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
    ):
        return "flash"
    return "sdpa"


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    Buffers are allocated on first use with the dtype/device of the keys written
    (so bf16 autocast gets a bf16 cache). `length` counts filled positions,
    memory tokens included; the model advances it once per forward, after all layers.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, hd) at [length, length+T); return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        if self.keys[layer_idx] is None:
            B, KV, _, hd = k.shape
            self.keys[layer_idx] = k.new_zeros(B, KV, self.max_len, hd)
            self.values[layer_idx] = v.new_zeros(B, KV, self.max_len, hd)
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def causal_mask(q_len: int, start: int, device: torch.device) -> torch.Tensor:
    """Bool mask (q_len, start + q_len): query row i sits at absolute index start + i."""
    rows = torch.arange(q_len, device=device)[:, None] + start
    cols = torch.arange(start + q_len, device=device)[None, :]
    return cols <= rows


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention, grouped-query when n_kv_heads < n_heads.

    Parameter names match `LlamaAttention` (q_proj, k_proj, v_proj, o_proj); the
    optional `head_gate` is the policy gate.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        layer_idx: int = 0,
        policy_gate: bool = False,
        attention_backend: str = "sdpa",
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        value_mix: bool = False,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.layer_idx = layer_idx  # which KV-cache slot this layer writes
        self.head_dim = d_model // n_heads
        self.attention_backend = attention_backend
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.o_proj.is_residual_projection = True  # init scaled by 1/sqrt(2 * n_layers)
        # One gate logit per head; the bias lets training (or a test) close a head outright.
        self.head_gate = nn.Linear(d_model, n_heads, bias=True) if policy_gate else None
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.value_lambda = nn.Parameter(torch.full((), 0.5)) if value_mix else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        n_memory: int = 0,
        record: dict | None = None,
        value_extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) normed hidden states; cos/sin (T, hd) for these T positions.

        Returns the output (B, T, D) and this call's values before mixing (B, KV, T, hd),
        which the model hands to later layers for the value residual.
        value_extra (B, KV, T, hd), with value_mix: what the values are mixed with.
        With a cache, keys/values of earlier positions come from it and this call's
        are appended. `record` (trace mode only) receives "policy_gate" (B, T, H) and,
        when n_memory > 0, "memory_mass" (B, T, H): the attention probability on the
        first n_memory key positions (the memory tokens).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        if self.q_norm is not None:  # per head, over hd
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, KV, T, hd)
        v = v_own = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        if self.value_lambda is not None and value_extra is not None:
            v = torch.lerp(v, value_extra.to(v.dtype), self.value_lambda.to(v.dtype))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, start + T, hd)

        y = self._attend(q, k, v, start)  # (B, T, H, hd)

        if self.head_gate is not None:
            gate = torch.sigmoid(self.head_gate(x))  # (B, T, H)
            y = y * gate.unsqueeze(-1)
            if record is not None:
                record["policy_gate"] = gate.detach()
        if record is not None and n_memory > 0:
            record["memory_mass"] = self._memory_mass(q, k, start, n_memory)

        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim)), v_own

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, KV, S, hd) with S = start + T -> (B, T, H, hd)."""
        T = q.shape[2]
        if resolve_attention_backend(self.attention_backend, q.device, q.dtype) == "flash":
            # flash-attn wants (B, S, heads, hd), handles GQA itself, and aligns the
            # causal mask bottom-right, which is what a cached prefix needs.
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)

        gqa = self.n_kv_heads != self.n_heads
        if start == 0:
            # Whole sequence (memory tokens, if any, are its first positions): plain causal.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # A chunk after a cached prefix: SDPA's is_causal aligns top-left, so mask explicitly.
            mask = causal_mask(T, start, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)  # (B, H, T, hd) -> (B, T, H, hd)

    @torch.no_grad()
    def _memory_mass(self, q: torch.Tensor, k: torch.Tensor, start: int, n_memory: int) -> torch.Tensor:
        """Trace only: explicit softmax(q k^T) in fp32, summed over the memory keys -> (B, T, H)."""
        T = q.shape[2]
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)           # (B, H, S, hd)
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        scores = scores.masked_fill(~causal_mask(T, start, q.device), float("-inf"))
        probs = scores.softmax(dim=-1)
        return probs[..., :n_memory].sum(dim=-1).transpose(1, 2)  # (B, H, T) -> (B, T, H)
