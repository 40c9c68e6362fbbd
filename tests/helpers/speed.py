"""The tiny preset's run config and one synthetic batch through benchmarks/measure.py, shared by the
speed tests (tests/test_speed_*.py)."""
from __future__ import annotations

import sys

import torch

from conftest import REPO


def script_folders_on_path() -> None:
    """The repository, SIM-ONE Training/ and benchmarks/ importable by their scripts' bare names."""
    for path in (REPO, REPO / "SIM-ONE Training", REPO / "benchmarks"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


script_folders_on_path()


def tiny_config(model: str, **flags):
    from measure import resolve_run_config
    return resolve_run_config(model, {"preset": "tiny", "device": "cpu", **flags})


def tiny_batch(model: str, cfg):
    from measure import synthetic_batch
    return synthetic_batch(model, cfg, torch.Generator().manual_seed(0))
