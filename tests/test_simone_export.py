"""Enhanced SIM-ONE's config, its Llama export (logits equal), torch.export/ONNX at a dynamic
length, the HF wrapper's loss and the saved folder loaded alone (trust_remote_code, a clean
interpreter, a stock text-generation pipeline)."""
from __future__ import annotations

import importlib.util
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from simone_transformer.enhanced_model import SimOneConfig, SimOneModel
from simone_transformer.hf_model import SimOneForCausalLM, SimOneHFConfig, load_native, save_pretrained_dir
from conftest import REPO, assert_one_line_error, assert_plain_file_modes, run_script
from helpers.tiny_simone import (GOVERNANCE_OFF, assert_same_as_clean_load, make_model, tiny_config, tokens,
                                 write_tiny_tokenizer)

EXPORT_SCRIPT = REPO / "SIM-ONE Training" / "export_llama.py"


def load_export_module():
    spec = importlib.util.spec_from_file_location("export_llama", EXPORT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- config


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError) as err:
        SimOneConfig.from_dict({"d_model": 64, "n_heads": 4, "dropuot": 0.1, "zz_extra": 1})
    message = str(err.value)
    assert "dropuot" in message and "zz_extra" in message and "\n" not in message


@pytest.mark.parametrize("overrides, needle", [
    (dict(d_model=100, n_heads=3), "d_model (100) must be divisible by n_heads (3)"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads (4) must be divisible by n_kv_heads (3)"),
    (dict(memory_tokens=-1), "memory_tokens"),
    (dict(attention_backend="xformers"), "attention_backend"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(d_model="64"), "d_model"),
    (dict(policy_gate=1), "policy_gate"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_config_rejects_bad_values(overrides, needle):
    with pytest.raises(ValueError, match=None) as err:
        tiny_config(**overrides)
    assert needle in str(err.value)


def test_config_round_trip_and_hf_config_mirror():
    config = tiny_config(rope_theta=5e5)
    assert SimOneConfig.from_dict(config.to_dict()) == config
    hf = SimOneHFConfig(**config.to_dict())
    assert hf.to_simone_config() == config
    assert {f.name for f in fields(SimOneConfig)} <= set(hf.to_dict())


# --------------------------------------------------------------------------- Llama parity


@pytest.mark.parametrize("n_kv_heads, tie", [(4, True), (2, True), (1, False)])
def test_export_matches_llama(tmp_path, n_kv_heads, tie):
    from transformers import LlamaForCausalLM

    model = make_model(n_kv_heads=n_kv_heads, tie_embeddings=tie, **GOVERNANCE_OFF)
    save_pretrained_dir(model, tmp_path / "simone")
    load_export_module().main(["--model_dir", str(tmp_path / "simone"), "--output_dir", str(tmp_path / "llama")])
    assert oct((tmp_path / "llama").stat().st_mode & 0o777) == "0o755"
    assert_plain_file_modes(tmp_path / "llama")

    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert llama.config.num_key_value_heads == n_kv_heads
    x = tokens(length=40)
    with torch.no_grad():
        expected, got = model(x).logits, llama(x).logits
    assert expected.std() > 0.5  # far from the near-uniform logits of a fresh init
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.e2e
def test_export_cli_refuses_governance_and_bad_paths(tmp_path):
    save_pretrained_dir(make_model(policy_gate=True, memory_tokens=2), tmp_path / "governed")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run_script(EXPORT_SCRIPT, "--model_dir", tmp_path / "governed", "--output_dir", tmp_path / "out",
                      cwd=elsewhere)
    assert_one_line_error(proc, "Llama cannot express", "policy_gate", "memory_tokens=2")
    assert not (tmp_path / "out").exists()

    proc = run_script(EXPORT_SCRIPT, "--model_dir", tmp_path / "missing", "--output_dir", tmp_path / "out",
                      cwd=elsewhere)
    assert proc.returncode == 2
    assert_one_line_error(proc, "missing")


# --------------------------------------------------------------------------- torch.export and ONNX


class LogitsOnly(torch.nn.Module):
    """What an exporter traces: input_ids -> logits."""

    def __init__(self, model: SimOneModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids).logits


def test_export_at_dynamic_length_with_governance_on(tmp_path):
    """torch.export (the front end of torch.onnx's dynamo exporter) at a symbolic length; the
    ONNX file too where onnxscript is installed, run by onnxruntime where that is installed."""
    model = make_model(policy_gate=True, memory_tokens=3, qk_norm=True)
    seq = torch.export.Dim("seq", min=2, max=model.config.max_seq_len)
    program = torch.export.export(LogitsOnly(model), (tokens(length=9),), dynamic_shapes=({1: seq},))
    for length in (5, 17):
        x = tokens(length=length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x).logits, atol=1e-5, rtol=1e-5)
    if importlib.util.find_spec("onnxscript") is None:
        return
    onnx_program = torch.onnx.export(LogitsOnly(model).eval(), (tokens(length=9),), dynamo=True,
                                     dynamic_shapes=({1: seq},))
    onnx_program.save(str(tmp_path / "simone.onnx"))
    assert (tmp_path / "simone.onnx").stat().st_size > 0
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "simone.onnx"), providers=["CPUExecutionProvider"])
    for length in (5, 17):  # other lengths than the one exported with
        x = tokens(length=length, seed=length)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x).logits, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- HF wrapper and trust_remote_code


def test_hf_wrapper_loss_and_native_round_trip(tmp_path):
    model = make_model()
    save_pretrained_dir(model, tmp_path / "m")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_native(tmp_path / "m")(x).logits, model(x).logits, atol=0, rtol=0)
        wrapper = SimOneForCausalLM(SimOneHFConfig(**model.config.to_dict()))
        wrapper.model.load_state_dict(model.state_dict())
        out = wrapper(x, labels=x)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.e2e
def test_trust_remote_code_load_and_padded_pipeline_batch_in_clean_process(tmp_path):
    """Loads alone; and the done-when of batched generation: a stock pipeline("text-generation",
    model=DIR, trust_remote_code=True), tokenizer padding on the left, batch_size=2, returns
    the text of one call per prompt."""
    from mvlm_engine.isolation import load_in_clean_interpreter
    from release import GENERATION_DEFAULTS
    from mvlm_engine.tokenizer import save_hf_tokenizer

    model = make_model(vocab_size=300, policy_gate=True, memory_tokens=3)
    special_ids = save_hf_tokenizer(write_tiny_tokenizer(tmp_path / "t.json"), 64, tmp_path / "model")
    model_dir = save_pretrained_dir(model, tmp_path / "model", special_ids, generation=GENERATION_DEFAULTS)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "hf_model.py"} <= {p.name for p in model_dir.iterdir()}

    batch = ["In the beginning God created the heaven and the earth", "God created"]
    result = load_in_clean_interpreter(model_dir, "In the beginning God created", trust_remote_code=True,
                                       new_tokens=6, batch_prompts=batch)
    texts = result["pipeline"]
    assert texts["prompt_tokens"][0] > texts["prompt_tokens"][1]  # so the batch is padded
    assert texts["batched"] == texts["single"]
    assert all(text.startswith(prompt) and len(text) > len(prompt) for prompt, text in zip(batch, texts["single"]))
    assert_same_as_clean_load(model, result)
