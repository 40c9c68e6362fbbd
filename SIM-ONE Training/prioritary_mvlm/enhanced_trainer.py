"""EnhancedPrioritaryTrainer: Enhanced SIM-ONE on the shared training engine.

It builds what is specific to SIM-ONE (the seeded tokenizer, the model, the composite
objective and batches that carry parallel-verse pairs) as the TrainingTask that enhanced_train.py
hands to mvlm_engine.trainer.fit, the repository's one training loop. On a GPU the engine's defaults
are the H100/H200 settings: bf16 autocast, torch.compile and fused AdamW.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mvlm_engine.data import BlockSampler, LMBatches
from mvlm_engine.fileio import plain_file_modes
from mvlm_engine.logs import get_logger
from mvlm_engine.metrics import FLOPS_CONVENTION, matmul_weights, training_flops_per_token
from mvlm_engine.parallel_verses import EncodedPairs, ParallelVerses, encode_padded
from mvlm_engine.runtime import Runtime, sdpa_backend_name
from mvlm_engine.shards import prepare_token_data
from mvlm_engine.tokenizer import eos_id, save_hf_tokenizer
from mvlm_engine.trainer import TrainingTask
from release import GENERATION_DEFAULTS
from simone_transformer import SimOneModel
from simone_transformer.hf_model import save_pretrained_dir

from .advanced_losses import CompositeObjective
from .advanced_tokenizer import build_simone_tokenizer
from .config import PrioritaryConfig

log = get_logger("train")
DESCRIPTION = ("Enhanced SIM-ONE: a Llama-style transformer with policy gate, memory tokens and trace, trained "
               "from scratch on the public-domain Bible corpus; its modelling code ships in the folder.")


class PairedBatches:
    """Language-modelling batches plus, when alignment is on, parallel-verse pairs.

    Pairs for micro-batch i come from a generator seeded with (seed, i, rank), so the saved
    position (the sampler's and i) restores them exactly. With --alignment_pair_cache they are
    read from EncodedPairs (each verse tokenized once per run), else tokenized every micro-step.
    """

    def __init__(self, lm: LMBatches, verses: ParallelVerses | None, tokenizer, cfg: PrioritaryConfig, rank: int):
        self.lm, self.verses, self.tokenizer, self.cfg, self.rank = lm, verses, tokenizer, cfg, rank
        self.pad_id = eos_id(tokenizer)
        self.index = 0
        self.encoded = EncodedPairs(verses, tokenizer, cfg.alignment_pairs, cfg.alignment_max_tokens, self.pad_id,
                                    cfg.seed, rank) if verses is not None and cfg.alignment_pair_cache else None

    def next_batch(self) -> dict:
        batch = self.lm.next_batch()
        if self.encoded is not None:
            ids, mask = self.encoded.pairs(self.index)
            batch.update(pair_ids=ids, pair_mask=mask)  # (2P, L) each
        elif self.verses is not None:
            rng = np.random.default_rng([self.cfg.seed, self.index, self.rank])
            first, second = self.verses.sample(rng, self.cfg.alignment_pairs)
            ids, mask = encode_padded(self.tokenizer, first + second, self.cfg.alignment_max_tokens, self.pad_id)
            batch.update(pair_ids=ids, pair_mask=mask)
        self.index += 1
        return batch

    def micro_batches_per_epoch(self) -> int:
        return self.lm.micro_batches_per_epoch()

    def state_dict(self) -> dict:
        return {**self.lm.state_dict(), "pair_index": self.index}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.index = state.pop("pair_index")
        self.lm.load_state_dict(state)


class EnhancedPrioritaryTrainer:
    """Train Enhanced SIM-ONE with the composite loss; every term is logged per step."""

    name = "Enhanced SIM-ONE"

    def __init__(self, cfg: PrioritaryConfig, runtime: Runtime):
        self.cfg, self.runtime = cfg, runtime

    def loss_weights(self) -> dict[str, float]:
        return {"coherence": self.cfg.coherence_weight, "alignment": self.cfg.alignment_weight,
                "stability": self.cfg.z_loss_weight, "distill": self.cfg.distill_weight}

    def build_objective(self, vocab_size: int) -> CompositeObjective:
        """The training module of a run: its SIM-ONE (seeded) under the composite loss."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = SimOneModel(cfg.model_config(vocab_size))
        model.use_fused_layers(cfg.fused_layers)
        return CompositeObjective(model, self.loss_weights(), cfg.adaptive_weights, cfg.alignment_temperature,
                                  cfg.chunked_loss, cfg.distill_temperature)

    def prepare_data(self):
        """The seeded tokenizer and the token shards, built or read from the cache."""
        cfg = self.cfg
        return prepare_token_data(cfg, self.runtime, tokenizer_factory=lambda corpus, cache: build_simone_tokenizer(
            corpus, cfg.vocab_size, cfg.quality_seeds, cache))

    def build_task(self) -> tuple[TrainingTask, object]:
        cfg, runtime = self.cfg, self.runtime
        data = self.prepare_data()
        # Alignment pairs come from verses.jsonl: check it before building the model.
        verses = ParallelVerses(cfg.data_dir, "train") if cfg.alignment_weight > 0 else None
        objective = self.build_objective(data.tokenizer.get_vocab_size())
        model = objective.model
        sampler = BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed,
                               runtime.rank, runtime.world_size)
        batches = PairedBatches(LMBatches(sampler), verses, data.tokenizer, cfg, runtime.rank)
        mc, flops = model.config, flops_per_token(objective, cfg)
        if runtime.is_main:
            log.info(f"{self.name} preset {cfg.preset}: {model.count_parameters(False) / 1e6:.2f}M parameters "
                     f"({model.count_parameters(True) / 1e6:.2f}M non-embedding), vocab {mc.vocab_size}, policy gate "
                     f"{mc.policy_gate}, memory tokens {mc.memory_tokens}, loss weights {objective.weights}, adaptive "
                     f"{cfg.adaptive_weights}; {runtime.world_size} x {runtime.device}, {runtime.precision}, compile "
                     f"{runtime.compile}, SDPA backend {sdpa_backend_name(runtime, mc.n_heads, mc.head_dim)}; "
                     f"{flops / 1e6:,.1f} MFLOPs per token ({FLOPS_CONVENTION})")
        task = TrainingTask(name=self.name, objective=objective, logits=lambda module, x: module.logits(x),
                            batches=batches, flops_per_token=flops, config=cfg, description=DESCRIPTION,
                            non_embedding_params=model.count_parameters(True),
                            export=lambda out: export(model, data.tokenizer_path, cfg.block_size, out))
        return task, data


def flops_per_token(objective: CompositeObjective, cfg: PrioritaryConfig) -> float:
    """Training FLOPs per language-modelling token (metrics.FLOPS_CONVENTION) of everything the
    step runs: the body over the memory tokens and the T real ones, the head on the real ones; the
    t+2 head's MLP and its second pass through the head (coherence on); the body over the
    alignment pairs (alignment on: 2P verses of up to alignment_max_tokens, per micro-batch)."""
    model, mc, T = objective.model, objective.model.config, cfg.block_size
    unembedding = model.embed_tokens if model.lm_head is None else model.lm_head
    body, head = matmul_weights(model.layers), unembedding.weight.numel()
    flops = training_flops_per_token(body, head, mc.n_layers, mc.d_model, T, mc.memory_tokens)
    if objective.multi_token_head is not None:  # on T - 1 of the T rows
        flops += 6 * (matmul_weights([objective.multi_token_head]) + head) * (T - 1) / T
    if "alignment" in objective.weights:  # no head: the pairs' hidden states are pooled
        pair_len = cfg.alignment_max_tokens
        pair_tokens = 2 * cfg.alignment_pairs * pair_len
        flops += training_flops_per_token(body, 0, mc.n_layers, mc.d_model, pair_len, mc.memory_tokens) \
            * pair_tokens / (cfg.batch_size * T)
    return flops


def export(model: SimOneModel, tokenizer_path: Path, block_size: int, out: Path) -> None:
    """The trust_remote_code directory: tokenizer files, then weights, config and modelling code."""
    special_ids = save_hf_tokenizer(tokenizer_path, block_size, out)
    save_pretrained_dir(model, out, special_ids, generation=GENERATION_DEFAULTS)
    plain_file_modes(out)
