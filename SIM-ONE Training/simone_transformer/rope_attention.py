"""Causal self-attention with RoPE, grouped-query heads, a KV cache and the policy gate.

The KV cache is any object with Hugging Face's Cache API (`update(k, v, layer_idx)` returning
all keys/values so far, `get_seq_length()`), such as `transformers.DynamicCache`, which
GenerationMixin creates, reorders for beam search and expands for several return sequences.
Padding: the model passes a boolean mask (B, 1, queries, keys) when a batch is padded; the
fast paths (SDPA's is_causal, flash-attn) serve the unpadded case.

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

Attention dropout (`attention_dropout`) drops attention probabilities in training only (SDPA's
and flash-attn's dropout_p); in eval mode it is 0, so evaluation and generation are exact.

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


def causal_mask(q_len: int, start: int, device: torch.device) -> torch.Tensor:
    """Bool mask (q_len, start + q_len): query row i sits at absolute index start + i."""
    rows = torch.arange(q_len, device=device)[:, None] + start
    cols = torch.arange(start + q_len, device=device)[None, :]
    return cols <= rows


def padded_causal_mask(key_is_real: torch.Tensor, q_len: int) -> torch.Tensor:
    """Bool mask (B, 1, q_len, K) from key_is_real (B, K): causal, and never onto padding.

    The queries are the last q_len keys. A padded query may still see itself: without memory
    tokens a left-padded row's first queries would otherwise see nothing, and a softmax over
    nothing is NaN. No real token attends a padded key, so what padded rows compute is never read.
    """
    K = key_is_real.shape[1]
    allowed = causal_mask(q_len, K - q_len, key_is_real.device)[None] & key_is_real[:, None, :]  # (B, Q, K)
    rows = torch.arange(q_len, device=key_is_real.device)[:, None] + K - q_len
    itself = torch.arange(K, device=key_is_real.device)[None, :] == rows  # (Q, K)
    return (allowed | itself).unsqueeze(1)


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
        attention_dropout: float = 0.0,
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
        self.attention_dropout = attention_dropout  # on the attention probabilities, in training only

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache=None,
        start: int = 0,
        mask: torch.Tensor | None = None,
        n_memory: int = 0,
        record: dict | None = None,
        value_extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) normed hidden states; cos/sin (B, T, hd) for these T positions.

        Returns the output (B, T, D) and this call's values before mixing (B, KV, T, hd),
        which the model hands to later layers for the value residual.
        cache: an HF-style KV cache (see the module docstring) holding `start` positions before
        this call; this call's keys/values are appended. mask: (B, 1, T, start + T) bool, True =
        may attend, for padded batches; None = plain causal attention.
        value_extra (B, KV, T, hd), with value_mix: what the values are mixed with.
        `record` (trace mode only) receives "policy_gate" (B, T, H) and, when n_memory > 0,
        "memory_mass" (B, T, H): the attention probability on the first n_memory key positions
        (the memory tokens).
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

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KV, start + T, hd)

        y = self._attend(q, k, v, start, mask)  # (B, T, H, hd)

        if self.head_gate is not None:
            gate = torch.sigmoid(self.head_gate(x))  # (B, T, H): from this token alone, so padding cannot move it
            y = y * gate.unsqueeze(-1)
            if record is not None:
                record["policy_gate"] = gate.detach()
        if record is not None and n_memory > 0:
            record["memory_mass"] = self._memory_mass(q, k, start, n_memory, mask)

        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim)), v_own

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, KV, S, hd) with S = start + T -> (B, T, H, hd)."""
        T = q.shape[2]
        p = self.attention_dropout if self.training else 0.0
        if mask is None and resolve_attention_backend(self.attention_backend, q.device, q.dtype) == "flash":
            # flash-attn wants (B, S, heads, hd), handles GQA itself, and aligns the
            # causal mask bottom-right, which is what a cached prefix needs.
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)

        gqa = self.n_kv_heads != self.n_heads
        if mask is not None:  # a padded batch
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        elif start == 0:
            # Whole sequence (memory tokens, if any, are its first positions): plain causal. A constant
            # is_causal (not T > 1) keeps the sequence length symbolic for torch.export / ONNX.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
        else:
            # A chunk after a cached prefix: SDPA's is_causal aligns top-left, so mask explicitly.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, start, q.device), dropout_p=p,
                                               enable_gqa=gqa)
        return y.transpose(1, 2)  # (B, H, T, hd) -> (B, T, H, hd)

    @torch.no_grad()
    def _memory_mass(self, q: torch.Tensor, k: torch.Tensor, start: int, n_memory: int,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """Trace only: explicit softmax(q k^T) in fp32, summed over the memory keys -> (B, T, H)."""
        T = q.shape[2]
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)           # (B, H, S, hd)
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        allowed = mask if mask is not None else causal_mask(T, start, q.device)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return probs[..., :n_memory].sum(dim=-1).transpose(1, 2)  # (B, H, T) -> (B, T, H)
