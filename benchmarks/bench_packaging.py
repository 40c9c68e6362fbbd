#!/usr/bin/env python3
"""Packaging a model folder: the archive at gzip level 9 (the old default) against level 0
(stored blocks, today's), side by side on the same folder, in interleaved rounds.

    python3 benchmarks/bench_packaging.py [--megabytes 200] [--rounds 3]

The folder holds one model.safetensors of normally distributed fp32 weights (std 0.02, as a
trained model's mostly are) and a small config.json. Each level is packaged once to warm up, then
`--rounds` times round-robin (measure.py's timers). Prints seconds, MB/s and archive sizes.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import interleaved, median, now, paired_ratio  # noqa: E402

from mvlm_engine import packaging  # noqa: E402
from mvlm_engine.cli import OneLineParser, run_cli  # noqa: E402

LEVELS = {"level 9": 9, "level 0": 0}


def package_timer(folder: Path, archive: Path, level: int):
    """Seconds to write `archive` from `folder` at gzip `level`."""
    def timer() -> float:
        packaging.COMPRESS_LEVEL = level
        started = now()
        packaging.package_model(folder, archive)
        return now() - started
    return timer


def main(argv=None) -> None:
    parser = OneLineParser(prog="bench_packaging.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        torch.manual_seed(0)
        save_file({"weight": torch.randn(args.megabytes * 250_000) * 0.02}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
        size = sum(p.stat().st_size for p in folder.iterdir())
        archives = {name: Path(tmp) / f"level{level}.tar.gz" for name, level in LEVELS.items()}
        samples = interleaved({name: package_timer(folder, archives[name], level) for name, level in LEVELS.items()},
                              args.rounds)
        archive_bytes = {name: archive.stat().st_size for name, archive in archives.items()}
    print(f"folder {size / 1e6:.0f} MB, {args.rounds} interleaved rounds (median)")
    for name, seconds in median(samples).items():
        print(f"gzip {name}: {seconds:.2f} s, {size / seconds / 1e6:.0f} MB/s, archive "
              f"{archive_bytes[name] / size:.3f} of the folder")
    print(f"level 0 / level 9 time ratio (median of the rounds' ratios): "
          f"{paired_ratio(samples, 'level 0', 'level 9'):.3f}")


if __name__ == "__main__":
    run_cli("bench_packaging.py", main)
