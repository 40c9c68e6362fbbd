"""SIM-ONE with every governance mechanism off, as a stock `transformers.LlamaForCausalLM`.

The native parameter names already are Llama's (enhanced_model.py), so the weights are
copied as they are; only an untied LM head moves out of `model.`. Used by export_llama.py
and by the benchmarks that compare against HF Llama. Not one of the files copied next to a
saved model: it imports transformers.
"""
from __future__ import annotations

import torch

from .enhanced_model import SimOneConfig, llama_incompatible_features

__all__ = ["llama_config", "llama_incompatible_features", "to_llama"]


def llama_config(config: SimOneConfig, special_ids: dict | None = None):
    """The LlamaConfig that computes exactly what `config` does. Attention dropout carries over
    (Llama has it; fine-tuning the export drops as training did); residual dropout, which Llama
    lacks, acts in training only, so inference is the same without it."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        initializer_range=config.init_std, attention_dropout=config.attention_dropout, **(special_ids or {}))


def to_llama(config: SimOneConfig, native_state: dict[str, torch.Tensor], special_ids: dict | None = None):
    """A LlamaForCausalLM holding the weights of a native SimOneModel state dict (names without
    the `model.` prefix of saved folders). Raises ValueError when a piece Llama lacks is on or
    the weights do not fit."""
    from transformers import LlamaForCausalLM

    features = llama_incompatible_features(config)
    if features:
        raise ValueError(f"Llama cannot express {', '.join(features)}; switch them off to export")
    state = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in native_state.items()}
    dtype = next(iter(state.values())).dtype
    llama = LlamaForCausalLM(llama_config(config, special_ids)).to(dtype)
    missing, unexpected = llama.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"weights do not match a Llama layout: missing {missing}, unexpected {unexpected}")
    llama.tie_weights()
    return llama
