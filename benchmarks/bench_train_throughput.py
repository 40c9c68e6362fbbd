#!/usr/bin/env python3
"""Training throughput of a trainer, measured through the real training loop.

    python3 benchmarks/bench_train_throughput.py --trainer gpt2 --preset small --max_steps 60
    python3 benchmarks/bench_train_throughput.py --trainer gpt2 --preset small --max_steps 6 \\
        --log_interval 2 -- --batch_size 1 --block_size 256 --device cpu   # CPU smoke

Runs the trainer in a subprocess into a temporary --output_dir and reads the tokens/s and MFU
it logged (training_history.json). The first logged window is dropped: it holds compilation
and warm-up. MFU uses the field's convention (docs/ARCHITECTURE.md: every matmul, the output head included) against
989 TFLOP/s (H100/H200 bf16); on CPU there
is no reference peak, so it prints n/a. Arguments after `--` go to the trainer unchanged.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from train_all_models import TRAINERS  # noqa: E402  (the pipeline's one table of trainers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="gpt2")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--log_interval", type=int, default=10)
    parser.add_argument("--data_dir", default=str(REPO / "mvlm_training_dataset_complete"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(TRAINERS[args.trainer].script), "--preset", args.preset,
                   "--data_dir", args.data_dir, "--output_dir", f"{tmp}/run", "--max_steps", str(args.max_steps),
                   "--log_interval", str(args.log_interval), "--eval_interval", str(args.max_steps),
                   "--save_interval", str(args.max_steps), "--eval_windows", "8", *extra]
        print("$", " ".join(command[1:]), flush=True)
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        history = json.loads((Path(tmp) / "run" / "training_history.json").read_text())
        train_config = json.loads((Path(tmp) / "run" / "train_config.json").read_text())
        summary = json.loads((Path(tmp) / "run" / "run_summary.json").read_text())
    records = history["train"][1:] or history["train"]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
    mfus = [r["mfu"] for r in records if r["mfu"] is not None]
    print(next((line for line in proc.stdout.splitlines() if line.startswith("[train] MVLM") or
                line.startswith("[train] SIM-ONE")), ""))
    print(f"trainer {args.trainer} preset {args.preset}: batch {train_config['batch_size']} x block "
          f"{train_config['block_size']} x accum {train_config['gradient_accumulation_steps']} x "
          f"{summary['world_size']} procs, {summary['precision']}, compile {summary['compile']}, {summary['device']}")
    print(f"tokens/s (median of {len(records)} windows): {tokens_per_s:,.0f}")
    print(f"MFU: {statistics.median(mfus):.1%}" if mfus else "MFU: n/a (no reference peak for this device)")


if __name__ == "__main__":
    main()
