"""Byte-level BPE tokenizers trained on the corpus with the Rust `tokenizers` library.

Saved as tokenizer.json (never pickled). Byte-level BPE round-trips any text exactly,
spaces and newlines included. A trained tokenizer is cached by (corpus hash, settings),
so the two trainers and reruns do not retrain it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import Corpus
from .errors import UserError
from .fileio import atomic_write_text

EOS_TOKEN = "<|endoftext|>"


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Content hash of a tokenizer: the same vocabulary and merges give the same hash."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tokenizer.to_str())


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a plain Exception on bad JSON
        raise UserError(f"{path} is not a valid tokenizer.json ({str(err).splitlines()[0]})") from None


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (byte-level pre-tokenization: words, numbers, punctuation) on documents."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def force_single_tokens(tokenizer: Tokenizer, words: tuple[str, ...]) -> Tokenizer:
    """Append BPE merges so that each word, bare and after a space, encodes as one token.

    The merges go after all learnt ones, so they only join the pieces these words already
    split into; every other text tokenizes as before or with a longer match, still lossless.
    """
    data = json.loads(tokenizer.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    next_id = max(vocab.values()) + 1
    forced = tokenizer
    for form in (f for word in words for f in (word, " " + word)):
        # Re-encode with the merges added so far; no earlier merge joins these pieces, so a
        # left-to-right chain of new merges (each with a brand-new left side) makes one token.
        pieces = forced.encode(form, add_special_tokens=False).tokens
        if len(pieces) == 1:
            continue
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append([pieces[0], pieces[1]])
            if merged not in vocab:
                vocab[merged] = next_id
                next_id += 1
            pieces = [merged] + pieces[2:]
        forced = Tokenizer.from_str(json.dumps(data))
    broken = [w for w in words for form in (w, " " + w) if len(forced.encode(form).ids) != 1]
    if broken:
        raise UserError(f"could not make these words single tokens: {', '.join(sorted(set(broken)))}")
    return forced


def get_or_train_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path,
                           required_words: tuple[str, ...] = ()) -> tuple[Tokenizer, Path]:
    """Load the cached tokenizer for this corpus and settings, or train and cache it.

    `required_words` must end up as single tokens (with and without a leading space).
    """
    settings = json.dumps({"vocab_size": vocab_size, "algorithm": "byte-level-bpe-v1",
                           "required_words": list(required_words)}, sort_keys=True)
    key = f"{corpus.hash[:16]}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
    path = cache_dir / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path), path
    tokenizer = train_bpe(corpus.documents("train"), vocab_size)
    if required_words:
        tokenizer = force_single_tokens(tokenizer, required_words)
    save_tokenizer(tokenizer, path)
    return tokenizer, path


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise UserError(f"the tokenizer has no {EOS_TOKEN} token; retrain it with this project")
    return token_id


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens): exact bits per byte.

    Every character of a byte-level BPE token is one of 256 stand-ins for one byte.
    """
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    specials = {tok.content for tok in tokenizer.get_added_tokens_decoder().values() if tok.special}
    for token, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        if token not in specials:
            lengths[idx] = len(token)
    return lengths


def hf_tokenizer(tokenizer_file: str | Path, model_max_length: int):
    """Wrap a tokenizer.json as a transformers PreTrainedTokenizerFast with bos/eos/pad set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=EOS_TOKEN,
                                   eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                   model_max_length=model_max_length)


def save_hf_tokenizer(tokenizer_file: str | Path, model_max_length: int, out: Path) -> dict:
    """Write tokenizer.json + tokenizer_config.json into a model folder; return the special ids
    ({"bos_token_id", "eos_token_id", "pad_token_id"}) for the model's config."""
    tokenizer = hf_tokenizer(tokenizer_file, model_max_length)
    token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != EOS_TOKEN:
        raise UserError(f"{tokenizer_file} has no {EOS_TOKEN} token; retrain the tokenizer with this project")
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own backend's class name ("TokenizersBackend"), which 4.x lacks;
    # "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length)
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": token_id}
