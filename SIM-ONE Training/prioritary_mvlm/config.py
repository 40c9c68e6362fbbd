"""PrioritaryConfig: every model, governance, loss and training field of a SIM-ONE run.

It extends the shared engine's TrainConfig (so the engine trains with it directly), rejects
unknown keys, and is saved as JSON beside every output. Its defaults are the small preset on
one GPU with the seed's flags (batch 12 x 4 accumulation, 32K vocabulary, 3 epochs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mvlm_engine.config import TrainConfig
from simone_transformer import SimOneConfig, preset_config

# Frequent names and terms that must stay single tokens (checked by a test).
DEFAULT_QUALITY_SEEDS = (
    "LORD", "God", "Jesus", "Christ", "Israel", "Jerusalem", "Moses", "David", "Abraham", "Egypt",
    "Pharaoh", "Babylon", "Judah", "Spirit", "covenant", "righteousness", "salvation", "Zion",
    "Philistines", "Nebuchadnezzar", "Melchizedek", "Galilee", "Pharisees", "Samaria",
)
LOSS_WEIGHTS = ("coherence_weight", "alignment_weight", "z_loss_weight")


@dataclass
class PrioritaryConfig(TrainConfig):
    """Model + governance + losses + training, in one strict dataclass."""

    # Training (the seed's defaults; paths are relative to "SIM-ONE Training/" in the CLIs).
    data_dir: str = "../mvlm_training_dataset_complete"
    output_dir: str = "../models/simone_enhanced"
    vocab_size: int = 32000
    batch_size: int = 12
    gradient_accumulation_steps: int = 4
    block_size: int = 1024
    learning_rate: float = 6e-4
    # Model (the small preset: GPT-2 small's ~85M non-embedding parameters).
    preset: str = "small"
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    ffn_hidden_dim: int | None = 2048
    rope_theta: float = 10000.0
    attention_backend: str = "sdpa"
    # Governance mechanisms.
    policy_gate: bool = True
    memory_tokens: int = 8  # 0 = off
    # Composite loss: accuracy (next-token CE) always has weight 1; 0 switches a term off.
    coherence_weight: float = 0.1  # multi-token prediction of token t+2
    alignment_weight: float = 0.1  # InfoNCE between parallel verses
    z_loss_weight: float = 1e-4  # stability
    adaptive_weights: bool = False  # uncertainty weighting (Kendall et al. 2018) instead of static
    alignment_pairs: int = 16  # parallel verse pairs per micro-step
    alignment_max_tokens: int = 64  # verse length cap (tokens), fixed so shapes stay static
    alignment_temperature: float = 0.1
    quality_seeds: list[str] = field(default_factory=lambda: list(DEFAULT_QUALITY_SEEDS))

    def model_config(self, vocab_size: int | None = None) -> SimOneConfig:
        """The SimOneConfig for this run (max_seq_len = block_size)."""
        return SimOneConfig(
            vocab_size=vocab_size or self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, ffn_hidden_dim=self.ffn_hidden_dim,
            max_seq_len=max(self.block_size, self.alignment_max_tokens), rope_theta=self.rope_theta,
            policy_gate=self.policy_gate, memory_tokens=self.memory_tokens,
            attention_backend=self.attention_backend)

    def problems(self) -> list[str]:
        errors = super().problems()
        for name in LOSS_WEIGHTS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                errors.append(f"--{name} must be >= 0 (0 switches the term off), got {value}")
        if self.alignment_weight > 0 and self.alignment_pairs < 2:
            errors.append(f"alignment_pairs must be >= 2 for the contrastive loss, got {self.alignment_pairs}")
        if self.alignment_max_tokens < 2:
            errors.append(f"alignment_max_tokens must be >= 2, got {self.alignment_max_tokens}")
        if not self.alignment_temperature > 0:
            errors.append(f"alignment_temperature must be > 0, got {self.alignment_temperature}")
        if self.memory_tokens < 0:
            errors.append(f"--memory_tokens must be >= 0 (0 = off), got {self.memory_tokens}")
        else:
            try:
                self.model_config()
            except ValueError as err:
                errors.append(str(err))
        return errors


MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim")
# Training defaults that suit each model size; the shape itself comes from simone_transformer.
TRAINING_PRESETS = {
    "tiny": {"vocab_size": 4096, "block_size": 128, "batch_size": 16, "gradient_accumulation_steps": 1,
             "max_steps": 300, "learning_rate": 3e-3, "warmup_steps": 30, "log_interval": 10,
             "eval_interval": 100, "save_interval": 100, "eval_windows": 64, "memory_tokens": 4,
             "alignment_pairs": 8, "alignment_max_tokens": 48},
    "small": {},
    "medium": {"learning_rate": 3e-4, "warmup_steps": 300},
}


def preset_values(name: str) -> dict:
    """Model shape (from simone_transformer's presets) plus the preset's training defaults."""
    shape = preset_config(name)
    return {**{k: getattr(shape, k) for k in MODEL_FIELDS}, **TRAINING_PRESETS[name], "preset": name}
