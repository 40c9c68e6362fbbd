"""Parallel verses: the same verse in two translations, from verses.jsonl, and what is done
with them: padded encoding, mean pooling of hidden states, and retrieval@1.

Used by a content-alignment training loss (training split) and by the parallel-verse
retrieval@1 metric of validation (held-out split).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .corpus import VERSES_NAME
from .errors import UserError


def verses_path(data_dir: str | Path) -> Path:
    path = Path(data_dir) / VERSES_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing; the alignment loss and retrieval metric need it "
                        "(rebuild the corpus with prepare.py, or set --alignment_weight 0)")
    return path


def read_verses(path: Path) -> dict[str, dict[tuple, dict[str, str]]]:
    """verses.jsonl as {split: {(book, chapter, verse): {translation: text}}}."""
    grouped: dict[str, dict[tuple, dict[str, str]]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                key = (record["book"], record["chapter"], record["verse"])
                grouped.setdefault(record["split"], {}).setdefault(key, {})[record["translation"]] = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{number} is not a verse record; rebuild the corpus") from None
    return grouped


class ParallelVerses:
    """Verses of one split that exist in at least two translations, in a fixed order."""

    def __init__(self, data_dir: str | Path, split: str, grouped: dict | None = None):
        """`grouped`: read_verses' result, when one read serves several splits (of_splits)."""
        path = verses_path(data_dir)
        by_reference = (read_verses(path) if grouped is None else grouped).get(split, {})
        self.references = [key for key, texts in by_reference.items() if len(texts) >= 2]
        self.texts = [by_reference[key] for key in self.references]
        if not self.references:
            raise UserError(f"{path} has no verse of the {split} split in two or more translations")

    @classmethod
    def of_splits(cls, data_dir: str | Path, splits: tuple[str, ...]) -> list[ParallelVerses]:
        """One ParallelVerses per split, from one read of verses.jsonl."""
        grouped = read_verses(verses_path(data_dir))
        return [cls(data_dir, split, grouped) for split in splits]

    def __len__(self) -> int:
        return len(self.references)

    def sample_keys(self, rng: np.random.Generator, count: int) -> tuple[list[tuple], list[tuple]]:
        """`count` distinct verses, each in two different random translations, as
        (verse index, translation) keys: the first translation's, then the second's."""
        picks = rng.choice(len(self.references), size=min(count, len(self.references)), replace=False)
        first, second = [], []
        for index in picks:
            a, b = rng.choice(sorted(self.texts[index]), size=2, replace=False)
            first.append((int(index), str(a)))
            second.append((int(index), str(b)))
        return first, second

    def text(self, key: tuple) -> str:
        index, translation = key
        return self.texts[index][translation]

    def sample(self, rng: np.random.Generator, count: int) -> tuple[list[str], list[str]]:
        """`count` distinct verses, each in two different random translations."""
        first, second = self.sample_keys(rng, count)
        return [self.text(k) for k in first], [self.text(k) for k in second]


class EncodedPairs:
    """The pairs of micro-batch i as padded (2P, max_tokens) ids and mask, the same as
    `encode_padded` of `sample(default_rng([seed, i, rank]), P)` (a pure function of seed, i
    and rank), without a tokenizer call per micro-step: every verse text is tokenized at most
    once per run (kept, truncated, in a dict) and the new texts of `block` consecutive
    micro-batches are tokenized in one call."""

    def __init__(self, verses: ParallelVerses, tokenizer, count: int, max_tokens: int, pad_id: int, seed: int,
                 rank: int, block: int = 64):
        self.verses, self.tokenizer, self.count, self.max_tokens = verses, tokenizer, count, max_tokens
        self.pad_id, self.seed, self.rank, self.block = pad_id, seed, rank, block
        self.encoded: dict[tuple, np.ndarray] = {}
        self.block_start, self.block_keys = -1, []

    def keys(self, index: int) -> list[tuple]:
        first, second = self.verses.sample_keys(np.random.default_rng([self.seed, index, self.rank]), self.count)
        return first + second

    def _encode_block(self, start: int) -> None:
        self.block_keys = [self.keys(i) for i in range(start, start + self.block)]
        missing = sorted({key for keys in self.block_keys for key in keys if key not in self.encoded})
        encodings = self.tokenizer.encode_batch([self.verses.text(k) for k in missing], add_special_tokens=False)
        for key, encoding in zip(missing, encodings):
            self.encoded[key] = np.asarray(encoding.ids[:self.max_tokens], dtype=np.int64)
        self.block_start = start

    def pairs(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index - index % self.block
        if start != self.block_start:
            self._encode_block(start)
        keys = self.block_keys[index - start]
        ids = np.full((len(keys), self.max_tokens), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(keys), self.max_tokens), dtype=np.int64)
        for row, key in enumerate(keys):
            tokens = self.encoded[key]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)


def encode_padded(tokenizer, texts: list[str], max_tokens: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, max_tokens) right-padded with pad_id, and the 0/1 mask of real tokens."""
    ids = torch.full((len(texts), max_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_tokens), dtype=torch.long)
    for row, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        tokens = encoding.ids[:max_tokens]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, D), mask (B, T) of 0/1 -> (B, D) average over the unmasked positions."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def retrieval_at_1(embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokenizer, first: list[str],
                   second: list[str], max_tokens: int, pad_id: int, batch_size: int = 64) -> float:
    """Share of verses in `first` whose most similar (cosine) row in `second` is the same verse.

    embed(ids, mask) -> (N, D) pooled embeddings.
    """
    def embed_all(texts):
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_padded(tokenizer, texts[start:start + batch_size], max_tokens, pad_id)
            chunks.append(torch.nn.functional.normalize(embed(ids, mask).float(), dim=-1))
        return torch.cat(chunks)

    a, b = embed_all(first), embed_all(second)
    best = (a @ b.T).argmax(dim=1)  # (N,)
    return (best == torch.arange(len(first), device=best.device)).float().mean().item()
