#!/usr/bin/env python3
"""Time training a 32K byte-level BPE on the corpus and tokenizing it into token shards.

    python3 benchmarks/bench_tokenize.py [--data_dir mvlm_training_dataset_complete] [--vocab_size 32000]

Uses a fresh temporary cache, so nothing is reused from an earlier run. Prints seconds.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from mvlm_engine.corpus import load_corpus
from mvlm_engine.cli import run_cli
from mvlm_engine.shards import build_token_shards
from mvlm_engine.tokenizer import get_or_train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="mvlm_training_dataset_complete")
    parser.add_argument("--vocab_size", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        corpus = load_corpus(args.data_dir)
        indexed = time.perf_counter()
        tokenizer, _ = get_or_train_tokenizer(corpus, args.vocab_size, Path(cache))
        trained = time.perf_counter()
        shards = build_token_shards(corpus, tokenizer, Path(cache))
        done = time.perf_counter()
    chars = corpus.manifest["total_chars"] if corpus.manifest else "n/a"
    tokens = shards.meta["tokens"]
    print(f"corpus: {len(corpus.files)} files, {chars:,} characters; cpu threads: {torch.get_num_threads()}")
    print(f"index + hash corpus : {indexed - start:7.1f} s")
    print(f"train {args.vocab_size} BPE     : {trained - indexed:7.1f} s")
    print(f"tokenize to shards  : {done - trained:7.1f} s  "
          f"(train {tokens['train']:,} tokens, val {tokens['val']:,} tokens)")
    print(f"total               : {done - start:7.1f} s")


if __name__ == "__main__":
    run_cli("bench_tokenize.py", lambda argv: main(), None)
