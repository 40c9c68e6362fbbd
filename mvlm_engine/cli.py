"""Command-line plumbing shared by every script: flags generated from the run-config fields,
the resolution of a run's settings, argument checks collected and reported once, and the one
wrapper that turns errors and signals into one line and an exit status."""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from .checkpoint import resolve_resume, step_checkpoints
from .config import TrainConfig, build_config, config_dict, flatten, leaf_default, leaves, union_members
from .env import REPO_ROOT
from .errors import TrainingDiverged, TrainingInterrupted, UserError

class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line ('prog: error: ...', exit 2), like every other error here."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_setting_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of `cls` (bools get --name and --no_name; a positional list also takes
    the bare words after the flags); absent flags stay absent."""
    groups = {}
    for name, leaf in leaves(cls).items():
        title = "model" if len(leaf.path) > 1 else (
            "training" if name in TrainConfig.__dataclass_fields__ and issubclass(cls, TrainConfig) else
            "model-specific training" if issubclass(cls, TrainConfig) else "")
        group = groups.get(title) or groups.setdefault(
            title, parser.add_argument_group(f"{title} settings".strip()))
        default = leaf_default(leaf)
        help_text = f"{leaf.field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if name == "preset" and hasattr(cls, "PRESETS"):
            group.add_argument("--preset", choices=sorted(cls.PRESETS), default=argparse.SUPPRESS, help=help_text)
            continue
        if bool in union_members(leaf.hint):
            group.add_argument(f"--{name}", dest=name, action="store_const", const=True, default=argparse.SUPPRESS,
                               help=help_text)
            group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=f"set {name} to False")
            continue
        if leaf.field.metadata.get("positional"):
            group.add_argument(name, nargs="*", default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)
        group.add_argument(f"--{name}", default=argparse.SUPPRESS, help=help_text, **flag_type(leaf.hint))


def flag_type(hint: Any) -> dict:
    """argparse keywords that parse a value of type `hint` from the command line."""
    hint = next(k for k in union_members(hint) if k is not type(None))  # X | None: the flag gives an X
    if typing.get_origin(hint) is Literal:
        return {"choices": list(typing.get_args(hint))}
    if typing.get_origin(hint) is list:
        return {"nargs": "*", "metavar": "WORD"}
    return {"type": hint if hint in (int, float) else str}


def build_parser(cls: type, prog: str, description: str) -> OneLineParser:
    words = "".join(f" [{n.upper()} ...]" for n, leaf in leaves(cls).items() if leaf.field.metadata.get("positional"))
    parser = OneLineParser(prog=prog, usage=f"{prog} [options]{words}", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file of settings (a run's own train_config.json reproduces it)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved settings as JSON and exit")
    add_setting_flags(parser, cls)
    return parser


def read_config_file(path: Path) -> dict:
    """A JSON object of settings from --config, or a one-line error."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--config {path} is not a readable JSON file ({err.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a JSON object of settings")
    return values


def resolve_settings(cls: type, flags: dict, file_values: dict) -> Any:
    """field default < preset < config file < flags, as a `cls`; paths made absolute."""
    settings = leaves(cls)
    per_invocation = sorted(k for k in file_values if k in settings and settings[k].field.metadata.get("per_invocation"))
    if per_invocation:
        raise UserError(f"--config: {', '.join(per_invocation)} is an action for one run, not a setting; "
                        "pass it on the command line")
    values = {**file_values, **flags}
    if hasattr(cls, "PRESETS"):
        preset = flags.get("preset") or file_values.get("preset") or leaf_default(settings["preset"])
        if preset not in cls.PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(cls.PRESETS))}")
        values = {**cls.PRESETS[preset], **values, "preset": preset}
    for name, leaf in settings.items():
        value = values.get(name, leaf_default(leaf))
        if leaf.field.metadata.get("path") and isinstance(value, str):
            given = name in file_values or name in flags
            values[name] = str(((Path.cwd() if given else REPO_ROOT) / value).resolve())
    return build_config(cls, values)


def parse_run_config(cls: type, argv, prog: str, description: str):
    """The resolved settings (a `cls`) from the command line, after their own checks (`problems()`).
    --print_config prints it and exits 0."""
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    config_path, show = args.pop("config"), args.pop("print_config")
    file_values = flatten(read_config_file(config_path), cls) if config_path else {}
    cfg = resolve_settings(cls, args, file_values)
    problems = cfg.problems() if hasattr(cfg, "problems") else []
    if problems:
        raise UserError("; ".join(problems))
    if show:
        print(json.dumps(config_dict(cfg), indent=2, sort_keys=True))
        raise SystemExit(0)
    return cfg


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


def run_cli(prog: str, main, argv=None) -> typing.NoReturn:
    """Run `main(argv)` and exit with its status. Errors become one line on stderr: bad input
    exits 2, a diverged run or a storage error 1, a signal 128 + n; never a traceback for these."""
    try:
        status = main(argv)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        status = 2
    except TrainingDiverged as err:
        print(f"{prog}: training diverged: {err}", file=sys.stderr)
        status = 1
    except TrainingInterrupted as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        status = stop.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = 130
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"{prog}: error: {err.strerror or err}{where}", file=sys.stderr)
        status = 1
    sys.exit(status or 0)
