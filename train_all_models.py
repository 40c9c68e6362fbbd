#!/usr/bin/env python3
"""The whole pipeline in one command: corpus -> MVLM-GPT2 -> Enhanced SIM-ONE -> validate -> package -> archives.

    python3 train_all_models.py                    # preset auto: small on a CUDA GPU, tiny on CPU
    python3 train_all_models.py --only simone      # one model
    python3 train_all_models.py --skip_training    # package and validate what exists

Re-running after a failure or a kill skips the finished stages and resumes an interrupted
training stage from its latest checkpoint. Each stage's output is shown live and kept in
logs/<stage>.log; models/training_summary.json records status, duration and key metrics.
Validation writes each model's card (README.md) into its folder, packaging then archives the
folders with their cards (plus `<name>.gguf` for each model GGUF can express), and a last stage
adds the download checks (SHA256SUMS over every file) to the validation report.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

from model_registry import MODELS, model_names
from mvlm_engine.checkpoint import step_checkpoints
from mvlm_engine.cli import parse_run_config, run_cli
from mvlm_engine.config import setting
from mvlm_engine.corpus import MANIFEST_NAME
from mvlm_engine.errors import StorageError, UserError
from mvlm_engine.fileio import (atomic_write_text, folder_problem, read_json_object, remove_dead_staging,
                                storage_errors, storage_message)
from mvlm_engine.locks import FileLock, in_use_message, note_takeover, remove_dead_locks
from mvlm_engine.logs import get_logger
from mvlm_engine.packaging import MODEL_MANIFEST, RUN_SUMMARY
from release.package import FORMATS

PROG = "train_all_models.py"
REPO = Path(__file__).resolve().parent
log = get_logger("pipeline")


# Trainer flags that the pipeline sets itself (or that would make a stage train nothing).
PIPELINE_FLAGS = {"--preset", "--data_dir", "--output_dir", "--device", "--resume_from", "--overwrite",
                  "--print_config", "--help", "-h"}
# The same for the corpus build and for validation.
CORPUS_FLAGS = {"--output_dir", "--help", "-h"}
VALIDATE_FLAGS = {"--models_dir", "--data_dir", "--download_dir", "--names", "--no_archives", "--archives_only",
                  "--print_config", "--help", "-h"}
PIPELINE_LOCK = ".pipeline.lock"



@dataclass
class PipelineSettings:
    preset: Literal["auto", "tiny", "small", "medium"] = setting(
        "auto", "auto: small on a CUDA machine, tiny on a CPU-only one")
    only: str | None = setting(None, f"train only this model: {', '.join(MODELS)} (model_registry.py)")
    skip_training: bool = setting(False, "package and validate what exists")
    retrain: bool = setting(False, "train again even where a finished model exists (its checkpoints are replaced)")
    data_dir: str = setting("mvlm_training_dataset_complete", "corpus folder (built if missing)", path=True)
    models_dir: str = setting("models", "where the trained models go", path=True)
    download_dir: str = setting("models_for_download", "where the archives go", path=True)
    logs_dir: str = setting("logs", "one log per stage", path=True)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train")
    trainer_args: str = setting("", 'extra flags for both trainers, e.g. "--max_steps 100"')
    corpus_args: str = setting("", 'extra flags for prepare.py when the corpus is built, e.g. "--translations KJV,WEB"')
    validate_args: str = setting("", 'extra flags for validate_models.py, e.g. "--eval_windows 8 --recall_verses 5"')

    def problems(self) -> list[str]:
        """--trainer_args, --corpus_args and --validate_args parse and leave the pipeline's own flags
        alone; every folder can be written."""
        errors = [] if self.only in (None, *MODELS) else [
            f"--only: invalid choice {self.only!r} (choose from {', '.join(model_names())})"]
        for name, owned_flags in (("trainer_args", PIPELINE_FLAGS), ("corpus_args", CORPUS_FLAGS),
                                  ("validate_args", VALIDATE_FLAGS)):
            errors += extra_flag_problems(name, getattr(self, name), owned_flags)
        for name in ("models_dir", "download_dir", "logs_dir"):
            errors.append(folder_problem(Path(getattr(self, name)), f"--{name}"))
        data = Path(self.data_dir)
        if not (data / MANIFEST_NAME).is_file() and not self.skip_training:  # the corpus stage writes it
            errors.append(folder_problem(data, "--data_dir"))
        return [e for e in errors if e]


def extra_flag_problems(name: str, value: str, owned_flags: set[str]) -> list[str]:
    """--<name> parses as shell words and sets none of the flags the pipeline sets itself."""
    try:
        words = shlex.split(value)
    except ValueError as err:
        return [f"--{name} {value!r} cannot be parsed ({err}); quote it as one shell word"]
    owned = sorted({w.split("=", 1)[0] for w in words if w.split("=", 1)[0] in owned_flags})
    if owned:
        return [f"--{name} may not set {', '.join(owned)}: the pipeline sets it (use this script's own flags)"]
    return []


class StageFailed(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class PipelineTerminated(KeyboardInterrupt):
    """SIGTERM to the orchestrator: passed on to the running stage, which checkpoints and stops."""


def stop_on_sigterm(*_):
    raise PipelineTerminated


def choose_preset(requested: str, device: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, "asked for on the command line"
    import torch
    if device != "cpu" and torch.cuda.is_available():
        return "small", f"a CUDA GPU is visible ({torch.cuda.get_device_name(0)})"
    return "tiny", "no CUDA GPU is visible, so the CPU smoke-size models are trained"


def run_stage(name: str, command: list, log_path: Path) -> None:
    """Run one stage, its output shown live and written to its log; never reads the keyboard."""
    log.info(f"=== stage {name}: {' '.join(shlex.quote(str(c)) for c in command[1:])}")
    log.info(f"=== log: {log_path}")
    with storage_errors(log_path, "opening the stage log"):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stage_log = StageLog(open(log_path, "ab"), log_path)
    with stage_log:
        stage_log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(map(str, command))}\n".encode())
        proc = subprocess.Popen([str(c) for c in command], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                stage_log.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        except KeyboardInterrupt as stop:
            # Ctrl-C reached the whole process group already; a SIGTERM sent to us alone is passed on.
            if isinstance(stop, PipelineTerminated) and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait()  # let the trainer save its checkpoint
            raise
        code = proc.wait()
    if code != 0:
        raise StageFailed(name, f"stage '{name}' failed with exit status {code}; see {log_path}")


class BackgroundStage:
    """A command run beside a stage (its output to its own log only), waited for when the stage
    ends and stopped with it; its failure is only logged: the stage that needs its work does
    that work itself and reports any problem. command None: nothing."""

    def __init__(self, command: list | None, log_path: Path):
        self.command, self.log_path, self.proc = command, log_path, None

    def __enter__(self):
        if self.command:
            with storage_errors(self.log_path, "opening the stage log"):
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.log_path, "ab")
            with handle:  # niced: the stage it runs beside (a training feeding its GPU) comes first
                self.proc = subprocess.Popen(["nice", "-n", "10", *map(str, self.command)], cwd=REPO,
                                             stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
            log.info(f"=== meanwhile: {' '.join(shlex.quote(str(c)) for c in self.command[1:])} (log: {self.log_path})")
        return self

    def __exit__(self, kind, *exc):
        if self.proc is None:
            return
        if kind is not None and self.proc.poll() is None:  # the stage failed or was stopped: stop this too
            self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait() != 0 and kind is None:
            log.warning(f"WARNING: {self.command[1]} --prepare_data_only failed (see {self.log_path}); its stage "
                        "builds the data itself")


class StageLog:
    """A stage's log file that never stops the pipeline: a failed write (full disk) is said once
    and the stage goes on, shown live as before."""

    def __init__(self, handle, path: Path):
        self.handle, self.path, self.failed = handle, path, False

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self.handle.write(data)
            self.handle.flush()
        except OSError as err:
            self.failed = True
            log.warning(f"WARNING: {storage_message(err, self.path)}; the stage goes on, shown here only")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.handle.close()


def training_state(out: Path, preset: str) -> str:
    """done (a finished run of this preset), resume (checkpoints of an interrupted run) or fresh.
    A finished model is never replaced without --retrain, whether or not its checkpoints remain."""
    if (out / RUN_SUMMARY).is_file():
        trained_preset = read_json_object(out / "train_config.json").get("preset")
        if trained_preset == preset:
            return "done"
        raise UserError(f"{out} holds a finished '{trained_preset}' run, not '{preset}'; pass --retrain "
                        f"to replace it, or --preset {trained_preset}")
    if step_checkpoints(out / "checkpoints"):
        return "resume"
    if any((out / name).is_file() for name in (MODEL_MANIFEST, "model.safetensors")):
        raise UserError(f"{out} holds a model but no run_summary.json or checkpoints to resume; pass --retrain to "
                        "replace it")
    return "fresh"


def training_metrics(out: Path) -> dict:
    run = read_json_object(out / RUN_SUMMARY)
    return {key: run.get(key) for key in ("steps", "tokens_seen", "final_val_loss", "final_val_bpb", "exported_step",
                                          "last_val_bpb", "device", "precision", "wall_seconds_this_process",
                                          "peak_memory_bytes", "timings")}


def pipeline_totals(stages: list[dict], wall_seconds: float) -> dict:
    """This invocation's wall time split into training (the trainers' loops without the first
    step's compile) and everything else (corpus, tokenizers, shards, compiles, process starts,
    exports, validation, packaging, archives)."""
    training = 0.0
    for stage in stages:
        timings = stage.get("timings") or {}
        if stage["stage"] in MODELS and stage["status"].endswith("done"):
            training += (timings.get("loop_seconds") or 0.0) - (timings.get("compile_seconds") or 0.0)
    return {"wall_seconds": round(wall_seconds, 1), "training_loop_seconds": round(training, 1),
            "non_training_seconds": round(wall_seconds - training, 1),
            "non_training_share": round(1 - training / wall_seconds, 3) if wall_seconds > 0 else None}


@dataclass
class Pipeline:
    """The stages in order; each one records itself in training_summary.json as it ends."""

    settings: PipelineSettings
    preset: str
    summary: dict = field(default_factory=dict)
    started: float = 0.0  # when the running stage began

    def begin(self) -> float:
        self.started = time.time()
        return self.started

    def path(self, name: str) -> Path:
        return Path(getattr(self.settings, name))

    def record(self, stage: str, status: str, started: float, **extra) -> None:
        self.summary.setdefault("stages", []).append(
            {"stage": stage, "status": status, "seconds": round(time.time() - started, 1),
             "log": str(self.path("logs_dir") / f"{stage}.log"), **extra})
        atomic_write_text(self.path("models_dir") / "training_summary.json", json.dumps(self.summary, indent=1) + "\n")

    def record_failure(self, stage: str) -> str:
        """Record a failed stage; '' or, when even that cannot be written, why (for the one line)."""
        try:
            self.record(stage, "failed", self.started)
        except StorageError as err:
            return f" (training_summary.json not updated: {err})"
        return ""

    def corpus(self) -> None:
        started, data_dir = self.begin(), self.path("data_dir")
        if (data_dir / MANIFEST_NAME).is_file():
            return self.record("corpus", "skipped (already built)", started)
        run_stage("corpus", [sys.executable, REPO / "mvlm_training_dataset_complete" / "prepare.py",
                             "--output_dir", data_dir, *shlex.split(self.settings.corpus_args)],
                  self.path("logs_dir") / "corpus.log")
        self.record("corpus", "done", started, manifest=str(data_dir / MANIFEST_NAME))

    def trainer_command(self, model: str) -> list:
        s = self.settings
        return [sys.executable, MODELS[model].trainer, "--preset", self.preset, "--data_dir", s.data_dir,
                "--output_dir", self.path("models_dir") / MODELS[model].folder, "--device", s.device,
                *shlex.split(s.trainer_args)]

    def train(self, model: str, next_model: str | None = None) -> None:
        """Train `model` (or skip or resume it); meanwhile next_model's tokenizer and token shards
        are built in the background (--prepare_data_only), off the critical path."""
        started, s = self.begin(), self.settings
        out = self.path("models_dir") / MODELS[model].folder
        state = "fresh" if s.retrain else training_state(out, self.preset)
        if state == "done":
            return self.record(model, "skipped (already trained)", started, **training_metrics(out))
        command = self.trainer_command(model)
        command += ["--resume_from", "latest"] if state == "resume" else (["--overwrite"] if out.exists() else [])
        # --device cpu: the data needs no GPU (and takes no CUDA context from the training stage)
        prepare = next_model and [*self.trainer_command(next_model), "--device", "cpu", "--prepare_data_only"]
        with BackgroundStage(prepare, self.path("logs_dir") / f"{next_model}_data.log"):
            run_stage(model, command, self.path("logs_dir") / f"{model}.log")
        self.record(model, "resumed and done" if state == "resume" else "done", started, **training_metrics(out))

    def package(self, models: list[str]) -> None:
        started, models_dir = self.begin(), self.path("models_dir")
        trained = [MODELS[m].folder for m in models if (models_dir / MODELS[m].folder / RUN_SUMMARY).is_file()]
        if not trained:
            raise StageFailed("package", f"no trained model in {models_dir} to package; run without --skip_training")
        run_stage("package", [sys.executable, "-m", "release.package", "--models_dir", models_dir,
                              "--download_dir", self.path("download_dir"), "--names", *trained,
                              "--formats", *FORMATS],
                  self.path("logs_dir") / "package.log")
        self.record("package", "done", started, archives=[str(self.path("download_dir") / f"{n}.tar.gz") for n in trained])

    def validate(self, models: list[str], stage: str = "validate") -> None:
        """validate: the models (and their cards); archives: the archives, added to the same report."""
        started = self.begin()
        run_stage(stage, [sys.executable, REPO / "validate_models.py", "--models_dir", self.path("models_dir"),
                          "--data_dir", self.path("data_dir"), "--download_dir", self.path("download_dir"),
                          "--names", *[MODELS[m].folder for m in models],
                          "--no_archives" if stage == "validate" else "--archives_only",
                          *shlex.split(self.settings.validate_args)],
                  self.path("logs_dir") / f"{stage}.log")
        self.record(stage, "passed", started, report=str(self.path("models_dir") / "validation_report.md"))


def remove_leftovers(s: PipelineSettings) -> None:
    """Staging files and lock files that killed processes left in the pipeline's folders and where
    no stage of this run would look again (a finished model's folder, a cache built before the kill,
    the reports); a live process's are never touched."""
    data, models = Path(s.data_dir), Path(s.models_dir)
    folders = [data, data / ".cache" / "tokenizers", data / ".cache" / "tokens", models, Path(s.download_dir)]
    folders += sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
    removed = [path for folder in folders for path in remove_dead_staging(folder) + remove_dead_locks(folder)]
    if removed:
        log.info(f"removed what killed processes left: {', '.join(str(p) for p in removed)}")


def stages(pipeline: Pipeline) -> list[tuple[str, Callable[[], None]]]:
    """The stages this run goes through, in order: corpus, each model of the registry (or --only's),
    validate, package, archives."""
    s = pipeline.settings
    models = [s.only] if s.only else model_names()
    # while one model trains, the next one's tokenizer and shards are built in the background
    training = [] if s.skip_training else [("corpus", pipeline.corpus)] + [
        (m, partial(pipeline.train, m, next_model)) for m, next_model in zip(models, [*models[1:], None])]
    return training + [("validate", partial(pipeline.validate, models)), ("package", partial(pipeline.package, models)),
                       ("archives", partial(pipeline.validate, models, "archives"))]


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    settings = parse_run_config(PipelineSettings, argv, PROG, __doc__)
    preset, reason = choose_preset(settings.preset, settings.device)
    pipeline = Pipeline(settings, preset, {"preset": preset, "preset_reason": reason, "stages": []})
    lock = FileLock(pipeline.path("models_dir") / PIPELINE_LOCK, f"{PROG} pipeline")
    with storage_errors(pipeline.path("models_dir"), "creating"):
        pipeline.path("models_dir").mkdir(parents=True, exist_ok=True)
    holder = lock.try_acquire()
    if holder is not None:
        raise UserError(in_use_message(pipeline.path("models_dir"), holder))
    note_takeover(lock)
    remove_leftovers(settings)
    log.info(f"preset {preset}: {reason}")
    planned = stages(pipeline)
    log.info(f"stages: {' -> '.join(name for name, _ in planned)}")
    started = time.time()
    try:
        for _, stage in planned:
            stage()
        pipeline.summary["totals"] = pipeline_totals(pipeline.summary["stages"], time.time() - started)
        atomic_write_text(pipeline.path("models_dir") / "training_summary.json",
                          json.dumps(pipeline.summary, indent=1) + "\n")
    except StageFailed as err:
        print(f"{PROG}: {err}{pipeline.record_failure(err.stage)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running stage saved a checkpoint if it was training. Run the same "
              "command again to resume.", file=sys.stderr)
        sys.exit(130)
    totals = pipeline.summary["totals"]
    log.info(f"done in {totals['wall_seconds']:.0f} s: training loops {totals['training_loop_seconds']:.0f} s, "
             f"everything else {totals['non_training_seconds']:.0f} s. Summary: "
             f"{pipeline.path('models_dir') / 'training_summary.json'}")
    log.info(f"validation report: {pipeline.path('models_dir') / 'validation_report.md'}")
    log.info(f"downloads: {pipeline.path('download_dir')}")


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
