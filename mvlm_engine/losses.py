"""Cross-entropy over a linear unembedding, with or without the full (rows, vocabulary) logits.

`linear_log_partition(hidden, weight, targets)` returns, per row, the log-partition
logsumexp(h W^T) and the logit of that row's target, computing the logits a chunk of rows at
a time and recomputing them chunk by chunk in the backward pass. Everything a language-model
objective needs is a cheap expression of these two (N,) vectors:

    cross-entropy  mean(log_partition - target_logit)
    z-loss         mean(log_partition ** 2)          (the same log-partition, no second pass)

Rows of several heads that share the unembedding (a next-token head and a t+2 head, say) go
through one call, concatenated, so the weight is streamed once per chunk for all of them.

`full_log_partition` returns the same two vectors from the whole (N, V) logits in one matmul
(`--no_chunked_loss`): more memory, no recompute, and a graph torch.compile can fuse end to
end; which is faster on a GPU is measured (benchmarks/gpu_session.sh ab). An objective picks
one with `log_partition_function(chunked)` and is otherwise the same code for both.

Vocabulary padding: the matmuls run against the weight padded with zero rows to a multiple of
VOCAB_MULTIPLE (aligned shapes for tensor cores and CPU GEMM kernels: measured on CPU, 1.3x
faster at 4,147 -> 4,160 columns, 1.08x at 32,058 -> 32,064), and the padding columns are set
to -inf before the softmax, so they are never part of a log-partition, never a target, and
get no gradient. The model itself keeps its real vocabulary (exports and sampling unchanged).

Memory: the logits of one chunk instead of rows x vocabulary, plus their gradient in the
backward pass, and a padded copy of the weight while each pass runs; the cost is one extra
(rows x D x V) matmul (the recompute).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB_MULTIPLE = 64
# Rows per chunk. On a CPU, 256 rows were fastest at both 4K and 32K vocabularies (the chunk's
# logits stay in cache across the softmax passes). On a GPU, larger chunks keep the matmuls
# big: 2**25 logit values (128 MiB fp32) per chunk, at least 256 rows.
CPU_CHUNK_ROWS = 256
GPU_CHUNK_ELEMENTS = 1 << 25


def rows_per_chunk(vocab_size: int, device: torch.device) -> int:
    if device.type == "cpu":
        return CPU_CHUNK_ROWS
    return max(CPU_CHUNK_ROWS, GPU_CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for hidden @ weight^T here (else hidden's own)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _padded(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight (V, D) in dtype, with zero rows appended up to a multiple of VOCAB_MULTIPLE."""
    extra = -weight.shape[0] % VOCAB_MULTIPLE
    return F.pad(weight.to(dtype), (0, 0, 0, extra)) if extra else weight.to(dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, vocab: int, softcap: float, buffer: torch.Tensor):
    """softcap(h w^T) of one chunk, in `buffer`'s dtype (the softmax statistics dtype) and,
    when the matmul runs in that dtype, in `buffer` itself (no allocation per chunk); the
    padding columns at -inf."""
    logits = buffer[:len(h)]
    if w.dtype == buffer.dtype:
        torch.mm(h, w.T, out=logits)
    else:
        logits.copy_(h @ w.T)
    if softcap > 0:
        logits.div_(softcap).tanh_().mul_(softcap)
    if w.shape[0] > vocab:
        logits[:, vocab:] = float("-inf")
    return logits


class _LinearLogPartition(torch.autograd.Function):
    """(log_partition, target_logit), each (N,) in fp32 or wider, for logits = softcap(hidden @ weight^T).
    Each pass works on one preallocated chunk buffer, in place."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, softcap: float, dtype: torch.dtype):
        w, stats, vocab = _padded(weight, dtype), torch.promote_types(dtype, torch.float32), weight.shape[0]
        log_partition = hidden.new_empty(len(hidden), dtype=stats)
        target_logit = hidden.new_empty(len(hidden), dtype=stats)
        buffer = hidden.new_empty(min(chunk_rows, len(hidden)), w.shape[0], dtype=stats)
        for start in range(0, len(hidden), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _chunk_logits(hidden[rows].to(dtype), w, vocab, softcap, buffer)  # (chunk, V padded)
            target_logit[rows] = logits.gather(1, targets[rows, None]).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            log_partition[rows] = logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(1))
        ctx.save_for_backward(hidden, weight, targets, log_partition)
        ctx.chunk_rows, ctx.softcap, ctx.dtype = chunk_rows, softcap, dtype
        return log_partition, target_logit

    @staticmethod
    def backward(ctx, grad_log_partition, grad_target_logit):
        hidden, weight, targets, log_partition = ctx.saved_tensors
        softcap, dtype, vocab = ctx.softcap, ctx.dtype, weight.shape[0]
        if grad_log_partition is None:
            grad_log_partition = torch.zeros_like(log_partition)
        if grad_target_logit is None:
            grad_target_logit = torch.zeros_like(log_partition)
        w, stats = _padded(weight, dtype), log_partition.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(w.shape, dtype=stats, device=weight.device)
        buffer = hidden.new_empty(min(ctx.chunk_rows, len(hidden)), w.shape[0], dtype=stats)
        for start in range(0, len(hidden), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(dtype)
            logits = _chunk_logits(h, w, vocab, softcap, buffer)
            # through cap * tanh(raw / cap): times 1 - tanh^2 = 1 - (logits / cap)^2
            capped = 1 - (logits[:, :vocab] / softcap).square_() if softcap > 0 else None
            # d/dlogits: softmax * d(log_partition) + one-hot(target) * d(target_logit); 0 on the padding
            grad = logits.sub_(log_partition[rows, None]).exp_().mul_(grad_log_partition[rows, None])
            grad.scatter_add_(1, targets[rows, None], grad_target_logit[rows, None])
            if capped is not None:
                grad[:, :vocab].mul_(capped)
            grad = grad.to(dtype)
            grad_hidden[rows] = (grad @ w).to(hidden.dtype)
            if dtype == stats:
                grad_weight.addmm_(grad.T, h)
            else:
                grad_weight += (grad.T @ h).to(stats)
        return grad_hidden, grad_weight[:vocab].to(weight.dtype), None, None, None, None


def linear_log_partition(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float = 0.0, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D) (the unembedding), targets (N,) int64 ->
    (log-partition, target logit), each (N,) fp32, of logits = softcap(hidden @ weight^T).

    softcap > 0: logits = softcap * tanh(raw / softcap). Under autocast the matmuls run in the
    autocast dtype and the softmax statistics in fp32, as `F.linear(...).float()` would."""
    chunk_rows = chunk_rows or rows_per_chunk(weight.shape[0], hidden.device)
    return _LinearLogPartition.apply(hidden, weight, targets, chunk_rows, float(softcap), _compute_dtype(hidden))


def full_log_partition(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_log_partition's (log-partition, target logit) from the full logits: one matmul
    against the weight padded with zero rows to a multiple of VOCAB_MULTIPLE (a 50,257-row head ->
    50,304), the padding columns sliced off before the softmax (never predicted, no gradient);
    the softmax statistics in fp32. Memory: the (N, V) logits and their gradient."""
    vocab = weight.shape[0]
    dtype = _compute_dtype(hidden)
    logits = F.linear(hidden.to(dtype), _padded(weight, dtype))[:, :vocab].float()  # (N, V padded) -> (N, V)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.logsumexp(dim=-1), logits.gather(1, targets[:, None]).squeeze(1)


def log_partition_function(chunked: bool):
    """linear_log_partition (chunked: the logits never held) or full_log_partition."""
    return linear_log_partition if chunked else full_log_partition


def cross_entropy_from_log_partition(log_partition: torch.Tensor, target_logit: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, -log softmax(logits)[target], from the two (N,) vectors."""
    return (log_partition - target_logit).mean()


def z_loss_from_log_partition(log_partition: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition (PaLM's z-loss) from the cross-entropy's own log-partition."""
    return log_partition.square().mean()
