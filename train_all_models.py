#!/usr/bin/env python3
"""The whole pipeline in one command: corpus -> MVLM-GPT2 -> Enhanced SIM-ONE -> validate -> package -> archives.

    python3 train_all_models.py                    # preset auto: small on a CUDA GPU, tiny on CPU
    python3 train_all_models.py --only simone      # one model
    python3 train_all_models.py --skip_training    # package and validate what exists

Re-running after a failure or a kill skips the finished stages and resumes an interrupted
training stage from its latest checkpoint. Each stage's output is shown live and kept in
logs/<stage>.log; models/training_summary.json records status, duration and key metrics.
Validation writes each model's card (README.md) into its folder, packaging then archives the
folders with their cards, and a last stage adds the archives' checks to the validation report.
"""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mvlm_engine.checkpoint import step_checkpoints
from mvlm_engine.cli import parse_run_config, run_cli
from mvlm_engine.config import setting
from mvlm_engine.corpus import MANIFEST_NAME
from mvlm_engine.errors import UserError
from mvlm_engine.fileio import atomic_write_text
from mvlm_engine.logs import get_logger

PROG = "train_all_models.py"
REPO = Path(__file__).resolve().parent
log = get_logger("pipeline")


@dataclass(frozen=True)
class Trainer:
    folder: str  # under --models_dir
    script: Path


# The pipeline's models, in training order: the one table of what there is to train.
TRAINERS = {"gpt2": Trainer("mvlm_gpt2", REPO / "mvlm_trainer.py"),
            "simone": Trainer("simone_enhanced", REPO / "SIM-ONE Training" / "enhanced_train.py")}


@dataclass
class PipelineSettings:
    preset: Literal["auto", "tiny", "small", "medium"] = setting(
        "auto", "auto: small on a CUDA machine, tiny on a CPU-only one")
    only: Literal["gpt2", "simone"] | None = setting(None, "train only this model")
    skip_training: bool = setting(False, "package and validate what exists")
    retrain: bool = setting(False, "train again even where a finished model exists (its checkpoints are replaced)")
    data_dir: str = setting("mvlm_training_dataset_complete", "corpus folder (built if missing)", path=True)
    models_dir: str = setting("models", "where the trained models go", path=True)
    download_dir: str = setting("models_for_download", "where the archives go", path=True)
    logs_dir: str = setting("logs", "one log per stage", path=True)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train")
    trainer_args: str = setting("", 'extra flags for both trainers, e.g. "--max_steps 100"')


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
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info(f"=== stage {name}: {' '.join(shlex.quote(str(c)) for c in command[1:])}")
    log.info(f"=== log: {log_path}")
    with open(log_path, "ab") as stage_log:
        stage_log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(map(str, command))}\n".encode())
        proc = subprocess.Popen([str(c) for c in command], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                stage_log.write(chunk)
                stage_log.flush()
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


def training_state(out: Path, preset: str) -> str:
    """done (a finished run of this preset), resume (checkpoints of an interrupted run) or fresh."""
    summary, config = out / "run_summary.json", out / "train_config.json"
    if summary.is_file() and config.is_file():
        trained_preset = json.loads(config.read_text()).get("preset")
        if trained_preset == preset:
            return "done"
        raise UserError(f"{out} holds a finished '{trained_preset}' run, not '{preset}'; pass --retrain "
                        "to replace it, or --preset " + str(trained_preset))
    return "resume" if step_checkpoints(out / "checkpoints") else "fresh"


def training_metrics(out: Path) -> dict:
    run = json.loads((out / "run_summary.json").read_text())
    return {key: run.get(key) for key in ("steps", "tokens_seen", "final_val_loss", "final_val_bpb", "device",
                                          "precision", "wall_seconds_this_process")}


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

    def corpus(self) -> None:
        started, data_dir = self.begin(), self.path("data_dir")
        if (data_dir / MANIFEST_NAME).is_file():
            return self.record("corpus", "skipped (already built)", started)
        run_stage("corpus", [sys.executable, REPO / "mvlm_training_dataset_complete" / "prepare.py",
                             "--output_dir", data_dir], self.path("logs_dir") / "corpus.log")
        self.record("corpus", "done", started, manifest=str(data_dir / MANIFEST_NAME))

    def train(self, model: str) -> None:
        started, s = self.begin(), self.settings
        out = self.path("models_dir") / TRAINERS[model].folder
        state = "fresh" if s.retrain else training_state(out, self.preset)
        if state == "done":
            return self.record(model, "skipped (already trained)", started, **training_metrics(out))
        command = [sys.executable, TRAINERS[model].script, "--preset", self.preset, "--data_dir", s.data_dir,
                   "--output_dir", out, "--device", s.device, *shlex.split(s.trainer_args)]
        command += ["--resume_from", "latest"] if state == "resume" else (["--overwrite"] if out.exists() else [])
        run_stage(model, command, self.path("logs_dir") / f"{model}.log")
        self.record(model, "resumed and done" if state == "resume" else "done", started, **training_metrics(out))

    def package(self, models: list[str]) -> None:
        started, models_dir = self.begin(), self.path("models_dir")
        trained = [TRAINERS[m].folder for m in models if (models_dir / TRAINERS[m].folder / "run_summary.json").is_file()]
        if not trained:
            raise StageFailed("package", f"no trained model in {models_dir} to package; run without --skip_training")
        run_stage("package", [sys.executable, "-m", "mvlm_engine.packaging", "--models_dir", models_dir,
                              "--download_dir", self.path("download_dir"), "--names", *trained],
                  self.path("logs_dir") / "package.log")
        self.record("package", "done", started, archives=[str(self.path("download_dir") / f"{n}.tar.gz") for n in trained])

    def validate(self, models: list[str], stage: str = "validate") -> None:
        """validate: the models (and their cards); archives: the archives, added to the same report."""
        started = self.begin()
        run_stage(stage, [sys.executable, REPO / "validate_models.py", "--models_dir", self.path("models_dir"),
                          "--data_dir", self.path("data_dir"), "--download_dir", self.path("download_dir"),
                          "--names", *[TRAINERS[m].folder for m in models],
                          "--no_archives" if stage == "validate" else "--archives_only"],
                  self.path("logs_dir") / f"{stage}.log")
        self.record(stage, "passed", started, report=str(self.path("models_dir") / "validation_report.md"))


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    settings = parse_run_config(PipelineSettings, argv, PROG, __doc__)
    preset, reason = choose_preset(settings.preset, settings.device)
    log.info(f"preset {preset}: {reason}")
    pipeline = Pipeline(settings, preset, {"preset": preset, "preset_reason": reason, "stages": []})
    pipeline.path("models_dir").mkdir(parents=True, exist_ok=True)
    models = [settings.only] if settings.only else list(TRAINERS)
    try:
        if not settings.skip_training:
            pipeline.corpus()
            for model in models:
                pipeline.train(model)
        pipeline.validate(models)
        pipeline.package(models)
        pipeline.validate(models, "archives")
    except StageFailed as err:
        pipeline.record(err.stage, "failed", pipeline.started)
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running stage saved a checkpoint if it was training. Run the same "
              "command again to resume.", file=sys.stderr)
        sys.exit(130)
    log.info(f"done. Summary: {pipeline.path('models_dir') / 'training_summary.json'}")
    log.info(f"validation report: {pipeline.path('models_dir') / 'validation_report.md'}")
    log.info(f"downloads: {pipeline.path('download_dir')}")


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
