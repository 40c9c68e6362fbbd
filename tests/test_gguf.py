"""export_gguf.py (release/gguf_conversion.py): GGUF files for llama.cpp from MVLM-GPT2, SIM-ONE and Llama folders.

Unit tests (run wherever the `gguf` package is installed, as in CI; seconds): the file reads
back with gguf's GGUFReader with the right architecture, tensors and tokenizer keys; q/k rows
are reordered so llama.cpp's RoPE computes what transformers' does; governance-on SIM-ONE and
bad input are refused in one line, exit status 2, with nothing written. They build
random-weight folders the way the trainers save them and call export_gguf in-process.

End-to-end tests (marked e2e): the command line on really trained models and, opt-in,
llama.cpp itself through its Python binding, which compiles llama.cpp from source (a few
minutes on CPU) and is deliberately not in requirements.txt:

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
    python -m pytest -q tests/test_gguf.py -m e2e

They export a tiny trained MVLM-GPT2 and a tiny trained governance-off SIM-ONE and check that
llama.cpp reproduces transformers: the same 20 greedy tokens, the same held-out perplexity
within 0.1%, the same token ids for awkward text. Without llama_cpp those are skipped.
What packaging ships (f16, q8_0 and 4-bit files) and their checks in llama.cpp: test_gguf_quantized.py.
"""
import importlib.util
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from conftest import REPO, TEST_VOCAB, assert_one_line_error, run_ok, run_script

gguf = pytest.importorskip("gguf")

EXPORT = REPO / "export_gguf.py"
EXPORT_LLAMA = REPO / "SIM-ONE Training" / "export_llama.py"
TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "For God so loved the world, that he gave his only begotten Son.",
         "Jesus wept. 12 tribes, 144000 sealed: “Holy, holy, holy”!"] * 20


# --------------------------------------------------------------------------- folders in the trainers' formats


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from mvlm_engine.tokenizer import save_tokenizer, train_bpe
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_bpe(TEXTS, vocab_size=300), path)
    return path


def vocab_size_of(tokenizer_file):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer_file, tmp_path_factory):
    """What mvlm_trainer.py saves: a tied GPT2LMHeadModel plus its tokenizer (random weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from mvlm_engine.tokenizer import eos_id, hf_tokenizer, load_tokenizer
    torch.manual_seed(0)
    eos = eos_id(load_tokenizer(tokenizer_file))
    config = GPT2Config(vocab_size=vocab_size_of(tokenizer_file), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("gpt2") / "mvlm_gpt2"
    GPT2LMHeadModel(config).save_pretrained(out)
    hf_tokenizer(tokenizer_file, model_max_length=64).save_pretrained(out)
    return out


def save_simone(tokenizer_file, out, **overrides):
    """What enhanced_train.py saves, with random weights; ffn 80 leaves ffn_down rows unquantizable.

    The trainer's own steps: modelling folder, tokenizer files, special ids in config.json.
    """
    import torch
    from simone_transformer import SimOneConfig, SimOneModel
    from simone_transformer.enhanced_model import LLAMA_VALUES
    from simone_transformer.hf_model import save_pretrained_dir
    from mvlm_engine.tokenizer import eos_id, hf_tokenizer, load_tokenizer
    torch.manual_seed(0)
    settings = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=80, max_seq_len=64,
                    rope_theta=5e5, tie_embeddings=True, zero_init_head=False, zero_init_proj=False, **LLAMA_VALUES)
    model = SimOneModel(SimOneConfig.from_dict({**settings, "vocab_size": vocab_size_of(tokenizer_file), **overrides}))
    save_pretrained_dir(model, out)
    hf_tokenizer(tokenizer_file, model_max_length=model.config.max_seq_len).save_pretrained(out)
    eos = eos_id(load_tokenizer(tokenizer_file))
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def simone_dir(tokenizer_file, tmp_path_factory):
    return save_simone(tokenizer_file, tmp_path_factory.mktemp("simone") / "simone_plain")


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


exporter = load_script(EXPORT, "export_gguf")


def run_main(capsys, *args):
    """export_gguf's command line in-process, through run_cli as the script runs it: (exit status,
    stdout, stderr) as a process would give."""
    from mvlm_engine.cli import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(exporter.PROG, exporter.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=stop.value.code or 0, stdout=out, stderr=err)


def export(capsys, model_dir, output, *extra):
    return run_main(capsys, "--model_dir", model_dir, "--output", output, *extra)


def export_ok(model_dir, output, dtype="f32"):
    """In-process export (no interpreter start-up per test); raises on any problem."""
    exporter.export(model_dir, output, dtype)
    return output


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    return reader.get_field(key).contents()


# --------------------------------------------------------------------------- unit tests: the file


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
    load_script(EXPORT_LLAMA, "export_llama").export(simone_dir, llama_dir)
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


# --------------------------------------------------------------------------- unit tests: refusals


@pytest.mark.parametrize("overrides, needles", [
    (dict(policy_gate=True), ["policy_gate"]),
    (dict(memory_tokens=2), ["memory_tokens=2"]),
    (dict(policy_gate=True, memory_tokens=3), ["policy_gate", "memory_tokens=3"]),
])
def test_governance_on_is_refused_in_one_line(tokenizer_file, tmp_path, capsys, overrides, needles):
    model_dir = save_simone(tokenizer_file, tmp_path / "governed", **overrides)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = export(capsys, model_dir, out_dir / "governed.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "governance", *needles)
    assert list(out_dir.iterdir()) == []


def test_switch_missing_from_config_counts_as_on(tokenizer_file, tmp_path, capsys):
    """SIM-ONE's defaults have governance on: a config.json without the switches is no Llama."""
    model_dir = save_simone(tokenizer_file, tmp_path / "old")
    config = json.loads((model_dir / "config.json").read_text())
    del config["policy_gate"], config["memory_tokens"]
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = export(capsys, model_dir, tmp_path / "old.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "policy_gate", "memory_tokens=8")
    assert not (tmp_path / "old.gguf").exists()


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "missing folder": (lambda d: d / "nope", None, "is not a directory"),
    "no weights": (lambda d: d, lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "garbage weights": (lambda d: d, lambda d: (d / "model.safetensors").write_bytes(b"\x07garbage" * 64),
                        "not a readable safetensors"),
    "truncated weights": (lambda d: d, lambda d: truncate(d / "model.safetensors"), "not a readable safetensors"),
    "config is a list": (lambda d: d, lambda d: (d / "config.json").write_text("[1, 2]"), "JSON list"),
    "unknown model_type": (lambda d: d, lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
                           "model_type 'bert' is not supported"),
    "zero heads": (lambda d: d, lambda d: edit_json(d / "config.json", n_head=0), "'n_head' must be positive"),
    "not a BPE tokenizer": (lambda d: d, lambda d: edit_json(d / "tokenizer.json", model={"type": "WordPiece"}),
                            "is not a BPE tokenizer"),
    "malformed tokenizer": (lambda d: d, lambda d: edit_json(d / "tokenizer.json", added_tokens=[{"content": "x"}]),
                            "tokenizer.json is malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(gpt2_dir, tmp_path, capsys, case):
    model_dir = tmp_path / "model"
    shutil.copytree(gpt2_dir, model_dir)
    pick, damage, needle = BAD_INPUTS[case]
    if damage:
        damage(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = export(capsys, pick(model_dir), out_dir / "model.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("output, needle", [("missing_dir/model.gguf", "does not exist"),
                                            ("a_directory", "is a directory")])
def test_unwritable_output_is_one_line(gpt2_dir, tmp_path, capsys, output, needle):
    (tmp_path / "a_directory").mkdir()
    proc = export(capsys, gpt2_dir, tmp_path / output)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory"]


@pytest.mark.parametrize("args, needle", [([], "required"), (["--dtype", "q4_0"], "invalid choice")])
def test_usage_errors_are_one_line(gpt2_dir, tmp_path, capsys, args, needle):
    proc = run_main(capsys, *(["--model_dir", gpt2_dir, "--output", tmp_path / "m.gguf"] if args else []), *args)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(gpt2_dir, tmp_path, monkeypatch, capsys):
    """A write that fails midway (disk full, say) removes its temporary file: one line, exit 1."""
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    proc = export(capsys, gpt2_dir, tmp_path / "model.gguf")
    assert proc.returncode == 1
    assert_one_line_error(proc, f"no space left on device writing {tmp_path / 'model.gguf'}", "MB free")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_refused_before_the_write(gpt2_dir, small_disk, capsys):
    (small_disk / "filler").write_bytes(b"\0" * shutil.disk_usage(small_disk).free)
    proc = export(capsys, gpt2_dir, small_disk / "model.gguf")
    assert proc.returncode == 1
    assert_one_line_error(proc, "no space left on device for the GGUF file model.gguf", "MB needed")
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_non_finite_weights_are_refused_naming_the_last_good_checkpoint(gpt2_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir = tmp_path / "model"
    shutil.copytree(gpt2_dir, model_dir)
    (model_dir / "checkpoints" / "step_000010").mkdir(parents=True)
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].clone()
    weights[name].view(-1)[:3] = float("inf")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    proc = export(capsys, model_dir, tmp_path / "model.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "holds 3 NaN or infinite weights, so it was not exported",
                          f"the last good checkpoint is {model_dir / 'checkpoints' / 'step_000010'}")
    assert not (tmp_path / "model.gguf").exists()


def test_a_dead_exports_temporary_file_is_removed_and_a_live_ones_kept(gpt2_dir, tmp_path):
    import subprocess
    from mvlm_engine.fileio import HOST
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [tmp_path / f".model.gguf.{pid}@{HOST}.tmp" for pid in (dead.pid, os.getppid())]
    for path in left:
        path.write_bytes(b"partial")
    export_ok(gpt2_dir, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", left[1].name])


# --------------------------------------------------------------------------- end to end: llama.cpp vs transformers

PROMPT = "In the beginning God created"
TRICKY_TEXTS = [
    "naïve café façade — “smart quotes” and ‘single’ … ½ ©",
    "emoji 🙏🏽 family 👨‍👩‍👧 flag 🇬🇧 rocket🚀🚀",
    "中文圣经 日本語の聖書 한국어 성경 עברית ελληνικά русский",
    "runs   of    spaces\n\n\nand\n \n  newlines\t\ttabs\r\nCRLF   ",
    "   leading spaces, trailing spaces   ",
    "numbers 1234567 3.14159 1,000,000 and 'tis I'M they've we'LL",
    "\n\n",
]

@pytest.mark.e2e
def test_command_line_exports_gpt2_and_refuses_governed_simone(trained_gpt2, trained_simone, tmp_path):
    proc = run_ok(EXPORT, "--model_dir", trained_gpt2, "--output", tmp_path / "gpt2.gguf", "--dtype", "q8_0")
    assert f"wrote {tmp_path / 'gpt2.gguf'} (gpt2, q8_0, 28 tensors" in proc.stdout
    assert gguf.GGUFReader(str(tmp_path / "gpt2.gguf")).get_field("general.file_type").contents() == 7
    proc = run_script(EXPORT, "--model_dir", trained_simone, "--output", tmp_path / "simone.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "governance", "policy_gate", "memory_tokens=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf"]


def held_out_text(corpus_dir, n_chars=6000):
    """A fixed stretch of the corpus's held-out books (never trained on)."""
    from mvlm_engine.corpus import load_corpus
    return "\n".join(load_corpus(corpus_dir).documents("val"))[:n_chars]


class Pair:
    """One model folder as transformers loads it, and its GGUF export in llama.cpp."""

    def __init__(self, model_dir, gguf_path, llama_cpp):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        remote = json.loads((model_dir / "config.json").read_text())["model_type"] == "simone"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote,
                                                          dtype=torch.float32).eval()
        reader = gguf.GGUFReader(str(gguf_path))
        self.n_ctx = field(reader, f"{field(reader, 'general.architecture')}.context_length")
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                   logits_all=True, n_threads=2, seed=0, verbose=False)

    def hf_ids(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def cpp_ids(self, text, special=False):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def hf_greedy(self, ids, n):
        import torch
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                                      pad_token_id=self.tokenizer.eos_token_id)  # plain greedy, as llama.cpp's
        return out[0, len(ids):].tolist()

    def cpp_greedy(self, ids, n):
        """Argmax decoding with llama.cpp's KV cache, one token at a time."""
        self.llm.reset()
        self.llm.eval(ids)
        new = []
        for _ in range(n):
            new.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([new[-1]])
        return new

    def hf_logprobs(self, ids):
        import torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()

    def cpp_logprobs(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
        peak = logits.max(-1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(-1))
        return (logits[np.arange(len(ids) - 1), ids[1:]] - log_norm[:-1])


def perplexities(pair, text):
    """Held-out perplexity of both runtimes on the same ids, in windows of the model's context."""
    ids = pair.hf_ids(text)
    windows = [ids[i: i + pair.n_ctx] for i in range(0, len(ids) - pair.n_ctx + 1, pair.n_ctx)][:8]
    assert len(windows) >= 2, len(ids)
    hf = np.concatenate([pair.hf_logprobs(w) for w in windows])
    cpp = np.concatenate([pair.cpp_logprobs(w) for w in windows])
    return float(np.exp(-hf.mean())), float(np.exp(-cpp.mean())), len(hf)


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
    print(f"\n{json.loads((model_dir / 'config.json').read_text())['model_type']}: greedy {sum(a == b for a, b in zip(hf_tokens, cpp_tokens))}/20 equal; held-out "
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
