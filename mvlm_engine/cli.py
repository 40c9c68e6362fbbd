"""Command-line plumbing shared by both trainers: the common flags, presets, argument checks
collected and reported once, and the exit codes."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .checkpoint import resolve_resume, step_checkpoints
from .config import TrainConfig, from_dict
from .errors import UserError

# Flags every trainer takes; defaults are None so that "given on the command line" can be told
# apart from "taken from the preset".
COMMON_FLAGS = {
    "data_dir": (str, "corpus folder (built by mvlm_training_dataset_complete/prepare.py)"),
    "output_dir": (str, "where the final model, logs, plots and checkpoints/ go"),
    "cache_dir": (str, "tokenizer and token-shard cache (default: <data_dir>/.cache)"),
    "vocab_size": (int, "BPE vocabulary size"),
    "batch_size": (int, "sequences per device per micro-step"),
    "gradient_accumulation_steps": (int, "micro-steps per optimizer step"),
    "num_epochs": (float, "passes over the training split (ignored when --max_steps is set)"),
    "max_steps": (int, "optimizer steps; 0 derives them from --num_epochs"),
    "learning_rate": (float, "peak learning rate (warmup, then cosine decay to 10%%)"),
    "warmup_steps": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay on matrices and embeddings"),
    "grad_clip": (float, "gradient-norm clip (0 = off)"),
    "block_size": (int, "tokens per training sequence"),
    "seed": (int, "random seed (data order and initialisation)"),
    "log_interval": (int, "steps between logged training records"),
    "eval_interval": (int, "steps between held-out evaluations"),
    "eval_windows": (int, "held-out windows per evaluation"),
    "save_interval": (int, "steps between checkpoints"),
    "keep_checkpoints": (int, "step checkpoints kept (plus best_model)"),
}


def add_common_args(parser: argparse.ArgumentParser, presets: tuple[str, ...], defaults: dict) -> None:
    """Add the shared flags; `defaults` are the script's own (shown in --help)."""
    parser.add_argument("--preset", choices=presets, default=None,
                        help=f"model size and training defaults (default: {defaults.get('preset')})")
    for name, (kind, help_text) in COMMON_FLAGS.items():
        shown = f" (default: {defaults[name]})" if name in defaults else " (default: from --preset)"
        parser.add_argument(f"--{name}", type=kind, default=None, help=help_text + shown)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                        help="auto: bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the model (default: on for CUDA; TORCH_COMPILE=0/1 overrides)")
    parser.add_argument("--no_compile", dest="compile", action="store_false", help="do not torch.compile")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: auto")
    parser.add_argument("--resume_from", default=None,
                        help="continue a run: 'latest', 'best_model' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in an --output_dir that already holds checkpoints")


def explicit_values(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def resolve_train_config(args: argparse.Namespace, defaults: dict, preset: dict, config_file: dict | None = None,
                         cls: type = TrainConfig):
    """Script defaults < preset < --config file < command line, as a `cls` dataclass."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {k: v for k, v in {**defaults, **preset}.items() if k in names}
    values.update(config_file or {})
    values.update(explicit_values(args, names))
    if not args.overwrite:
        values.pop("overwrite", None)
    else:
        values["overwrite"] = True
    return from_dict(cls, values)


def output_dir_problems(cfg: TrainConfig) -> list[str]:
    """Refuse to write into a file or over an earlier run's checkpoints; check --resume_from."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return [f"--output_dir {out} is a file; choose a folder"]
    if step_checkpoints(out / "checkpoints") and not cfg.resume_from and not cfg.overwrite:
        return [f"--output_dir {out} already holds checkpoints of a run; continue it with "
                "--resume_from latest, or pass --overwrite to start over"]
    return resume_problems(cfg)


def resume_problems(cfg: TrainConfig) -> list[str]:
    if not cfg.resume_from:
        return []
    try:
        resolve_resume(cfg.resume_from, Path(cfg.output_dir) / "checkpoints")
    except UserError as err:
        return [str(err)]
    return []


def data_dir_problems(cfg: TrainConfig) -> list[str]:
    data = Path(cfg.data_dir)
    if not data.is_dir():
        return [f"--data_dir {data} does not exist; build the corpus with "
                "python3 mvlm_training_dataset_complete/prepare.py"]
    return []


def exit_on_error(prog: str, main, argv=None) -> None:
    """Run `main(argv)`; user errors become one line on stderr and exit 2; signals exit 128+n."""
    from .trainer import TrainingInterrupted

    try:
        main(argv)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
