"""PrioritaryConfig: every setting of an Enhanced SIM-ONE run, in one strict dataclass.

It extends the shared engine's TrainConfig (so the engine trains with it directly) with the
model (a SimOneConfig under `model`: shape and governance switches), the composite loss and
the tokenizer's quality seeds. Defaults: the small preset on one GPU, batch 12 x 4 accumulation,
32K vocabulary, 2 epochs (the engine's default), and the recipe measured in RESULTS.md (speedrun,
slowrun and ablations): Muon for the hidden matrices, AdamW (beta1 0.8) for embeddings, head and
gains, decoupled weight decay on every matrix and embedding, an EMA of the weights, and
SimOneConfig's architecture (an untied zero-initialised head; the other recipe pieces showed no
gain beyond the seed spread, so they stay off).
The auxiliary losses cost held-out quality at the sizes measured, so only the z-loss is on.
Saved as train_config.json beside every run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mvlm_engine.config import CPU_SMOKE_TRAINING, TrainConfig, override, setting, upper_limit_problems
from simone_transformer import SimOneConfig

# Frequent names and terms that must stay single tokens (checked by a test).
DEFAULT_QUALITY_SEEDS = (
    "LORD", "God", "Jesus", "Christ", "Israel", "Jerusalem", "Moses", "David", "Abraham", "Egypt",
    "Pharaoh", "Babylon", "Judah", "Spirit", "covenant", "righteousness", "salvation", "Zion",
    "Philistines", "Nebuchadnezzar", "Melchizedek", "Galilee", "Pharisees", "Samaria",
)
LOSS_WEIGHTS = ("coherence_weight", "alignment_weight", "z_loss_weight")
# The training half of the default recipe (its model half is SimOneConfig's defaults; Muon's lr and
# momentum are the engine's). The ablations in RESULTS.md measure each piece. The data-limited part
# (decoupled weight decay on every matrix and embedding, an EMA of the weights that evaluation and the
# export see) was chosen on benchmarks/slowrun.py's proxy at the tiny preset (annealing to 0 and
# dropout gave nothing there beyond the seed spread, so they stay off). Its values here are the small
# preset's, transferred by keeping each timescale in epochs (the decay's 1 / (lr x decay) steps: 0.34
# epoch; the EMA's half-life: 0.75 epoch; Wang & Aitchison 2024) from the proxy's 92 optimizer steps
# per epoch to the small preset's 436 on the full corpus.
RECIPE_TRAINING = {"optimizer": "muon", "learning_rate": 0.05, "head_lr": 0.008, "scalar_lr": 0.02, "beta1": 0.8,
                   "weight_decay": 0.34, "muon_weight_decay": 0.34, "ema_decay": 0.9979}
# The same timescales at the tiny preset's 92 steps per proxy epoch (the values measured there).
TINY_REGULARIZATION = {"weight_decay": 1.6, "muon_weight_decay": 1.6, "ema_decay": 0.99}
# Upper limits past which a run cannot work (or a number is a typo); lower ones are in problems().
LIMITS = {"coherence_weight": 100.0, "alignment_weight": 100.0, "z_loss_weight": 100.0, "alignment_pairs": 4096,
          "alignment_max_tokens": 1 << 16, "alignment_temperature": 100.0}
MODEL_LIMITS = {"d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "ffn_hidden_dim": 1 << 18,
                "memory_tokens": 4096, "rope_theta": 1e9, "init_std": 1.0, "trace_top_k": 1000, "logit_softcap": 1e4}


@dataclass
class PrioritaryConfig(TrainConfig):
    """Model + governance + losses + training of a SIM-ONE run."""

    PRESETS = {
        # CPU smoke runs: ~0.8M non-embedding parameters, a training step well under a second.
        "tiny": {**CPU_SMOKE_TRAINING, **TINY_REGULARIZATION, "learning_rate": RECIPE_TRAINING["learning_rate"],
                 "batch_size": 16, "gradient_accumulation_steps": 1, "d_model": 128, "n_layers": 4, "n_heads": 4,
                 "n_kv_heads": 2, "ffn_hidden_dim": 384, "memory_tokens": 4, "alignment_pairs": 8,
                 "alignment_max_tokens": 48},
        # GPT-2 small scale: ~85M non-embedding parameters (the SimOneConfig defaults).
        "small": {},
        # ~304M non-embedding parameters.
        "medium": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "ffn_hidden_dim": 2752, "warmup_steps": 300},
    }
    # The model's vocabulary comes from the trained tokenizer, its context from --block_size.
    DERIVED = ("model.vocab_size", "model.max_seq_len")

    preset: str = override(TrainConfig, "preset", "small")
    output_dir: str = override(TrainConfig, "output_dir", "models/simone_enhanced")
    batch_size: int = override(TrainConfig, "batch_size", 12)
    gradient_accumulation_steps: int = override(TrainConfig, "gradient_accumulation_steps", 4)
    optimizer: Literal["adamw", "muon"] = override(TrainConfig, "optimizer", RECIPE_TRAINING["optimizer"])
    learning_rate: float = override(TrainConfig, "learning_rate", RECIPE_TRAINING["learning_rate"])
    head_lr: float | None = override(TrainConfig, "head_lr", RECIPE_TRAINING["head_lr"])
    scalar_lr: float | None = override(TrainConfig, "scalar_lr", RECIPE_TRAINING["scalar_lr"])
    beta1: float = override(TrainConfig, "beta1", RECIPE_TRAINING["beta1"])
    weight_decay: float = override(TrainConfig, "weight_decay", RECIPE_TRAINING["weight_decay"])
    muon_weight_decay: float = override(TrainConfig, "muon_weight_decay", RECIPE_TRAINING["muon_weight_decay"])
    ema_decay: float = override(TrainConfig, "ema_decay", RECIPE_TRAINING["ema_decay"])
    model: SimOneConfig = setting(factory=SimOneConfig)
    # Composite loss: accuracy (next-token CE) always has weight 1; 0 switches a term off.
    coherence_weight: float = setting(0.0, "weight of the multi-token (t+2) prediction loss (0 = off)")
    alignment_weight: float = setting(0.0, "weight of the parallel-verse InfoNCE loss (0 = off)")
    z_loss_weight: float = setting(1e-4, "weight of the z-loss on the logits (0 = off)")
    adaptive_weights: bool = setting(False, "learn the loss weights by uncertainty weighting (Kendall et al. 2018)")
    alignment_pairs: int = setting(16, "parallel verse pairs per micro-step")
    alignment_max_tokens: int = setting(64, "verse length cap in tokens (fixed, so shapes stay static)")
    alignment_temperature: float = setting(0.1, "InfoNCE temperature")
    alignment_pair_cache: bool = setting(True, "tokenize each parallel verse at most once per run, the new ones "
                                               "of 64 micro-batches in one call (off: every micro-step's pairs)")
    quality_seeds: list[str] = setting(help="words the tokenizer must keep as single tokens",
                                       factory=lambda: list(DEFAULT_QUALITY_SEEDS))

    def model_config(self, vocab_size: int | None = None) -> SimOneConfig:
        """The SimOneConfig for this run: the tokenizer's vocabulary, context = block_size
        (or the alignment verse length, if longer)."""
        return dataclasses.replace(self.model, vocab_size=vocab_size or self.vocab_size,
                                   max_seq_len=max(self.block_size, self.alignment_max_tokens))

    def problems(self) -> list[str]:
        errors = super().problems()
        errors += [f"--{name} must be >= 0 (0 switches the term off), got {getattr(self, name)}"
                   for name in LOSS_WEIGHTS if getattr(self, name) < 0]
        if self.alignment_pairs < 2:  # checked even when --alignment_weight 0 makes it unused
            errors.append(f"--alignment_pairs must be >= 2 for the contrastive loss, got {self.alignment_pairs}")
        if self.alignment_max_tokens < 2:
            errors.append(f"--alignment_max_tokens must be >= 2, got {self.alignment_max_tokens}")
        if not self.alignment_temperature > 0:
            errors.append(f"--alignment_temperature must be > 0, got {self.alignment_temperature}")
        bad = [seed for seed in self.quality_seeds if not seed or seed != seed.strip() or " " in seed]
        if bad:
            errors.append(f"--quality_seeds must be single words without spaces: {bad}")
        if not self.model.norm_eps < 1:
            errors.append(f"--norm_eps must be < 1, got {self.model.norm_eps}")
        return errors + upper_limit_problems(self, LIMITS) + upper_limit_problems(self.model, MODEL_LIMITS)


def simone_preset(name: str, vocab_size: int = 32000, **overrides) -> SimOneConfig:
    """The SimOneConfig of a preset (for tests and benchmarks that build a model directly)."""
    from mvlm_engine.cli import resolve_settings

    cfg = resolve_settings(PrioritaryConfig, {"preset": name}, {})
    return dataclasses.replace(cfg.model_config(vocab_size), **overrides)
