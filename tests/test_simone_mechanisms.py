"""Enhanced SIM-ONE's governance mechanisms: memory tokens (no logits, no position shift), the
policy gate (a closed head is silent) and the trace (records, changes nothing, aligns in generation)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from simone_transformer import rope_attention
from simone_transformer.enhanced_model import SimOneModel, trace_to_jsonable
from helpers.tiny_simone import GOVERNANCE_OFF, greedy, make_model, tiny_config, tokens


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
