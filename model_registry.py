"""The table of models: one `ModelSpec` per model this project trains, looked up by name.

Everything that branches on the model reads it: train_all_models.py (its stages, in the order
here), generate.py and validate_models.py (how a folder loads: `FolderKind`, found by config.json's
model_type), export_gguf.py and release/ (which folders GGUF can express, and how), and the
benchmarks (run config, training task, objective). The engine (mvlm_engine/) names no model; the
model-specific hooks below import the models' own files only when called, so that reading this
table costs no torch import.

Adding a model: its own files (a trainer script whose run config subclasses TrainConfig and that
writes a save_pretrained folder), then one ModelSpec in MODELS (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mvlm_engine.fileio import read_json_object

REPO = Path(__file__).resolve().parent


@dataclass(frozen=True)
class FolderKind:
    """A model folder as transformers and the other clients see it (config.json's model_type)."""

    model_type: str
    display_name: str
    context_key: str = "max_position_embeddings"  # config.json's key of the context length
    trust_remote_code: bool = False  # its modelling code ships in the folder
    trace: bool = False  # generate(..., trace=True) returns a governance trace
    # "module:attribute" of its GGUF conversion (a release.gguf_conversion.Architecture, which may still
    # refuse a folder: CannotExpress), or None. A string, imported when used: the conversion reads this
    # table, so this table imports no conversion.
    gguf: str | None = None
    no_gguf: str = "no GGUF conversion is registered for it"  # why not, when gguf is None
    # What release/trust.py checks a folder of this kind against before anything loads it. code_dir: the
    # repository folder whose files a folder's modelling code must equal (trust_remote_code kinds); auto_map:
    # the config.json auto_map a folder of this kind carries; size_limits: () -> {config.json key: upper limit},
    # from the run configs' limit tables (imported when called).
    code_dir: Path | None = None
    auto_map: tuple[tuple[str, str], ...] = ()
    size_limits: Callable[[], dict[str, float]] | None = None

    def context_length(self, config: dict) -> int:
        return int(config[self.context_key])


@dataclass(frozen=True)
class ModelSpec:
    """A model this project trains. The hooks are called with the run's resolved settings."""

    name: str  # its pipeline stage, --only choice, log name and benchmark key
    folder: str  # its output folder under --models_dir
    trainer: Path  # its training script: run by the pipeline and the benchmarks with the engine's flags
    kind: FolderKind  # the folder the trainer writes
    run_config: Callable[[], type]  # its run-config class (a TrainConfig with PRESETS)
    build_task: Callable[[Any, Any], tuple]  # (cfg, runtime) -> (TrainingTask, data), as the trainer builds them
    build_objective: Callable[[Any], Any]  # (cfg) -> the training module for cfg.vocab_size, no corpus needed
    attention_backend: Callable[[Any, Any], str] | None = None  # (cfg, runtime) -> the attention kernel's name
    synthetic_extras: Callable[[Any, Any], dict] | None = None  # (cfg, generator) -> extra fields of a batch
    exports: tuple[FolderKind, ...] = ()  # folders exported from this model's (another model_type)

    @property
    def display_name(self) -> str:
        return self.kind.display_name


# --------------------------------------------------------------------------- MVLM-GPT2 (mvlm_trainer.py)


# mvlm_trainer.py is named by strings (resolve): it is a script too, whose main checks teacher folders with
# release/trust.py, which reads this table; a string keeps the two from importing each other.
def gpt2_run_config() -> type:
    return resolve("mvlm_trainer:GPT2RunConfig")


def gpt2_task(cfg, runtime) -> tuple:
    return resolve("mvlm_trainer:build_task")(cfg, runtime)


def gpt2_objective(cfg):
    return resolve("mvlm_trainer:build_objective")(cfg, cfg.vocab_size, 0)


def gpt2_size_limits() -> dict[str, float]:
    from mvlm_engine.config import TRAIN_LIMITS
    return {**resolve("mvlm_trainer:SHAPE_LIMITS"), "vocab_size": TRAIN_LIMITS["vocab_size"],
            "n_positions": TRAIN_LIMITS["block_size"]}


def gpt2_attention(cfg, runtime) -> str:
    from mvlm_engine.runtime import sdpa_backend_name
    return "sdpa/" + sdpa_backend_name(runtime, cfg.model.n_head, cfg.model.n_embd // cfg.model.n_head)


# --------------------------------------------------------------------------- Enhanced SIM-ONE (SIM-ONE Training/)


def simone_run_config() -> type:
    from prioritary_mvlm.config import PrioritaryConfig
    return PrioritaryConfig


def simone_task(cfg, runtime) -> tuple:
    from prioritary_mvlm.enhanced_trainer import EnhancedPrioritaryTrainer
    return EnhancedPrioritaryTrainer(cfg, runtime).build_task()


def simone_objective(cfg):
    from prioritary_mvlm.enhanced_trainer import EnhancedPrioritaryTrainer
    return EnhancedPrioritaryTrainer(cfg, None).build_objective(cfg.vocab_size)


def simone_size_limits() -> dict[str, float]:
    from mvlm_engine.config import TRAIN_LIMITS
    from prioritary_mvlm.config import MODEL_LIMITS
    return {**MODEL_LIMITS, "vocab_size": TRAIN_LIMITS["vocab_size"], "max_seq_len": TRAIN_LIMITS["block_size"]}


# config.json keys of the Llama export -> SIM-ONE's names for them
LLAMA_KEYS = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
              "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden_dim", "rope_theta": "rope_theta",
              "vocab_size": "vocab_size", "max_position_embeddings": "max_seq_len"}


def llama_size_limits() -> dict[str, float]:
    limits = simone_size_limits()
    return {key: limits[ours] for key, ours in LLAMA_KEYS.items()}


def simone_attention(cfg, runtime) -> str:
    import torch

    from mvlm_engine.runtime import sdpa_backend_name
    from simone_transformer.rope_attention import resolve_attention_backend

    shape = cfg.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[runtime.precision]
    if resolve_attention_backend(shape.attention_backend, runtime.device, dtype) == "flash":
        return "flash-attn"
    return "sdpa/" + sdpa_backend_name(runtime, shape.n_heads, shape.d_model // shape.n_heads)


def simone_pairs(cfg, generator) -> dict:
    """With the alignment loss on, (2 P, max_tokens) parallel-verse pairs of random ids, all real tokens."""
    import torch

    if cfg.alignment_weight <= 0:
        return {}
    pairs = (2 * cfg.alignment_pairs, cfg.alignment_max_tokens)
    return {"pair_ids": torch.randint(0, cfg.vocab_size, pairs, generator=generator),
            "pair_mask": torch.ones(pairs, dtype=torch.long)}


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("gpt2", "mvlm_gpt2", REPO / "mvlm_trainer.py",
              FolderKind("gpt2", "MVLM-GPT2", context_key="n_positions", gguf="release.gguf_conversion:GPT2",
                         size_limits=gpt2_size_limits),
              gpt2_run_config, gpt2_task, gpt2_objective, gpt2_attention),
    ModelSpec("simone", "simone_enhanced", REPO / "SIM-ONE Training" / "enhanced_train.py",
              # GGUF: llama.cpp's llama graph, only with every governance and recipe piece Llama lacks off.
              FolderKind("simone", "SIM-ONE", context_key="max_seq_len", trust_remote_code=True, trace=True,
                         gguf="release.gguf_conversion:SIMONE", code_dir=REPO / "SIM-ONE Training" / "simone_transformer",
                         auto_map=(("AutoConfig", "hf_model.SimOneHFConfig"),
                                   ("AutoModelForCausalLM", "hf_model.SimOneForCausalLM")),
                         size_limits=simone_size_limits),
              simone_run_config, simone_task, simone_objective, simone_attention, simone_pairs,
              exports=(FolderKind("llama", "Llama export of SIM-ONE", gguf="release.gguf_conversion:LLAMA",
                                  size_limits=llama_size_limits),)),
)}


# --------------------------------------------------------------------------- lookups


def model_names() -> list[str]:
    """The trained models, in training order."""
    return list(MODELS)


def folder_kinds() -> dict[str, FolderKind]:
    """Every folder type the models write or are exported to, by config.json's model_type."""
    return {kind.model_type: kind for spec in MODELS.values() for kind in (spec.kind, *spec.exports)}


def folder_kind(model_type) -> FolderKind | None:
    return folder_kinds().get(model_type) if isinstance(model_type, str) else None


def kind_of_folder(folder: Path) -> FolderKind | None:
    """The kind of a model folder by its config.json; None for a folder of no kind listed here."""
    return folder_kind(read_json_object(Path(folder) / "config.json").get("model_type"))


def resolve(reference: str):
    """The object a "module:attribute" string names. A trainer script beside this file (not part of
    the installed packages) imports from any process, SIM-ONE's trainer or an installed tool too."""
    module, _, attribute = reference.partition(":")
    if (REPO / f"{module}.py").is_file() and str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    return getattr(importlib.import_module(module), attribute)
