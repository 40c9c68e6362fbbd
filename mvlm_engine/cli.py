"""Command-line plumbing shared by every script: flags generated from the run-config fields,
the resolution of a run's settings, argument checks collected and reported once, and the one
wrapper that turns errors and signals into one line and an exit status."""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from .checkpoint import resolve_resume, step_checkpoints
from .config import TrainConfig, build_config, config_dict, flatten, leaf_default, leaves, union_members
from .distillation import teacher_folder_problems
from .env import REPO_ROOT
from .errors import OutOfMemory, StorageError, TrainingDiverged, TrainingInterrupted, UserError, fail
from .fileio import folder_problem, storage_message
from .locks import FileLock, folder_holder, in_use_message, lock_folder
from .memory import is_out_of_memory
from .packaging import MODEL_MANIFEST, RUN_SUMMARY
from .stopping import STOP

# A folder holding any of these holds a finished (or exported) model.
FINISHED_MARKERS = (RUN_SUMMARY, MODEL_MANIFEST, "model.safetensors")

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
        if leaf.field.metadata.get("path") and isinstance(value, (str, list)):
            base = Path.cwd() if name in file_values or name in flags else REPO_ROOT
            values[name] = str((base / value).resolve()) if isinstance(value, str) else \
                [str((base / v).resolve()) if isinstance(v, str) else v for v in value]
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


def cache_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data_dir) / ".cache"


def is_inside(path: Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def output_dir_problems(cfg: TrainConfig) -> list[str]:
    """Refuse a folder that is a file, unwritable, inside the corpus or cache, or that holds an
    earlier run's checkpoints or finished model (unless resumed or --overwrite); check --resume_from."""
    out = Path(cfg.output_dir)
    problem = folder_problem(out, "--output_dir")
    if problem:
        return [problem]
    for flag, folder in (("the corpus folder --data_dir", Path(cfg.data_dir)), ("the cache folder", cache_folder(cfg))):
        if is_inside(out, folder):
            return [f"--output_dir {out} is or is inside {flag} {folder.resolve()}; the model's files must not mix with "
                    "it: choose another --output_dir"]
    if not cfg.resume_from and not cfg.overwrite:
        if step_checkpoints(out / "checkpoints"):
            return [f"--output_dir {out} already holds checkpoints of a run; continue it with "
                    "--resume_from latest, or pass --overwrite to start over"]
        finished = [name for name in FINISHED_MARKERS if (out / name).is_file()]
        if finished:
            return [f"--output_dir {out} already holds a finished model ({', '.join(finished)}); pass --overwrite to "
                    "replace it, or choose another --output_dir"]
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
    """The corpus folder exists; the cache folder can be written."""
    data = Path(cfg.data_dir)
    if not data.is_dir():
        return [f"--data_dir {data} {'is not a folder' if data.exists() else 'does not exist'}; build the corpus with "
                "python3 mvlm_training_dataset_complete/prepare.py"]
    flag = "--cache_dir" if cfg.cache_dir else "the default cache folder"
    problem = folder_problem(cache_folder(cfg), flag)
    return [problem + ("" if cfg.cache_dir else "; pass --cache_dir to a writable folder")] if problem else []


HELD: dict[Path, FileLock] = {}  # the output dirs this process holds, until its run_cli ends


def claim_output_dir(cfg: TrainConfig, problems: list[str] = ()) -> None:
    """Check the corpus and output folders (reporting them with a trainer's own `problems`), then
    take the output dir's lock (rank 0; one writer per folder) and check it again under the lock:
    another run may have finished meanwhile."""
    if cfg.prepare_data_only:  # the data cache only: the output dir is another process's business
        return fail(list(problems) + data_dir_problems(cfg))
    out = Path(cfg.output_dir).resolve()
    main_process = int(os.environ.get("RANK", 0)) == 0 and out not in HELD
    holder = folder_holder(out) if main_process and out.is_dir() else None
    if holder is not None:
        raise UserError(in_use_message(out, holder))  # first: the folder's state is the holder's to change
    fail(list(problems) + data_dir_problems(cfg) + teacher_folder_problems(cfg) + output_dir_problems(cfg))
    if main_process:
        HELD[out] = lock_folder(out, f"{Path(sys.argv[0]).name} training")
        fail(output_dir_problems(cfg))


def run_cli(prog: str, main, argv=None) -> typing.NoReturn:
    """Run `main(argv)` and exit with its status. Errors become one line on stderr: bad input
    exits 2, a diverged run, a storage error or running out of memory 1, a signal 128 + n;
    never a traceback for these. SIGINT/SIGTERM stop at once unless the work defers them
    (stopping.STOP). After a stop, the handler stays until the process ends, so that an impatient
    repeat can neither replace the stop's line nor print a traceback on the way out. The output
    dirs claimed by the work are released when it ends, whether by a return, an error or a stop."""
    installed = STOP.install()
    try:
        status = main(argv)
    except BaseException as err:  # noqa: BLE001  (re-raised below unless it is one of ours)
        line, status = error_line(err)
        if line is None:
            raise
        close_progress_bars()  # so that a bar's last redraw cannot land on the error line
        print(f"{prog}: {line}", file=sys.stderr)
    finally:
        release_output_dirs()  # the work is over, however it ended: the next run must not see a dead holder
        if installed and not STOP.stopping:
            STOP.uninstall()
    sys.exit(status or 0)


def release_output_dirs() -> None:
    """Give up the output dirs this process claimed (removing their lock files)."""
    while HELD:
        HELD.popitem()[1].release()


def close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def error_line(err: BaseException) -> tuple[str | None, int]:
    """(the one line, exit status) for the errors run_cli reports; (None, 0) for anything else."""
    if isinstance(err, UserError):
        return f"error: {err}", 2
    if isinstance(err, TrainingDiverged):
        return f"training diverged: {err}", 1
    if isinstance(err, StorageError):
        return f"error: {err}", 1
    if isinstance(err, TrainingInterrupted):
        return str(err), err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return (str(err) or "interrupted"), getattr(err, "exit_code", 130)
    if isinstance(err, OSError):
        return f"error: {storage_message(err, Path(err.filename or '?'), 'with')}", 1
    if isinstance(err, OutOfMemory):
        return f"error: {err}", 1
    if is_out_of_memory(err):  # outside a trainer's steps (loading, exporting) or in another script
        memory = "GPU memory" if type(err).__name__ == "OutOfMemoryError" else "memory"
        return (f"error: out of {memory} (" + (str(err).strip().splitlines() or [type(err).__name__])[0][:160] +
                "); use a smaller model, batch or context (a trainer: lower --batch_size and raise "
                "--gradient_accumulation_steps to keep the tokens per step), or --device cpu"), 1
    return None, 0
