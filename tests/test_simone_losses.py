"""Composite-loss terms: known values, gradients reach what each term trains, alignment signal."""
import math

import pytest
import torch

from conftest import REPO, import_script
from mvlm_engine.parallel_verses import mean_pool
from prioritary_mvlm.advanced_losses import (CompositeObjective, alignment_loss, combine_losses, multi_token_loss,
                                             next_token_loss, z_loss)
from prioritary_mvlm.config import simone_preset
from simone_transformer import SimOneModel


def test_next_token_loss_known_value():
    logits = torch.zeros(1, 2, 4)  # uniform over 4 tokens
    assert next_token_loss(logits, torch.tensor([[1, 3]])).item() == pytest.approx(math.log(4))
    logits = torch.tensor([[[10.0, 0, 0, 0]]])
    assert next_token_loss(logits, torch.tensor([[0]])).item() == pytest.approx(
        math.log(1 + 3 * math.exp(-10)), abs=1e-6)


def test_multi_token_loss_scores_the_token_two_ahead():
    targets = torch.tensor([[5, 6, 7]])  # the tokens after positions 0, 1, 2
    logits = torch.full((1, 3, 8), -20.0)
    logits[0, 0, 6] = logits[0, 1, 7] = 20.0  # position t predicts targets[t + 1]
    assert multi_token_loss(logits, targets).item() < 1e-6
    wrong = torch.full((1, 3, 8), -20.0)
    wrong[0, 0, 5] = wrong[0, 1, 6] = 20.0  # next-token answers are wrong for this head
    assert multi_token_loss(wrong, targets).item() > 30


def test_z_loss_known_value():
    logits = torch.zeros(2, 3, 5)
    assert z_loss(logits).item() == pytest.approx(math.log(5) ** 2)
    assert z_loss(logits + 2.0).item() == pytest.approx((math.log(5) + 2.0) ** 2)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_alignment_loss_known_values_and_true_pairs_beat_shuffled():
    eye = torch.eye(4)
    perfect = alignment_loss(eye, eye, temperature=0.1).item()
    expected = -math.log(math.exp(10) / (math.exp(10) + 3))  # cos 1 vs cos 0 at temperature 0.1
    assert perfect == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(0)
    first = torch.randn(16, 32)
    second = first + 0.3 * torch.randn(16, 32)  # the "same verse" in another wording
    shuffled = second[torch.randperm(16)]
    assert alignment_loss(first, second, 0.1) < alignment_loss(first, shuffled, 0.1)


def test_combine_static_and_adaptive():
    terms = {"accuracy": torch.tensor(2.0), "coherence": torch.tensor(3.0), "stability": torch.tensor(50.0)}
    weights = {"accuracy": 1.0, "coherence": 0.5, "stability": 1e-2}
    assert combine_losses(terms, weights).item() == pytest.approx(2.0 + 1.5 + 0.5)
    s = {"accuracy": torch.tensor(0.0), "coherence": torch.tensor(math.log(2.0))}
    # exp(-s) * L + s, times the static weight; stability stays static.
    expected = (2.0 + 0.0) + 0.5 * (3.0 / 2 + math.log(2.0)) + 0.5
    assert combine_losses(terms, weights, s).item() == pytest.approx(expected)


def tiny_objective(**weights):
    torch.manual_seed(0)
    # A random (not zero) head, so every gradient path is live at step 0.
    model = SimOneModel(simone_preset("tiny", vocab_size=64, max_seq_len=32, memory_tokens=2, zero_init_head=False))
    full = {"coherence": 0.1, "alignment": 0.1, "stability": 1e-4, **weights}
    return CompositeObjective(model, full, adaptive=True, temperature=0.1)


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 16), generator=g)
    return {"input_ids": x, "labels": torch.roll(x, -1, 1), "pair_ids": torch.randint(0, 64, (4, 8), generator=g),
            "pair_mask": torch.ones(4, 8)}


def grads_of(objective, term):
    objective.zero_grad()
    _, logged = objective(tiny_batch())
    logged[f"loss/{term}"].backward()
    return {name: p.grad for name, p in objective.named_parameters()}


def test_each_term_trains_the_parameters_it_should():
    objective = tiny_objective()
    coherence = grads_of(objective, "coherence")
    # down starts at zero (the head starts as the identity), so its gradient is the live one.
    assert coherence["multi_token_head.down.weight"].abs().sum() > 0
    assert coherence["model.embed_tokens.weight"].abs().sum() > 0  # through the trunk
    accuracy = grads_of(objective, "accuracy")
    # The next-token loss never moves the t+2 head: both heads' rows share one pass over the
    # unembedding, so its gradient there is exactly zero.
    assert not accuracy["multi_token_head.down.weight"].any()
    assert accuracy["model.memory_embeddings"].abs().sum() > 0  # memory tokens are trained through attention
    assert accuracy["model.layers.0.self_attn.head_gate.weight"].abs().sum() > 0  # the policy gate learns
    alignment = grads_of(objective, "alignment")
    assert alignment["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
    assert alignment["multi_token_head.down.weight"] is None
    stability = grads_of(objective, "stability")
    assert stability["model.norm.weight"].abs().sum() > 0


def test_adaptive_weights_get_gradients_and_are_logged():
    objective = tiny_objective()
    objective.zero_grad()
    total, logged = objective(tiny_batch())
    total.backward()
    assert set(objective.log_variances) == {"accuracy", "coherence", "alignment"}
    assert all(p.grad is not None and p.grad.abs() > 0 for p in objective.log_variances.values())
    assert {"weight/accuracy", "weight/coherence", "weight/alignment"} <= set(logged)


def test_zero_weight_builds_nothing():
    objective = tiny_objective(coherence=0.0, alignment=0.0, stability=0.0)
    assert objective.multi_token_head is None
    _, logged = objective(tiny_batch())
    assert set(logged) == {"loss/accuracy", "weight/accuracy"}


def test_each_ablation_row_switches_off_exactly_its_piece():
    """Every row of ablation.py parses as enhanced_train.py flags and changes the default recipe."""
    import dataclasses

    from mvlm_engine.cli import parse_run_config, resolve_settings
    from prioritary_mvlm.config import PrioritaryConfig
    ablation = import_script(REPO / "SIM-ONE Training" / "ablation.py", "ablation")

    default = resolve_settings(PrioritaryConfig, {"preset": "tiny"}, {})
    rows = ablation.switch_offs(default)
    expected = {"Muon", "untied head", "policy gate", "memory tokens"}
    assert {label[2:].split(" (")[0] for label in rows} == expected
    for label, flags in rows.items():
        cfg = parse_run_config(PrioritaryConfig, ["--preset", "tiny", *flags], "enhanced_train.py", "")
        changed = {k for k, v in dataclasses.asdict(cfg.model).items() if getattr(default.model, k) != v}
        changed |= {f.name for f in dataclasses.fields(cfg) if f.name != "model"
                    and getattr(cfg, f.name) != getattr(default, f.name)}
        assert changed, label
        assert ablation.switch_offs(cfg).keys() < rows.keys(), label  # the piece is off, the rest still on
