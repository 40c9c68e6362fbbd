"""Checkpoints: one folder each, written atomically, loaded without unpickling.

<output_dir>/checkpoints/step_000500/
    model.safetensors     weights of the training module (the model plus any auxiliary heads)
    optimizer.pt          optimizer state  } torch.save of tensors and plain values only,
    scaler.pt             GradScaler state } read back with torch.load(weights_only=True)
    rng_state.pt          torch CPU and CUDA generator states
    trainer_state.json    step, data position, best validation loss, schedule, Python RNG
    config.json           the resolved configuration
    averaged_weights.safetensors   with --ema_decay: the weight average (averaging.py), fp32
The folder is filled under a temporary name, fsynced and renamed, so a folder with the final
name is always complete. The last `keep` step folders and `best_model/` are kept.

A checkpoint is never written with a NaN or infinite weight, nor started without the free
space it needs. model.safetensors records the step and the hash of trainer_state.json, so an
edited trainer state is refused on load; every file is checked when it is read back.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .averaging import AVERAGE_FILE, WeightAverage, saved_state_problem

from .errors import TrainingDiverged, UserError
from .fileio import ensure_free_space, fsync_dir, plain_file_modes, storage_errors
from .optim import optimizers_of

STEP_DIR = re.compile(r"^step_(\d+)$")
BEST = "best_model"
REQUIRED = ("model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json", "config.json")
TRAINER_STATE_SHA = "trainer_state_sha256"


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


def state_bytes(module: torch.nn.Module, optimizer) -> int:
    """About how many bytes a checkpoint of `module` and `optimizer` takes on disk."""
    tensors = list(module.state_dict().values())
    tensors += [t for o in optimizers_of(optimizer) for state in o.state.values() for t in state.values()
                if torch.is_tensor(t)]
    unique = {(t.device, t.data_ptr()): t for t in tensors}.values()  # tied weights are saved once
    return sum(t.numel() * t.element_size() for t in unique) + (1 << 20)


def non_finite_values(module: torch.nn.Module) -> int:
    """How many weights (parameters and floating buffers) are NaN or infinite; 0 costs one pass."""
    return count_non_finite(module.state_dict().values())


def count_non_finite(weights) -> int:
    """How many values of `weights` (tensors or numpy arrays) are NaN or infinite."""
    tensors = [torch.as_tensor(w).detach() for w in weights]
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors or bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()):
        return 0
    return int(sum((~torch.isfinite(t)).sum().item() for t in tensors))


def last_good_checkpoint(root: Path) -> str:
    found = step_checkpoints(root)
    return f"the last good checkpoint is {found[-1]}" if found else f"no checkpoint was written yet in {root}"


def refuse_non_finite(module: torch.nn.Module, what: str, root: Path) -> None:
    """TrainingDiverged naming the last good checkpoint if any weight of `module` is not finite."""
    bad = non_finite_values(module)
    if bad:
        total = sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())
        raise TrainingDiverged(f"{bad:,} of {total:,} weights are NaN or infinite, so {what} was not written; "
                               f"{last_good_checkpoint(root)} (resume from it with a lower --learning_rate)")


def refuse_non_finite_export(weights: dict, model_dir: Path) -> None:
    """UserError naming the last good checkpoint if a saved model's `weights` (name -> tensor or
    array) hold a NaN or infinite value: the exporters never write such a model."""
    bad = count_non_finite(weights.values())
    if bad:
        raise UserError(f"--model_dir {model_dir} holds {bad:,} NaN or infinite weights, so it was not exported; "
                        f"{last_good_checkpoint(Path(model_dir) / 'checkpoints')}")


def save_checkpoint(folder: Path, module: torch.nn.Module, optimizer, scaler, trainer_state: dict,
                    config: dict, average: WeightAverage | None = None) -> Path:
    """Write a complete checkpoint to `folder` atomically (replacing an older one of that name),
    with the weight average when the run keeps one.

    Refused (TrainingDiverged) when a weight is not finite, and (StorageError) when the disk
    cannot hold it; either way nothing earlier is touched.
    """
    refuse_non_finite(module, f"checkpoint {folder.name}", folder.parent)
    needed = state_bytes(module, optimizer)
    if average is not None:
        if count_non_finite(average.averaged):
            raise TrainingDiverged(f"the weight average holds NaN or infinite values, so checkpoint {folder.name} was "
                                   f"not written; {last_good_checkpoint(folder.parent)}")
        trainer_state = {**trainer_state, "average": average.state()}
        needed += sum(t.numel() * t.element_size() for t in average.averaged)
    ensure_free_space(folder.parent, needed, f"checkpoint {folder.name}",
                      f"; free some space, then continue with --resume_from latest "
                      f"({last_good_checkpoint(folder.parent)})")
    tmp = folder.with_name(f".tmp-{folder.name}")
    try:
        with storage_errors(tmp, "writing checkpoint", needed):
            write_checkpoint_files(tmp, module, optimizer, scaler, trainer_state, config, average)
            swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # its space back; the earlier checkpoints are untouched
        raise
    return folder


def write_checkpoint_files(tmp: Path, module, optimizer, scaler, trainer_state: dict, config: dict,
                           average: WeightAverage | None = None) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, plain = rng_states()
    state_text = json.dumps({**trainer_state, "rng": plain}, indent=1)
    # The weights files record the step and the trainer state's hash: an edited trainer_state.json is refused.
    metadata = {"step": str(trainer_state.get("step")), TRAINER_STATE_SHA: sha256_text(state_text)}
    save_model(module, str(tmp / "model.safetensors"), metadata=metadata)
    if average is not None:
        save_file(average.tensors(), str(tmp / AVERAGE_FILE), metadata=metadata)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(tensors, tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(state_text)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    plain_file_modes(tmp)
    for path in tmp.iterdir():
        _fsync_file(path)
    fsync_dir(tmp)


def swap_into_place(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    fsync_dir(folder.parent)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def load_checkpoint(folder: Path, module: torch.nn.Module, optimizer, scaler, tokenizer_hash: str,
                    average: WeightAverage | None = None) -> dict:
    """Restore weights, optimizer, scaler, RNG and the weight average in place; return the trainer
    state (its "average_restored": False when the checkpoint holds no average to restore).

    Every file is checked, not trusted: a checkpoint of another tokenizer is refused before any
    tensor is read, and a damaged, edited or non-finite one is refused in one line.
    """
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); "
                        "resume from another checkpoint")
    state_text, state = read_trainer_state(folder)
    if state.get("tokenizer_hash") not in (None, tokenizer_hash):
        raise UserError(f"checkpoint {folder} was trained with another tokenizer than this run's; resume with the "
                        "same --data_dir and --vocab_size, or start a new --output_dir")
    try:
        load_checked_weights(folder, module, state_text, state["step"])
        state["average_restored"] = restore_average(folder, average, state, state_text)
        # map_location cpu: every rank reads rank 0's file; load_state_dict moves the optimizer
        # state to each parameter's own device.
        saved_optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        check_optimizer_state(saved_optimizer, optimizer)
        optimizer.load_state_dict(saved_optimizer)
        if scaler is not None and scaler.is_enabled() and (folder / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
        restore_rng(torch.load(folder / "rng_state.pt", map_location="cpu", weights_only=True), state.pop("rng"))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (safetensors, torch.load and json raise many types on corrupt files)
        raise unreadable(folder, err, "; resume from another checkpoint") from None
    if non_finite_values(module):
        raise UserError(f"checkpoint {folder} holds NaN or infinite weights; resume from an earlier checkpoint")
    return state


def unreadable(folder: Path, err: Exception, hint: str = "") -> UserError:
    first_line = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"checkpoint {folder} is corrupt or does not match this model ({first_line}){hint}")


def load_checked_weights(folder: Path, module: torch.nn.Module, state_text: str, step: int) -> None:
    check_weights_metadata(folder, state_text, step)
    result = load_model(module, str(folder / "model.safetensors"), strict=True)
    if result and any(result):
        raise ValueError(f"mismatched keys: {result}")


def load_weights(folder: Path, module: torch.nn.Module, average: WeightAverage | None = None) -> dict:
    """Only the weights of a checkpoint, and its weight average into `average` (checked as
    load_checkpoint checks them); its trainer state."""
    state_text, state = read_trainer_state(folder)
    try:
        load_checked_weights(folder, module, state_text, state["step"])
        state["average_restored"] = restore_average(folder, average, state, state_text)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (safetensors raises many types on corrupt files)
        raise unreadable(folder, err) from None
    if non_finite_values(module):
        raise UserError(f"checkpoint {folder} holds NaN or infinite weights")
    return state


STATE_TYPES = {"step": int, "best_val_loss": float, "bad_steps": int, "data": dict, "rng": dict}


def read_trainer_state(folder: Path) -> tuple[str, dict]:
    """trainer_state.json's text and its checked contents, or a one-line UserError."""
    try:
        text = (folder / "trainer_state.json").read_text(encoding="utf-8")
        state = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {folder}: trainer_state.json is unreadable ({type(err).__name__}); "
                        "resume from another checkpoint") from None
    problems = trainer_state_problems(state, folder)
    if problems:
        raise UserError(f"checkpoint {folder}: trainer_state.json is damaged ({'; '.join(problems)}); "
                        "resume from another checkpoint")
    return text, state


def trainer_state_problems(state, folder: Path) -> list[str]:
    if not isinstance(state, dict):
        return ["not a JSON object"]
    problems = [f"'{key}' is missing" for key in STATE_TYPES if key not in state]
    for key, kind in STATE_TYPES.items():
        value = state.get(key)
        fits = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if key in state and (not fits or isinstance(value, bool) or (kind is not dict and value != value)):
            problems.append(f"'{key}' is not {'an' if kind is int else 'a'} {kind.__name__}")
    if not problems:
        python_rng = state["rng"].get("python")
        if not (isinstance(python_rng, list) and len(python_rng) == 3 and isinstance(python_rng[1], list)):
            problems.append("'rng' has no Python generator state")
        if state["step"] < 0 or state["bad_steps"] < 0:
            problems.append("'step' and 'bad_steps' must be >= 0")
        named = STEP_DIR.match(folder.name)
        if named and int(named.group(1)) != state["step"]:
            problems.append(f"'step' is {state['step']} in the folder of step {int(named.group(1))}")
    if not isinstance(state.get("tokenizer_hash", ""), str):
        problems.append("'tokenizer_hash' is not a string")
    return problems


def check_weights_metadata(folder: Path, state_text: str, step: int, name: str = "model.safetensors") -> None:
    """The step and trainer-state hash recorded in the weights file `name` must match (older
    checkpoints without them are accepted)."""
    with safe_open(str(folder / name), framework="pt") as weights:
        metadata = weights.metadata() or {}
    if TRAINER_STATE_SHA in metadata and metadata[TRAINER_STATE_SHA] != sha256_text(state_text):
        raise UserError(f"checkpoint {folder}: trainer_state.json was changed after the checkpoint was written "
                        f"(its hash differs from the one in {name}); resume from another checkpoint")
    if "step" in metadata and metadata["step"] != str(step):
        raise UserError(f"checkpoint {folder}: trainer_state.json says step {step}, {name} step "
                        f"{metadata['step']}; resume from another checkpoint")


def restore_average(folder: Path, average: WeightAverage | None, state: dict, state_text: str) -> bool:
    """Load the checkpoint's weight average into `average`; False when it holds none (a run
    without averaging: the average starts after its step). A damaged one is a one-line UserError."""
    saved = state.get("average")
    if average is None:
        return False
    if saved is None:
        average.start_after(state["step"])
        return False
    damage = saved_state_problem(saved)
    if damage is None and not (folder / AVERAGE_FILE).is_file():
        damage = f"{AVERAGE_FILE} is missing"
    if damage is None:
        check_weights_metadata(folder, state_text, state["step"], AVERAGE_FILE)
        tensors = load_file(str(folder / AVERAGE_FILE))
        params = dict(zip(average.names, average.averaged))
        if tensors.keys() != params.keys() or any(t.shape != params[k].shape or t.dtype != torch.float32
                                                  for k, t in tensors.items()):
            damage = f"{AVERAGE_FILE} does not fit this model's parameters"
        elif count_non_finite(tensors.values()):
            damage = f"{AVERAGE_FILE} holds NaN or infinite values"
    if damage is not None:
        raise UserError(f"checkpoint {folder}: its weight average is damaged ({damage}); resume from another "
                        "checkpoint")
    average.restore(saved, tensors)
    return True


MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def check_optimizer_state(saved, optimizer) -> None:
    """The saved optimizer state fits this optimizer (each of an OptimizerSet's in turn): same
    groups and sizes, moments shaped like their parameters (load_state_dict checks the groups only)."""
    optimizers = optimizers_of(optimizer)
    if len(optimizers) > 1 or (isinstance(saved, dict) and "optimizers" in saved):
        parts = saved.get("optimizers") if isinstance(saved, dict) else None
        if not isinstance(parts, list) or len(parts) != len(optimizers):
            raise ValueError("optimizer.pt was saved by another --optimizer")
        for part, one in zip(parts, optimizers):
            check_optimizer_state(part, one)
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or \
            not isinstance(saved.get("param_groups"), list):
        raise ValueError("optimizer.pt is not an optimizer state")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group.get("params", [])]
    if len(ids) != len(params):
        raise ValueError(f"optimizer.pt has {len(ids)} parameters, the model {len(params)}")
    for index, param in zip(ids, params):
        for key, value in saved["state"].get(index, {}).items():
            if key in MOMENT_KEYS and (not torch.is_tensor(value) or value.shape != param.shape):
                raise ValueError(f"optimizer.pt: {key} of parameter {index} does not fit its shape {tuple(param.shape)}")
