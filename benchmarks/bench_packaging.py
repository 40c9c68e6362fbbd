#!/usr/bin/env python3
"""Packaging a model folder: the archive at gzip level 9 (the old default) against level 0
(stored blocks, today's), side by side on the same folder, in interleaved rounds.

    python3 benchmarks/bench_packaging.py [--megabytes 200] [--rounds 3]

The folder holds one model.safetensors of normally distributed fp32 weights (std 0.02, as a
trained model's mostly are) and a small config.json. Prints seconds, MB/s and archive sizes.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mvlm_engine import packaging
from mvlm_engine.cli import run_cli


def timed_package(folder: Path, archive: Path, level: int) -> tuple[float, int]:
    packaging.COMPRESS_LEVEL = level
    started = time.perf_counter()
    packaging.package_model(folder, archive)
    return time.perf_counter() - started, archive.stat().st_size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        times = {9: [], 0: []}
        for _ in range(args.rounds):
            for level in times:
                seconds, archive_bytes = timed_package(folder, Path(tmp) / f"level{level}.tar.gz", level)
                times[level].append((seconds, archive_bytes))
    print(f"folder {size / 1e6:.0f} MB, {args.rounds} interleaved rounds (median)")
    for level, runs in times.items():
        seconds = statistics.median(s for s, _ in runs)
        print(f"gzip level {level}: {seconds:.2f} s, {size / seconds / 1e6:.0f} MB/s, archive "
              f"{runs[0][1] / size:.3f} of the folder")
    print(f"level 0 / level 9 time ratio: "
          f"{statistics.median(s for s, _ in times[0]) / statistics.median(s for s, _ in times[9]):.3f}")


if __name__ == "__main__":
    run_cli("bench_packaging.py", main)
