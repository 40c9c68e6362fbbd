"""Checkpoints: one folder each, written atomically, loaded without unpickling.

<output_dir>/checkpoints/step_000500/
    model.safetensors     weights of the training module (the model plus any auxiliary heads)
    optimizer.pt          optimizer state  } torch.save of tensors and plain values only,
    scaler.pt             GradScaler state } read back with torch.load(weights_only=True)
    rng_state.pt          torch CPU and CUDA generator states
    trainer_state.json    step, data position, best validation loss, schedule, Python RNG
    config.json           the resolved configuration
The folder is filled under a temporary name, fsynced and renamed, so a folder with the final
name is always complete. The last `keep` step folders and `best_model/` are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .fileio import fsync_dir
from .errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")
BEST = "best_model"
REQUIRED = ("model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json", "config.json")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def rng_states() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    state = random.getstate()
    return tensors, {"python": [state[0], list(state[1]), state[2]]}


def restore_rng(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available() and len(tensors["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(folder: Path, module: torch.nn.Module, optimizer, scaler, trainer_state: dict,
                    config: dict) -> Path:
    """Write a complete checkpoint to `folder` atomically (replacing an older one of that name)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(module, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    tensors, plain = rng_states()
    torch.save(tensors, tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "rng": plain}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    for path in tmp.iterdir():
        _fsync_file(path)
    fsync_dir(tmp)
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    fsync_dir(folder.parent)
    return folder


def step_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def recover_interrupted_swaps(root: Path) -> None:
    """A crash between the two renames of a checkpoint replacement leaves only `.old-NAME`:
    put it back. Unfinished `.tmp-NAME` folders are incomplete by construction: drop them."""
    if not root.is_dir():
        return
    for old in root.glob(".old-*"):
        target = root / old.name.removeprefix(".old-")
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp)


def set_aside_later_checkpoints(root: Path, resumed: Path, step: int) -> list[Path]:
    """Resuming from an earlier checkpoint abandons the later ones: move them to
    checkpoints/abandoned/ (kept, not deleted) so `latest` and pruning see only this run."""
    later = [p for p in step_checkpoints(root) if int(STEP_DIR.match(p.name).group(1)) > step and p != resumed]
    if later:
        (root / "abandoned").mkdir(exist_ok=True)
        for path in later:
            os.replace(path, root / "abandoned" / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    return later


def prune_checkpoints(root: Path, keep: int) -> None:
    for stale in step_checkpoints(root)[:-keep]:
        shutil.rmtree(stale)


def resolve_resume(spec: str, checkpoints_root: Path) -> Path:
    """Turn --resume_from latest|best_model|PATH into a checkpoint folder, or a one-line error."""
    if spec == "latest":
        found = step_checkpoints(checkpoints_root)
        if not found:
            raise UserError(f"--resume_from latest: no checkpoint in {checkpoints_root}")
        return found[-1]
    path = checkpoints_root / BEST if spec == BEST else Path(spec)
    if not path.is_dir():
        raise UserError(f"--resume_from {spec}: {path} is not a checkpoint folder")
    return path


def load_checkpoint(folder: Path, module: torch.nn.Module, optimizer, scaler, tokenizer_hash: str) -> dict:
    """Restore weights, optimizer, scaler and RNG in place; return the trainer state.

    A checkpoint of another tokenizer is refused before any tensor is read.
    """
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); "
                        "resume from another checkpoint")
    try:
        saved_hash = json.loads((folder / "trainer_state.json").read_text()).get("tokenizer_hash")
    except (OSError, json.JSONDecodeError):
        saved_hash = None  # reported as corrupt below
    if saved_hash is not None and saved_hash != tokenizer_hash:
        raise UserError(f"checkpoint {folder} was trained with another tokenizer than this run's; resume with the "
                        "same --data_dir and --vocab_size, or start a new --output_dir")
    try:
        result = load_model(module, str(folder / "model.safetensors"), strict=True)
        if result and any(result):
            raise ValueError(f"mismatched keys: {result}")
        # map_location cpu: every rank reads rank 0's file; load_state_dict moves the optimizer
        # state to each parameter's own device.
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        if scaler is not None and scaler.is_enabled() and (folder / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
        tensors = torch.load(folder / "rng_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((folder / "trainer_state.json").read_text())
    except UserError:
        raise
    except Exception as err:  # safetensors, torch.load and json raise many types on corrupt files
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"checkpoint {folder} is corrupt or does not match this model ({first_line}); "
                        "resume from another checkpoint") from None
    restore_rng(tensors, state.pop("rng"))
    return state
