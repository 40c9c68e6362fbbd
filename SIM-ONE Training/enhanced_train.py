#!/usr/bin/env python3
"""Enhanced SIM-ONE: train the governed transformer with the composite loss.

    cd "SIM-ONE Training" && python3 enhanced_train.py                 # small preset on a GPU
    python3 "SIM-ONE Training/enhanced_train.py" --preset tiny         # CPU smoke run, from the root
    python3 enhanced_train.py --no_policy_gate --memory_tokens 0 --z_loss_weight 0  # a plain Llama
    python3 enhanced_train.py --resume_from latest                     # continue after a stop
    python3 enhanced_train.py --config ../models/simone_enhanced/train_config.json  # reproduce a run

Default paths (mvlm_training_dataset_complete, models/simone_enhanced) are relative to the
repository root, so the script works from here and from the root; paths you pass are relative
to where you are. Settings resolve as: field default < --preset < --config FILE < flags
(docs/ARCHITECTURE.md). The output directory loads with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mvlm_engine.env import apply_training_env

apply_training_env()  # before torch initialises CUDA

from mvlm_engine import cli  # noqa: E402
from mvlm_engine.corpus import VERSES_NAME  # noqa: E402
from mvlm_engine.runtime import start_runtime, stop_runtime  # noqa: E402
from mvlm_engine.trainer import fit  # noqa: E402
from prioritary_mvlm.config import PrioritaryConfig  # noqa: E402
from prioritary_mvlm.enhanced_trainer import EnhancedPrioritaryTrainer  # noqa: E402
from release.trust import folder_check  # noqa: E402

PROG = "enhanced_train.py"


def setup(argv=None) -> PrioritaryConfig:
    """Parse and check every argument; report all problems at once, before any work starts."""
    cfg = cli.parse_run_config(PrioritaryConfig, argv, PROG, __doc__)
    errors = []
    verses = Path(cfg.data_dir) / VERSES_NAME
    if cfg.alignment_weight > 0 and Path(cfg.data_dir).is_dir() and not verses.is_file():
        errors.append(f"{verses} is missing but the alignment loss needs its parallel verses; rebuild the "
                      "corpus with prepare.py or pass --alignment_weight 0")
    cli.claim_output_dir(cfg, errors)  # checks the folders too, then holds the output dir for this process
    return cfg


def main(argv=None) -> None:
    cfg = setup(argv)
    runtime = start_runtime(cfg.device, cfg.precision, cfg.compile)
    try:
        trainer = EnhancedPrioritaryTrainer(cfg, runtime)
        if cfg.prepare_data_only:
            trainer.prepare_data()
            return
        task, data = trainer.build_task()
        fit(cfg, dataclasses.replace(task, vet_folder=folder_check("--teachers", cfg.trust_folder_code)), runtime, data)
    finally:
        stop_runtime(runtime)


if __name__ == "__main__":
    cli.run_cli(PROG, main, sys.argv[1:])
