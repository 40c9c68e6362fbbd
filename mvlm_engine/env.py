"""Runtime environment settings shared by setup_environment.sh and the trainers.

setup_environment.sh writes them to `training.env` at the repo root; every trainer applies
that file (or these defaults) before torch touches CUDA. Variables already set win.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .fileio import atomic_write_text
from .logs import get_logger

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = REPO_ROOT / "training.env"


def default_settings() -> dict[str, str]:
    threads = str(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    return {
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:True",
        "TORCH_CUDNN_V8_API_ENABLED": "1",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "true",
    }


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    settings = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                settings[key.strip()] = value.strip()
    return settings


def apply_training_env() -> dict[str, str]:
    """Apply training.env (or the defaults) without overriding the caller's environment."""
    settings = {**default_settings(), **read_env_file()}
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return settings


def write_env_file(path: Path) -> None:
    text = "# Written by setup_environment.sh; the trainers apply it unless a variable is already set.\n"
    text += "".join(f"{k}={v}\n" for k, v in default_settings().items())
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def report() -> str:
    import torch

    lines = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        lines += [f"device cuda x{torch.cuda.device_count()} ({name})",
                  f"bf16 supported: {torch.cuda.is_bf16_supported()}"]
    else:
        lines += ["device cpu (no CUDA GPU visible)", "bf16 supported: cpu autocast only"]
    try:
        import flash_attn  # noqa: F401
        lines.append(f"flash-attn: yes ({flash_attn.__version__})")
    except ImportError:
        lines.append("flash-attn: no (torch SDPA is used)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="write the env file to this path")
    parser.add_argument("--report", action="store_true", help="print torch/device/bf16/flash-attn")
    args = parser.parse_args()
    if args.write:
        write_env_file(args.write)
        get_logger("setup").info(f"environment settings in {args.write}")
    if args.report:
        get_logger("setup").info("report:\n  " + report().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
