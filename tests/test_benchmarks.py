"""The benchmark code runs against today's models and APIs (the figures themselves are the
benchmarks' business, never a test's): one round of the model comparison at a toy shape."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
model_compare = pytest.importorskip("model_compare")


def test_the_model_comparison_runs_and_gives_every_ratio():
    import torch
    shape = model_compare.CompareShape(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=16,
                                       batch_size=2, memory_tokens=2, prompt_len=4, new_tokens=3)
    result = model_compare.compare_models(torch.device("cpu"), shape, steps=1, repeats=1)
    assert set(result["ratios"]) == {"simone_vs_llama_train_ratio", "simone_governed_vs_llama_train_ratio",
                                     "simone_chunked_ce_vs_llama_train_ratio", "simone_decode_vs_hf_generate_ratio"}
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    assert set(result["decode_tokens_per_s"]) == {"SIM-ONE generate, KV cache", "HF generate, KV cache"}
