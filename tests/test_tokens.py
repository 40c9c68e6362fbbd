"""Tokenizer, token shards and the block sampler."""
import numpy as np
import pytest

from mvlm_engine.corpus import load_corpus
from mvlm_engine.data import BlockSampler, eval_windows
from mvlm_engine.errors import UserError
from mvlm_engine.shards import build_token_shards
from mvlm_engine.tokenizer import get_or_train_tokenizer, load_tokenizer, token_byte_lengths, tokenizer_hash


@pytest.fixture(scope="module")
def tokenized(small_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    corpus = load_corpus(small_corpus)
    tokenizer, path = get_or_train_tokenizer(corpus, 2000, cache)
    return corpus, tokenizer, path, cache


def test_round_trip_is_exact_spaces_included(tokenized):
    _, tokenizer, _, _ = tokenized
    for text in ["[KJV] John 3:16 For God so loved the world,", "  two  spaces\n\nand\ttabs ",
                 "Ünïcödé — “quotes” 123", ""]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_is_cached_and_reloads_identically(tokenized):
    corpus, tokenizer, path, cache = tokenized
    again, again_path = get_or_train_tokenizer(corpus, 2000, cache)
    assert again_path == path
    assert tokenizer_hash(again) == tokenizer_hash(load_tokenizer(path)) == tokenizer_hash(tokenizer)
    assert path.name == "tokenizer.json" and path.read_text().lstrip().startswith("{")


def test_shards_hold_every_document_and_are_cached(tokenized):
    corpus, tokenizer, _, cache = tokenized
    shards = build_token_shards(corpus, tokenizer, cache)
    val = np.asarray(shards.tokens("val"))
    expected = []
    for doc in corpus.documents("val"):
        expected += tokenizer.encode(doc).ids + [tokenizer.token_to_id("<|endoftext|>")]
    assert val.dtype == np.uint16 and val.tolist() == expected
    mtime = (shards.folder / "train.bin").stat().st_mtime_ns
    assert build_token_shards(corpus, tokenizer, cache).folder == shards.folder
    assert (shards.folder / "train.bin").stat().st_mtime_ns == mtime


def test_token_byte_lengths_count_utf8_bytes(tokenized):
    _, tokenizer, _, _ = tokenized
    lengths = token_byte_lengths(tokenizer)
    text = "In the beginning — “God” créa 42.\n"
    assert lengths[tokenizer.encode(text).ids].sum() == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_to_id("<|endoftext|>")] == 0


def test_sampler_resumes_exactly_across_epochs():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BlockSampler(tokens, block_size=16, batch_size=4, seed=7)
    first = [sampler.next_batch() for _ in range(20)]  # crosses an epoch boundary (~15 per epoch)
    assert sampler.state.epoch >= 1
    restored = BlockSampler(tokens, block_size=16, batch_size=4, seed=0)
    probe = BlockSampler(tokens, block_size=16, batch_size=4, seed=7)
    for _ in range(9):
        probe.next_batch()
    restored.load_state_dict(probe.state_dict())
    for x, y in first[9:]:
        rx, ry = restored.next_batch()
        assert (rx == x).all() and (ry == y).all()
    x, y = first[0]
    assert (y[:, :-1] == x[:, 1:]).all()


def test_sampler_epoch_visits_disjoint_windows():
    tokens = np.arange(2000, dtype=np.int64)
    sampler = BlockSampler(tokens, block_size=10, batch_size=3, seed=1)
    starts = [int(x[0, 0]) for x, _ in (sampler.next_batch() for _ in range(sampler.micro_batches_per_epoch()))]
    assert len(starts) == len(set(starts))


def test_ranks_split_the_global_batch():
    tokens = np.arange(5000, dtype=np.int64)
    single = BlockSampler(tokens, block_size=8, batch_size=4, seed=3)
    ranks = [BlockSampler(tokens, block_size=8, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, _ = single.next_batch()
        parts = [sampler.next_batch()[0] for sampler in ranks]
        assert (x == np.concatenate(parts)).all()


def test_too_little_data_is_a_clear_error():
    with pytest.raises(UserError, match="too few"):
        BlockSampler(np.arange(50), block_size=32, batch_size=4, seed=0)
    with pytest.raises(UserError, match="held-out"):
        eval_windows(np.arange(10), block_size=32, max_windows=4)
