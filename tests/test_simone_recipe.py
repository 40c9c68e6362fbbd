"""Enhanced SIM-ONE's training-recipe switches (QK-norm, soft-cap, value residual and embeddings,
ReLU², untied zero-init head, x0 mixing, U-net skips): each checked, cached equals uncached, each
reduces to the plain model where it should, and each round-trips a save and a clean load."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from transformers import DynamicCache

from simone_transformer.enhanced_model import SimOneModel, llama_incompatible_features
from simone_transformer.hf_model import load_native, save_pretrained_dir
from helpers.tiny_simone import (GOVERNANCE_OFF, assert_same_as_clean_load, greedy, make_model, tiny_config, tokens,
                                 write_tiny_tokenizer)


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
