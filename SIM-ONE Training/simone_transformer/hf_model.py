"""Hugging Face packaging for SIM-ONE: config class, causal-LM wrapper, save and load.

A directory written by `save_pretrained_dir` holds config.json (with `auto_map`),
model.safetensors, generation_config.json and copies of the four modelling files (the
trainer adds tokenizer.json + tokenizer_config.json), so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

works with nothing of this repository importable. The modelling files therefore use
only relative imports among themselves; transformers copies them by following the
`from .x import` lines.

Generation is transformers' own `GenerationMixin`: the wrapper's forward takes HF's attention
mask, position ids and Cache (a `DynamicCache` unless the caller picks another), so padded
batches, beam search, several return sequences, streamers and logits processors all work, on
transformers 4.57 (which calls the cache `past_key_values`) and 5.x (`cache`). SIM-ONE's
governance trace rides along as an extra output: `generate(..., trace=True)`.

Weights are stored under the wrapper's names ("model.<native name>"); `load_native`
strips the prefix to rebuild a plain `SimOneModel`. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

try:  # the transformers 5 name; 4.x has only PretrainedConfig
    from transformers import PreTrainedConfig
except ImportError:
    from transformers import PretrainedConfig as PreTrainedConfig

from .enhanced_model import TRAINING_ONLY, SimOneConfig, SimOneModel, concat_traces

# transformers 4.x copies into its module cache only the files this module imports itself:
# name every sibling here so that enhanced_model's own imports resolve there.
from .modern_layers import RMSNorm  # noqa: F401,E402
from .rope_attention import CausalSelfAttention  # noqa: F401,E402

WEIGHTS_NAME = "model.safetensors"
CODE_FILES = ("hf_model.py", "enhanced_model.py", "rope_attention.py", "modern_layers.py")
# The output field GenerationMixin reads the cache back from: "cache" in transformers 5,
# "past_key_values" in 4.x.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
logger = logging.get_logger(__name__)


@dataclass
class SimOneCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus SIM-ONE's governance trace (forward(trace=True))."""

    trace: dict | None = None


@dataclass
class SimOneGenerateOutput(GenerateDecoderOnlyOutput):
    """generate(..., trace=True): transformers' output plus the trace of every forward, joined
    along positions: (L, B, S - 1, ...) for S = prompt + new tokens (the last token is never fed)."""

    trace: dict | None = None


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
    """transformers wrapper around `SimOneModel` (available as `.model`); `generate` is
    GenerationMixin's, with the memory tokens prefilled into the cache on the first step."""

    config_class = SimOneHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # gradient_checkpointing_enable() (and Trainer's gradient_checkpointing=True) finds the native
    # model's `gradient_checkpointing` flag and gives it the checkpoint function (SimOneModel._run_layers).
    supports_gradient_checkpointing = True

    def __init__(self, config: SimOneHFConfig):
        super().__init__(config)
        self.model = SimOneModel(config.to_simone_config())
        self._trace_steps = None  # a list while generate(trace=True) runs
        self.post_init()

    @classmethod
    def from_native(cls, model: SimOneModel, **special_ids) -> "SimOneForCausalLM":
        """Wrap an in-memory SimOneModel (shared, not copied) to generate with it;
        special_ids: bos_token_id / eos_token_id / pad_token_id."""
        with torch.device("meta"):  # the wrapper's own model is replaced at once: build no weights
            wrapper = cls(SimOneHFConfig(**model.config.to_dict(), **special_ids))
        wrapper.model = model
        return wrapper.train(model.training)

    def _init_weights(self, module):
        # Same init as the native model. When loading, transformers calls this only for
        # what the checkpoint did not fill: here the RoPE tables (non-persistent buffers).
        self.model.init_module(module)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        """The untied LM head; None when tied (the logits then read embed_tokens.weight itself)."""
        return self.model.lm_head

    def set_output_embeddings(self, value):
        value.is_output_head = True
        self.model.lm_head = value

    def tie_weights(self, *args, **kwargs):
        """Nothing to tie: a tied SIM-ONE has no lm_head at all and an untied one keeps its own
        (transformers 4 would otherwise tie get_output_embeddings() to the input embedding, since
        its configs default to tie_word_embeddings=True)."""

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' resize (the input embedding, and the head when untied), plus what only
        SIM-ONE has: the value-embedding tables and the native config's vocab_size."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        vocab = embeddings.weight.shape[0]
        head = self.model.lm_head
        if head is not None and head.out_features != vocab:  # transformers 4 skips it (tie_word_embeddings)
            self.set_output_embeddings(self._get_resized_lm_head(head, vocab))
        if self.model.value_embeds is not None:
            for i, table in enumerate(self.model.value_embeds):
                self.model.value_embeds[i] = self._get_resized_embeddings(table, vocab)
        self.model.config.vocab_size = vocab
        return embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, labels=None, use_cache=None, output_hidden_states=False, trace=False,
                **kwargs) -> SimOneCausalLMOutput:
        """Logits (B, T, V), as transformers' causal LMs. attention_mask / position_ids / cache:
        as SimOneModel.forward (`past_key_values` is transformers 4's name for the cache; with
        use_cache=True and no cache, a DynamicCache is started; not while training with gradient
        checkpointing). labels (B, T): also the next-token loss, shifted inside (-100 ignored), by
        transformers' loss_function, which takes Trainer's num_items_in_batch (the mean over a whole
        gradient-accumulation window). output_hidden_states: a 1-tuple holding the final normed
        hidden states (B, T, D), the LM head's input. trace: the governance trace as `.trace`.
        Other HF bookkeeping kwargs (return_dict, cache_position, ...) are accepted and ignored."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None and self.model.gradient_checkpointing and self.training:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using no cache")
            use_cache = False
        if cache is None and use_cache:
            cache = DynamicCache()
        recording = self._trace_steps is not None
        out = self.model(input_ids, attention_mask, position_ids, cache, trace=trace or recording)
        if recording:
            # Without a cache every step re-reads the whole sequence: keep only its new position.
            step = out.trace if cache is not None or not self._trace_steps else {
                key: value[:, :, -1:] for key, value in out.trace.items()}
            self._trace_steps.append(step)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1], **kwargs)
        hidden = (out.hidden_states,) if output_hidden_states else None
        return SimOneCausalLMOutput(loss=loss, logits=out.logits, hidden_states=hidden,
                                    trace=out.trace if trace else None, **{CACHE_FIELD: cache})

    def generate(self, *args, trace: bool = False, **kwargs):
        """GenerationMixin.generate, unchanged: greedy, sampling, beam search, num_return_sequences,
        streamers, logits processors, left-padded batches with their attention_mask.

        trace=True also records SIM-ONE's governance trace in the same forward calls and returns
        a SimOneGenerateOutput (return_dict_in_generate) with `.trace`: as SimOneModel.forward's,
        over every position fed to the model (position t records the step that predicted token
        t + 1). Needs num_beams=1: beam search reorders rows between steps.
        """
        if not trace:
            return super().generate(*args, **kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("num_beams", config.num_beams) not in (None, 1):
            raise ValueError("trace=True needs num_beams=1: beam search reorders rows between steps")
        self._trace_steps = []
        try:
            out = super().generate(*args, **{**kwargs, "return_dict_in_generate": True})
            steps = self._trace_steps
        finally:
            self._trace_steps = None
        return SimOneGenerateOutput(**out, trace=concat_traces(steps) if steps else None)


# --------------------------------------------------------------------------- save / load


def save_pretrained_dir(
    model: SimOneModel,
    out_dir: str | Path,
    special_ids: dict | None = None,
    dtype: torch.dtype | None = None,
    generation: dict | None = None,
) -> Path:
    """Write `model` as a transformers directory loadable with trust_remote_code.

    Files: config.json (auto_map for AutoConfig and AutoModelForCausalLM, plus the
    bos/eos/pad ids in `special_ids`), model.safetensors (in `dtype`, default the model's
    own), the modelling code and generation_config.json (the special ids plus `generation`,
    e.g. sampling defaults). The tokenizer files are the trainer's to write. Returns the directory.
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
    GenerationConfig(**special_ids, **(generation or {})).save_pretrained(out_dir)
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
    missing = [n for n in names if n not in raw and n not in TRAINING_ONLY]
    if missing:
        raise ValueError(f"{path} lacks SIM-ONE fields: {', '.join(missing)}")
    return SimOneConfig.from_dict({n: raw[n] for n in names if n in raw})


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
