"""The SIM-ONE tokenizer: a 32K byte-level BPE trained on the training split, in which the
"quality seeds" (frequent names and terms) are guaranteed single tokens.

Training and caching are the shared engine's (mvlm_engine.tokenizer); this module adds the
seed list and checks. Byte-level BPE round-trips any text exactly; saved as tokenizer.json.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from mvlm_engine.corpus import Corpus
from mvlm_engine.tokenizer import get_or_train_tokenizer


def build_simone_tokenizer(corpus: Corpus, vocab_size: int, quality_seeds: list[str],
                           cache_dir: Path) -> tuple[Tokenizer, Path]:
    """Train (or load from the cache) the BPE with every quality seed as one token (the seeds
    were checked as settings: single words without spaces)."""
    return get_or_train_tokenizer(corpus, vocab_size, cache_dir, required_words=tuple(quality_seeds))


def seeds_split_apart(tokenizer: Tokenizer, quality_seeds: list[str]) -> list[str]:
    """Seeds that do not encode as one token, bare or after a space (empty when all is well)."""
    return [seed for seed in quality_seeds
            if any(len(tokenizer.encode(form, add_special_tokens=False).ids) != 1 for form in (seed, " " + seed))]
