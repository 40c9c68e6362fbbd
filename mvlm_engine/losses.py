"""Cross-entropy over a linear unembedding without the full (rows, vocabulary) logits tensor.

`linear_log_partition(hidden, weight, targets)` returns, per row, the log-partition
logsumexp(h W^T) and the logit of that row's target, computing the logits a chunk of rows at
a time and recomputing them chunk by chunk in the backward pass. Everything a language-model
objective needs is a cheap expression of these two (N,) vectors:

    cross-entropy  mean(log_partition - target_logit)
    z-loss         mean(log_partition ** 2)          (the same log-partition, no second pass)

Rows of several heads that share the unembedding (a next-token head and a t+2 head, say) go
through one call, concatenated, so the weight is streamed once per chunk for all of them.

Memory: the logits of one chunk (CHUNK_ELEMENTS fp32 values) instead of rows x vocabulary, plus
their gradient in the backward pass; the cost is one extra (rows x D x V) matmul (the recompute).
"""
from __future__ import annotations

import torch

# Logit values per chunk: 2**22 fp32 values = 16 MiB, small enough to stay in a CPU's cache
# hierarchy and to be negligible on a GPU, large enough that each matmul stays efficient
# (at a 32K vocabulary, 128 rows of hidden states per chunk).
CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // vocab_size)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for hidden @ weight^T here (else hidden's own)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _capped(raw: torch.Tensor, softcap: float) -> torch.Tensor:
    return raw if softcap <= 0 else softcap * torch.tanh(raw / softcap)


class _LinearLogPartition(torch.autograd.Function):
    """(log_partition, target_logit), each (N,) in fp32 or wider, for logits = softcap(hidden @ weight^T)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, softcap: float, dtype: torch.dtype):
        w, stats = weight.to(dtype), torch.promote_types(dtype, torch.float32)
        log_partition = hidden.new_empty(len(hidden), dtype=stats)
        target_logit = hidden.new_empty(len(hidden), dtype=stats)
        for start in range(0, len(hidden), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _capped((hidden[rows].to(dtype) @ w.T).to(stats), softcap)  # (chunk, V)
            log_partition[rows] = torch.logsumexp(logits, dim=-1)
            target_logit[rows] = logits.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, log_partition)
        ctx.chunk_rows, ctx.softcap, ctx.dtype = chunk_rows, softcap, dtype
        return log_partition, target_logit

    @staticmethod
    def backward(ctx, grad_log_partition, grad_target_logit):
        hidden, weight, targets, log_partition = ctx.saved_tensors
        softcap, dtype = ctx.softcap, ctx.dtype
        if grad_log_partition is None:
            grad_log_partition = torch.zeros_like(log_partition)
        if grad_target_logit is None:
            grad_target_logit = torch.zeros_like(log_partition)
        w, stats = weight.to(dtype), log_partition.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=stats, device=weight.device)
        for start in range(0, len(hidden), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(dtype)
            raw = (h @ w.T).to(stats)
            logits = _capped(raw, softcap)
            # d/dlogits: softmax * d(log_partition) + one-hot(target) * d(target_logit)
            grad = logits.sub_(log_partition[rows, None]).exp_().mul_(grad_log_partition[rows, None])
            grad.scatter_add_(1, targets[rows, None], grad_target_logit[rows, None])
            if softcap > 0:  # through cap * tanh(raw / cap): times 1 - tanh^2
                grad.mul_(1 - torch.tanh(raw / softcap).square_())
            grad = grad.to(dtype)
            grad_hidden[rows] = (grad @ w).to(hidden.dtype)
            if dtype == stats:
                grad_weight.addmm_(grad.T, h)
            else:
                grad_weight += (grad.T @ h).to(stats)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def linear_log_partition(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float = 0.0, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D) (the unembedding), targets (N,) int64 ->
    (log-partition, target logit), each (N,) fp32, of logits = softcap(hidden @ weight^T).

    softcap > 0: logits = softcap * tanh(raw / softcap). Under autocast the matmuls run in the
    autocast dtype and the softmax statistics in fp32, as `F.linear(...).float()` would."""
    chunk_rows = chunk_rows or rows_per_chunk(weight.shape[0])
    return _LinearLogPartition.apply(hidden, weight, targets, chunk_rows, float(softcap), _compute_dtype(hidden))


def cross_entropy_from_log_partition(log_partition: torch.Tensor, target_logit: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, -log softmax(logits)[target], from the two (N,) vectors."""
    return (log_partition - target_logit).mean()


def z_loss_from_log_partition(log_partition: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition (PaLM's z-loss) from the cross-entropy's own log-partition."""
    return log_partition.square().mean()
