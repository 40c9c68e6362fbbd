"""The speed work (issue 19), the step's arithmetic: FLOPs per token in the field's convention, the
loss path's graph breaks and the padded full-logits head."""
from __future__ import annotations

import pytest
import torch

from conftest import GPT2_NO_DROPOUT
from helpers.speed import tiny_batch, tiny_config


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
    micro-step (forward and backward) of the tiny objective: every matmul and attention FLOP of the
    step, per language-model token
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


# --------------------------------------------------------------------------- the loss path


@pytest.mark.parametrize("model", ["gpt2", "simone"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_compiled_step_has_no_graph_break_on_the_default_loss_path(model, precision):
    """torch._dynamo.explain on the objective as the trainer compiles it (the whole training
    module, under the run's autocast: fp32 on a CPU, bf16 on a GPU), default settings of the tiny
    preset (the chunked cross-entropy): one graph, no break."""
    from measure import build_objective
    from mvlm_engine.runtime import Runtime
    cfg = tiny_config(model)
    assert cfg.chunked_loss
    objective = build_objective(model, cfg)
    runtime = Runtime(0, 0, 1, torch.device("cpu"), precision, True)
    torch._dynamo.reset()
    with runtime.autocast():
        explained = torch._dynamo.explain(objective)(tiny_batch(model, cfg))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_full_logits_pad_the_head_in_the_matmul_and_never_predict_the_padding(monkeypatch):
    """GPT-2's 50,257 rows run as 50,304 in the one matmul; the padding is no class of the softmax
    and gets no gradient: values and gradients are those of the unpadded logits."""
    import torch.nn.functional as F

    from mvlm_engine.losses import full_log_partition
    seen, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *rest: seen.append(tuple(w.shape)) or linear(x, w, *rest))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50257, 8, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 5, 50256, 17, 3, 50000])
    log_partition, target_logit = full_log_partition(hidden, weight, targets)
    assert seen == [(50304, 8)]
    monkeypatch.undo()
    logits = hidden @ weight.T
    torch.testing.assert_close(log_partition, logits.logsumexp(-1))
    torch.testing.assert_close(target_logit, logits.gather(1, targets[:, None]).squeeze(1))
    ours = torch.autograd.grad((log_partition - target_logit).mean(), (hidden, weight))
    reference = torch.autograd.grad(F.cross_entropy(logits, targets), (hidden, weight))
    assert ours[1].shape == weight.shape
    for a, b in zip(ours, reference):  # sums over 50,257 classes: rounding to 1e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_logits_objectives_equal_the_models_own_logits():
    """--no_chunked_loss (padded full logits, our cross-entropy) gives the loss and gradients of
    each model's own logits through the reference functions: F.cross_entropy on HF GPT-2's
    logits; the pure next-token, t+2 and z-loss functions on SIM-ONE's (soft-cap on, vocabulary
    300, padded to 320). tests/test_fast_path.py checks the chunked path against this one."""
    import copy

    from mvlm_trainer import CausalLMObjective, GPT2Shape, build_model
    from prioritary_mvlm.advanced_losses import CompositeObjective, multi_token_loss, next_token_loss, z_loss
    from prioritary_mvlm.config import simone_preset
    from simone_transformer import SimOneModel
    torch.manual_seed(0)
    x = torch.randint(0, 300, (3, 32))
    shape = GPT2Shape(n_layer=2, n_embd=32, n_head=4, **GPT2_NO_DROPOUT)
    gpt2 = CausalLMObjective(build_model(shape, 300, 32, 0), chunked_loss=False)
    reference_gpt2 = copy.deepcopy(gpt2)
    labels = torch.roll(x, -1, 1)
    reference_loss = torch.nn.functional.cross_entropy(reference_gpt2.logits(x).flatten(0, 1), labels.flatten())
    assert_same_loss_and_gradients(gpt2({"input_ids": x, "labels": labels})[0], gpt2, reference_loss, reference_gpt2)
    model = SimOneModel(simone_preset("tiny", vocab_size=300, max_seq_len=32, memory_tokens=2, logit_softcap=3.0))
    simone = CompositeObjective(model, {"coherence": 0.1, "stability": 1e-2}, adaptive=False, temperature=0.1,
                                chunked_loss=False)
    reference = copy.deepcopy(simone)
    out = reference.model(x)
    ahead = reference.model.logits(reference.multi_token_head(out.hidden_states))
    expected = next_token_loss(out.logits, labels) + 0.1 * multi_token_loss(ahead, labels) + 1e-2 * z_loss(out.logits)
    assert_same_loss_and_gradients(simone({"input_ids": x, "labels": labels})[0], simone, expected, reference)


def assert_same_loss_and_gradients(loss, module, expected, reference_module):
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    for (name, a), b in zip(module.named_parameters(), reference_module.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
