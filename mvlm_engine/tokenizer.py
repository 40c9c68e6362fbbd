"""Byte-level BPE tokenizers trained on the corpus with the Rust `tokenizers` library.

Saved as tokenizer.json (never pickled). Byte-level BPE round-trips any text exactly,
spaces and newlines included. A trained tokenizer is cached by (corpus hash, settings),
so the two trainers and reruns do not retrain it; its sha256, recorded beside it, is checked
on every use, so an edited or damaged tokenizer.json is trained again (with a warning).

Training runs in a child process (`python -m mvlm_engine.tokenizer`): the Rust trainer cannot
be interrupted in the middle of a call, so a stop request abandons the child instead, within
a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import Corpus, CorpusFile
from .errors import StorageError, UserError
from .fileio import atomic_write_text, remove_dead_staging, sha256_file, staging_path, storage_errors
from .locks import wait_for_lock
from .logs import get_logger
from .stopping import STOP

log = get_logger("tokenizer")
SHA_NAME = "tokenizer.sha256"  # beside a cached tokenizer.json: the sha256 it had when it was trained

EOS_TOKEN = "<|endoftext|>"


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Content hash of a tokenizer: the same vocabulary and merges give the same hash."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


# The parts of a tokenizer.json that decide which ids a text gets and which text ids stand for.
ENCODING_PARTS = ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens")


def encoding_fingerprint(tokenizer: Tokenizer) -> str:
    """Hash of what maps text to ids and back (vocabulary, merges, added tokens, pre-tokenizer,
    normalizer, decoder). Unlike tokenizer_hash it leaves out the post-processor, padding and
    truncation, which a model folder's tokenizer.json gets from transformers when it is saved:
    a folder and the run that wrote it have the same fingerprint."""
    data = json.loads(tokenizer.to_str())
    return hashlib.sha256(json.dumps({k: data.get(k) for k in ENCODING_PARTS}, sort_keys=True).encode()).hexdigest()


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

    `required_words` must end up as single tokens (with and without a leading space). One
    process trains a given tokenizer at a time; the others wait for it, then load it.
    """
    settings = json.dumps({"vocab_size": vocab_size, "algorithm": "byte-level-bpe-v1",
                           "required_words": list(required_words)}, sort_keys=True)
    key = f"{corpus.hash[:16]}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
    path = cache_dir / "tokenizers" / key / "tokenizer.json"
    cached = load_cached_tokenizer(path, warn=True)
    if cached is not None:
        return cached, path
    with storage_errors(path.parent, "creating"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with wait_for_lock(path.parent.with_name(f"{key}.lock"), "tokenizer training"):
        cached = load_cached_tokenizer(path, warn=False)  # trained by another process meanwhile?
        if cached is None:
            remove_dead_staging(path.parent)
            cached = train_in_child(corpus, vocab_size, required_words, staging_path(path))
            save_tokenizer(cached, path)
            atomic_write_text(path.with_name(SHA_NAME), sha256_file(path) + "\n")
    return cached, path


def load_cached_tokenizer(path: Path, warn: bool) -> Tokenizer | None:
    """The cached tokenizer if it is whole and unchanged since it was trained, else None."""
    if not path.is_file():
        return None
    try:
        recorded = path.with_name(SHA_NAME).read_text().strip()
        if recorded == sha256_file(path):
            return load_tokenizer(path)
        problem = "its sha256 differs from the one recorded when it was trained (edited or damaged)"
    except (OSError, UserError) as err:
        problem = f"it cannot be checked ({err})"
    if warn:
        log.warning(f"WARNING: the cached tokenizer {path} is not used: {problem}; training it again")
    return None


def train_in_child(corpus: Corpus, vocab_size: int, required_words: tuple[str, ...], out: Path) -> Tokenizer:
    """Train in a child process (see the module docstring) that writes `out`; a stop request kills it."""
    spec = json.dumps({"root": str(corpus.root), "files": [[str(f.path), f.rel, f.split, f.sha256] for f in corpus.files],
                       "vocab_size": vocab_size, "required_words": list(required_words), "out": str(out),
                       "parent": os.getpid()})
    engine_parent = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [engine_parent, os.environ.get("PYTHONPATH")]))}
    spec_file = staging_path(out.parent / "training_spec.json")
    atomic_write_text(spec_file, spec)
    child = subprocess.Popen([sys.executable, "-m", "mvlm_engine.tokenizer", str(spec_file)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)  # a terminal's Ctrl-C reaches us, and we end it
    try:
        stderr = wait_for_child(child)
        if child.returncode != 0:
            raise child_error(child.returncode, stderr)
        return load_tokenizer(out)
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        out.unlink(missing_ok=True)
        spec_file.unlink(missing_ok=True)


def wait_for_child(child: subprocess.Popen) -> str:
    while True:
        try:
            return child.communicate(timeout=0.2)[1]
        except subprocess.TimeoutExpired:
            STOP.check("training the tokenizer", "nothing was saved; the next run trains it again")


def child_error(code: int, stderr: str) -> Exception:
    last = (stderr.strip().splitlines() or [""])[-1]
    kind, _, message = last.partition("\t")
    if kind == "user":
        return UserError(message)
    if kind == "storage":
        return StorageError(message)
    reason = f"killed by signal {-code} (out of memory?)" if code < 0 else last[:300] or f"exit status {code}"
    return UserError(f"training the tokenizer failed: {reason}")


def child_main() -> None:
    """The tokenizer-training child: a JSON spec file in argv[1], the tokenizer written to spec["out"]."""
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    files = tuple(CorpusFile(Path(p), rel, split, sha) for p, rel, split, sha in spec["files"])
    corpus = Corpus(Path(spec["root"]), files, None)
    try:
        tokenizer = train_bpe(corpus.documents("train"), spec["vocab_size"])
        if spec["required_words"]:
            tokenizer = force_single_tokens(tokenizer, tuple(spec["required_words"]))
        if os.getppid() != spec["parent"]:
            return  # the parent is gone: nobody wants this tokenizer any more
        with storage_errors(Path(spec["out"])):
            Path(spec["out"]).write_text(tokenizer.to_str(), encoding="utf-8")
    except UserError as err:
        print(f"user\t{err}", file=sys.stderr)
        sys.exit(2)
    except StorageError as err:
        print(f"storage\t{err}", file=sys.stderr)
        sys.exit(1)


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


if __name__ == "__main__":
    child_main()
