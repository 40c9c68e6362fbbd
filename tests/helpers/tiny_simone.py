"""Tiny random-weight Enhanced SIM-ONE models on CPU, shared by the SIM-ONE test files.

Weights are randomised beyond the default init (norm scales included) so that a mismatch in any
parameter shows up in the logits.
"""
from __future__ import annotations

from pathlib import Path

import torch

from simone_transformer.enhanced_model import SimOneConfig, SimOneModel
from simone_transformer.hf_model import SimOneForCausalLM


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
