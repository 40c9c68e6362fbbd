"""Strict dataclass configs: unknown keys are rejected, the resolved config is saved as JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

from .errors import UserError
from .fileio import atomic_write_text

T = TypeVar("T")


def from_dict(cls: type[T], values: dict) -> T:
    """Build dataclass `cls` from `values`, refusing keys it does not define."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad {cls.__name__}: {err}") from None


def save_config_json(config, path: Path) -> None:
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")


@dataclasses.dataclass
class TrainConfig:
    """Everything the shared training loop needs; model-specific fields live with each model."""

    data_dir: str = "mvlm_training_dataset_complete"
    output_dir: str = "models/run"
    cache_dir: str | None = None  # default: <data_dir>/.cache
    vocab_size: int = 32000
    block_size: int = 1024
    batch_size: int = 16  # per device, per micro-step
    gradient_accumulation_steps: int = 1
    num_epochs: float = 3.0
    max_steps: int = 0  # 0: derived from num_epochs
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    compile: bool | None = None  # None: on for CUDA (TORCH_COMPILE=0/1 overrides)
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 10
    eval_interval: int = 250
    eval_windows: int = 200  # held-out windows per evaluation (spread evenly over the split)
    save_interval: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    resume_from: str | None = None  # latest | best_model | PATH
    overwrite: bool = False

    def problems(self) -> list[str]:
        """Every invalid value, as messages naming the flag."""
        errors = []
        positive = ["batch_size", "gradient_accumulation_steps", "block_size", "log_interval",
                    "eval_interval", "save_interval", "eval_windows", "keep_checkpoints", "vocab_size"]
        errors += [f"--{name} must be > 0 (got {getattr(self, name)})" for name in positive
                   if getattr(self, name) <= 0]
        if self.max_steps < 0:
            errors.append(f"--max_steps must be >= 0 (got {self.max_steps})")
        if self.num_epochs <= 0 and self.max_steps == 0:
            errors.append(f"--num_epochs must be > 0 (got {self.num_epochs})")
        if not self.learning_rate > 0:
            errors.append(f"--learning_rate must be > 0 (got {self.learning_rate})")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            errors.append("warmup_steps, weight_decay and grad_clip must be >= 0")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            errors.append(f"--precision must be auto, bf16, fp16 or fp32 (got {self.precision})")
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append(f"--device must be auto, cpu or cuda (got {self.device})")
        if self.vocab_size > 1 << 32:
            errors.append("--vocab_size is too large")
        return errors
