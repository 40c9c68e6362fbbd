"""Hugging Face packaging for SIM-ONE: config class, causal-LM wrapper, save and load.

A directory written by `save_pretrained_dir` holds config.json (with `auto_map`),
model.safetensors, generation_config.json and copies of the four modelling files (the
trainer adds tokenizer.json + tokenizer_config.json), so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

works with nothing of this repository importable. The modelling files therefore use
only relative imports among themselves; transformers copies them by following the
`from .x import` lines.

Weights are stored under the wrapper's names ("model.<native name>"); `load_native`
strips the prefix to rebuild a plain `SimOneModel`. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:  # the transformers 5 name; 4.x has only PretrainedConfig
    from transformers import PreTrainedConfig
except ImportError:
    from transformers import PretrainedConfig as PreTrainedConfig

from .enhanced_model import SimOneConfig, SimOneModel

# transformers 4.x copies into its module cache only the files this module imports itself:
# name every sibling here so that enhanced_model's own imports resolve there.
from .modern_layers import RMSNorm  # noqa: F401,E402
from .rope_attention import KVCache  # noqa: F401,E402

WEIGHTS_NAME = "model.safetensors"
CODE_FILES = ("hf_model.py", "enhanced_model.py", "rope_attention.py", "modern_layers.py")


class SimOneHFConfig(PreTrainedConfig):
    """`SimOneConfig` as a transformers config (model_type "simone"); same field names."""

    model_type = "simone"
    # Standard names some transformers utilities look up.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_hidden_dim",
        "max_position_embeddings": "max_seq_len",
    }

    # Every SimOneConfig field, with its type and default, plus the special-token ids: derived
    # here so that the native config stays the one home of each default.
    __annotations__ = {**{f.name: f.type for f in fields(SimOneConfig)},
                       "bos_token_id": "int | None", "eos_token_id": "int | None", "pad_token_id": "int | None"}
    vars().update({f.name: f.default for f in fields(SimOneConfig)})
    bos_token_id = eos_token_id = pad_token_id = None

    def to_simone_config(self) -> SimOneConfig:
        return SimOneConfig.from_dict({f.name: getattr(self, f.name) for f in fields(SimOneConfig)})


class SimOneForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers wrapper around `SimOneModel` (available as `.model`).

    `generate` delegates to the native `SimOneModel.generate` (native KV cache with
    the memory tokens prefilled once), after reading HF-style arguments.
    """

    config_class = SimOneHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: SimOneHFConfig):
        super().__init__(config)
        self.model = SimOneModel(config.to_simone_config())
        self.post_init()

    def _init_weights(self, module):
        # Same init as the native model. When loading, transformers calls this only for
        # what the checkpoint did not fill: here the RoPE tables (non-persistent buffers).
        self.model.init_module(module)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None, output_hidden_states=False,
                **kwargs) -> CausalLMOutput:
        """Logits (B, T, V); with labels (B, T), also the shifted next-token loss
        (-100 ignored), as in transformers' causal LMs. With output_hidden_states, a
        1-tuple holding the final normed hidden states (B, T, D), the LM head's input.
        Extra HF bookkeeping kwargs (return_dict, use_cache, ...) are accepted and ignored."""
        _reject_padding(attention_mask)
        out = self.model(input_ids)
        logits = out.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        hidden = (out.hidden_states,) if output_hidden_states else None
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, generation_config=None, **kwargs):
        """HF-style generate: max_new_tokens / max_length, do_sample, temperature, top_k,
        top_p, repetition_penalty, eos_token_id, use_cache. Greedy unless do_sample=True. Returns
        the token tensor (B, T + n), prompt included. Rows that finished early are
        padded with eos (or pad_token_id when set). No beams, no padded batches."""
        _reject_padding(attention_mask)
        gc = GenerationConfig.from_dict((generation_config or self.generation_config).to_dict())
        unused = gc.update(**kwargs)
        if unused:
            raise ValueError(f"unsupported generate arguments: {', '.join(sorted(unused))}")
        if gc.num_beams not in (None, 1) or gc.return_dict_in_generate:
            raise ValueError("SIM-ONE generate supports neither beam search nor return_dict_in_generate")
        T = input_ids.shape[1]
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - T
        eos = gc.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(eos) > 1:
                raise ValueError(f"SIM-ONE generate takes one eos_token_id, got {eos}")
            eos = eos[0] if eos else None
        result = self.model.generate(
            input_ids,
            max_new_tokens=max(max_new, 0),
            temperature=(gc.temperature if gc.temperature is not None else 1.0) if gc.do_sample else 0.0,
            top_k=gc.top_k if gc.do_sample else None,
            top_p=gc.top_p if gc.do_sample else None,
            repetition_penalty=gc.repetition_penalty or 1.0,
            eos_token_id=eos,
            use_cache=gc.use_cache if gc.use_cache is not None else True,
        )
        tokens = result.tokens
        if eos is not None and gc.pad_token_id is not None and gc.pad_token_id != eos:
            # Native generation repeats eos after a row ends; HF convention pads instead.
            after_first_eos = (tokens[:, T:] == eos).long().cumsum(dim=1) > 1
            tokens[:, T:] = tokens[:, T:].masked_fill(after_first_eos, gc.pad_token_id)
        return tokens


def _reject_padding(attention_mask) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("SIM-ONE takes unpadded, equal-length sequences: attention_mask must be all ones")


# --------------------------------------------------------------------------- save / load


def save_pretrained_dir(
    model: SimOneModel,
    out_dir: str | Path,
    special_ids: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as a transformers directory loadable with trust_remote_code.

    Files: config.json (auto_map for AutoConfig and AutoModelForCausalLM, plus the
    bos/eos/pad ids in `special_ids`), model.safetensors (in `dtype`, default the model's
    own), the modelling code and generation_config.json. The tokenizer files are the
    trainer's to write. Returns the directory.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special_ids = special_ids or {}
    weights = {
        f"model.{name}": (t.to(dtype) if dtype is not None else t).detach().contiguous().cpu()
        for name, t in model.state_dict().items()
    }
    save_file(weights, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    stored_dtype = next(iter(weights.values())).dtype

    config = SimOneHFConfig(
        **model.config.to_dict(),
        **special_ids,
        architectures=["SimOneForCausalLM"],
        auto_map={
            "AutoConfig": "hf_model.SimOneHFConfig",
            "AutoModelForCausalLM": "hf_model.SimOneForCausalLM",
        },
        dtype=str(stored_dtype).removeprefix("torch."),
    )
    config.to_json_file(out_dir / "config.json", use_diff=False)
    GenerationConfig(**special_ids).save_pretrained(out_dir)
    package = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(package / name, out_dir / name)
    return out_dir


def load_config(model_dir: str | Path) -> SimOneConfig:
    """The SimOneConfig stored in a saved directory's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("model_type") != "simone":
        raise ValueError(f"{path} is not a SIM-ONE config (model_type={raw.get('model_type')!r})")
    names = [f.name for f in fields(SimOneConfig)]
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(f"{path} lacks SIM-ONE fields: {', '.join(missing)}")
    return SimOneConfig.from_dict({n: raw[n] for n in names})


def load_native(model_dir: str | Path, device: str | torch.device = "cpu") -> SimOneModel:
    """Rebuild a SimOneModel (fp32) from a `save_pretrained_dir` directory (safetensors only)."""
    config = load_config(model_dir)
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {model_dir}")
    state = {k.removeprefix("model."): v for k, v in load_file(str(path), device=str(device)).items()}
    with torch.device(device):
        model = SimOneModel(config)
    model.load_state_dict(state, strict=True)
    return model
