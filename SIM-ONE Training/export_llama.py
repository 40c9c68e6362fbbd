"""Export a saved SIM-ONE directory as a stock `LlamaForCausalLM` directory.

    python "SIM-ONE Training/export_llama.py" --model_dir SRC --output_dir DST

Only a model with every governance mechanism off (policy_gate=False,
memory_tokens=0) is numerically a Llama model, so anything else is refused. The
native parameter names already are Llama's, so the weights are copied as they are
(the tied LM head is re-tied by transformers). Tokenizer files are copied along.
The output is written to a temporary sibling directory and renamed into place, so
a failed export leaves nothing half-written. Errors: one line, exit status 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExportError(Exception):
    """A problem with the user's input; reported as one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path, help="directory written by save_pretrained_dir")
    parser.add_argument("--output_dir", required=True, type=Path, help="new (or empty) directory for the Llama model")
    return parser.parse_args(argv)


def check_paths(model_dir: Path, output_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ExportError(f"--model_dir {model_dir} is not a directory; pass a saved SIM-ONE model directory")
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise ExportError(f"--model_dir {model_dir} has no {name}; pass a directory written by save_pretrained_dir")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ExportError(f"--output_dir {output_dir} exists and is not empty; choose a new directory")


def llama_config(config, special_ids: dict):
    """The LlamaConfig that computes exactly what `config` (a SimOneConfig) does."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=config.init_std,
        **special_ids,
    )


def export(model_dir: Path, output_dir: Path) -> None:
    """Write the Llama directory; raises ExportError for anything the user must fix."""
    check_paths(model_dir, output_dir)  # before the slow imports: bad paths fail fast

    import json

    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlamaForCausalLM

    from simone_transformer.hf_model import load_config

    try:
        config = load_config(model_dir)
    except (ValueError, json.JSONDecodeError) as err:
        raise ExportError(f"--model_dir {model_dir}: {err}") from None
    if config.policy_gate or config.memory_tokens > 0:
        raise ExportError(
            "export needs every governance mechanism off: "
            f"policy_gate={config.policy_gate}, memory_tokens={config.memory_tokens}"
        )

    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    special_ids = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    # SIM-ONE stores "model.<Llama name>", which is Llama's own layout except for an
    # untied LM head (Llama keeps it outside `model.`).
    state = load_file(str(model_dir / "model.safetensors"))
    state = {("lm_head.weight" if k == "model.lm_head.weight" else k): v for k, v in state.items()}
    dtype = next(iter(state.values())).dtype

    llama = LlamaForCausalLM(llama_config(config, special_ids)).to(dtype)
    missing, unexpected = llama.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ExportError(f"weights do not match a Llama layout: missing {missing}, unexpected {unexpected}")
    llama.tie_weights()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        llama.save_pretrained(staging)
        if (model_dir / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, staging / name)
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export(args.model_dir.expanduser().resolve(), args.output_dir.expanduser().resolve())
    except (ExportError, OSError) as err:
        print(f"export_llama: error: {err}", file=sys.stderr)
        return 2
    print(f"export_llama: wrote LlamaForCausalLM to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
