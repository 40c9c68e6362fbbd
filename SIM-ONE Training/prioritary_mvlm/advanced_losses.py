"""The composite loss of Enhanced SIM-ONE: each term a small pure function.

    accuracy       next-token cross-entropy (the language-modelling objective)
    coherence      multi-token prediction: a light extra head predicts token t+2
                   (Gloeckle et al. 2024, arXiv 2404.19737)
    alignment      InfoNCE pulling together the pooled hidden states of the same verse in two
                   translations (in-batch negatives)
    stability      z-loss on the logits, mean(logsumexp^2) (PaLM, Chowdhery et al. 2022)
    distill        T^2 KL(teachers || model) against finished models' averaged prediction
                   (mvlm_engine.distillation; on when the batch carries their targets)
    comprehensive  the weighted sum: static weights, or uncertainty weighting
                   (Kendall et al. 2018, arXiv 1705.07115)

CompositeObjective wires them to the model for the shared training engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mvlm_engine.distillation import TEACHER_LOG_PROBS, distillation_loss
from mvlm_engine.losses import cross_entropy_from_log_partition, log_partition_function, z_loss_from_log_partition
from mvlm_engine.parallel_verses import mean_pool


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) at position t score targets[:, t], the token after t."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def multi_token_loss(logits_ahead: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits_ahead (B, T, V) at position t score the token two ahead, i.e. targets[:, t + 1]."""
    return F.cross_entropy(logits_ahead[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition: keeps logits from drifting to large magnitudes."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def alignment_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `first` (P, D) should match row i of `second` (P, D)."""
    first, second = F.normalize(first.float(), dim=-1), F.normalize(second.float(), dim=-1)
    similarity = first @ second.T / temperature  # (P, P)
    labels = torch.arange(len(first), device=first.device)
    return 0.5 * (F.cross_entropy(similarity, labels) + F.cross_entropy(similarity.T, labels))


def combine_losses(terms: dict[str, torch.Tensor], weights: dict[str, float],
                   log_variances: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The comprehensive loss.

    Static: sum of weight * term. Adaptive (uncertainty weighting): for each term with a learnt
    log-variance s, exp(-s) * term + s, scaled by its static weight (so weight 0 is still off).
    Terms without a log-variance (the z-loss regulariser) stay static.
    """
    total = torch.zeros((), device=next(iter(terms.values())).device)
    for name, value in terms.items():
        weight = weights.get(name, 1.0)
        if log_variances is not None and name in log_variances:
            s = log_variances[name]
            total = total + weight * (torch.exp(-s) * value + s)
        else:
            total = total + weight * value
    return total


class MultiTokenHead(nn.Module):
    """Light t+2 head: a residual MLP on the final hidden state, then the shared unembedding."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.up = nn.Linear(d_model, d_model, bias=False)
        self.down = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = nn.RMSNorm(d_model, eps=eps)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.down.weight)  # starts as the identity on the residual

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_norm(hidden + self.down(F.silu(self.up(self.norm(hidden)))))


class CompositeObjective(nn.Module):
    """Model + auxiliary heads + loss weights: forward(batch) -> (total, logged terms).

    Only terms with a non-zero weight are built, computed and given parameters, so a weight
    of 0 costs nothing and leaves no unused parameters (DDP needs that).

    The next-token and t+2 rows go through one cross-entropy pass over the shared unembedding
    (mvlm_engine.losses), the z-loss reuses its log-partition, and the alignment forward computes
    no logits. chunked_loss: a chunk of rows at a time, the (rows, V) logits never held; off: the
    full logits of one matmul against the unembedding padded to a multiple of 64 rows. The pure
    functions above compute the same terms from a model's own logits (the tests' reference); a
    batch with teachers' targets takes that path too (the distillation term needs the logits).
    """

    def __init__(self, model: nn.Module, weights: dict[str, float], adaptive: bool, temperature: float,
                 chunked_loss: bool = False, distill_temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.weights = {"accuracy": 1.0, **{k: v for k, v in weights.items() if v > 0}}
        self.temperature, self.distill_temperature = temperature, distill_temperature
        self.chunked_loss = chunked_loss
        d_model = model.config.d_model
        self.multi_token_head = MultiTokenHead(d_model) if "coherence" in self.weights else None
        self.log_variances = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(())) for name in self.weights if name != "stability"}
        ) if adaptive else None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def forward(self, batch: dict):
        teacher = batch.get(TEACHER_LOG_PROBS)
        if teacher is None:
            terms = self.language_terms(batch["input_ids"], batch["labels"])
        else:
            terms = self.language_terms_full_logits(batch["input_ids"], batch["labels"], teacher)
        if "alignment" in self.weights:
            pairs = batch["pair_ids"]  # (2P, L): first P rows one translation, last P the other
            hidden = self.model(pairs, return_logits=False).hidden_states
            first, second = mean_pool(hidden, batch["pair_mask"]).chunk(2)
            terms["alignment"] = alignment_loss(first, second, self.temperature)
        total = combine_losses(terms, self.weights, self.log_variances)
        logged = {f"loss/{name}": value for name, value in terms.items()}
        if self.log_variances is not None:
            logged.update({f"weight/{n}": torch.exp(-s) * self.weights[n] for n, s in self.log_variances.items()})
        return total, logged

    def language_terms_full_logits(self, input_ids: torch.Tensor, labels: torch.Tensor,
                                   teacher_log_probs: torch.Tensor | None = None) -> dict:
        """accuracy, coherence, stability and (with teachers' targets) distill from materialised
        (B, T, V) logits."""
        out = self.model(input_ids)
        terms = {"accuracy": next_token_loss(out.logits, labels)}
        if teacher_log_probs is not None:
            terms["distill"] = distillation_loss(out.logits, teacher_log_probs, self.distill_temperature)
        if self.multi_token_head is not None:
            ahead = self.model.logits(self.multi_token_head(out.hidden_states))
            terms["coherence"] = multi_token_loss(ahead, labels)
        if "stability" in self.weights:
            terms["stability"] = z_loss(out.logits)
        return terms

    def language_terms(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        """accuracy, coherence and stability through one pass over the unembedding for both heads."""
        hidden = self.model(input_ids, return_logits=False).hidden_states  # (B, T, D)
        rows, targets = [hidden.flatten(0, 1)], [labels.flatten()]
        if self.multi_token_head is not None:  # position t predicts labels[:, t + 1]
            rows.append(self.multi_token_head(hidden[:, :-1]).flatten(0, 1))
            targets.append(labels[:, 1:].flatten())
        model = self.model
        unembedding = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        # A model config with a logit soft-cap applies it inside model.logits; the loss must too.
        softcap = getattr(model.config, "logit_softcap", 0.0)
        log_partition, target_logit = log_partition_function(self.chunked_loss)(
            torch.cat(rows), unembedding, torch.cat(targets), softcap=softcap)
        n = labels.numel()
        terms = {"accuracy": cross_entropy_from_log_partition(log_partition[:n], target_logit[:n])}
        if self.multi_token_head is not None:
            terms["coherence"] = cross_entropy_from_log_partition(log_partition[n:], target_logit[n:])
        if "stability" in self.weights:
            terms["stability"] = z_loss_from_log_partition(log_partition[:n])
        return terms
