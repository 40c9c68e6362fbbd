"""Enhanced SIM-ONE model: Llama parity, KV cache, padding, governance mechanisms, HF generation,
packaging.

Tiny random-weight models on CPU. Weights are randomised beyond the default init
(norm scales included) so that a mismatch in any parameter shows up in the logits.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformers import DynamicCache

from simone_transformer import rope_attention
from simone_transformer.enhanced_model import (
    SimOneConfig,
    SimOneModel,
    llama_incompatible_features,
    trace_to_jsonable,
)
from simone_transformer.hf_model import SimOneForCausalLM, SimOneHFConfig, load_native, save_pretrained_dir
from conftest import REPO, assert_one_line_error, assert_plain_file_modes, run_script

EXPORT_SCRIPT = REPO / "SIM-ONE Training" / "export_llama.py"
GOVERNANCE_OFF = dict(policy_gate=False, memory_tokens=0)


# A tied random head: most tests check the Llama core plus governance (the default head is untied, zero).
PLAIN = dict(tie_embeddings=True, zero_init_head=False)


def tiny_config(**overrides) -> SimOneConfig:
    base = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160,
                max_seq_len=64, policy_gate=True, memory_tokens=4, **PLAIN)
    return SimOneConfig.from_dict({**base, **overrides})


def make_model(seed: int = 0, **overrides) -> SimOneModel:
    torch.manual_seed(seed)
    model = SimOneModel(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def tokens(batch: int = 2, length: int = 12, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: SimOneModel, prompt: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """n greedy tokens through transformers' GenerationMixin -> (B, T + n), prompt included."""
    wrapper = SimOneForCausalLM.from_native(model)
    return wrapper.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                            **kwargs)

def assert_same_as_clean_load(model, result: dict) -> None:
    """The logits and 6 greedy tokens a clean interpreter got from the saved folder are the model's own."""
    ids = torch.tensor([result["ids"]])
    with torch.no_grad():
        expected = model(ids).logits[0]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    native = greedy(model, ids, 6)
    assert result["greedy_ids"] == native[0, ids.shape[1]:].tolist()



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


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("policy_gate, memory_tokens", [(False, 0), (False, 4), (True, 0), (True, 4)])
def test_cached_generation_equals_uncached(policy_gate, memory_tokens):
    model = make_model(policy_gate=policy_gate, memory_tokens=memory_tokens)
    prompt = tokens(length=7)
    cached = greedy(model, prompt, 12, use_cache=True)
    uncached = greedy(model, prompt, 12, use_cache=False)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def test_incremental_logits_equal_full_forward():
    """Prefill, a multi-token chunk (explicit mask path), then single tokens."""
    model = make_model(policy_gate=True, memory_tokens=3)
    x = tokens(length=14)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache()
        parts = [model(x[:, :5], cache=cache).logits, model(x[:, 5:9], cache=cache).logits]
        parts += [model(x[:, i : i + 1], cache=cache).logits for i in range(9, 14)]
    assert cache.get_seq_length() == 3 + 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- padding, HF generation, export


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token rows -> left-padded input_ids (B, T) and attention_mask (B, T), as a tokenizer
    with padding_side="left" makes them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


PADDING_CASES = {
    "governance_off": GOVERNANCE_OFF,
    "gate_and_memory": dict(policy_gate=True, memory_tokens=3),
    "gate_only": dict(policy_gate=True, memory_tokens=0),
    "value_embeddings_x0_unet": dict(memory_tokens=2, value_embeddings=True, x0_mix=True, unet_skips=True,
                                     qk_norm=True, n_layers=3),
}


@pytest.mark.parametrize("case", sorted(PADDING_CASES))
def test_left_padded_batch_computes_and_generates_what_single_rows_do(case):
    model = make_model(**PADDING_CASES[case])
    rows = [tokens(batch=1, length=n, seed=n)[0] for n in (9, 4, 6)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):  # every real position, padding ignored
            torch.testing.assert_close(batched[i, -len(r):], model(r[None]).logits[0], atol=1e-5, rtol=1e-5)
    wrapper = SimOneForCausalLM.from_native(model, pad_token_id=0)
    out = wrapper.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for i, r in enumerate(rows):
        assert torch.equal(out[i, ids.shape[1]:], greedy(model, r[None], 8)[0, len(r):]), i


def test_padded_trace_matches_single_rows_and_records_zero_on_padding():
    model = make_model(policy_gate=True, memory_tokens=3)
    rows = [tokens(batch=1, length=n, seed=n)[0] for n in (8, 5)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, trace=True).trace
        single = model(rows[1][None], trace=True).trace
    for key in ("policy_gate", "memory_mass", "lens_top_ids"):
        torch.testing.assert_close(batched[key][:, 1, 3:], single[key][:, 0], atol=1e-5, rtol=1e-4)
    assert not batched["policy_gate"][:, 1, :3].any() and not batched["memory_mass"][:, 1, :3].any()


def test_generation_mixin_strategies_and_processors():
    """What the hand-written loop refused or ignored: beams, several sequences, n-gram and word
    bans, suppressed tokens, streamers, dict outputs."""
    from transformers.generation.streamers import BaseStreamer

    model = make_model(policy_gate=True, memory_tokens=3)
    wrapper = SimOneForCausalLM.from_native(model, pad_token_id=0)
    prompt = tokens(batch=2, length=6)
    mask = torch.ones_like(prompt)
    beams = [wrapper.generate(prompt, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                              do_sample=False, use_cache=use_cache) for use_cache in (True, False)]
    assert beams[0].shape == (4, 12) and torch.equal(beams[0], beams[1])  # the cache reorders memory rows too
    torch.manual_seed(0)
    sampled = wrapper.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    assert sampled.shape == (6, 12) and len({tuple(r.tolist()) for r in sampled}) > 1

    free = greedy(model, prompt, 12)[:, 6:]
    banned = int(free[0, 0])
    out = greedy(model, prompt, 12, bad_words_ids=[[banned]], suppress_tokens=[int(free[1, 0])],
                 no_repeat_ngram_size=2)[:, 6:]
    assert banned not in out.tolist()[0] + out.tolist()[1] and int(out[1, 0]) != int(free[1, 0])
    for row in out.tolist():
        assert len(set(zip(row, row[1:]))) == len(row) - 1  # no bigram twice

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    result = wrapper.generate(prompt[:1], max_new_tokens=4, do_sample=False, streamer=streamer,
                              return_dict_in_generate=True, output_scores=True)
    assert streamer.chunks[-1] == "end" and len(streamer.chunks) == 1 + 4 + 1  # prompt, each token, end
    assert len(result.scores) == 4 and result.sequences.shape == (1, 10)


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


# --------------------------------------------------------------------------- memory tokens


def mask_real_to_memory(n_memory: int):
    """An SDPA stand-in that forbids real tokens to look at the first n_memory keys."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
        assert attn_mask is None and is_causal and q.shape[2] == k.shape[2]  # full-sequence forward
        mask = rope_attention.causal_mask(q.shape[2], 0, q.device)
        mask[n_memory:, :n_memory] = False  # memory rows keep their own (causal) view
        return original(q, k, v, attn_mask=mask, enable_gqa=enable_gqa, **kwargs)

    return sdpa


def test_memory_tokens_get_no_logits_and_inert_memory_is_no_memory(monkeypatch):
    with_memory = make_model(memory_tokens=5)
    without = SimOneModel(tiny_config(memory_tokens=0)).eval()
    missing, unexpected = without.load_state_dict(with_memory.state_dict(), strict=False)
    assert not missing and unexpected == ["memory_embeddings"]

    x = tokens(length=16)
    with torch.no_grad():
        out = with_memory(x)
        assert out.logits.shape == (2, 16, 96) and out.hidden_states.shape == (2, 16, 64)
        assert not torch.allclose(out.logits, without(x).logits, atol=1e-3)  # memory matters...
        monkeypatch.setattr(rope_attention.F, "scaled_dot_product_attention", mask_real_to_memory(5))
        inert = with_memory(x).logits
    monkeypatch.undo()
    # ...and with attention to it cut, the real tokens compute exactly what a memory-less model does.
    torch.testing.assert_close(inert, without(x).logits, atol=1e-5, rtol=1e-5)


def reference_layer0_memory_mass(model: SimOneModel, x: torch.Tensor, real_offset: int) -> torch.Tensor:
    """Layer-0 attention mass on memory computed by hand, Llama rotate-half RoPE,
    memory at position 0 and real token t at position t + real_offset -> (B, T, H)."""
    c, attn = model.config, model.layers[0].self_attn
    h = model.layers[0].input_layernorm(torch.cat((model.memory_embeddings.expand(x.shape[0], -1, -1),
                                                   model.embed_tokens(x)), dim=1))
    n_mem, T, hd = c.memory_tokens, x.shape[1], c.head_dim
    positions = torch.cat((torch.zeros(n_mem), torch.arange(T) + real_offset)).double()
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2).double() / hd)
    angles = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)

    def rope(t):  # t (B, S, heads, hd)
        rotated = torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), dim=-1)
        return t * angles.cos()[:, None] + rotated * angles.sin()[:, None]

    q = rope(attn.q_proj(h).double().unflatten(-1, (c.n_heads, hd)))
    k = rope(attn.k_proj(h).double().unflatten(-1, (c.n_kv_heads, hd))).repeat_interleave(
        c.n_heads // c.n_kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
    S = n_mem + T
    scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)[..., n_mem:, :n_mem].sum(-1).transpose(1, 2)


def test_memory_tokens_do_not_shift_real_positions():
    model = make_model(memory_tokens=4)
    x = tokens(length=10)
    with torch.no_grad():
        traced = model(x, trace=True).trace["memory_mass"][0].double()
        expected = reference_layer0_memory_mass(model, x, real_offset=0)
        shifted = reference_layer0_memory_mass(model, x, real_offset=4)
    torch.testing.assert_close(traced, expected, atol=1e-5, rtol=1e-4)
    assert (traced - shifted).abs().max() > 1e-3  # the check can tell a shift apart

    # The whole RoPE table is available to real tokens: max_seq_len of them fit beside the memory.
    long = tokens(batch=1, length=model.config.max_seq_len)
    assert model(long).logits.shape[1] == model.config.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(batch=1, length=model.config.max_seq_len + 1))


# --------------------------------------------------------------------------- policy gate


def test_policy_gate_trace_shape_and_closed_head_is_silent():
    model = make_model(policy_gate=True, memory_tokens=2)
    x = tokens(length=9)
    with torch.no_grad():
        gate = model(x, trace=True).trace["policy_gate"]
        assert gate.shape == (2, 2, 9, 4)  # (L, B, T, H)
        assert ((gate > 0) & (gate < 1)).all()

        open_logits = model(x).logits
        layer, head, hd = 1, 2, model.config.head_dim
        model.layers[layer].self_attn.head_gate.bias[head] = -1e4
        captured = {}
        hook = model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args: captured.setdefault("o_proj_in", args[0].clone()))
        closed = model(x, trace=True)
        hook.remove()

    o_in = captured["o_proj_in"]  # (B, N + T, H * hd), memory rows included
    assert torch.all(o_in[..., head * hd : (head + 1) * hd] == 0)
    assert torch.all(o_in[..., :head * hd].abs().sum(-1) > 0)
    assert torch.all(closed.trace["policy_gate"][layer, ..., head] == 0)
    assert not torch.allclose(closed.logits, open_logits, atol=1e-3)


# --------------------------------------------------------------------------- trace


def test_trace_records_and_changes_nothing():
    model = make_model(policy_gate=True, memory_tokens=3)
    x = tokens(length=11)
    with torch.no_grad():
        plain = model(x)
        traced = model(x, trace=True, trace_top_k=4)
    assert plain.trace is None
    assert torch.equal(plain.logits, traced.logits)
    t = traced.trace
    assert t["memory_mass"].shape == (2, 2, 11, 4)
    # Every position attends to the 3 memory keys and at least one real key: mass strictly inside (0, 1).
    assert ((t["memory_mass"] > 0) & (t["memory_mass"] < 1)).all()
    assert t["lens_top_ids"].shape == t["lens_top_probs"].shape == (2, 2, 11, 4)
    # The last layer's lens is the model's own output distribution.
    top = traced.logits.float().softmax(-1).topk(4)
    assert torch.equal(t["lens_top_ids"][-1], top.indices)
    torch.testing.assert_close(t["lens_top_probs"][-1], top.values, atol=1e-6, rtol=1e-5)

    blob = json.loads(json.dumps(trace_to_jsonable(t)))
    assert set(blob["layout"]) == set(t)
    assert len(blob["memory_mass"][0][0]) == 11


def test_trace_off_mechanisms_are_absent_and_generation_trace_aligns():
    model = make_model(**GOVERNANCE_OFF)
    with torch.no_grad():
        assert set(model(tokens(), trace=True).trace) == {"lens_top_ids", "lens_top_probs"}

    model = make_model(policy_gate=True, memory_tokens=2)
    prompt = tokens(length=6)
    cached = greedy(model, prompt, 5, trace=True)
    uncached = greedy(model, prompt, 5, trace=True, use_cache=False)
    assert cached.trace["policy_gate"].shape == (2, 2, 6 + 5 - 1, 4)
    for key in cached.trace:
        torch.testing.assert_close(cached.trace[key], uncached.trace[key], atol=1e-5, rtol=1e-4)
    # The last layer's lens at position t names the token generated at t + 1.
    assert torch.equal(cached.trace["lens_top_ids"][-1, :, 5:, 0], cached.sequences[:, 6:])
    with pytest.raises(ValueError, match="num_beams=1"):
        greedy(model, prompt, 2, trace=True, num_beams=2)


# --------------------------------------------------------------------------- sampling, dtype, HF wrapper


def test_bf16_autocast_forward_and_generation():
    model = make_model(policy_gate=True, memory_tokens=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens(), trace=True)
        generated = greedy(model, tokens(length=4), 3)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert generated.shape == (2, 7)


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


# --------------------------------------------------------------------------- trust_remote_code

def write_tiny_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20, trainer=trainer)
    tok.save(str(path))
    return path


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


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = make_model(policy_gate=True, memory_tokens=2)
    prompt = tokens(batch=2, length=5)
    free = greedy(model, prompt, 6)
    eos = int(free[0, 7])  # row 0's third generated token
    first_eos = 5 + int((free[0, 5:] == eos).nonzero()[0])  # it may also come earlier
    pad = 0 if eos != 0 else 1
    stopped = greedy(model, prompt, 6, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(stopped[0, : first_eos + 1], free[0, : first_eos + 1])
    assert bool((stopped[0, first_eos + 1:] == pad).all())  # HF's convention: a finished row is padded
    assert torch.equal(greedy(model, prompt[:1], 6, eos_token_id=eos), free[:1, : first_eos + 1])


def test_hf_wrapper_honours_use_cache_and_returns_final_hidden_states(tmp_path):
    torch.manual_seed(0)
    native = SimOneModel(tiny_config(memory_tokens=2)).eval()
    save_pretrained_dir(native, tmp_path / "m")
    hf = SimOneForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], native(ids).hidden_states)
    lengths = []  # tokens each forward call reads
    hook = hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with_cache = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert lengths == [7, 1, 1, 1, 1, 1]  # prefill, then one token per step from the cache
    lengths.clear()
    without = hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    hook.remove()
    assert lengths == [7, 8, 9, 10, 11, 12]
    assert torch.equal(with_cache, without)


# --------------------------------------------------------------------------- training-recipe switches

RECIPE_SWITCHES = {
    "qk_norm": dict(qk_norm=True),
    "logit_softcap": dict(logit_softcap=3.0),
    "value_residual": dict(value_residual=True),
    "value_embeddings": dict(value_embeddings=True),
    "relu2": dict(mlp="relu2", ffn_hidden_dim=96),
    "untied_zero_init": dict(tie_embeddings=False, zero_init_head=True, zero_init_proj=True),
    "x0_mix": dict(x0_mix=True),
    "unet_skips": dict(unet_skips=True, n_layers=3),
}


@pytest.mark.parametrize("overrides, needle", [
    (dict(mlp="gelu"), "mlp must be one of"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
    (dict(value_residual=True, value_embeddings=True), "value_residual and value_embeddings"),
    (dict(qk_norm=1), "qk_norm"),
])
def test_config_rejects_bad_recipe_values(overrides, needle):
    with pytest.raises(ValueError) as err:
        tiny_config(**overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_llama_incompatible_features_names_every_switched_on_piece():
    assert llama_incompatible_features(tiny_config(**GOVERNANCE_OFF)) == []
    # Init-only switches and an untied head are still a Llama checkpoint.
    assert llama_incompatible_features(tiny_config(**GOVERNANCE_OFF, **RECIPE_SWITCHES["untied_zero_init"])) == []
    everything = tiny_config(policy_gate=True, memory_tokens=4, qk_norm=True, logit_softcap=15.0,
                             value_embeddings=True, mlp="relu2", x0_mix=True, unet_skips=True)
    assert llama_incompatible_features(everything) == [
        "policy_gate=True", "memory_tokens=4", "qk_norm=True", "logit_softcap=15.0", "value_embeddings=True",
        "mlp=relu2", "x0_mix=True", "unet_skips=True"]
    assert llama_incompatible_features(tiny_config(**GOVERNANCE_OFF, value_residual=True)) == ["value_residual=True"]


@pytest.mark.parametrize("switch", sorted(RECIPE_SWITCHES))
@pytest.mark.parametrize("memory_tokens", [0, 3])
def test_recipe_switches_keep_cached_equal_uncached(switch, memory_tokens):
    model = make_model(policy_gate=True, memory_tokens=memory_tokens, **RECIPE_SWITCHES[switch])
    prompt = tokens(length=7)
    cached = greedy(model, prompt, 10, use_cache=True)
    uncached = greedy(model, prompt, 10, use_cache=False)
    assert torch.equal(cached, uncached)
    x = tokens(length=13)
    with torch.no_grad():  # prefill, a multi-token chunk after a cached prefix, single tokens
        full = model(x).logits
        cache = DynamicCache()
        parts = [model(x[:, :4], cache=cache).logits, model(x[:, 4:9], cache=cache).logits]
        parts += [model(x[:, i : i + 1], cache=cache).logits for i in range(9, 13)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    x = tokens(length=10)
    for qk_norm, should_change in ((True, False), (False, True)):
        model = make_model(qk_norm=qk_norm, **GOVERNANCE_OFF)
        with torch.no_grad():
            before = model(x).logits
            for layer in model.layers:
                layer.self_attn.q_proj.weight.mul_(7.0)
                layer.self_attn.k_proj.weight.mul_(0.3)
            after = model(x).logits
        assert (not torch.allclose(before, after, atol=1e-3)) == should_change
    assert tuple(model.layers[0].self_attn.q_proj.weight.shape) == (64, 64)
    normed = make_model(qk_norm=True, **GOVERNANCE_OFF)
    assert tuple(normed.layers[0].self_attn.q_norm.weight.shape) == (16,)  # one gain per head dim (Qwen3 layout)


def test_logit_softcap_bounds_logits_and_is_tanh_of_the_raw_logits():
    capped = make_model(logit_softcap=2.0)
    raw = SimOneModel(tiny_config(logit_softcap=0.0)).eval()
    raw.load_state_dict(capped.state_dict())
    x = tokens(length=12)
    with torch.no_grad():
        got, plain = capped(x).logits, raw(x).logits
    assert plain.abs().max() > 2.0  # the cap has something to do
    assert got.abs().max() < 2.0
    torch.testing.assert_close(got, 2.0 * torch.tanh(plain / 2.0))


def test_zero_init_projections_make_the_residual_stream_the_embedding():
    torch.manual_seed(0)
    model = SimOneModel(tiny_config(zero_init_proj=True, memory_tokens=2)).eval()
    for layer in model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    x = tokens(length=9)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.hidden_states, model.norm(model.embed_tokens(x)))
    default = SimOneModel(tiny_config()).eval()
    assert default.layers[0].self_attn.o_proj.weight.std() > 0


def test_untied_head_has_its_own_weight_and_zero_init_head_starts_uniform():
    torch.manual_seed(0)
    model = SimOneModel(tiny_config(tie_embeddings=False, zero_init_head=True)).eval()
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert not model.lm_head.weight.any() and model.embed_tokens.weight.std() > 0
    with torch.no_grad():
        assert not model(tokens()).logits.any()  # uniform predictions at step 0
        model.embed_tokens.weight.add_(1.0)
    assert not model.lm_head.weight.any()  # not shared
    tied = SimOneModel(tiny_config())
    vocab_matrices = 96 * 64
    assert model.count_parameters(False) - tied.count_parameters(False) == vocab_matrices
    assert model.count_parameters(True) == tied.count_parameters(True)


@pytest.mark.parametrize("switch", ["value_residual", "value_embeddings"])
def test_value_mixing_at_lambda_zero_is_the_plain_model(switch):
    mixed = make_model(**RECIPE_SWITCHES[switch])
    plain = SimOneModel(tiny_config()).eval()
    missing, unexpected = plain.load_state_dict(mixed.state_dict(), strict=False)
    assert not missing and unexpected
    lambdas = [layer.self_attn.value_lambda for layer in mixed.layers]
    # The value residual's source layer mixes nothing in; value embeddings mix in every layer.
    assert (lambdas[0] is None) == (switch == "value_residual")
    x = tokens(length=10)
    with torch.no_grad():
        assert not torch.allclose(mixed(x).logits, plain(x).logits, atol=1e-3)
        for lam in lambdas:
            if lam is not None:
                lam.zero_()
        torch.testing.assert_close(mixed(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)
    if switch == "value_embeddings":
        assert mixed.count_parameters(True) == plain.count_parameters(True) + 2  # only the lambdas
        assert tuple(mixed.value_embeds[0].weight.shape) == (96, 2 * 16)  # (vocab, KV * hd)


def test_relu2_mlp_computes_relu_squared_with_two_matrices():
    model = make_model(mlp="relu2", ffn_hidden_dim=96)
    mlp = model.layers[0].mlp
    assert {name for name, _ in mlp.named_parameters()} == {"up_proj.weight", "down_proj.weight"}
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(h), F.relu(h @ mlp.up_proj.weight.T).square() @ mlp.down_proj.weight.T)
    assert tiny_config(mlp="relu2", ffn_hidden_dim=None).ffn_hidden_dim == 4 * 64


@pytest.mark.parametrize("n_layers", [1, 4, 5])
def test_x0_mix_and_unet_skips_start_or_reduce_to_the_plain_model(n_layers):
    plain = make_model(n_layers=n_layers)
    x = tokens(length=10)
    with torch.no_grad():
        expected = plain(x).logits
        # x0 mixing starts at (a, b) = (1, 0): exactly the plain residual stream.
        torch.manual_seed(0)
        mixed = SimOneModel(tiny_config(n_layers=n_layers, x0_mix=True)).eval()
        assert all(torch.equal(layer.x0_lambdas, torch.tensor([1.0, 0.0])) for layer in mixed.layers)
        missing, _ = mixed.load_state_dict(plain.state_dict(), strict=False)
        assert missing == [f"layers.{i}.x0_lambdas" for i in range(n_layers)]
        torch.testing.assert_close(mixed(x).logits, expected, atol=1e-5, rtol=1e-5)
        mixed.layers[-1].x0_lambdas[1] = 0.5
        assert not torch.allclose(mixed(x).logits, expected, atol=1e-3)
        # U-net skips: one weight per mirrored pair; at weight 0 the plain model.
        unet = SimOneModel(tiny_config(n_layers=n_layers, unet_skips=True)).eval()
        unet.load_state_dict(plain.state_dict(), strict=False)
        assert unet.skip_weights.shape == (n_layers // 2,) and bool((unet.skip_weights == 1).all())
        if n_layers > 1:
            assert not torch.allclose(unet(x).logits, expected, atol=1e-3)
        unet.skip_weights.zero_()
        torch.testing.assert_close(unet(x).logits, expected, atol=1e-5, rtol=1e-5)


ALL_RECIPE_FIELDS = [
    dict(qk_norm=True, logit_softcap=5.0, value_embeddings=True, mlp="relu2", ffn_hidden_dim=96,
         tie_embeddings=False, zero_init_head=True, zero_init_proj=True),
    dict(value_residual=True, qk_norm=True, x0_mix=True, unet_skips=True),
]


@pytest.mark.parametrize("fields_on", ALL_RECIPE_FIELDS, ids=["most_switches", "value_residual"])
def test_recipe_fields_round_trip_save_and_trust_remote_code(tmp_path, fields_on):
    from mvlm_engine.isolation import load_in_clean_interpreter
    from mvlm_engine.tokenizer import save_hf_tokenizer

    model = make_model(vocab_size=300, policy_gate=True, memory_tokens=2, **fields_on)
    special_ids = save_hf_tokenizer(write_tiny_tokenizer(tmp_path / "t.json"), 64, tmp_path / "model")
    model_dir = save_pretrained_dir(model, tmp_path / "model", special_ids)
    saved = json.loads((model_dir / "config.json").read_text())
    assert {k: saved[k] for k in fields_on} == fields_on
    assert load_native(model_dir).config == model.config

    result = load_in_clean_interpreter(model_dir, "In the beginning God created", trust_remote_code=True,
                                       new_tokens=6)
    assert_same_as_clean_load(model, result)
