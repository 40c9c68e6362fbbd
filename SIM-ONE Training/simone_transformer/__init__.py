"""Enhanced SIM-ONE model (see enhanced_model.py); HF packaging and generation live in hf_model.py.

Kept free of transformers imports so that `import simone_transformer` stays fast:
use `from simone_transformer.hf_model import SimOneForCausalLM, save_pretrained_dir, load_native`.
"""
from .enhanced_model import (
    SimOneConfig,
    SimOneModel,
    SimOneOutput,
    concat_traces,
    trace_to_jsonable,
)
from .rope_attention import resolve_attention_backend

__all__ = [
    "SimOneConfig",
    "SimOneModel",
    "SimOneOutput",
    "concat_traces",
    "resolve_attention_backend",
    "trace_to_jsonable",
]
