"""The GGUF files packaging ships (release/package.py's FORMATS): float16, 8-bit Q8_0 and, made by
llama.cpp's own quantizer where llama-cpp-python is installed, 4-bit Q4_K_M; no float32 file.

Unit tests (the `gguf` package; seconds): which files packaging writes beside the archives, their
types, SHA256SUMS and DOWNLOAD.md, the notes for a model or a type that has no file, and the
conversion's edges (a float16 overflow, a 4-bit file without llama-cpp-python).

End-to-end tests (e2e; opt-in: skipped without llama-cpp-python, which compiles llama.cpp):

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
    python -m pytest -q tests/test_gguf_quantized.py -m e2e -s

On a tiny trained MVLM-GPT2 and a tiny trained governance-off SIM-ONE, in llama.cpp: the f16 file
gives the same 20 greedy tokens as transformers; the q8_0 file's held-out perplexity is within 1%
of the f32 file's; the 4-bit file's is printed beside them (with -s).
"""
import shutil
import sys

import numpy as np
import pytest

from conftest import REPO, TEST_VOCAB, assert_one_line_error, run_script, save_simone

gguf = pytest.importorskip("gguf")

from helpers.gguf_files import (PROMPT, Pair, export_ok, field, held_out_text, perplexities,  # noqa: E402
                                read_gguf, run_main)

Q = gguf.GGMLQuantizationType
SHIPPED = ("f16", "q8_0", "q4_k_m")
NO_QUANTIZER = "4-bit GGUF files are made by llama.cpp's own quantizer, which needs llama-cpp-python"


def package(models, downloads):
    """release.package's command line in-process with --formats gguf (every GGUF file)."""
    from release.package import main as package_main
    package_main(["--models_dir", str(models), "--download_dir", str(downloads), "--formats", "gguf"])


def model_folders(root, gpt2_dir, tokenizer_file):
    """A GPT-2 folder, a governance-off SIM-ONE (a Llama model) and a governed one, each finished."""
    from mvlm_engine.packaging import write_model_manifest
    models = root / "models"
    shutil.copytree(gpt2_dir, models / "mvlm_gpt2")
    save_simone(tokenizer_file, models / "simone_plain")
    save_simone(tokenizer_file, models / "simone_enhanced", policy_gate=True, memory_tokens=2)
    for name in ("mvlm_gpt2", "simone_plain", "simone_enhanced"):
        write_model_manifest(models / name)
    return models


@pytest.fixture(scope="module")
def packaged(gpt2_dir, tokenizer_file, tmp_path_factory):
    """Packaging without llama-cpp-python (hidden, whether installed or not); the download folder
    held a file of an earlier, expressible model of the governed SIM-ONE's name."""
    root = tmp_path_factory.mktemp("packaged")
    models, downloads = model_folders(root, gpt2_dir, tokenizer_file), root / "downloads"
    downloads.mkdir()
    (downloads / "simone_enhanced-f16.gguf").write_bytes(b"an earlier, expressible model's file")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
        package(models, downloads)
    return models, downloads


def sums_of(downloads):
    return {name: digest for digest, _, name in
            (line.partition("  ") for line in (downloads / "SHA256SUMS").read_text().splitlines())}


def test_packaging_ships_f16_and_q8_0_for_each_expressible_model_listed_in_sha256sums(packaged):
    from mvlm_engine.fileio import sha256_file
    _, downloads = packaged
    ggufs = [f"{name}-{dtype}.gguf" for name in ("mvlm_gpt2", "simone_plain") for dtype in ("f16", "q8_0")]
    archives = [f"{name}.tar.gz" for name in ("mvlm_gpt2", "simone_enhanced", "simone_plain")]
    assert sorted(p.name for p in downloads.iterdir()) == sorted(["DOWNLOAD.md", "SHA256SUMS", *ggufs, *archives])
    assert sums_of(downloads) == {name: sha256_file(downloads / name) for name in ggufs + archives}
    for name, arch in (("mvlm_gpt2", "gpt2"), ("simone_plain", "llama")):
        names = set()
        for dtype, file_type, matrix in (("f16", 1, Q.F16), ("q8_0", 7, Q.Q8_0)):
            reader, tensors = read_gguf(downloads / f"{name}-{dtype}.gguf")
            assert field(reader, "general.architecture") == arch and (names or set(tensors)) == set(tensors)
            names = set(tensors)
            assert field(reader, "general.file_type") == file_type
            assert tensors["token_embd.weight"].tensor_type == matrix
            assert tensors["output_norm.weight"].tensor_type == Q.F32
    assert (downloads / "mvlm_gpt2-q8_0.gguf").stat().st_size < 0.7 * (downloads / "mvlm_gpt2-f16.gguf").stat().st_size


def test_download_md_lists_each_file_and_shows_how_to_run_them(packaged):
    _, downloads = packaged
    section = (downloads / "DOWNLOAD.md").read_text().split("## mvlm_gpt2")[1].split("\n## ")[0]
    sizes = {dtype: (downloads / f"mvlm_gpt2-{dtype}.gguf").stat().st_size for dtype in ("f16", "q8_0")}
    assert f"- `mvlm_gpt2-f16.gguf` ({sizes['f16']:,} bytes): float16 weights" in section
    assert f"- `mvlm_gpt2-q8_0.gguf` ({sizes['q8_0']:,} bytes): 8-bit weights (Q8_0)" in section
    assert "The commands below use `mvlm_gpt2-f16.gguf`; the other files above run the same way" in section
    # The folder's context is 64 tokens: the continuation is capped to half of it.
    assert 'llama-cli -m mvlm_gpt2-f16.gguf -p "[KJV] John 3:16" -c 64 --temp 0.8 --top-p 0.9 --top-k 0 ' \
           "--repeat-penalty 1.1 -n 32" in section
    modelfile = section.split("FROM ./mvlm_gpt2-f16.gguf\n")[1].split("```")[0]
    assert modelfile.splitlines() == ['TEMPLATE "{{ .Prompt }}"', "PARAMETER num_ctx 64", "PARAMETER temperature 0.8",
                                      "PARAMETER top_p 0.9", "PARAMETER top_k 0", "PARAMETER repeat_penalty 1.1",
                                      "PARAMETER num_predict 32"]
    assert section.count("```bash\nllama-cli") == 1 and section.count("FROM ./") == 1  # one usage for every file
    notes = [line for line in section.splitlines() if line.startswith("- no ")]
    assert notes == [f"- no `-q4_k_m.gguf` file: {NO_QUANTIZER} (pip install llama-cpp-python); not installed here"]


def test_a_governed_simone_gets_one_note_for_every_gguf_file(packaged):
    _, downloads = packaged
    assert not list(downloads.glob("simone_enhanced*.gguf"))  # the earlier model's file went too
    section = (downloads / "DOWNLOAD.md").read_text().split("## simone_enhanced")[1].split("\n## ")[0]
    notes = [line for line in section.splitlines() if line.startswith("- no ")]
    assert len(notes) == 1 and notes[0].startswith("- no `-f16.gguf`, `-q8_0.gguf`, `-q4_k_m.gguf` files: ")
    assert "governance" in notes[0] and "policy_gate" in notes[0] and "memory_tokens=2" in notes[0]
    assert "llama-cli" not in section and "FROM ./" not in section


def test_a_corrupted_gguf_fails_the_archives_check_in_one_line(packaged, tmp_path):
    models, downloads = packaged
    copy = tmp_path / "downloads"
    shutil.copytree(downloads, copy)
    data = bytearray((copy / "mvlm_gpt2-q8_0.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "mvlm_gpt2-q8_0.gguf").write_bytes(bytes(data))
    shutil.copytree(models, tmp_path / "models")
    proc = run_script(REPO / "validate_models.py", "--archives_only", "--models_dir", tmp_path / "models",
                      "--download_dir", copy, "--names", "mvlm_gpt2", "simone_plain", "simone_enhanced")
    assert proc.returncode == 1
    failed = [line for line in proc.stderr.splitlines() if "FAILED" in line]
    assert failed == [f"validate_models.py: FAILED archives (archives): {copy / 'mvlm_gpt2-q8_0.gguf'}: sha256 "
                      "differs from SHA256SUMS"], proc.stderr


def test_a_broken_folder_is_an_error_not_a_note(gpt2_dir, tmp_path):
    from mvlm_engine.errors import UserError
    from release.package import FORMATS
    broken = shutil.copytree(gpt2_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    for key in ("gguf_f16", "gguf_q8_0"):
        with pytest.raises(UserError, match="is not a readable safetensors file"):
            FORMATS[key].write(broken, tmp_path / f"broken{FORMATS[key].suffix}")
    assert list(tmp_path.iterdir()) == [broken]


def test_an_unknown_format_is_one_line(packaged, tmp_path, capsys):
    from release.package import main as package_main
    models, _ = packaged
    with pytest.raises(SystemExit) as stop:
        package_main(["--models_dir", str(models), "--download_dir", str(tmp_path / "d"),
                      "--formats", "no_such_format"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "--formats: invalid choice: 'no_such_format'" in lines[0]
    assert not (tmp_path / "d").exists()


def test_f16_keeps_a_tensor_float16_cannot_hold_in_float32(gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    model_dir = shutil.copytree(gpt2_dir, tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in weights if k.endswith("h.0.mlp.c_fc.weight"))
    weights[name][0, 0] = 1e5  # beyond float16's 65504
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    _, tensors = read_gguf(export_ok(model_dir, tmp_path / "m.gguf", "f16"))
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.F32
    assert np.array_equal(tensors["blk.0.ffn_up.weight"].data, weights[name].numpy().T)
    assert tensors["blk.1.ffn_up.weight"].tensor_type == Q.F16
    assert np.isfinite(tensors["blk.1.ffn_up.weight"].data).all()


def test_a_4_bit_file_without_llama_cpp_python_is_one_line(gpt2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    proc = run_main(capsys, "--model_dir", gpt2_dir, "--output", tmp_path / "m.gguf", "--dtype", "q4_k_m")
    assert proc.returncode == 2
    assert_one_line_error(proc, NO_QUANTIZER)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_llama_cpps_quantizer_makes_the_4_bit_file_packaging_ships(llama_cpp, gpt2_dir, tokenizer_file, tmp_path):
    models, downloads = model_folders(tmp_path, gpt2_dir, tokenizer_file), tmp_path / "downloads"
    downloads.mkdir()
    package(models, downloads)
    assert sorted(p.name for p in downloads.glob("*.gguf")) == \
        sorted(f"{name}-{dtype}.gguf" for name in ("mvlm_gpt2", "simone_plain") for dtype in SHIPPED)
    assert not [p.name for p in downloads.iterdir() if p.name.startswith(".")]  # no staging file left
    sums = sums_of(downloads)
    for name in ("mvlm_gpt2", "simone_plain"):
        reader, tensors = read_gguf(downloads / f"{name}-q4_k_m.gguf")
        assert field(reader, "general.file_type") == 15 and f"{name}-q4_k_m.gguf" in sums
        # Rows of 64 values are no whole number of 256-value K-quant blocks: llama.cpp falls back to
        # 32-value blocks of 4 to 8 bits, never float.
        assert {tensors[t].tensor_type for t in tensors if t.endswith("attn_output.weight")} <= \
            {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
        section = (downloads / "DOWNLOAD.md").read_text().split(f"## {name}")[1].split("\n## ")[0]
        size = (downloads / f"{name}-q4_k_m.gguf").stat().st_size
        assert f"- `{name}-q4_k_m.gguf` ({size:,} bytes): 4-bit weights (Q4_K_M" in section
        assert not [line for line in section.splitlines() if line.startswith("- no ")]


# --------------------------------------------------------------------------- end to end: the files in llama.cpp


@pytest.fixture
def plain_cpu_buffers(llama_cpp, monkeypatch):
    """llama.cpp's model parameters with use_extra_bufts off (no weight repacking, no AMX buffers):
    on the machine these tests were written on (a CPU with AMX, in a sandbox) llama-cpp-python 0.3.36
    dies with SIGSEGV evaluating Q8_0 and Q4_K files through those buffers; f32 and f16 are unaffected."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = False
        return chosen

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)


def in_llama_cpp(pair, path, llama_cpp, text):
    """The GGUF file `path` in llama.cpp: (held-out perplexity on `pair`'s windows, 20 greedy tokens)."""
    pair.llm = llama_cpp.Llama(model_path=str(path), n_ctx=pair.n_ctx, n_batch=pair.n_ctx, logits_all=True,
                               n_threads=2, seed=0, verbose=False)
    return perplexities(pair, text)[1], pair.cpp_greedy(pair.hf_ids(PROMPT), 20)


def check_shipped_files_in_llama_cpp(model_dir, corpus_dir, tmp_path, llama_cpp):
    files = {dtype: export_ok(model_dir, tmp_path / f"model-{dtype}.gguf", dtype) for dtype in ("f32", *SHIPPED)}
    pair = Pair(model_dir, files["f32"], llama_cpp)
    assert pair.cpp_ids(PROMPT) == pair.hf_ids(PROMPT)
    hf_tokens = pair.hf_greedy(pair.hf_ids(PROMPT), 20)
    text = held_out_text(corpus_dir)
    hf_ppl = perplexities(pair, text)[0]
    figures = {dtype: in_llama_cpp(pair, path, llama_cpp, text) for dtype, path in files.items()}
    ppl = {dtype: p for dtype, (p, _) in figures.items()}
    sizes = {dtype: path.stat().st_size for dtype, path in files.items()}
    print(f"\n{pair.model.config.model_type}: held-out perplexity, transformers {hf_ppl:.4f}; in llama.cpp, "
          + "; ".join(
        f"{d} {p:.4f} ({100 * (p / ppl['f32'] - 1):+.3f}% vs f32), greedy "
        f"{sum(a == b for a, b in zip(hf_tokens, tokens))}/20 equal to transformers, {sizes[d]:,} bytes"
        for d, (p, tokens) in figures.items()))
    f16_tokens = figures["f16"][1]
    assert f16_tokens == hf_tokens, (pair.tokenizer.decode(hf_tokens), pair.tokenizer.decode(f16_tokens))
    assert hf_ppl < TEST_VOCAB / 4  # a trained model, so agreement means something
    assert abs(ppl["f32"] / hf_ppl - 1) < 1e-3
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]


@pytest.mark.e2e
@pytest.mark.parametrize("trained", ["trained_gpt2", "plain_simone"])  # MVLM-GPT2; a governance-off SIM-ONE
def test_shipped_files_in_llama_cpp(llama_cpp, plain_cpu_buffers, trained, small_corpus, tmp_path, request):
    check_shipped_files_in_llama_cpp(request.getfixturevalue(trained), small_corpus, tmp_path, llama_cpp)
