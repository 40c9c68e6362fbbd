"""The CPU fast path computes what the old path computed: chunked cross-entropy (values and
gradients, both objectives, z-loss, soft-cap, vocabulary padding), fused layers (SIM-ONE's
RMSNorm and SwiGLU, GPT-2's GELU), verse pairs from the per-run cache, and prefetched batches
that resume exactly. Every old path stays reachable through its setting."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import GPT2_NO_DROPOUT
from mvlm_engine.data import BlockSampler, LMBatches
from mvlm_engine.losses import (cross_entropy_from_log_partition, linear_log_partition, z_loss_from_log_partition)
from mvlm_engine.parallel_verses import EncodedPairs, ParallelVerses, encode_padded
from mvlm_engine.prefetch import PrefetchedBatches
from mvlm_engine.tokenizer import train_bpe
from prioritary_mvlm.advanced_losses import CompositeObjective
from prioritary_mvlm.config import simone_preset
from simone_transformer import SimOneModel


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_chunked_log_partition_has_exact_gradients(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)  # 37 rows: a ragged last chunk
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    assert torch.autograd.gradcheck(
        lambda h, w: linear_log_partition(h, w, targets, softcap=softcap, chunk_rows=8), (hidden, weight))


@pytest.mark.parametrize("vocab", [1000, 1024])  # padded to 1024 inside the loss; already a multiple of 64
def test_chunked_cross_entropy_and_z_loss_match_the_full_logits_in_fp32(vocab):
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(vocab, 32, requires_grad=True)
    targets = torch.randint(0, vocab, (300,))
    log_partition, target_logit = linear_log_partition(hidden, weight, targets, chunk_rows=64)
    ours = cross_entropy_from_log_partition(log_partition, target_logit) + 0.1 * z_loss_from_log_partition(
        log_partition)
    logits = hidden @ weight.T
    reference = F.cross_entropy(logits, targets) + 0.1 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_under_bf16_autocast_matches_full_logits():
    """Matmuls in bf16, softmax statistics in fp32, as F.linear(...).float() does under autocast."""
    torch.manual_seed(0)
    hidden = torch.randn(200, 64, requires_grad=True)
    weight = torch.randn(500, 64, requires_grad=True)
    targets = torch.randint(0, 500, (200,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cross_entropy_from_log_partition(*linear_log_partition(hidden, weight, targets, chunk_rows=64))
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def assert_same_loss_and_gradients(full, chunked, batch):
    loss_full, terms_full = full(batch)
    loss_chunked, terms_chunked = chunked(batch)
    torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-6, atol=1e-6)
    assert terms_full.keys() == terms_chunked.keys()
    for key in terms_full:
        torch.testing.assert_close(terms_chunked[key], terms_full[key], rtol=1e-6, atol=1e-6)
    loss_full.backward()
    loss_chunked.backward()
    for (name, a), (_, b) in zip(full.named_parameters(), chunked.named_parameters()):
        grad_a = torch.zeros_like(a) if a.grad is None else a.grad
        torch.testing.assert_close(b.grad, grad_a, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tied, softcap", [(True, 0.0), (False, 0.0), (True, 3.0)])
def test_simone_objective_chunked_equals_full_logits(tied, softcap):
    """Every term (next-token, t+2, z-loss, alignment) and every gradient; with the recipe's
    logit soft-cap on, the chunked pass must apply the cap (and its tanh' in the backward) too."""
    torch.manual_seed(0)
    model = SimOneModel(simone_preset("tiny", vocab_size=300, max_seq_len=32, memory_tokens=2, tie_embeddings=tied,
                                      logit_softcap=softcap))
    weights = {"coherence": 0.1, "alignment": 0.1, "stability": 1e-2}
    full = CompositeObjective(model, weights, adaptive=True, temperature=0.1, chunked_loss=False)
    chunked = copy.deepcopy(full)
    chunked.chunked_loss = True
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (3, 32), generator=g)
    batch = {"input_ids": x, "labels": torch.randint(0, 300, (3, 32), generator=g),
             "pair_ids": torch.randint(0, 300, (4, 8), generator=g), "pair_mask": torch.ones(4, 8)}
    assert_same_loss_and_gradients(full, chunked, batch)


def test_gpt2_objective_chunked_equals_full_logits():
    from mvlm_trainer import CausalLMObjective, GPT2Shape, build_model

    torch.manual_seed(0)
    full = CausalLMObjective(build_model(GPT2Shape(n_layer=2, n_embd=32, n_head=4, **GPT2_NO_DROPOUT), 300, 32, 0), chunked_loss=False)
    chunked = copy.deepcopy(full)
    chunked.chunked_loss = True
    x = torch.randint(0, 300, (3, 32))
    assert_same_loss_and_gradients(full, chunked, {"input_ids": x, "labels": torch.roll(x, -1, 1)})


def simone_pair(**overrides):
    torch.manual_seed(0)
    fused = SimOneModel(simone_preset("tiny", vocab_size=300, max_seq_len=32, memory_tokens=2, **overrides))
    plain = copy.deepcopy(fused)
    plain.use_fused_layers(False)
    return fused, plain


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "value_embeddings": True, "policy_gate": False}])
def test_fused_layers_equal_plain_ops(overrides):
    """Same logits bit for bit (the forward arithmetic is the same); gradients to fp32 rounding."""
    fused, plain = simone_pair(**overrides)
    assert sum(m.fused for m in fused.modules() if hasattr(m, "fused")) >= 2 * fused.config.n_layers
    x = torch.randint(0, 300, (3, 32))
    logits_fused, logits_plain = fused(x).logits, plain(x).logits
    assert torch.equal(logits_fused, logits_plain)
    logits_fused.square().mean().backward()
    logits_plain.square().mean().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_layers_equal_plain_ops_under_bf16_autocast():
    fused, plain = simone_pair()
    x = torch.randint(0, 300, (3, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_fused, logits_plain = fused(x).logits, plain(x).logits
    assert torch.equal(logits_fused, logits_plain)
    logits_fused.float().square().mean().backward()
    logits_plain.float().square().mean().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=1e-4, msg=name)


def test_gpt2_fused_gelu_equals_gelu_new():
    """gelu_pytorch_tanh and gelu_new are the same function (the tanh approximation)."""
    from mvlm_trainer import GPT2Shape, build_model

    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        models.append(build_model(GPT2Shape(n_layer=2, n_embd=32, n_head=4, **GPT2_NO_DROPOUT), 300, 32, 0, fused_gelu=fused))
    assert [m.config.activation_function for m in models] == ["gelu_pytorch_tanh", "gelu_new"]
    x = torch.randint(0, 300, (3, 32))
    logits = [m(input_ids=x).logits for m in models]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    for out in logits:
        out.square().mean().backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def old_and_fast_objectives(model: str) -> list:
    """The objective the registry's hook builds for `model` at the tiny preset, fast path on, then off."""
    from model_registry import MODELS
    from mvlm_engine.cli import resolve_settings

    spec = MODELS[model]
    return [spec.build_objective(resolve_settings(spec.run_config(), {"preset": "tiny", "vocab_size": 300, **extra}, {}))
            for extra in ({}, {"chunked_loss": False, "fused_layers": False})]


def test_old_path_settings_reach_the_gpt2_objective():
    """--no_chunked_loss and --no_fused_layers switch the built objective back to the old path."""
    objectives = old_and_fast_objectives("gpt2")
    assert [o.model.config.activation_function for o in objectives] == ["gelu_pytorch_tanh", "gelu_new"]
    assert [o.chunked_loss for o in objectives] == [True, False]


def test_old_path_settings_reach_the_simone_objective():
    objectives = old_and_fast_objectives("simone")
    assert [{m.fused for m in o.modules() if hasattr(m, "fused")} for o in objectives] == [{True}, {False}]
    assert [o.chunked_loss for o in objectives] == [True, False]


def test_cached_pairs_equal_pairs_tokenized_every_micro_step(small_corpus):
    verses = ParallelVerses(small_corpus, "train")
    tokenizer = train_bpe((verses.text((i, t)) for i in range(len(verses)) for t in verses.texts[i]), 300)
    encoded = EncodedPairs(verses, tokenizer, count=4, max_tokens=12, pad_id=0, seed=3, rank=1, block=8)
    for index in [*range(20), 5, 40, 2]:  # in order, then jumps back and forth, as after a resume
        first, second = verses.sample(np.random.default_rng([3, index, 1]), 4)
        ids, mask = encode_padded(tokenizer, first + second, 12, 0)
        got_ids, got_mask = encoded.pairs(index)
        assert torch.equal(got_ids, ids) and torch.equal(got_mask, mask), index


def lm_batches():
    return LMBatches(BlockSampler(np.arange(5000, dtype=np.uint16), block_size=16, batch_size=4, seed=7))


def test_prefetched_batches_are_the_same_batches_and_resume_exactly():
    plain, prefetched = lm_batches(), PrefetchedBatches(lm_batches(), torch.device("cpu"))
    for _ in range(5):
        assert torch.equal(plain.next_batch()["input_ids"], prefetched.next_batch()["input_ids"])
    # A checkpoint now: the batch the worker has already drawn is not counted as handed out.
    state = prefetched.state_dict()
    assert state == plain.state_dict()
    expected = [plain.next_batch()["input_ids"] for _ in range(3)]
    resumed = PrefetchedBatches(lm_batches(), torch.device("cpu"))
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()["input_ids"], e) for e in expected)
    prefetched.load_state_dict(state)  # rewinding a source that has a batch in flight
    assert all(torch.equal(prefetched.next_batch()["input_ids"], e) for e in expected)
