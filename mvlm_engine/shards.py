"""Token shards: the corpus tokenized once into memory-mapped arrays, cached on disk.

<cache_dir>/tokens/<tokenizer hash>-<corpus hash>/{train.bin, val.bin, meta.json}
Each .bin is a flat uint16 (vocab <= 65536) or uint32 array: documents joined by EOS.
meta.json is written last, so a cache folder without it is an interrupted build.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .corpus import Corpus, load_corpus
from .errors import UserError
from .fileio import atomic_write_text
from .runtime import Runtime
from .tokenizer import eos_id, get_or_train_tokenizer, token_byte_lengths, tokenizer_hash

ENCODE_BATCH_DOCS = 256


@dataclass(frozen=True)
class TokenShards:
    folder: Path
    meta: dict

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_split(corpus: Corpus, split: str, tokenizer: Tokenizer, path: Path, dtype: str) -> int:
    """Tokenize one split in parallel batches, appending EOS after every document."""
    eos, count = eos_id(tokenizer), 0
    with open(path, "wb") as out:
        batch: list[str] = []

        def flush():
            nonlocal count
            for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
                ids = np.asarray(encoding.ids + [eos], dtype=dtype)
                ids.tofile(out)
                count += ids.size
            batch.clear()

        for document in corpus.documents(split):
            batch.append(document)
            if len(batch) == ENCODE_BATCH_DOCS:
                flush()
        flush()
        out.flush()
        os.fsync(out.fileno())
    return count


def build_token_shards(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path) -> TokenShards:
    """Return the cached shards for (tokenizer, corpus), tokenizing only on a cache miss."""
    tok_hash = tokenizer_hash(tokenizer)
    folder = cache_dir / "tokens" / f"{tok_hash[:16]}-{corpus.hash[:16]}"
    if not (folder / "meta.json").is_file():
        _tokenize_into(folder, corpus, tokenizer, tok_hash)
    shards = TokenShards(folder, json.loads((folder / "meta.json").read_text()))
    if shards.meta["tokens"]["val"] == 0:
        raise UserError(f"the corpus in {corpus.root} has no held-out text; build it with held-out books "
                        "(prepare.py keeps them by default) or add more text")
    return shards


def _tokenize_into(folder: Path, corpus: Corpus, tokenizer: Tokenizer, tok_hash: str) -> None:
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")  # unique per process (multi-node)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    counts = {split: encode_split(corpus, split, tokenizer, staging / f"{split}.bin", dtype)
              for split in ("train", "val")}
    meta = {"dtype": dtype, "tokens": counts, "tokenizer_hash": tok_hash, "corpus_hash": corpus.hash,
            "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    atomic_write_text(staging / "meta.json", json.dumps(meta, indent=1) + "\n")
    if (folder / "meta.json").is_file():  # another node on a shared filesystem finished first
        shutil.rmtree(staging)
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


@dataclass
class TokenData:
    """What a run trains and evaluates on: the tokenizer, its file, the shards, bytes per token."""

    tokenizer: Tokenizer
    tokenizer_path: Path
    shards: TokenShards
    byte_lengths: np.ndarray

    @property
    def tokenizer_hash(self) -> str:
        return self.shards.meta["tokenizer_hash"]


def prepare_token_data(cfg, runtime: Runtime, tokenizer_factory=None) -> TokenData:
    """Corpus -> tokenizer -> token shards, all cached. The first process of each node builds
    (nodes may not share a filesystem); the others wait, then read the cache.

    tokenizer_factory(corpus, cache_dir) -> (Tokenizer, path) replaces the plain BPE."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data_dir) / ".cache"
    corpus = load_corpus(cfg.data_dir)

    def build():
        if tokenizer_factory is not None:
            tokenizer, path = tokenizer_factory(corpus, cache)
        else:
            tokenizer, path = get_or_train_tokenizer(corpus, cfg.vocab_size, cache)
        return tokenizer, path, build_token_shards(corpus, tokenizer, cache)

    builder = runtime.local_rank == 0
    if not builder:
        runtime.barrier()
    tokenizer, path, shards = build()
    if builder:
        runtime.barrier()
    return TokenData(tokenizer, path, shards, token_byte_lengths(tokenizer))
