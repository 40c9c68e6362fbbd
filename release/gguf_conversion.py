"""A trained model folder as one GGUF file that llama.cpp runs (export_gguf.py is its command
line; release/package.py writes such a file beside each archive).

Conversions (the model registry, model_registry.py, names one per folder kind):
  GPT2    MVLM-GPT2 from mvlm_trainer.py              -> llama.cpp architecture "gpt2"
  SIMONE  SIM-ONE with every governance mechanism off -> "llama"
  LLAMA   a LlamaForCausalLM folder (export_llama.py) -> "llama"
A SIM-ONE model with a governance mechanism on (policy gate, memory tokens) has no llama.cpp
equivalent and is refused (CannotExpress); SIM-ONE configs are read with this repository's
simone_transformer. The tokenizer (byte-level BPE, GPT-2 pre-tokenization) goes in as llama.cpp's
"gpt2" BPE with the "gpt-2" pre-tokenizer, so llama.cpp tokenizes as transformers does.

dtype: f32 keeps every weight in float32; f16 stores 2-D weights in float16 (a tensor float16 cannot
hold, some |w| > 65504, stays float32); q8_0 stores 2-D weights whose rows are a whole number of
32-value blocks in Q8_0 and the rest in float16. Norms, biases and GPT-2's position table always stay
float32, as llama.cpp's converter does. q4_k_m is llama.cpp's own quantizer (through llama-cpp-python,
an optional extra) run on the f32 file, with llama.cpp's rules for that type (rows that are no
whole number of 256-value blocks fall back to another type, as llama.cpp's quantize tool does).

The file is written beside the output under a temporary name and renamed at the end, so a failed
export leaves nothing behind (a killed export's temporary file is removed by the next one). A model
with a NaN or infinite weight is refused. Problems with the input are UserErrors (one line).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from model_registry import folder_kind, folder_kinds, resolve
from mvlm_engine.errors import UserError
from mvlm_engine.fileio import ensure_free_space, remove_dead_staging, staging_path, storage_errors

DTYPES = ("f32", "f16", "q8_0", "q4_k_m")
# Made by llama.cpp's quantizer from the f32 file (llama-cpp-python's llama_model_quantize): its ftype.
LLAMA_CPP_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
F16_MAX = 65504.0
GPT2_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 regex split + byte-level mapping
# transformers' GPT-2 Conv1D layers store weights as (in, out); GGUF wants (out, in) like nn.Linear.
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints, not weights


class CannotExpress(UserError):
    """A sound model folder that GGUF/llama.cpp cannot express (governance on, an unsupported
    architecture, activation or tokenizer; no gguf package): packaging notes it and writes no file."""


@dataclass
class Hparams:
    """The shape of the network, in llama.cpp's terms, whatever folder it came from."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    vocab_size: int
    norm_eps: float
    tied: bool
    head_dim: int = 0
    rope_theta: float = 10000.0


# --------------------------------------------------------------------------- reading the folder


def read_config(model_dir: Path) -> dict:
    """config.json as a dict; the folder, the weights and a JSON object are required."""
    if not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir} is not a directory; pass a trained model folder")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise UserError(f"--model_dir {model_dir} has no {name}; pass a folder written by the trainers")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{model_dir / 'config.json'} is not readable JSON ({err.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise UserError(f"{model_dir / 'config.json'} holds a JSON {type(config).__name__}, not an object")
    return config


def config_value(config: dict, key: str, kind: type, default=None, minimum: float = 1e-30):
    """config[key] checked to be of `kind` (int accepted for float) and, if a number, at least
    `minimum` (sizes and epsilons are positive); `default` when absent."""
    value = config.get(key, default)
    if value is None:
        raise UserError(f"config.json lacks {key!r}")
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(f"config.json {key!r} must be {kind.__name__}, got {value!r}")
    if kind in (int, float) and not value >= minimum:
        raise UserError(f"config.json {key!r} must be positive, got {value!r}")
    return value


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy (never unpickles anything)."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name).to(torch.float32).numpy() for name in handle.keys()}
    except Exception as err:  # the Rust reader raises SafetensorError and plain exceptions alike
        first_line = (str(err).splitlines() or [err.__class__.__name__])[0]
        raise UserError(f"{path} is not a readable safetensors file ({first_line})") from None


# --------------------------------------------------------------------------- governance


SIMONE_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")


def simone_config(config: dict):
    """config.json as a SimOneConfig (checked by its own rules). A switch missing from the file
    takes SimOneConfig's default (governance on), so an old or hand-written config is never
    taken for a plain Llama; the shape must be there."""
    try:
        from simone_transformer import SimOneConfig
    except ImportError:
        raise CannotExpress("SIM-ONE folders need this repository's packages; run pip install -e . "
                          "in the repository root") from None
    missing = [key for key in SIMONE_SHAPE_KEYS if key not in config]
    if missing:
        raise UserError(f"config.json lacks {', '.join(map(repr, missing))}")
    known = SimOneConfig.__dataclass_fields__
    try:
        return SimOneConfig.from_dict({key: value for key, value in config.items() if key in known})
    except (ValueError, TypeError) as err:
        raise UserError(f"config.json: {err}") from None


def governance_features(simone) -> list[str]:
    """SIM-ONE mechanisms switched on that a Llama graph cannot express. The list has one home,
    simone_transformer.llama_export (export_llama.py refuses by it too): new switches go there."""
    from simone_transformer.llama_export import llama_incompatible_features

    return llama_incompatible_features(simone)


# --------------------------------------------------------------------------- architectures


def gpt2_hparams(config: dict) -> Hparams:
    """GPT2Config -> Hparams; refuses what llama.cpp's gpt2 graph does not compute."""
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):  # llama.cpp's GELU is the tanh form
        raise CannotExpress(f"GPT-2 activation {activation!r} has no llama.cpp equivalent (needs gelu_new)")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        raise CannotExpress("GPT-2 attention scaling other than 1/sqrt(head_dim) has no llama.cpp equivalent")
    n_embd = config_value(config, "n_embd", int)
    n_head = config_value(config, "n_head", int)
    inner = config.get("n_inner")
    return Hparams(
        n_layer=config_value(config, "n_layer", int), n_embd=n_embd, n_head=n_head, n_head_kv=n_head,
        n_ff=config_value(config, "n_inner", int) if inner is not None else 4 * n_embd,
        n_ctx=config_value(config, "n_positions", int), vocab_size=config_value(config, "vocab_size", int),
        norm_eps=config_value(config, "layer_norm_epsilon", float, 1e-5),
        tied=config_value(config, "tie_word_embeddings", bool, True), head_dim=n_embd // n_head)


def simone_hparams(config: dict) -> Hparams:
    """SIM-ONE config.json (every governance mechanism off) -> Hparams."""
    simone = simone_config(config)
    features = governance_features(simone)
    if features:
        raise CannotExpress(f"cannot export to GGUF: SIM-ONE has governance or recipe pieces on that llama.cpp's "
                          f"llama architecture cannot express: {', '.join(features)}")
    return Hparams(
        n_layer=simone.n_layers, n_embd=simone.d_model, n_head=simone.n_heads, n_head_kv=simone.n_kv_heads,
        n_ff=simone.ffn_hidden_dim, n_ctx=simone.max_seq_len, vocab_size=simone.vocab_size,
        norm_eps=simone.norm_eps, tied=simone.tie_embeddings, head_dim=simone.head_dim,
        rope_theta=simone.rope_theta)


def llama_rope_theta(config: dict) -> float:
    """transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta/rope_scaling."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError("config.json 'rope_parameters' must be an object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CannotExpress(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                          "only plain RoPE is exported")
    return config_value({**config, **rope}, "rope_theta", float, 10000.0)


def llama_hparams(config: dict) -> Hparams:
    """LlamaConfig -> Hparams; biases and activations other than SiLU are refused."""
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
        raise CannotExpress("only bias-free SiLU Llama models are exported")
    n_embd = config_value(config, "hidden_size", int)
    n_head = config_value(config, "num_attention_heads", int)
    n_head_kv = config.get("num_key_value_heads")
    head_dim = config.get("head_dim")
    return Hparams(
        n_layer=config_value(config, "num_hidden_layers", int), n_embd=n_embd, n_head=n_head,
        n_head_kv=config_value(config, "num_key_value_heads", int) if n_head_kv is not None else n_head,
        n_ff=config_value(config, "intermediate_size", int),
        n_ctx=config_value(config, "max_position_embeddings", int),
        vocab_size=config_value(config, "vocab_size", int), norm_eps=config_value(config, "rms_norm_eps", float),
        tied=config_value(config, "tie_word_embeddings", bool, True),
        head_dim=config_value(config, "head_dim", int) if head_dim is not None else n_embd // n_head,
        rope_theta=llama_rope_theta(config))


def rope_pairs_adjacent(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k output rows from transformers' rotate-half RoPE to llama.cpp's.

    transformers rotates dimension i of a head together with i + head_dim/2; llama.cpp's
    llama graph rotates 2i with 2i+1. Row 2i takes row i, row 2i+1 takes row i + head_dim/2,
    in every head; q and k get the same order, so attention scores are unchanged.
    """
    head_dim = weight.shape[0] // n_heads
    half = np.arange(head_dim // 2)
    within_head = np.stack([half, half + head_dim // 2], axis=1).reshape(-1)
    rows = (np.arange(n_heads)[:, None] * head_dim + within_head[None, :]).reshape(-1)
    return weight[rows]


def llama_tensors(weights: dict[str, np.ndarray], hp: Hparams) -> dict[str, np.ndarray]:
    """SIM-ONE or Llama weights under transformers' Llama names, q/k in llama.cpp's RoPE order."""
    out = {}
    for name, tensor in weights.items():
        if name == "model.lm_head.weight":  # SIM-ONE keeps its untied head inside `model.`
            name = "lm_head.weight"
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            tensor = rope_pairs_adjacent(tensor, hp.n_head)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            tensor = rope_pairs_adjacent(tensor, hp.n_head_kv)
        out[name] = tensor
    return out


def gpt2_tensors(weights: dict[str, np.ndarray], hp: Hparams) -> dict[str, np.ndarray]:
    """GPT-2 weights with Conv1D matrices transposed to (out, in) and mask buffers dropped."""
    return {name: (tensor.T if name.endswith(GPT2_CONV1D) else tensor)
            for name, tensor in weights.items() if not name.endswith(GPT2_BUFFERS)}


@dataclass
class Architecture:
    gguf_arch: str
    hparams: Callable[[dict], Hparams]
    # (weights, Hparams) -> weights under transformers names, in GGUF's layout
    tensors: Callable[[dict[str, np.ndarray], Hparams], dict[str, np.ndarray]]


GPT2 = Architecture("gpt2", gpt2_hparams, gpt2_tensors)
SIMONE = Architecture("llama", simone_hparams, llama_tensors)  # every governance mechanism off
LLAMA = Architecture("llama", llama_hparams, llama_tensors)


def architecture_of(config: dict) -> Architecture:
    """The conversion the model registry names for this folder's model_type (FolderKind.gguf)."""
    kind = folder_kind(config.get("model_type"))
    if kind is None:
        raise CannotExpress(f"config.json model_type {config.get('model_type')!r} is not supported "
                            f"(supported: {', '.join(folder_kinds())})")
    if kind.gguf is None:
        raise CannotExpress(f"{kind.display_name} folders have no GGUF form: {kind.no_gguf}")
    return resolve(kind.gguf)


# --------------------------------------------------------------------------- tensors


def expected_shapes(arch: str, hp: Hparams) -> dict[str, tuple[int, ...]]:
    """Every tensor llama.cpp loads for this architecture, with its numpy (row-major) shape."""
    E, F, V = hp.n_embd, hp.n_ff, hp.vocab_size
    shapes = {"token_embd.weight": (V, E), "output_norm.weight": (E,)}
    if not hp.tied:
        shapes["output.weight"] = (V, E)
    if arch == "gpt2":
        shapes.update({"position_embd.weight": (hp.n_ctx, E), "output_norm.bias": (E,)})
        per_layer = {"attn_norm": (E,), "attn_qkv": (3 * E, E), "attn_output": (E, E), "ffn_norm": (E,),
                     "ffn_up": (F, E), "ffn_down": (E, F)}
        for i in range(hp.n_layer):
            for part, shape in per_layer.items():
                shapes[f"blk.{i}.{part}.weight"] = shape
                shapes[f"blk.{i}.{part}.bias"] = (shape[0],)
        return shapes
    q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    per_layer = {"attn_norm": (E,), "attn_q": (q_rows, E), "attn_k": (kv_rows, E), "attn_v": (kv_rows, E),
                 "attn_output": (E, q_rows), "ffn_norm": (E,), "ffn_gate": (F, E), "ffn_up": (F, E),
                 "ffn_down": (E, F)}
    for i in range(hp.n_layer):
        shapes.update({f"blk.{i}.{part}.weight": shape for part, shape in per_layer.items()})
    return shapes


def gguf_named_tensors(weights: dict[str, np.ndarray], arch: str, hp: Hparams) -> dict[str, np.ndarray]:
    """Weights under GGUF names, checked against what llama.cpp will load (names and shapes)."""
    import gguf

    arch_id = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_id, hp.n_layer)
    named = {}
    for name, tensor in weights.items():
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise UserError(f"weight {name!r} has no counterpart in llama.cpp's {arch} architecture")
        if new_name == "output.weight" and hp.tied:
            continue  # tied head: llama.cpp reuses token_embd when output.weight is absent
        named[new_name] = tensor
    expected = expected_shapes(arch, hp)
    missing = sorted(set(expected) - set(named))
    if missing:
        raise UserError(f"model.safetensors lacks {len(missing)} weight(s) llama.cpp needs, e.g. {missing[0]}")
    extra = sorted(set(named) - set(expected))
    if extra:
        raise UserError(f"weight {extra[0]} does not fit llama.cpp's {arch} architecture as configured")
    for name, shape in expected.items():
        if named[name].shape != shape:
            raise UserError(f"weight {name} has shape {named[name].shape}, config.json implies {shape}")
    return {name: named[name] for name in expected}  # llama.cpp's usual order: embeddings, then blocks


def storage_type(name: str, tensor: np.ndarray, dtype: str):
    """GGML type of one tensor for --dtype; the same rules as llama.cpp's own converter."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    # llama.cpp reads 1-D tensors, norms, biases and position tables in float32 only.
    if tensor.ndim < 2 or not name.endswith(".weight") or "_norm." in name or name.startswith("position_embd"):
        return Q.F32
    if dtype == "f32" or (dtype == "f16" and np.abs(tensor).max() > F16_MAX):
        return Q.F32
    block = GGML_QUANT_SIZES[Q.Q8_0][0]
    if dtype == "q8_0" and tensor.shape[-1] % block == 0:
        return Q.Q8_0
    return Q.F16


def encode_tensor(tensor: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q, quants

    if qtype == Q.F32:
        return np.ascontiguousarray(tensor, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(tensor, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(tensor, dtype=np.float32), qtype)


# --------------------------------------------------------------------------- tokenizer


def read_tokenizer_json(model_dir: Path) -> dict:
    """tokenizer.json, checked to be a byte-level BPE that llama.cpp's gpt-2 mode reproduces."""
    path = model_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({err.__class__.__name__})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CannotExpress(f"{path} is not a BPE tokenizer")
    pre = data.get("pre_tokenizer") or {}
    if (not isinstance(pre, dict) or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex") is False
            or data.get("normalizer") is not None):
        raise CannotExpress(f"{path}: only byte-level BPE with GPT-2 pre-tokenization, no prefix space and "
                          "no normalizer can be tokenized identically by llama.cpp")
    if model.get("byte_fallback") or model.get("ignore_merges") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise CannotExpress(f"{path}: BPE options (byte_fallback, ignore_merges, affixes) llama.cpp lacks")
    return data


def vocabulary(data: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types for ids 0 .. vocab_size-1 (unused ids padded)."""
    from gguf import TokenType

    by_id = {idx: token for token, idx in data["model"].get("vocab", {}).items()}
    types = {idx: TokenType.NORMAL for idx in by_id}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if not by_id or max(by_id) >= vocab_size:
        raise UserError(f"tokenizer.json has ids up to {max(by_id, default=-1)} but the model's "
                          f"vocab_size is {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    return tokens, [int(types.get(i, TokenType.UNUSED)) for i in range(vocab_size)]


def merge_list(data: dict) -> list[str]:
    """BPE merges as llama.cpp reads them: "left right", in priority order."""
    merges = data["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def special_token_ids(config: dict, tokens: list[str]) -> dict[str, int]:
    """bos/eos/pad ids from config.json; the project's <|endoftext|> when config has none."""
    fallback = tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else None
    ids = {}
    for role in ("bos", "eos", "pad"):
        value = config.get(f"{role}_token_id", fallback)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if value is None:
            continue
        if not isinstance(value, int) or not 0 <= value < len(tokens):
            raise UserError(f"config.json {role}_token_id {value!r} is not a token id")
        ids[role] = value
    return ids


# --------------------------------------------------------------------------- writing


def add_hparams(writer, arch: str, hp: Hparams) -> None:
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_vocab_size(hp.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(hp.norm_eps)
        return
    writer.add_layer_norm_rms_eps(hp.norm_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:  # llama.cpp assumes n_embd / n_head otherwise
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)


@dataclass
class TokenizerMetadata:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]


def tokenizer_metadata(data: dict, config: dict, vocab_size: int) -> TokenizerMetadata:
    """Everything the GGUF tokenizer keys need, checked before any file is opened."""
    try:
        tokens, types = vocabulary(data, vocab_size)
        merges = merge_list(data)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise UserError(f"tokenizer.json is malformed ({err.__class__.__name__}: {err})") from None
    return TokenizerMetadata(tokens, types, merges, special_token_ids(config, tokens))


def add_tokenizer(writer, meta: TokenizerMetadata) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(GPT2_PRE_TOKENIZER)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    writer.add_token_merges(meta.merges)
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        if role in meta.special_ids:
            add(meta.special_ids[role])
    # The trainers never prepend or append special tokens; prompts must tokenize the same way.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(output: Path, arch: str, name: str, fill, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write the whole file under a temporary name beside `output`, then rename it into place.

    `fill(writer)` adds the metadata; tensors are stored as `storage_type` says.
    """
    import gguf

    tmp = staging_path(output)  # .NAME.PID@HOST.tmp: the next export removes it if this process dies
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[dtype]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        fill(writer)
        for tensor_name, tensor in tensors.items():
            qtype = storage_type(tensor_name, tensor, dtype)
            writer.add_tensor(tensor_name, encode_tensor(tensor, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        try:
            writer.close()  # may fail again on a full disk; the temporary file goes regardless
        finally:
            tmp.unlink(missing_ok=True)
        raise


def check_output(output: Path) -> None:
    """Fail before the slow work when the output cannot be written."""
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; pass a file name such as model.gguf")
    if not output.parent.is_dir():
        state = "is a file, not a directory" if output.parent.exists() else "does not exist"
        raise UserError(f"--output {output}: directory {output.parent} {state}")
    if not os.access(output.parent, os.W_OK):
        raise UserError(f"--output {output}: directory {output.parent} is not writable")


def export(model_dir: Path, output: Path, dtype: str = "f32") -> str:
    """Export `model_dir` to `output`; returns a one-line summary. Raises UserError (the input),
    CannotExpress (this model or this dtype has no GGUF form here) or StorageError (a full disk or
    an unwritable folder, checked before the write too)."""
    check_output(output)
    config = read_config(model_dir)
    architecture = architecture_of(config)
    hp = architecture.hparams(config)
    tokenizer = tokenizer_metadata(read_tokenizer_json(model_dir), config, hp.vocab_size)
    if dtype in LLAMA_CPP_QUANTS:
        quantizer()  # before the slow work: this dtype needs llama-cpp-python
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CannotExpress("the gguf package is not installed; pip install 'gguf>=0.16'") from None
    raw = load_weights(model_dir / "model.safetensors")
    from mvlm_engine.checkpoint import refuse_non_finite_export  # torch: only once the input is checked
    refuse_non_finite_export(raw, model_dir)
    tensors = gguf_named_tensors(architecture.tensors(raw, hp), architecture.gguf_arch, hp)

    def fill(writer):
        add_hparams(writer, architecture.gguf_arch, hp)
        add_tokenizer(writer, tokenizer)

    remove_dead_staging(output.parent)
    f32_bytes = sum(t.nbytes for t in tensors.values())
    # f32 is the whole tensor size, f16/q8_0 at most half; q4_k_m writes the f32 file first.
    needed = {"f32": f32_bytes, "q4_k_m": f32_bytes + f32_bytes // 4}.get(dtype, f32_bytes // 2) + (1 << 20)
    ensure_free_space(output.parent, needed, f"the GGUF file {output.name}")
    with storage_errors(output, "writing", needed):
        if dtype in LLAMA_CPP_QUANTS:
            source = staging_path(output.with_name(output.name + ".f32"))
            try:
                write_gguf(source, architecture.gguf_arch, model_dir.name, fill, tensors, "f32")
                quantize(source, output, dtype)
            finally:
                source.unlink(missing_ok=True)
        else:
            write_gguf(output, architecture.gguf_arch, model_dir.name, fill, tensors, dtype)
    return (f"wrote {output} ({architecture.gguf_arch}, {dtype}, {len(tensors)} tensors, "
            f"{output.stat().st_size:,} bytes)")


# --------------------------------------------------------------------------- llama.cpp's quantizer


def quantizer():
    """llama-cpp-python's module, whose llama_model_quantize is llama.cpp's own quantizer."""
    try:
        import llama_cpp
    except ImportError:
        raise CannotExpress("4-bit GGUF files are made by llama.cpp's own quantizer, which needs "
                            "llama-cpp-python (pip install llama-cpp-python); not installed here") from None
    return llama_cpp


def quantize(source: Path, output: Path, dtype: str) -> None:
    """llama.cpp's quantizer: the GGUF file `source` -> `output` as `dtype` (LLAMA_CPP_QUANTS),
    through a staging file renamed into place."""
    import ctypes
    import logging

    llama_cpp = quantizer()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_QUANTS[dtype])
    params.nthread = min(os.cpu_count() or 1, 8)
    tmp = staging_path(output)
    chatter = logging.getLogger("llama-cpp-python")  # llama.cpp's log: a line per tensor unless raised
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            raise UserError(f"llama.cpp's quantizer could not make {dtype} from {source.name} (status {status})")
        os.replace(tmp, output)
    finally:
        chatter.setLevel(level)
        tmp.unlink(missing_ok=True)
