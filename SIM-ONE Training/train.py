#!/usr/bin/env python3
"""Train Enhanced SIM-ONE with the defaults (small preset, every mechanism and loss on).

    python3 train.py            # same as: python3 enhanced_train.py
    python3 train.py --preset tiny

Any flag of enhanced_train.py is passed through; see `python3 enhanced_train.py --help`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, from any directory

from enhanced_train import PROG, main  # noqa: E402

from mvlm_engine.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
