"""Enhanced SIM-ONE model (see enhanced_model.py); HF packaging lives in hf_model.py.

Kept free of transformers imports so that `import simone_transformer` stays fast:
use `from simone_transformer.hf_model import save_pretrained_dir, load_native`.
"""
from .enhanced_model import (
    GenerationResult,
    SimOneConfig,
    SimOneModel,
    SimOneOutput,
    sample_next_token,
    trace_to_jsonable,
)
from .rope_attention import KVCache, resolve_attention_backend

__all__ = [
    "GenerationResult",
    "KVCache",
    "SimOneConfig",
    "SimOneModel",
    "SimOneOutput",
    "resolve_attention_backend",
    "sample_next_token",
    "trace_to_jsonable",
]
