"""Run settings: one typed dataclass field per setting (docs/ARCHITECTURE.md, "Settings").

A model's run config subclasses TrainConfig and nests its model-shape dataclass under
`model`. A preset is a named dict of overrides keyed by setting name, defined once per model
(`PRESETS` on the run config). Command-line flags are generated from the fields (cli.py).

A value is resolved in this order, later wins:
    field default < preset < --config FILE < command-line flag
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import UserError
from .fileio import atomic_write_text

T = typing.TypeVar("T")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, path: bool = False,
            per_invocation: bool = False, positional: bool = False):
    """A dataclass field carrying its help text. `path`: resolved against the repository root
    when it comes from the default, against the working directory when the user gives it.
    `per_invocation`: an action for this run only (never saved, refused in config files).
    `positional` (a list[str] setting): the words after the flags fill it too, as in
    `generate.py --model DIR PROMPT ...`."""
    metadata = {"help": help, "path": path, "per_invocation": per_invocation, "positional": positional}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def override(base: type, name: str, default: Any):
    """The field `name` of `base` with another default (a model's own value of a shared setting)."""
    inherited = {f.name: f for f in dataclasses.fields(base)}[name]
    return field(default=default, metadata=inherited.metadata)


# The CPU smoke-run training settings that every model's "tiny" preset starts from.
CPU_SMOKE_TRAINING = {"vocab_size": 4096, "block_size": 128, "max_steps": 300, "learning_rate": 3e-3,
                      "warmup_steps": 30, "log_interval": 10, "eval_interval": 100, "save_interval": 100,
                      "eval_windows": 64}


@dataclass
class TrainConfig:
    """Everything the shared training loop needs; each model adds its own fields in a subclass."""

    PRESETS: ClassVar[dict[str, dict]] = {"default": {}}
    # Fields of nested model configs that are set from other settings, never by the user.
    DERIVED: ClassVar[tuple[str, ...]] = ()

    preset: str = setting("default", "named set of overrides for model size and training defaults")
    data_dir: str = setting("mvlm_training_dataset_complete",
                            "corpus folder (built by mvlm_training_dataset_complete/prepare.py)", path=True)
    output_dir: str = setting("models/run", "where the final model, logs, plots and checkpoints/ go", path=True)
    cache_dir: str | None = setting(None, "tokenizer and token-shard cache (default: <data_dir>/.cache)", path=True)
    vocab_size: int = setting(32000, "BPE vocabulary size")
    block_size: int = setting(1024, "tokens per training sequence")
    batch_size: int = setting(16, "sequences per device per micro-step")
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step")
    # 2: at the small preset on one H200 the held-out loss of the data-limited recipe was lowest after 2
    # epochs of a 3-epoch run and rose after (RESULTS.md, 2026-12-04); the corpus repeats each verse ~23 times an epoch.
    num_epochs: float = setting(2.0, "passes over the training split (ignored when --max_steps is set)")
    max_steps: int = setting(0, "optimizer steps; 0 derives them from --num_epochs")
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw", "adamw: AdamW everywhere; muon: torch.optim.Muon on hidden matrices, AdamW on the rest")
    learning_rate: float = setting(6e-4, "peak AdamW learning rate (with --optimizer muon: embeddings, head, gains)")
    head_lr: float | None = setting(None, "peak AdamW learning rate of untied output heads (default: learning_rate)")
    scalar_lr: float | None = setting(None, "peak AdamW learning rate of gains and biases (default: learning_rate)")
    muon_lr: float = setting(0.02, "peak Muon learning rate (--optimizer muon)")
    muon_momentum: float = setting(0.95, "Muon momentum (Nesterov); the value after --muon_momentum_warmup_steps")
    muon_momentum_warmup_steps: int = setting(
        0, "steps over which Muon's momentum rises linearly from --muon_momentum_start to --muon_momentum (0 = off)")
    muon_momentum_start: float = setting(0.85, "Muon's momentum at step 0 of --muon_momentum_warmup_steps")
    muon_weight_decay: float = setting(0.0, "Muon decoupled weight decay: each step multiplies the hidden matrices "
                                            "by 1 - lr * decay")
    muon_impl: Literal["torch", "batched"] = setting(
        "torch", "torch: torch.optim.Muon, one matrix at a time; batched: the same update with each shape's matrices "
                 "stacked, the Newton-Schulz iteration as batched matmuls (compiled on CUDA; mvlm_engine/muon.py)")
    schedule: Literal["cosine", "wsd"] = setting(
        "cosine", "after warmup: cosine decay, or wsd (warmup-stable-decay: flat, then a linear decay)")
    decay_fraction: float = setting(0.2, "wsd: the share of the steps spent decaying at the end")
    min_lr_ratio: float = setting(0.1, "the schedule decays to peak * min_lr_ratio, reached at the last step "
                                       "(0: the last step runs at 0)")
    warmup_steps: int = setting(200, "linear warmup steps")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay of matrices and embeddings (each step "
                                       "multiplies them by 1 - lr * decay)")
    head_weight_decay: float | None = setting(
        None, "AdamW decoupled weight decay of untied output heads (default: weight_decay)")
    scalar_weight_decay: float = setting(0.0, "AdamW decoupled weight decay of gains and biases")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "gradient-norm clip (0 = off)")
    seed: int = setting(1337, "random seed (data order and initialisation)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "auto: bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU")
    compile: bool | None = setting(None, "torch.compile the model (default: on for CUDA; TORCH_COMPILE=0/1 overrides)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = setting(
        "default", "torch.compile's mode when compiling (benchmarks/gpu_session.sh ab measures "
                   "max-autotune-no-cudagraphs against the default on a GPU)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train")
    chunked_loss: bool = setting(True, "cross-entropy through the unembedding a chunk of rows at a time, so the "
                                       "full tokens x vocabulary logits are never held (off: full logits, as before)")
    fused_layers: bool = setting(True, "activations through fused kernels and autograd functions that keep fewer "
                                       "tensors for the backward pass, same forward values (off: plain ops, as before)")
    prefetch_batches: bool | None = setting(
        None, "prepare the next micro-batch in a background thread while the current step runs, with pinned, "
              "non-blocking copies (default: on for CUDA; off on a CPU, where the thread hand-off measured costlier "
              "than the cheap draw it hides)")
    log_interval: int = setting(10, "steps between logged training records")
    eval_interval: int = setting(250, "steps between held-out evaluations")
    eval_windows: int = setting(200, "held-out windows per evaluation (spread evenly over the split)")
    save_interval: int = setting(500, "steps between checkpoints")
    keep_checkpoints: int = setting(3, "step checkpoints kept (plus best_model)")
    export_weights: Literal["best", "last"] = setting(
        "best", "the weights the final model carries: those of the lowest held-out loss seen (checkpoints/best_model) "
                "or the last step's")
    early_stop_patience: int = setting(0, "stop after this many held-out evaluations in a row without a new best "
                                          "(0: never)")
    max_bad_steps: int = setting(5, "consecutive non-finite steps before the run stops")
    # Weight averaging (mvlm_engine/averaging.py) and distillation (mvlm_engine/distillation.py).
    ema_decay: float = setting(0.0, "decay per optimizer step of the weight average (debiased EMA) that evaluation, "
                                    "best_model and the export see; training goes on with the raw weights (0 = off)")
    ema_start_step: int = setting(0, "the weight average leaves out the weights of the steps up to this one")
    teachers: list[str] = setting(help="finished model folders (written by either trainer, with this run's "
                                       "tokenizer) whose probability-averaged prediction the model also learns",
                                  factory=list, path=True)
    distill_weight: float = setting(0.0, "weight of the distillation term, T^2 KL(teachers || model) (0 = off)")
    distill_temperature: float = setting(1.0, "temperature T of the teachers' and the model's distributions in the "
                                              "distillation term")
    trust_folder_code: bool = setting(False, "load --teachers folders even where they fail the checks of folders from "
                                             "elsewhere (release/trust.py): their Python then runs as they load",
                                      per_invocation=True)
    resume_from: str | None = setting(None, "continue a run: 'latest', 'best_model' or a checkpoint folder",
                                      per_invocation=True)
    overwrite: bool = setting(False, "start a fresh run in an --output_dir that already holds a run",
                              per_invocation=True)
    prepare_data_only: bool = setting(
        False, "build (or find cached) the run's tokenizer and token shards, then exit without touching "
               "--output_dir (train_all_models.py runs it for the next model while the previous one trains)",
        per_invocation=True)

    def problems(self) -> list[str]:
        """Every invalid value, as messages naming the flag (types were checked on construction)."""
        errors = [f"--{name} must be > 0 (got {getattr(self, name)})" for name in
                  ("batch_size", "gradient_accumulation_steps", "block_size", "log_interval", "eval_interval",
                   "save_interval", "eval_windows", "keep_checkpoints", "vocab_size", "max_bad_steps")
                  if getattr(self, name) <= 0]
        errors += [f"--{name} must be >= 0 (got {getattr(self, name)})" for name in
                   ("max_steps", "warmup_steps", "weight_decay", "head_weight_decay", "scalar_weight_decay",
                    "muon_weight_decay", "grad_clip", "early_stop_patience", "muon_momentum_warmup_steps")
                   if getattr(self, name) is not None and getattr(self, name) < 0]
        if self.num_epochs <= 0:  # checked even when --max_steps makes it unused
            errors.append(f"--num_epochs must be > 0 (got {self.num_epochs})")
        errors += [f"--{name} must be > 0 (got {getattr(self, name)})"
                   for name in ("learning_rate", "muon_lr", "head_lr", "scalar_lr")
                   if getattr(self, name) is not None and not getattr(self, name) > 0]
        errors += [f"--{name} must be in [0, 1) (got {getattr(self, name)})"
                   for name in ("muon_momentum", "muon_momentum_start") if not 0 <= getattr(self, name) < 1]
        errors += decay_factor_problems(self)
        if not 0 < self.decay_fraction <= 1:
            errors.append(f"--decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"--min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        errors += [f"--{name} must be in [0, 1) (got {getattr(self, name)})" for name in ("beta1", "beta2")
                   if not 0 <= getattr(self, name) < 1]
        if not 0 <= self.seed < 1 << 32:
            errors.append(f"--seed must be in [0, {(1 << 32) - 1}] (got {self.seed})")
        if 0 < self.vocab_size < MIN_VOCAB:
            errors.append(f"--vocab_size must be >= {MIN_VOCAB}: the 256 byte tokens and the end-of-text token "
                          f"(got {self.vocab_size})")
        return errors + averaging_and_distillation_problems(self) + upper_limit_problems(self, TRAIN_LIMITS)


def averaging_and_distillation_problems(cfg: TrainConfig) -> list[str]:
    errors = [] if 0 <= cfg.ema_decay < 1 else [f"--ema_decay must be in [0, 1) (got {cfg.ema_decay})"]
    errors += [f"--{name} must be >= 0 (got {getattr(cfg, name)})" for name in ("ema_start_step", "distill_weight")
               if getattr(cfg, name) < 0]
    if not cfg.distill_temperature > 0:
        errors.append(f"--distill_temperature must be > 0 (got {cfg.distill_temperature})")
    if cfg.distill_weight > 0 and not cfg.teachers:
        errors.append(f"--distill_weight {cfg.distill_weight} needs --teachers: the model folders to learn from")
    return errors + upper_limit_problems(cfg, {"ema_start_step": 10 ** 9, "distill_weight": 100.0,
                                               "distill_temperature": 100.0})


MIN_VOCAB = 257
# Upper limits: past these a run cannot work on any machine (or a number is a typo).
TRAIN_LIMITS = {"vocab_size": 1 << 20, "block_size": 1 << 16, "batch_size": 1 << 16,
                "gradient_accumulation_steps": 1 << 16, "num_epochs": 1e6, "max_steps": 10 ** 9,
                "learning_rate": 1.0, "head_lr": 1.0, "scalar_lr": 1.0, "muon_lr": 10.0, "muon_weight_decay": 100.0,
                "muon_momentum_warmup_steps": 10 ** 9, "warmup_steps": 10 ** 9, "weight_decay": 100.0,
                "head_weight_decay": 100.0, "scalar_weight_decay": 100.0, "grad_clip": 1e6,
                "log_interval": 10 ** 9, "eval_interval": 10 ** 9, "eval_windows": 10 ** 6, "save_interval": 10 ** 9,
                "keep_checkpoints": 10 ** 4, "max_bad_steps": 10 ** 6, "early_stop_patience": 10 ** 6}


def decay_factor_problems(cfg: TrainConfig) -> list[str]:
    """Decoupled weight decay multiplies a group's weights by 1 - peak lr * decay each step: at a
    product of 1 or more that factor reaches 0 or flips the sign. One message per such group,
    naming the two flags in effect for it (a group's own flag, else the one it falls back to)."""
    def chosen(own: str, fallback: str) -> str:
        return own if getattr(cfg, own) is not None else fallback

    pairs = [("muon_lr", "muon_weight_decay"), ("learning_rate", "weight_decay"),
             (chosen("head_lr", "learning_rate"), chosen("head_weight_decay", "weight_decay")),
             (chosen("scalar_lr", "learning_rate"), "scalar_weight_decay")]
    errors = []
    for lr, decay in dict.fromkeys(pairs):  # the head's pair may be the matrices' own
        product = getattr(cfg, lr) * getattr(cfg, decay)
        if product >= 1:
            errors.append(f"--{lr} x --{decay} must be < 1 (got {getattr(cfg, lr)} x {getattr(cfg, decay)} = "
                          f"{product:g}): each step multiplies the weights by 1 - lr x decay")
    return errors


def upper_limit_problems(owner, limits: dict[str, float]) -> list[str]:
    """'--name must be <= limit' for each attribute of `owner` above its limit (None: unset, fine)."""
    return [f"--{name} must be <= {limit:,} (got {getattr(owner, name)})" if isinstance(limit, int) else
            f"--{name} must be <= {limit:g} (got {getattr(owner, name)})" for name, limit in limits.items()
            if getattr(owner, name) is not None and getattr(owner, name) > limit]


# --------------------------------------------------------------------------- the settings tree


@dataclass(frozen=True)
class Leaf:
    """One user-facing setting: its name (the flag), where it sits, its type and field."""

    name: str
    path: tuple[str, ...]  # attribute path from the run config, e.g. ("model", "d_model")
    hint: Any
    field: dataclasses.Field


def leaves(cls: type) -> dict[str, Leaf]:
    """Every setting of run-config class `cls`, nested model fields included (derived ones not)."""
    found: dict[str, Leaf] = {}

    def walk(klass, prefix):
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            path = (*prefix, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], path)
            elif ".".join(path) not in getattr(cls, "DERIVED", ()):
                if f.name in found:
                    raise TypeError(f"setting name {f.name} appears twice in {cls.__name__}")
                found[f.name] = Leaf(f.name, path, hints[f.name], f)

    walk(cls, ())
    return found


def leaf_default(leaf: Leaf) -> Any:
    f = leaf.field
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def union_members(hint: Any) -> tuple:
    """(int, NoneType) for `int | None` or Optional[int]; (hint,) for anything else."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def type_problem(name: str, value: Any, hint: Any) -> str | None:
    """None if `value` fits `hint`, else a message naming the flag (finite numbers only)."""
    allowed = union_members(hint)
    for kind in allowed:
        if typing.get_origin(kind) is Literal:
            if value in typing.get_args(kind):
                return None
        elif kind is type(None):
            if value is None:
                return None
        elif typing.get_origin(kind) is list:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return None
        elif kind is bool:
            if isinstance(value, bool):
                return None
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return None
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return None if math.isfinite(value) else f"--{name} must be a finite number, got {value}"
        elif isinstance(value, kind):
            return None
    return f"--{name} must be {describe_type(hint)}, got {value!r}"


def describe_type(hint: Any) -> str:
    allowed = union_members(hint)
    names = []
    for kind in allowed:
        if typing.get_origin(kind) is Literal:
            names.append("one of " + ", ".join(map(str, typing.get_args(kind))))
        elif typing.get_origin(kind) is list:
            names.append("a list of strings")
        else:
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            names.append("null" if kind is type(None) else f"{article} {kind.__name__}")
    return " or ".join(names)


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """A `cls` from flat setting values (name -> value); every unknown key, wrong type and
    invalid model shape is reported at once in one UserError."""
    known = leaves(cls)
    unknown = sorted(set(values) - set(known))
    errors = [f"unknown {cls.__name__} key(s): {', '.join(unknown)}"] if unknown else []
    errors += [p for name, value in values.items() if name in known
               if (p := type_problem(name, value, known[name].hint))]
    if errors:
        raise UserError("; ".join(errors))
    tree: dict = {}
    for name, leaf in known.items():
        node = tree
        for part in leaf.path[:-1]:
            node = node.setdefault(part, {})
        node[leaf.path[-1]] = values.get(name, leaf_default(leaf))
    return _construct(cls, tree)


def _construct(cls: type, tree: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], tree.get(f.name, {}))
        elif f.name in tree:
            kwargs[f.name] = tree[f.name]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a model config's own checks (e.g. heads vs width)
        raise UserError(f"bad {cls.__name__}: {err}") from None


def flatten(values: dict, cls: type) -> dict[str, Any]:
    """Setting values from a config file, nested as saved ({"model": {...}}) or flat, as a flat
    dict; a nested key that is no setting stays dotted ("model.x") so it is reported as unknown."""
    by_path = {".".join(leaf.path): name for name, leaf in leaves(cls).items()}
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and any(p.startswith(key + ".") for p in by_path):
            flat.update({by_path.get(f"{key}.{sub}", f"{key}.{sub}"): v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_dict(cfg) -> dict:
    """The saved form of a run config: nested, without per-invocation or derived fields."""
    values = dataclasses.asdict(cfg)
    for leaf in [f for f in dataclasses.fields(cfg) if f.metadata.get("per_invocation")]:
        values.pop(leaf.name)
    for dotted in getattr(type(cfg), "DERIVED", ()):
        *parents, name = dotted.split(".")
        node = values
        for part in parents:
            node = node[part]
        node.pop(name, None)
    return values


def save_config_json(cfg, path: Path) -> None:
    values = config_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")

