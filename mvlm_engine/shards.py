"""Token shards: the corpus tokenized once into memory-mapped arrays, cached on disk.

<cache_dir>/tokens/<tokenizer hash>-<corpus hash>/{train.bin, val.bin, meta.json}
Each .bin is a flat uint16 (vocab <= 65536) or uint32 array: documents joined by EOS.
meta.json is written last, so a cache folder without it is an interrupted build.

The key holds the tokenizer's content hash and the corpus hash. Before a cache is used,
meta.json is checked, each shard's size must match it exactly and every id must be below the
vocabulary (one vectorised pass); a damaged cache is rebuilt with a warning. One process builds
a given cache at a time (a lock per key); a stop request ends a build between two batches.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .corpus import Corpus, load_corpus
from .errors import StorageError, UserError
from .fileio import atomic_write_text, ensure_free_space, remove_dead_staging, staging_path, storage_errors
from .locks import wait_for_lock
from .logs import get_logger
from .runtime import Runtime
from .stopping import STOP
from .tokenizer import eos_id, get_or_train_tokenizer, token_byte_lengths, tokenizer_hash

ENCODE_BATCH_DOCS = 256
# Text per encoding batch: ~0.5 MB per CPU core (1 MB on 2 cores), so that every core has books to
# encode and a batch still takes a second or so (a stop request waits for it at most).
ENCODE_BATCH_CHARS = (1 << 19) * max(2, os.cpu_count() or 2)
SPLITS = ("train", "val")
log = get_logger("cache")


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
    eos, count, vocab = eos_id(tokenizer), 0, tokenizer.get_vocab_size(with_added_tokens=True)
    with open(path, "wb") as out:
        batch: list[str] = []

        def flush():
            nonlocal count
            for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
                ids = np.asarray(encoding.ids + [eos], dtype=np.int64)
                if ids.max() >= vocab:
                    raise UserError(f"the tokenizer produced id {ids.max()} for a vocabulary of {vocab}; it is "
                                    "damaged: delete it from the cache and run again")
                ids.astype(dtype).tofile(out)
                count += ids.size
            batch.clear()
            STOP.check("building the token cache", "nothing was saved; the next run builds it again")

        chars = 0
        for document in corpus.documents(split):
            batch.append(document)
            chars += len(document)
            if len(batch) == ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                flush()
                chars = 0
        flush()
        out.flush()
        os.fsync(out.fileno())
    return count


def build_token_shards(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path) -> TokenShards:
    """Return the cached shards for (tokenizer, corpus), tokenizing only on a cache miss or
    when the cache is damaged."""
    tok_hash = tokenizer_hash(tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    folder = cache_dir / "tokens" / f"{tok_hash[:16]}-{corpus.hash[:16]}"
    expected = {"tokenizer_hash": tok_hash, "corpus_hash": corpus.hash, "vocab_size": vocab}
    shards = load_shards(folder, expected, warn=True)
    if shards is None:
        with storage_errors(folder.parent, "creating"):
            folder.parent.mkdir(parents=True, exist_ok=True)
        with wait_for_lock(folder.with_name(f"{folder.name}.lock"), "token cache build"):
            shards = load_shards(folder, expected, warn=False)  # built by another process meanwhile?
            if shards is None:
                rebuild(folder, corpus, tokenizer, tok_hash)
                shards = load_shards(folder, expected, warn=True)
        if shards is None:
            raise StorageError(f"the token cache {folder} was written but does not read back; delete it "
                               f"(rm -r '{folder}') and check the disk")
    if shards.meta["tokens"]["val"] == 0:
        raise UserError(f"the corpus in {corpus.root} has no held-out text; build it with held-out books "
                        "(prepare.py keeps them by default) or add more text")
    return shards


def rebuild(folder: Path, corpus: Corpus, tokenizer: Tokenizer, tok_hash: str) -> None:
    """Build the cache into `folder`; when a damaged one is there and cannot be replaced, say how to clear it."""
    damaged = folder.exists()
    try:
        remove_dead_staging(folder.parent)
        _tokenize_into(folder, corpus, tokenizer, tok_hash)
    except StorageError as err:
        if not damaged:
            raise
        raise StorageError(f"{err}; the damaged token cache {folder} could not be rebuilt: delete it "
                           f"(rm -r '{folder}') or pass another --cache_dir") from None


def load_shards(folder: Path, expected: dict, warn: bool) -> TokenShards | None:
    """The shards in `folder` if they are whole and match `expected`; None (with a warning when
    `warn` and something was there) if they must be built."""
    if not folder.exists():
        return None
    problem = shard_problem(folder, expected)
    if problem is None:
        return TokenShards(folder, json.loads((folder / "meta.json").read_text()))
    if warn:
        log.warning(f"WARNING: the token cache {folder} is not used: {problem}; building it again")
    return None


def shard_problem(folder: Path, expected: dict) -> str | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tokens = meta["tokens"]
        dtype = np.dtype(meta["dtype"])
        if dtype not in (np.uint16, np.uint32) or not all(isinstance(tokens[s], int) for s in SPLITS):
            return "meta.json is damaged"
    except FileNotFoundError:
        return "it has no meta.json (an interrupted build)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json is damaged ({type(err).__name__})"
    mismatched = [key for key, value in expected.items() if meta.get(key) != value]
    if mismatched:
        return f"meta.json does not match this tokenizer and corpus ({', '.join(mismatched)})"
    for split in SPLITS:
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != tokens[split] * dtype.itemsize:
            return f"{split}.bin has {size} bytes, meta.json says {tokens[split] * dtype.itemsize}"
        if tokens[split] and int(np.memmap(path, dtype=dtype, mode="r").max()) >= expected["vocab_size"]:
            return f"{split}.bin holds token ids outside the vocabulary of {expected['vocab_size']}"
    return None


def _tokenize_into(folder: Path, corpus: Corpus, tokenizer: Tokenizer, tok_hash: str) -> None:
    staging = staging_path(folder)  # unique per process (multi-node); a dead process's is removed
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    # About 3 bytes of text per token: the shards take about 2/3 of the corpus size per byte of dtype.
    needed = int(sum(f.path.stat().st_size for f in corpus.files) * np.dtype(dtype).itemsize / 1.5)
    ensure_free_space(folder.parent, needed, "the token cache", "; free some space or pass --cache_dir")
    try:
        with storage_errors(staging, "writing the token cache", needed):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            counts = {split: encode_split(corpus, split, tokenizer, staging / f"{split}.bin", dtype)
                      for split in SPLITS}
            meta = {"dtype": dtype, "tokens": counts, "tokenizer_hash": tok_hash, "corpus_hash": corpus.hash,
                    "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
            atomic_write_text(staging / "meta.json", json.dumps(meta, indent=1) + "\n")
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache (we hold its lock)
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # its space back at once
        raise


@dataclass
class TokenData:
    """What a run trains and evaluates on: the tokenizer, its file, the shards, bytes per token."""

    tokenizer: Tokenizer
    tokenizer_path: Path
    shards: TokenShards
    byte_lengths: np.ndarray
    timings: dict = field(default_factory=dict)  # seconds: corpus_index, tokenizer, shards (run_summary.json)

    @property
    def tokenizer_hash(self) -> str:
        return self.shards.meta["tokenizer_hash"]


def prepare_token_data(cfg, runtime: Runtime, tokenizer_factory=None) -> TokenData:
    """Corpus -> tokenizer -> token shards, all cached. The first process of each node builds
    (nodes may not share a filesystem); the others wait, then read the cache.

    tokenizer_factory(corpus, cache_dir) -> (Tokenizer, path) replaces the plain BPE."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data_dir) / ".cache"
    started = time.perf_counter()
    corpus = load_corpus(cfg.data_dir, announce=runtime.is_main)
    timings = {"corpus_index_seconds": time.perf_counter() - started}

    def build():
        started = time.perf_counter()
        if tokenizer_factory is not None:
            tokenizer, path = tokenizer_factory(corpus, cache)
        else:
            tokenizer, path = get_or_train_tokenizer(corpus, cfg.vocab_size, cache)
        timings["tokenizer_seconds"] = time.perf_counter() - started
        shards = build_token_shards(corpus, tokenizer, cache)
        timings["shards_seconds"] = time.perf_counter() - started - timings["tokenizer_seconds"]
        return tokenizer, path, shards

    builder = runtime.local_rank == 0
    with STOP.deferred():  # tokenizer training and encoding stop at their next check
        if not builder:
            runtime.barrier()
        tokenizer, path, shards = build()
        if builder:
            runtime.barrier()
    return TokenData(tokenizer, path, shards, token_byte_lengths(tokenizer), timings)
