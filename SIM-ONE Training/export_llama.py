#!/usr/bin/env python3
"""Export a saved SIM-ONE directory as a stock `LlamaForCausalLM` directory.

    python "SIM-ONE Training/export_llama.py" --model_dir SRC --output_dir DST

Only a model with every governance mechanism off is numerically a Llama model, so anything
else is refused in one line naming the mechanism (simone_transformer/llama_export.py says
which). Tokenizer files are copied along, and the folder gets a model card (README.md, by
release/card.py: the source's training records and, when the source has a card, its evaluation
results and licence; the export computes what the source computes). The output is written to a temporary sibling
directory and renamed into place, so a failed export leaves nothing half-written (a killed
export's staging folder is removed by the next export). A model with a NaN or infinite weight
is refused, and so is a folder that fails the checks of folders from elsewhere (release/trust.py)
unless --trust_folder_code is given. Errors: one line, exit status 2 (1 for a full disk or an
unwritable folder).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mvlm_engine.checkpoint import refuse_non_finite_export
from mvlm_engine.cli import OneLineParser, run_cli
from mvlm_engine.errors import UserError
from mvlm_engine.fileio import (ensure_free_space, folder_problem, plain_file_modes, remove_dead_staging,
                                staging_path, storage_errors)
from release.trust import TRUST_FLAG, TRUST_HELP, vet_folder

PROG = "export_llama.py"
CARD_NOTE = ("This folder is its export as a stock LlamaForCausalLM (every governance mechanism off), which "
             "transformers and other Llama tooling load without trust_remote_code.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_paths(model_dir: Path, output_dir: Path) -> None:
    if not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir} is not a directory; pass a saved SIM-ONE model directory")
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise UserError(f"--model_dir {model_dir} has no {name}; pass a directory written by save_pretrained_dir")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"--output_dir {output_dir} exists and is not empty; choose a new directory")
    problem = folder_problem(output_dir, "--output_dir")
    if problem:
        raise UserError(problem)
    if output_dir == model_dir or model_dir in output_dir.parents:
        raise UserError(f"--output_dir {output_dir} is inside --model_dir {model_dir}; choose another directory")


def load_llama(model_dir: Path):
    """The Llama model of a saved SIM-ONE folder, or a one-line UserError."""
    from safetensors.torch import load_file

    from simone_transformer.hf_model import load_config
    from simone_transformer.llama_export import to_llama

    try:
        config = load_config(model_dir)
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        special_ids = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
        state = {k.removeprefix("model."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    except Exception as err:  # noqa: BLE001  (json, safetensors and the config check raise many types)
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"--model_dir {model_dir} cannot be read ({type(err).__name__}: {first_line})") from None
    refuse_non_finite_export(state, model_dir)
    try:
        return to_llama(config, state, special_ids)
    except (ValueError, TypeError, RuntimeError) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"--model_dir {model_dir}: {first_line}") from None


def keep_rope_theta_for_transformers4(config_path: Path) -> None:
    """transformers 5 saves rope_theta only inside rope_parameters; 4.x reads the top-level key
    and silently falls back to 10000 without it. transformers 5 ignores the extra key."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "rope_theta" in config.get("rope_parameters", {}):  # transformers 4.x writes the top-level key itself
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export(model_dir: Path, output_dir: Path) -> None:
    """Write the Llama directory; raises UserError for anything the user must fix."""
    check_paths(model_dir, output_dir)  # before the slow imports: bad paths fail fast
    llama = load_llama(model_dir)
    from transformers import GenerationConfig

    from release.card import write_export_card

    with storage_errors(output_dir.parent, "creating"):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(output_dir.parent)
    needed = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    ensure_free_space(output_dir.parent, needed, f"the export {output_dir.name}")
    staging = staging_path(output_dir)
    try:
        with storage_errors(staging, "writing the export", needed):
            staging.mkdir()
            llama.save_pretrained(staging)
            keep_rope_theta_for_transformers4(staging / "config.json")
            if (model_dir / "generation_config.json").is_file():
                GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
            for name in TOKENIZER_FILES:
                if (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, staging / name)
            write_export_card(model_dir, staging, output_dir.name, CARD_NOTE)
            if output_dir.exists():
                output_dir.rmdir()  # empty, checked above
            plain_file_modes(staging)
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path, help="directory written by save_pretrained_dir")
    parser.add_argument("--output_dir", required=True, type=Path, help="new (or empty) directory for the Llama model")
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    vet_folder(args.model_dir.expanduser(), "--model_dir", args.trust_folder_code)
    export(args.model_dir.expanduser().resolve(), args.output_dir.expanduser().resolve())
    print(f"{PROG}: wrote LlamaForCausalLM to {args.output_dir}")


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
