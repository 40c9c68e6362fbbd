"""Folders from elsewhere: check a model folder before anything loads it.

A folder whose kind ships its modelling code (SIM-ONE: `trust_remote_code`) runs that code the
moment transformers loads it, so a folder downloaded or copied from somewhere else could run
anything. Every entry point that loads a folder (generate.py, validate_models.py, export_gguf.py,
export_llama.py, the teachers of distillation and the ensembles of mvlm_engine/ensemble.py,
benchmarks/check_transformers4.py) calls `vet_folder` first, which refuses in one line:

- a top-level file that is a symlink leading out of the folder (weights, config, code alike), and a
  model_manifest.json entry that names a path rather than a file of the folder;
- a config.json `auto_map` other than the one its kind carries (model_registry.py), a
  `custom_pipelines` entry, or a tokenizer_config.json `auto_map` (no kind ships tokenizer code);
- a Python file (of a kind that ships code) that is not byte-identical to this repository's copy of
  the same name (and, where the folder's model_manifest.json records it, to its recorded sha256);
- a config.json size past the run configs' upper limits (the kind's `size_limits`).

The user may pass `--trust_folder_code` (TRUST_FLAG, the same name in every script) to load such a
folder anyway: then each problem is logged as a warning and the folder's code runs. Weights load only
from safetensors in every case (`use_safetensors=True`; nothing is unpickled). A folder whose
config.json is missing or unreadable passes here: nothing can load it, and each caller has its own
one-line error (or, in validate_models.py, a failed check) for it.
"""
from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Callable

from model_registry import FolderKind, folder_kind
from mvlm_engine.errors import UserError
from mvlm_engine.fileio import read_json_object, sha256_file
from mvlm_engine.logs import get_logger
from mvlm_engine.packaging import MODEL_MANIFEST

TRUST_FLAG = "--trust_folder_code"
TRUST_HELP = ("load a model folder even where it fails the checks of folders from elsewhere (modelling code other "
              "than this repository's, a foreign auto_map, a symlink out of the folder, sizes past the limits): its "
              "Python then runs as it loads; only for folders whose origin you trust")
log = get_logger("trust")


def link_problems(folder: Path) -> list[str]:
    """Top-level symlinks that lead out of the folder; manifest entries that are paths, not names."""
    root, problems = folder.resolve(), []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            if root not in target.parents:
                problems.append(f"{entry.name} is a symlink to {target}, outside the folder")
    listed = read_json_object(folder / MODEL_MANIFEST).get("files", {})
    names = listed if isinstance(listed, dict) else {}
    problems += [f"{MODEL_MANIFEST} names {name!r}, a path leaving the folder" for name in sorted(names)
                 if Path(name).name != name or name in (".", "..")]
    return problems


def auto_map_problems(folder: Path, config: dict, kind: FolderKind | None) -> list[str]:
    """An auto_map other than the kind's own (any auto_map for an unknown kind), custom pipelines,
    and tokenizer code."""
    problems, known = [], dict(kind.auto_map) if kind else {}
    found = config.get("auto_map")
    if found is not None and not isinstance(found, dict):
        problems.append(f"config.json's auto_map is {type(found).__name__}, not a mapping")
    elif found:
        foreign = [f"{key} -> {value}" for key, value in sorted(found.items()) if known.get(key) != value]
        if foreign:
            whose = f"{kind.display_name}'s own classes ({', '.join(known.values()) or 'none'})" if kind else \
                "the classes of a model kind of this project"
            problems.append(f"config.json's auto_map names {', '.join(foreign)}, not {whose}")
    if config.get("custom_pipelines"):
        problems.append("config.json names custom_pipelines (code of its own)")
    if read_json_object(folder / "tokenizer_config.json").get("auto_map"):
        problems.append("tokenizer_config.json has an auto_map (tokenizer code of its own)")
    return problems


def code_problems(folder: Path, kind: FolderKind | None) -> list[str]:
    """Each Python file of a folder that ships its code must be this repository's copy, byte for
    byte (and match the sha256 its model_manifest.json records, where it records one)."""
    if kind is None or not kind.trust_remote_code:
        return []  # transformers imports no file of such a folder
    listed = read_json_object(folder / MODEL_MANIFEST).get("files", {})
    recorded = listed if isinstance(listed, dict) else {}
    problems = []
    for path in sorted(p for p in folder.iterdir() if p.suffix == ".py" and p.is_file()):
        digest, ours = sha256_file(path), kind.code_dir / path.name
        if not ours.is_file():
            problems.append(f"{path.name} is not a modelling file this repository ships")
        elif digest != sha256_file(ours):
            problems.append(f"{path.name} differs from this repository's {ours} (sha256 {digest[:12]}… "
                            f"against {sha256_file(ours)[:12]}…)")
        entry = recorded.get(path.name)
        if isinstance(entry, dict) and entry.get("sha256") != digest:
            problems.append(f"{path.name} differs from the sha256 its {MODEL_MANIFEST} records")
    return problems


def size_problems(config: dict, kind: FolderKind | None) -> list[str]:
    """config.json sizes past the run configs' upper limits, negative, or not numbers."""
    limits = kind.size_limits() if kind and kind.size_limits else {}
    problems = []
    for key, limit in limits.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"config.json's {key} is {value!r}, not a number")
        elif not 0 <= value <= limit:
            problems.append(f"config.json asks for {key} {value:,} (allowed: 0 to {limit:,})")
    return problems


def folder_problems(folder: Path) -> list[str]:
    """Why loading `folder` could run code other than this repository's or build an absurd model;
    [] when it is safe to load (or has no readable config.json, so that nothing can load it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    problems = link_problems(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return problems
    if not isinstance(config, dict):
        return problems
    kind = folder_kind(config.get("model_type"))
    return problems + auto_map_problems(folder, config, kind) + code_problems(folder, kind) + \
        size_problems(config, kind)


def vet_folder(folder: Path, flag: str, trust: bool = False) -> None:
    """Refuse `folder` in one line (UserError) when folder_problems finds anything, unless `trust`
    (the user's --trust_folder_code), which logs the problems as a warning instead."""
    problems = folder_problems(folder)
    if not problems:
        return
    if trust:
        log.warning(f"WARNING: {TRUST_FLAG}: loading {folder} although {'; '.join(problems)}")
        return
    raise UserError(f"{flag} {folder} is refused, as a folder from elsewhere would be: {'; '.join(problems)}. "
                    f"Nothing of it was run; pass {TRUST_FLAG} to load it anyway, only if you trust where it came from")


def folder_check(flag: str, trust: bool = False) -> Callable[[Path], None]:
    """vet_folder for the folders of one flag: what mvlm_engine's ensembles and teachers take."""
    return partial(vet_folder, flag=flag, trust=trust)
