"""The speed work (issue 19): FLOPs per token in the field's convention, batched Muon, the loss
path's graph breaks and padding, one host sync per optimizer step, the GPU A/B script's dry run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "SIM-ONE Training", REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def tiny_config(model: str, **flags):
    from measure import resolve_run_config
    return resolve_run_config(model, {"preset": "tiny", "device": "cpu", **flags})


def tiny_batch(model: str, cfg):
    from measure import synthetic_batch
    return synthetic_batch(model, cfg, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- FLOPs per token


def test_gpt2_small_flops_per_token_pinned():
    """GPT-2 small (12 layers, d 768, vocab 50,257, T 1,024), by hand:
    per layer the matmul weights are c_attn 768 x 2,304 + attn c_proj 768 x 768 + c_fc 768 x 3,072
    + mlp c_proj 3,072 x 768 = 768 x 9,216 = 7,077,888; 12 layers: 84,934,656. The tied head:
    50,257 x 768 = 38,597,376. Matmuls: 6 x (84,934,656 + 38,597,376) = 741,192,192. Attention:
    12 x 12 x 768 x 1,024 = 113,246,208. Total 854,438,400 FLOPs per token (the old convention,
    6 x non-embedding parameters, gave 623,582,208: it left out the head)."""
    import mvlm_trainer

    with torch.device("meta"):
        model = mvlm_trainer.build_model(mvlm_trainer.GPT2Shape(), 50257, 1024, 0)
    assert mvlm_trainer.flops_per_token(model, 1024) == 854_438_400


@pytest.mark.parametrize("model,flags", [
    ("gpt2", {"chunked_loss": False}),
    ("simone", {"chunked_loss": False}),  # memory tokens, the policy gate, GQA, the z-loss
    # The full-logits path runs the t+2 head on every row and unembeds the alignment pairs (work it
    # throws away); the chunked path runs only what is used. Its counter misses the in-place
    # weight-gradient accumulation and counts the forward recompute instead: the same FLOPs.
    ("simone", {"coherence_weight": 0.5, "alignment_weight": 0.1, "tie_embeddings": True}),
])
def test_flops_per_token_counts_every_matmul_of_the_step(model, flags):
    """The trainers' FLOPs per token equal what torch's FlopCounterMode counts in one training
    micro-step (forward and backward) of the tiny objective: every matmul and attention FLOP of the step, per language-model token
    (attention through SDPA's math kernel, whose matmuls the counter sees on a CPU).
    (The alignment loss's P x P similarity matmul is the one term the formula leaves out.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from measure import build_objective
    cfg = tiny_config(model, **flags)
    objective = build_objective(model, cfg)
    batch = tiny_batch(model, cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = objective(batch)
        loss.backward()
    counted = counter.get_total_flops() / batch["input_ids"].numel()
    if model == "gpt2":
        import mvlm_trainer
        ours = mvlm_trainer.flops_per_token(objective.model, cfg.block_size)
    else:
        from prioritary_mvlm.enhanced_trainer import flops_per_token
        ours = flops_per_token(objective, cfg)
    if "alignment_weight" in flags:
        pairs, d = cfg.alignment_pairs, cfg.model.d_model
        counted -= 3 * 2 * pairs * pairs * d / batch["input_ids"].numel()  # similarity, forward + backward
    assert ours == pytest.approx(counted, rel=1e-9)
