"""Enhanced SIM-ONE: a Llama-style decoder (RoPE, SwiGLU, RMSNorm) with three
governance mechanisms, each a config switch:

- policy  (`policy_gate`):   a learned sigmoid gate per attention head per token
                              (see rope_attention.py);
- memory  (`memory_tokens`): N learned embeddings placed before every sequence and
                              attended under the ordinary causal mask (Burtsev et al.
                              2020, arXiv 2006.11527). They get no logits, hence no loss,
                              and sit at RoPE position 0 (i.e. unrotated), so real token t
                              keeps position t whether memory is on or off. Generation
                              prefills them once into the KV cache; padding never hides them;
- trace   (`forward(..., trace=True)`): a per-token record of the gates, the attention
                              mass on memory, and a logit-lens top-k per layer.

Training-recipe switches (QK-norm, zero-init projections and head, logit soft-cap, value residual
or value embeddings, ReLU^2 MLP, x0 mixing, U-net skips; see SimOneConfig) come from
modded-nanogpt; dropout on the residual branches and on attention (`dropout`, `attention_dropout`)
acts in training only. The defaults are the recipe measured in RESULTS.md: of these pieces only the
untied zero-initialised head is on (the others showed no gain beyond the seed spread). With
everything `llama_incompatible_features` lists off, the model is numerically a Llama model (same
parameter names, see export_llama.py). Reads top to bottom: config, block, model, trace helpers.
Generation is Hugging Face's GenerationMixin, through the wrapper in hf_model.py: this model
takes HF's attention mask, position ids and KV cache (`forward`). Imports only torch and sibling
files (trust_remote_code).
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .modern_layers import MLP_TYPES, MLPS, RMSNorm, RotaryEmbedding
from .rope_attention import ATTENTION_BACKENDS, CausalSelfAttention, padded_causal_mask

# --------------------------------------------------------------------------- config


def _setting(default, help_text: str):
    """A config field with its help text (the training CLIs turn each field into a flag)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class SimOneConfig:
    """Architecture and governance switches. `from_dict` rejects unknown keys."""

    vocab_size: int = _setting(32000, "vocabulary size (a run takes it from its tokenizer)")
    d_model: int = _setting(768, "width of the residual stream")
    n_layers: int = _setting(12, "transformer blocks")
    n_heads: int = _setting(12, "attention heads")
    n_kv_heads: int | None = _setting(None, "key/value heads (grouped-query attention); default: n_heads")
    ffn_hidden_dim: int | None = _setting(None, "MLP hidden size; default: 8/3 d_model rounded up to 64 (SwiGLU), "
                                                "4 d_model (ReLU^2)")
    max_seq_len: int = _setting(1024, "real tokens per sequence (a run takes it from --block_size)")
    rope_theta: float = _setting(10000.0, "RoPE base")
    norm_eps: float = _setting(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _setting(False, "the LM head reuses the input embedding")
    policy_gate: bool = _setting(True, "governance: a learned sigmoid gate per attention head per token")
    memory_tokens: int = _setting(8, "governance: learned memory tokens before every sequence (0 = off)")
    attention_backend: str = _setting("sdpa", "sdpa | flash (flash-attn on CUDA bf16/fp16 only)")
    init_std: float = _setting(0.02, "standard deviation of the weight init")
    trace_top_k: int = _setting(5, "logit-lens entries per layer in a trace")
    # Training-recipe switches (modded-nanogpt style); defaults: the measured recipe (RESULTS.md).
    # `llama_incompatible_features` names the ones a Llama checkpoint cannot express.
    qk_norm: bool = _setting(False, "RMSNorm with a learned gain on each head's q and k, before RoPE")
    zero_init_proj: bool = _setting(False, "o_proj and down_proj start at 0: every block starts as the identity")
    zero_init_head: bool = _setting(True, "an untied lm_head starts at 0 (uniform first predictions); "
                                                 "no effect with tie_embeddings")
    logit_softcap: float = _setting(0.0, "> 0: logits = cap * tanh(logits / cap); 0 = off")
    value_residual: bool = _setting(False, "layers after the first mix layer 0's values into theirs")
    value_embeddings: bool = _setting(False, "each layer mixes a learned per-token vector into its values")
    mlp: str = _setting("swiglu", "swiglu (Llama) | relu2: down(relu(up(x))^2)")
    x0_mix: bool = _setting(False, "each block starts from a * x + b * x0 (x0: the embedded input), learned")
    unet_skips: bool = _setting(False, "layer L-1-i adds w_i * (output of layer i) for i < L // 2, learned")
    # Regularisation, active in module.train() only: evaluation, generation and exports compute the
    # same with any value, so these are no architecture pieces (LLAMA_VALUES has no entry for them).
    dropout: float = _setting(0.0, "dropout on each residual branch's output (attention after o_proj, MLP after "
                                   "down_proj), training only")
    attention_dropout: float = _setting(0.0, "dropout on the attention probabilities, training only")

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden_dim is None:
            # Same parameter count either way: SwiGLU has three matrices, ReLU^2 two.
            self.ffn_hidden_dim = 4 * self.d_model if self.mlp == "relu2" else 64 * math.ceil(8 * self.d_model / 3 / 64)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim",
                     "max_seq_len", "trace_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim d_model/n_heads ({self.head_dim}) must be even for RoPE")
        if self.memory_tokens < 0:
            raise ValueError(f"memory_tokens must be >= 0 (0 = off), got {self.memory_tokens}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.mlp not in MLP_TYPES:
            raise ValueError(f"mlp must be one of {MLP_TYPES}, got {self.mlp!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        for name in ("dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.value_residual and self.value_embeddings:
            raise ValueError("value_residual and value_embeddings are alternatives: switch on one of them")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "SimOneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SimOneConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_type(name: str, value, hint) -> None:
    """Reject e.g. d_model="768" or policy_gate=1 with a one-line message."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    ok = any(
        (t is type(None) and value is None)
        or (t is bool and isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is str and isinstance(value, str))
        for t in allowed
    )
    if not ok:
        raise ValueError(f"{name} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")


# The value of each switch a stock Llama checkpoint can express (init-only switches and an untied
# head need no entry): SimOneConfig(**LLAMA_VALUES, ...) is numerically a Llama model.
LLAMA_VALUES = {"policy_gate": False, "memory_tokens": 0, "qk_norm": False, "logit_softcap": 0.0,
                "value_residual": False, "value_embeddings": False, "mlp": "swiglu", "x0_mix": False,
                "unet_skips": False}


# Fields that change training only: a folder saved before they existed loads with their defaults.
TRAINING_ONLY = ("dropout", "attention_dropout")


def llama_incompatible_features(config: SimOneConfig) -> list[str]:
    """The switched-on pieces a stock Llama checkpoint cannot express, as "field=value"
    (empty: the model exports to LlamaForCausalLM as it is). The single list an exporter
    consults."""
    return [f"{name}={getattr(config, name)}" for name, value in LLAMA_VALUES.items() if getattr(config, name) != value]


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block with Llama's parameter names."""

    def __init__(self, config: SimOneConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        # The first layer's values are the value residual's source, so it mixes nothing in.
        value_mix = config.value_embeddings or (config.value_residual and layer_idx > 0)
        self.self_attn = CausalSelfAttention(
            config.d_model, config.n_heads, config.n_kv_heads, layer_idx,
            policy_gate=config.policy_gate, attention_backend=config.attention_backend,
            qk_norm=config.qk_norm, norm_eps=config.norm_eps, value_mix=value_mix,
            attention_dropout=config.attention_dropout,
        )
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLPS[config.mlp](config.d_model, config.ffn_hidden_dim)
        # On both branches' outputs before they join the residual stream (GPT-2's resid_pdrop);
        # the identity in eval mode and at p = 0 (no random numbers drawn).
        self.residual_dropout = nn.Dropout(config.dropout)
        # (a, b) of a * x + b * x0: starts as the plain residual stream (a=1, b=0).
        self.x0_lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if config.x0_mix else None

    def forward(self, x, cos, sin, cache=None, start=0, mask=None, n_memory=0, record=None, value_extra=None,
                x0=None):
        """-> (x, this layer's values before mixing (B, KV, S, hd)). x0: the embedded input (x0_mix);
        the other arguments as in CausalSelfAttention.forward."""
        if self.x0_lambdas is not None:
            x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        h, values = self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask, n_memory, record,
                                   value_extra)
        x = x + self.residual_dropout(h)
        return x + self.residual_dropout(self.mlp(self.post_attention_layernorm(x))), values


@dataclass
class SimOneOutput:
    """What `SimOneModel.forward` returns; every tensor covers the real tokens only.

    logits:        (B, T, V)
    hidden_states: (B, T, D) final-normed hidden states (input of the LM head)
    cache:         the KV cache passed in (now holding this call's positions too), or None
    trace:         dict of tensors (see SimOneModel.forward), or None
    """

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    cache: object | None = None
    trace: dict | None = None


class SimOneModel(nn.Module):
    """Decoder-only language model; loss is computed outside (the trainer owns it)."""

    def __init__(self, config: SimOneConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.memory_embeddings = (
            nn.Parameter(torch.zeros(config.memory_tokens, config.d_model)) if config.memory_tokens else None
        )
        # One (vocab, KV * hd) table per layer: token-keyed values (embedding parameters).
        kv_dim = config.n_kv_heads * config.head_dim
        self.value_embeds = (
            nn.ModuleList(nn.Embedding(config.vocab_size, kv_dim) for _ in range(config.n_layers))
            if config.value_embeddings else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # U-net: one weight per (layer i, layer L-1-i) pair, i < L // 2.
        self.skip_weights = nn.Parameter(torch.ones(config.n_layers // 2)) if config.unet_skips else None
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # Tied: logits reuse the embedding matrix directly (no shared Parameter to untangle
        # in safetensors or in HF's tying logic).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.is_output_head = True  # zero_init_head; the engine's optimizer groups read it too
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        # transformers' gradient checkpointing, switched on through the HF wrapper's
        # gradient_checkpointing_enable(), which also sets the function: in training without a
        # cache each block's activations are recomputed in the backward pass instead of kept.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        self.apply(self.init_module)

    @torch.no_grad()
    def init_module(self, module: nn.Module) -> None:
        """GPT-2 style init: N(0, init_std), residual projections N(0, init_std / sqrt(2 L)).

        zero_init_proj / zero_init_head start those matrices at 0 instead (modded-nanogpt):
        each block then starts as the identity and the first predictions are uniform.
        """
        c, std = self.config, self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = 0.0 if c.zero_init_proj else std / math.sqrt(2 * c.n_layers)
            if getattr(module, "is_output_head", False) and c.zero_init_head:
                std = 0.0
            if std == 0.0:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, CausalSelfAttention) and module.value_lambda is not None:
            nn.init.constant_(module.value_lambda, 0.5)
        elif isinstance(module, Block) and module.x0_lambdas is not None:
            module.x0_lambdas.data.copy_(torch.tensor([1.0, 0.0]))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            module.reset_tables()
        elif isinstance(module, SimOneModel):
            if module.memory_embeddings is not None:
                nn.init.normal_(module.memory_embeddings, mean=0.0, std=std)
            if module.skip_weights is not None:
                nn.init.ones_(module.skip_weights)

    def use_fused_layers(self, enabled: bool) -> None:
        """Norms, RoPE and the SwiGLU gate through the autograd functions of modern_layers
        (the default: fewer activations kept for the backward pass), or as plain ops (the
        baseline a memory comparison measures). Forward values are the same either way."""
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = enabled

    # ------------------------------------------------------------------ accounting

    def count_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops the vocabulary matrices (input embedding,
        untied LM head, value embeddings) and the memory embeddings, as in Kaplan et al. 2020."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed_tokens.weight.numel()
            if self.value_embeds is not None:
                total -= sum(e.weight.numel() for e in self.value_embeds)
            if self.lm_head is not None:
                total -= self.lm_head.weight.numel()
            if self.memory_embeddings is not None:
                total -= self.memory_embeddings.numel()
        return total

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        trace: bool = False,
        trace_top_k: int | None = None,
        return_logits: bool = True,
    ) -> SimOneOutput:
        """input_ids (B, T) -> SimOneOutput with logits (B, T, V) for the real tokens.

        attention_mask: (B, P + T) over the real tokens so far (P of them cached), 1 = token,
            0 = padding, as in transformers; None = no padding. Padded keys are never attended;
            the memory tokens always are.
        position_ids: (B, T) RoPE positions of input_ids; default: counted along attention_mask
            (a row's first real token is position 0, so left padding shifts nothing), else P .. P + T - 1.
        cache: a KV cache with Hugging Face's Cache API (e.g. transformers.DynamicCache); the
            tokens are appended to it. On an empty cache (and always without one) the memory
            tokens are prepended; afterwards they live in the cache.
        trace: also return a dict of detached tensors, L = n_layers, k = top-k:
            "policy_gate"    (L, B, T, H)  gate per head (only when policy_gate)
            "memory_mass"    (L, B, T, H)  attention probability on memory tokens
                                           (only when memory_tokens > 0)
            "lens_top_ids"   (L, B, T, k)  logit lens: final norm + LM head applied to
            "lens_top_probs" (L, B, T, k)  each layer's residual stream, top-k softmax
            Padded positions record a gate and a memory mass of 0.
        Tracing only reads activations; the logits are identical with it on or off.
        return_logits=False: logits is None (a loss that unembeds in chunks needs only hidden_states).
        """
        B, T = input_ids.shape
        n_mem = self.config.memory_tokens
        cached = cache.get_seq_length() if cache is not None else 0  # memory rows included
        prepend = n_mem if cached == 0 else 0  # memory rows in this call's sequence
        past = cached - n_mem if cached else 0  # real tokens already in the cache
        real = self._real_tokens(attention_mask, past, T)  # (B, P + T) bool, or None: no padding
        cos, sin = self.rope(self._positions(position_ids, real, past, T, input_ids.device))  # (B|1, T, hd)

        x = self.embed_tokens(input_ids)  # (B, T, D)
        if prepend:
            memory = self.memory_embeddings.to(x.dtype).expand(B, -1, -1)  # (N, D) -> (B, N, D)
            x = torch.cat((memory, x), dim=1)  # (B, N + T, D)
            # Position 0 for every memory token: the rotation is the identity there. The tables keep
            # their batch size: 1 when every row has the same positions.
            cos = torch.cat((self.rope.cos[:1].expand(cos.shape[0], n_mem, -1), cos), dim=1)  # (B|1, N + T, hd)
            sin = torch.cat((self.rope.sin[:1].expand(sin.shape[0], n_mem, -1), sin), dim=1)
        mask = None
        if real is not None:  # keys: the memory tokens (always visible), then the real ones
            mask = padded_causal_mask(torch.cat((real.new_ones(B, n_mem), real), dim=1), prepend + T)

        records = [{} for _ in self.layers] if trace else None
        lens = [] if trace else None
        x = self._run_layers(x, input_ids, cos, sin, (cache, cached, mask), prepend, records, lens, trace_top_k)

        hidden = self.norm(x[:, prepend:])  # (B, T, D): real tokens only
        logits = self.logits(hidden) if return_logits else None
        trace_out = None
        if trace:
            trace_out = self._collect_trace(records, lens, prepend, None if real is None else real[:, -T:])
        return SimOneOutput(logits=logits, hidden_states=hidden, cache=cache, trace=trace_out)

    @staticmethod
    def _real_tokens(attention_mask: torch.Tensor | None, past: int, T: int) -> torch.Tensor | None:
        """attention_mask as bool (B, past + T), or None when it hides nothing (the fast paths)."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens; the cache holds {past} "
                             f"and input_ids has {T}")
        # An all-ones check reads the data; an export keeps the mask path for every input instead.
        if not torch.compiler.is_compiling() and bool(attention_mask.all()):
            return None
        return attention_mask.bool()

    def _positions(self, position_ids, real, past: int, T: int, device) -> torch.Tensor:
        """RoPE positions (B or 1, T) of this call's tokens, checked against max_seq_len."""
        if position_ids is None:
            if real is not None:  # count real tokens only: padding occupies no position
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None]
        # No row holds more than past + T real tokens: a plain-int bound, data read only beyond it.
        limit = self.config.max_seq_len
        if past + T > limit and (real is None or int(position_ids.max()) >= limit):
            raise ValueError(f"position {past + T - 1} is beyond max_seq_len ({limit}); "
                             "shorten the input or raise max_seq_len")
        return position_ids

    def _run_layers(self, x, input_ids, cos, sin, attention, prepend, records, lens, trace_top_k):
        """The blocks in order, with the value residual / value embeddings, x0 mixing and
        U-net skips when switched on. x (B, N + T, D) -> (B, N + T, D). attention: (cache,
        positions it held before this call, padding mask or None), the same for every layer."""
        cache, start, mask = attention
        x0, first_values, skips = x, None, []
        L = len(self.layers)
        n_skip = L // 2 if self.skip_weights is not None else 0
        # Never with a cache: the recomputation would append this call's keys and values twice.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if i >= L - n_skip:  # second half: the mirror layer's output comes back (U-net)
                x = x + self.skip_weights[L - 1 - i] * skips[L - 1 - i]
            extra = self._value_extra(i, input_ids, first_values, prepend)
            record = records[i] if records is not None else None
            args = (x, cos, sin, cache, start, mask, self.config.memory_tokens, record, extra, x0)
            # Positional tensors, as reentrant checkpointing needs for the gradients to reach them.
            x, values = self._gradient_checkpointing_func(layer.__call__, *args) if recompute else layer(*args)
            first_values = values if i == 0 else first_values
            if i < n_skip:
                skips.append(x)
            if lens is not None:
                lens.append(self._logit_lens(x[:, prepend:], trace_top_k or self.config.trace_top_k))
        return x

    def _value_extra(self, i: int, input_ids: torch.Tensor, first_values, prepend: int):
        """What layer i mixes into its values: (B, KV, N + T, hd) or None."""
        if self.value_embeds is not None:
            e = self.value_embeds[i](input_ids)  # (B, T, KV * hd)
            e = F.pad(e, (0, 0, prepend, 0))  # memory rows have no token: zeros (B, N + T, KV * hd)
            B, S, _ = e.shape
            return e.view(B, S, self.config.n_kv_heads, self.config.head_dim).transpose(1, 2)
        if self.config.value_residual and i > 0:
            return first_values
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states (B, T, D) -> (B, T, V), soft-capped when
        logit_softcap > 0 (Gemma 2): smooth, bounded logits keep early training stable."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    @torch.no_grad()
    def _logit_lens(self, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(self.norm(residual)).float()  # (B, T, V)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        # softmax probabilities of the top k only, without materialising all V of them
        return top.indices, (top.values - logits.logsumexp(dim=-1, keepdim=True)).exp()  # each (B, T, k)

    @staticmethod
    def _collect_trace(records: list[dict], lens: list, prepend: int, real: torch.Tensor | None) -> dict:
        """Stack per-layer records into (L, B, T, ...) tensors, dropping memory rows; padded
        positions (real (B, T) False) record 0."""
        out = {}
        for key in ("policy_gate", "memory_mass"):
            if key in records[0]:
                out[key] = torch.stack([r[key][:, prepend:] for r in records])
                if real is not None:
                    out[key] = out[key] * real[None, :, :, None]
        out["lens_top_ids"] = torch.stack([ids for ids, _ in lens])
        out["lens_top_probs"] = torch.stack([p for _, p in lens])
        return out


# --------------------------------------------------------------------------- trace helpers


TRACE_LAYOUT = {
    "policy_gate": "layer, batch, position, head",
    "memory_mass": "layer, batch, position, head",
    "lens_top_ids": "layer, batch, position, rank",
    "lens_top_probs": "layer, batch, position, rank",
}


def concat_traces(steps: list[dict]) -> dict:
    """Traces of successive forward calls (each (L, B, T_i, ...)) as one, along positions."""
    return {key: torch.cat([step[key] for step in steps], dim=2) for key in steps[0]}


def trace_to_jsonable(trace: dict, decimals: int = 5) -> dict:
    """A trace (from forward or generate) as plain lists, ready for json.dump.

    Adds "layout" naming each array's axes. Probabilities and gates are rounded to
    `decimals` places to keep reports small.
    """
    out = {"layout": {key: TRACE_LAYOUT[key] for key in trace}}
    for key, value in trace.items():
        value = value.detach().cpu()
        out[key] = value.tolist() if not value.is_floating_point() else value.float().round(decimals=decimals).tolist()
    return out
