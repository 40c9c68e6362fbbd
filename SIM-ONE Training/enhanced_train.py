#!/usr/bin/env python3
"""Enhanced SIM-ONE: train the governed transformer with the composite loss.

    cd "SIM-ONE Training" && python3 enhanced_train.py                 # small preset on a GPU
    python3 "SIM-ONE Training/enhanced_train.py" --preset tiny         # CPU smoke run, from the root
    python3 enhanced_train.py --no_policy_gate --memory_tokens 0 --coherence_weight 0 \\
        --alignment_weight 0 --z_loss_weight 0                         # a plain Llama baseline
    python3 enhanced_train.py --resume_from latest                     # continue after a stop

Default paths (../mvlm_training_dataset_complete, ../models/simone_enhanced) are relative to
this folder, so the script works from here and from the repository root; paths you pass are
relative to where you are. --config FILE.json sets any PrioritaryConfig field (unknown keys are
refused); flags given on the command line win over it. The output directory loads with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mvlm_engine.env import apply_training_env

apply_training_env()  # before torch initialises CUDA

from mvlm_engine import cli  # noqa: E402
from mvlm_engine.corpus import VERSES_NAME  # noqa: E402
from mvlm_engine.errors import UserError, fail  # noqa: E402
from mvlm_engine.runtime import start_runtime, stop_runtime  # noqa: E402
from prioritary_mvlm.config import TRAINING_PRESETS, PrioritaryConfig, preset_values  # noqa: E402
from prioritary_mvlm.enhanced_trainer import EnhancedPrioritaryTrainer  # noqa: E402

PROG = "enhanced_train.py"
HERE = Path(__file__).resolve().parent
SEED_DEFAULTS = {"preset": "small", "data_dir": str(HERE.parent / "mvlm_training_dataset_complete"),
                 "output_dir": str(HERE.parent / "models" / "simone_enhanced"), "vocab_size": 32000,
                 "batch_size": 12, "gradient_accumulation_steps": 4, "num_epochs": 3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, tuple(TRAINING_PRESETS), SEED_DEFAULTS)
    group = parser.add_argument_group("governance mechanisms and losses")
    group.add_argument("--no_policy_gate", dest="policy_gate", action="store_false", default=None,
                       help="switch off the per-head sigmoid gate on attention outputs")
    group.add_argument("--memory_tokens", type=int, default=None,
                       help="learned memory tokens before every sequence (0 = off; default 8, tiny 4)")
    group.add_argument("--coherence_weight", type=float, default=None,
                       help="weight of the multi-token (t+2) prediction loss (0 = off; default 0.1)")
    group.add_argument("--alignment_weight", type=float, default=None,
                       help="weight of the parallel-verse InfoNCE loss (0 = off; default 0.1)")
    group.add_argument("--z_loss_weight", type=float, default=None,
                       help="weight of the z-loss on the logits (0 = off; default 1e-4)")
    group.add_argument("--adaptive_weights", action="store_true", default=None,
                       help="learn the loss weights by uncertainty weighting (Kendall et al. 2018)")
    parser.add_argument("--config", type=Path, default=None, help="JSON file of PrioritaryConfig fields")
    return parser.parse_args(argv)


def read_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--config {path} is not a readable JSON file ({err.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a JSON object of PrioritaryConfig fields")
    return values


def setup(argv=None) -> PrioritaryConfig:
    """Parse and check every argument; report all problems at once, before any work starts."""
    args = parse_args(argv)
    file_values = read_config_file(args.config)
    preset_name = args.preset or file_values.get("preset") or SEED_DEFAULTS["preset"]
    if preset_name not in TRAINING_PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; choose one of {', '.join(TRAINING_PRESETS)}")
    cfg = cli.resolve_train_config(args, SEED_DEFAULTS, preset_values(preset_name), file_values,
                                   cls=PrioritaryConfig)
    errors = cfg.problems() + cli.data_dir_problems(cfg) + cli.output_dir_problems(cfg)
    verses = Path(cfg.data_dir) / VERSES_NAME
    if cfg.alignment_weight > 0 and Path(cfg.data_dir).is_dir() and not verses.is_file():
        errors.append(f"{verses} is missing but the alignment loss needs its parallel verses; rebuild the "
                      "corpus with prepare.py or pass --alignment_weight 0")
    fail(errors)
    return cfg


def main(argv=None) -> None:
    cfg = setup(argv)
    runtime = start_runtime(cfg.device, cfg.precision, cfg.compile)
    try:
        EnhancedPrioritaryTrainer(cfg, runtime).train()
    finally:
        stop_runtime(runtime)


if __name__ == "__main__":
    cli.exit_on_error(PROG, main, sys.argv[1:])
