"""Enhanced SIM-ONE generation through transformers' GenerationMixin: the KV cache equals no cache,
left-padded batches equal single rows, beams, processors, streamers, EOS, bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from transformers import DynamicCache

from simone_transformer.enhanced_model import SimOneModel
from simone_transformer.hf_model import SimOneForCausalLM, save_pretrained_dir
from helpers.tiny_simone import GOVERNANCE_OFF, greedy, make_model, tiny_config, tokens


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


# --------------------------------------------------------------------------- padding, HF generation


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


# --------------------------------------------------------------------------- dtype


def test_bf16_autocast_forward_and_generation():
    model = make_model(policy_gate=True, memory_tokens=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens(), trace=True)
        generated = greedy(model, tokens(length=4), 3)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert generated.shape == (2, 7)
