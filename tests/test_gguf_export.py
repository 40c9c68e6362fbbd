"""export_gguf.py (release/gguf_conversion.py): the GGUF file of MVLM-GPT2, SIM-ONE and Llama folders.

Unit tests (run wherever the `gguf` package is installed, as in CI; seconds): the file reads
back with gguf's GGUFReader with the right architecture, tensors and tokenizer keys; q/k rows
are reordered so llama.cpp's RoPE computes what transformers' does; f16 and q8_0 store what they
should. They build random-weight folders the way the trainers save them (conftest's gpt2_dir,
simone_dir) and call export_gguf in-process. Refusals: test_gguf_refusals.py; llama.cpp itself:
test_gguf_llama_cpp.py; what packaging ships: test_gguf_quantized.py.
"""
import json

import numpy as np
import pytest

from conftest import REPO, import_script, save_simone

gguf = pytest.importorskip("gguf")

from helpers.gguf_files import export_ok, exporter, field, read_gguf  # noqa: E402

EXPORT_LLAMA = REPO / "SIM-ONE Training" / "export_llama.py"


# --------------------------------------------------------------------------- the file


def test_gpt2_folder_reads_back_as_gpt2_with_transposed_conv1d(gpt2_dir, tmp_path):
    from safetensors.numpy import load_file
    out = tmp_path / "gpt2.gguf"
    assert exporter.export(gpt2_dir, out).startswith(f"wrote {out} (gpt2, f32, 28 tensors")
    reader, tensors = read_gguf(out)
    config = json.loads((gpt2_dir / "config.json").read_text())
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == 64 and field(reader, "gpt2.block_count") == 2
    assert field(reader, "gpt2.embedding_length") == 64 and field(reader, "gpt2.feed_forward_length") == 256
    assert field(reader, "gpt2.attention.head_count") == 4
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(config["layer_norm_epsilon"])
    per_layer = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    assert set(tensors) == ({"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
                            | {f"blk.{i}.{p}.{s}" for i in range(2) for p in per_layer for s in ("weight", "bias")})
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    weights = load_file(str(gpt2_dir / "model.safetensors"))
    prefix = "transformer." if "transformer.wte.weight" in weights else ""
    qkv = weights[f"{prefix}h.1.attn.c_attn.weight"]  # Conv1D: (in, out)
    assert np.array_equal(tensors["blk.1.attn_qkv.weight"].data, qkv.T)
    assert list(tensors["blk.1.attn_qkv.weight"].shape) == [64, 192]  # ggml order: (in, out)
    assert np.array_equal(tensors["token_embd.weight"].data, weights[f"{prefix}wte.weight"])


def test_tokenizer_keys_match_the_hf_tokenizer(gpt2_dir, tmp_path):
    from transformers import AutoTokenizer
    out = tmp_path / "gpt2.gguf"
    export_ok(gpt2_dir, out)
    reader, _ = read_gguf(out)
    hf = AutoTokenizer.from_pretrained(gpt2_dir)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert tokens == hf.convert_ids_to_tokens(list(range(len(hf))))
    eos = hf.convert_tokens_to_ids("<|endoftext|>")
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[eos] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == len(tokens) - 1
    merges = json.loads((gpt2_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    for role in ("bos", "eos", "padding"):
        assert field(reader, f"tokenizer.ggml.{role}_token_id") == eos
    assert field(reader, "tokenizer.ggml.add_bos_token") is False


def rope_hf(vec, pos, theta):
    """transformers' rotate-half RoPE of one head vector."""
    half = len(vec) // 2
    angle = pos * theta ** (-np.arange(half) * 2.0 / len(vec))
    a, b = vec[:half], vec[half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)])


def rope_llama_cpp(vec, pos, theta):
    """llama.cpp's llama RoPE (LLAMA_ROPE_TYPE_NORM): rotates adjacent pairs (2i, 2i+1)."""
    angle = pos * theta ** (-np.arange(len(vec) // 2) * 2.0 / len(vec))
    a, b = vec[0::2], vec[1::2]
    out = np.empty_like(vec)
    out[0::2], out[1::2] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
    return out


def test_simone_qk_rows_make_llama_cpp_rope_give_transformers_scores(simone_dir, tmp_path):
    from safetensors.numpy import load_file
    out = tmp_path / "simone.gguf"
    export_ok(simone_dir, out)
    reader, tensors = read_gguf(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.attention.head_count") == 4 and field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.freq_base") == pytest.approx(5e5)
    assert field(reader, "llama.rope.dimension_count") == 16 and field(reader, "llama.context_length") == 64
    weights = load_file(str(simone_dir / "model.safetensors"))
    q_hf, k_hf = weights["model.layers.1.self_attn.q_proj.weight"], weights["model.layers.1.self_attn.k_proj.weight"]
    q_cpp, k_cpp = tensors["blk.1.attn_q.weight"].data, tensors["blk.1.attn_k.weight"].data
    assert not np.array_equal(q_cpp, q_hf)  # the rows did move
    rng = np.random.default_rng(0)
    x_query, x_key = rng.standard_normal(64), rng.standard_normal(64)
    for head in range(4):
        q_rows, k_rows = slice(16 * head, 16 * head + 16), slice(16 * (head // 2), 16 * (head // 2) + 16)
        hf = rope_hf(q_hf[q_rows] @ x_query, 9, 5e5) @ rope_hf(k_hf[k_rows] @ x_key, 4, 5e5)
        cpp = rope_llama_cpp(q_cpp[q_rows] @ x_query, 9, 5e5) @ rope_llama_cpp(k_cpp[k_rows] @ x_key, 4, 5e5)
        assert cpp == pytest.approx(hf, rel=1e-5, abs=1e-6)
    assert np.array_equal(tensors["blk.1.attn_v.weight"].data, weights["model.layers.1.self_attn.v_proj.weight"])


def test_llama_export_folder_gives_the_same_gguf_tensors(simone_dir, tmp_path):
    llama_dir = tmp_path / "llama"
    import_script(EXPORT_LLAMA, "export_llama").export(simone_dir, llama_dir)
    export_ok(simone_dir, tmp_path / "simone.gguf")
    export_ok(llama_dir, tmp_path / "llama.gguf")
    simone_reader, simone = read_gguf(tmp_path / "simone.gguf")
    llama_reader, llama = read_gguf(tmp_path / "llama.gguf")
    assert field(llama_reader, "general.architecture") == "llama"
    assert simone.keys() == llama.keys() and "output.weight" not in llama
    for name in simone:
        assert np.array_equal(simone[name].data, llama[name].data), name
    for key in simone_reader.fields:
        if key not in ("general.name", "GGUF.kv_count"):
            assert field(llama_reader, key) == field(simone_reader, key), key


def test_untied_simone_head_becomes_the_output_tensor(tokenizer_file, tmp_path):
    from safetensors.numpy import load_file
    model_dir = save_simone(tokenizer_file, tmp_path / "untied", tie_embeddings=False)
    _, tensors = read_gguf(export_ok(model_dir, tmp_path / "untied.gguf"))
    head = load_file(str(model_dir / "model.safetensors"))["model.lm_head.weight"]
    assert np.array_equal(tensors["output.weight"].data, head)
    assert not np.array_equal(tensors["token_embd.weight"].data, head)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_dtype_stores_2d_weights_and_keeps_norms_f32(simone_dir, tmp_path, dtype):
    from safetensors.numpy import load_file
    Q = gguf.GGMLQuantizationType
    out = tmp_path / f"simone-{dtype}.gguf"
    export_ok(simone_dir, out, dtype)
    reader, tensors = read_gguf(out)
    wanted = Q.F16 if dtype == "f16" else Q.Q8_0
    assert field(reader, "general.file_type") == (1 if dtype == "f16" else 7)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_up.weight"):
        assert tensors[name].tensor_type == wanted, name
    # ffn_down rows hold 80 values, not a whole number of 32-value Q8_0 blocks: float16 instead.
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"):
        assert tensors[name].tensor_type == Q.F32, name
    original = load_file(str(simone_dir / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    stored = gguf.quants.dequantize(tensors["blk.0.ffn_gate.weight"].data, wanted)
    assert np.abs(stored - original).max() <= np.abs(original).max() / 100
