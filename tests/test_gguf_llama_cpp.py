"""llama.cpp runs the exported GGUF files as transformers runs the folders (end to end, marked e2e).

Opt-in: llama.cpp itself through its Python binding, which compiles llama.cpp from source (a few
minutes on CPU) and is deliberately not in requirements.txt:

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
    python -m pytest -q tests/test_gguf_llama_cpp.py -m e2e

They export a tiny trained MVLM-GPT2 and a tiny trained governance-off SIM-ONE and check that
llama.cpp reproduces transformers: the same 20 greedy tokens, the same held-out perplexity
within 0.1%, the same token ids for awkward text. Without llama_cpp those are skipped.
What packaging ships (f16, q8_0 and 4-bit files) and their checks in llama.cpp: test_gguf_quantized.py.
"""
import json

import pytest

from conftest import TEST_VOCAB

gguf = pytest.importorskip("gguf")

from helpers.gguf_files import PROMPT, Pair, export_ok, held_out_text, perplexities  # noqa: E402


TRICKY_TEXTS = [
    "naïve café façade — “smart quotes” and ‘single’ … ½ ©",
    "emoji 🙏🏽 family 👨‍👩‍👧 flag 🇬🇧 rocket🚀🚀",
    "中文圣经 日本語の聖書 한국어 성경 עברית ελληνικά русский",
    "runs   of    spaces\n\n\nand\n \n  newlines\t\ttabs\r\nCRLF   ",
    "   leading spaces, trailing spaces   ",
    "numbers 1234567 3.14159 1,000,000 and 'tis I'M they've we'LL",
    "\n\n",
]


def check_llama_cpp_reproduces_transformers(model_dir, corpus_dir, tmp_path, llama_cpp):
    pair = Pair(model_dir, export_ok(model_dir, tmp_path / "model.gguf"), llama_cpp)
    for text in [PROMPT, held_out_text(corpus_dir, 400), *TRICKY_TEXTS]:
        assert pair.cpp_ids(text) == pair.hf_ids(text), repr(text)
    special = "end<|endoftext|>The beginning"
    assert pair.cpp_ids(special, special=True) == pair.hf_ids(special)
    prompt = pair.hf_ids(PROMPT)
    hf_tokens, cpp_tokens = pair.hf_greedy(prompt, 20), pair.cpp_greedy(prompt, 20)
    assert cpp_tokens == hf_tokens, (pair.tokenizer.decode(hf_tokens), pair.tokenizer.decode(cpp_tokens))
    hf_ppl, cpp_ppl, n_tokens = perplexities(pair, held_out_text(corpus_dir))
    model_type = json.loads((model_dir / 'config.json').read_text())['model_type']
    print(f"\n{model_type}: greedy {sum(a == b for a, b in zip(hf_tokens, cpp_tokens))}/20 equal; held-out "
          f"perplexity over {n_tokens} tokens: transformers {hf_ppl:.4f}, llama.cpp {cpp_ppl:.4f} "
          f"({100 * (cpp_ppl / hf_ppl - 1):+.4f}%)")
    assert hf_ppl < TEST_VOCAB / 4  # a trained model, so agreement means something
    assert abs(cpp_ppl / hf_ppl - 1) < 1e-3


@pytest.mark.e2e
def test_llama_cpp_runs_mvlm_gpt2_as_transformers_does(llama_cpp, trained_gpt2, small_corpus, tmp_path):
    check_llama_cpp_reproduces_transformers(trained_gpt2, small_corpus, tmp_path, llama_cpp)


@pytest.mark.e2e
def test_llama_cpp_runs_simone_as_transformers_does(llama_cpp, plain_simone, small_corpus, tmp_path):
    check_llama_cpp_reproduces_transformers(plain_simone, small_corpus, tmp_path, llama_cpp)
