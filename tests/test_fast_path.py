"""The CPU fast path computes what the old path computed: chunked cross-entropy (values and
gradients, both objectives), verse pairs from the per-run cache, and prefetched batches that
resume exactly."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def test_chunked_cross_entropy_and_z_loss_match_the_full_logits_in_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    log_partition, target_logit = linear_log_partition(hidden, weight, targets, chunk_rows=64)
    ours = cross_entropy_from_log_partition(log_partition, target_logit) + 0.1 * z_loss_from_log_partition(
        log_partition)
    logits = hidden @ weight.T
    reference = F.cross_entropy(logits, targets) + 0.1 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


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
    full = CausalLMObjective(build_model(GPT2Shape(n_layer=2, n_embd=32, n_head=4), 300, 32, 0), chunked_loss=False)
    chunked = copy.deepcopy(full)
    chunked.chunked_loss = True
    x = torch.randint(0, 300, (3, 32))
    assert_same_loss_and_gradients(full, chunked, {"input_ids": x, "labels": torch.roll(x, -1, 1)})


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
