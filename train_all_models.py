#!/usr/bin/env python3
"""The whole pipeline in one command: corpus -> MVLM-GPT2 -> Enhanced SIM-ONE -> package -> validate.

    python3 train_all_models.py                    # preset auto: small on a CUDA GPU, tiny on CPU
    python3 train_all_models.py --only simone      # one model
    python3 train_all_models.py --skip_training    # package and validate what exists

Re-running after a failure or a kill skips the finished stages and resumes an interrupted
training stage from its latest checkpoint. Each stage's output is shown live and kept in
logs/<stage>.log; models/training_summary.json records status, duration and key metrics.
Packaging runs before validation, so the validation report covers the archives too.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mvlm_engine.checkpoint import step_checkpoints
from mvlm_engine.corpus import MANIFEST_NAME
from mvlm_engine.errors import UserError, user_errors_exit
from mvlm_engine.fileio import atomic_write_text

PROG = "train_all_models.py"
REPO = Path(__file__).resolve().parent
TRAINERS = {"gpt2": ("mvlm_gpt2", [REPO / "mvlm_trainer.py"]),
            "simone": ("simone_enhanced", [REPO / "SIM-ONE Training" / "enhanced_train.py"])}


class StageFailed(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["auto", "tiny", "small", "medium"], default="auto",
                        help="auto: small on a CUDA machine, tiny on a CPU-only one")
    parser.add_argument("--only", choices=sorted(TRAINERS), help="train only this model")
    parser.add_argument("--skip_training", action="store_true", help="package and validate what exists")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even where a finished model exists (its checkpoints are replaced)")
    parser.add_argument("--data_dir", type=Path, default=REPO / "mvlm_training_dataset_complete")
    parser.add_argument("--models_dir", type=Path, default=REPO / "models")
    parser.add_argument("--download_dir", type=Path, default=REPO / "models_for_download")
    parser.add_argument("--logs_dir", type=Path, default=REPO / "logs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--trainer_args", default="",
                        help="extra flags for both trainers, e.g. \"--max_steps 100\"")
    return parser.parse_args(argv)


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
    print(f"\n=== stage {name}: {' '.join(shlex.quote(str(c)) for c in command[1:])}\n    log: {log_path}", flush=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(map(str, command))}\n".encode())
        proc = subprocess.Popen([str(c) for c in command], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                log.write(chunk)
                log.flush()
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


class PipelineTerminated(KeyboardInterrupt):
    """SIGTERM to the orchestrator: passed on to the running stage, which checkpoints and stops."""


def stop_on_sigterm(*_):
    raise PipelineTerminated


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    args = parse_args(argv)
    preset, reason = choose_preset(args.preset, args.device)
    print(f"[pipeline] preset {preset}: {reason}")
    summary_path = args.models_dir / "training_summary.json"
    summary = {"preset": preset, "preset_reason": reason, "stages": []}
    args.models_dir.mkdir(parents=True, exist_ok=True)

    def record(name: str, status: str, started: float, **extra) -> None:
        summary["stages"].append({"stage": name, "status": status, "seconds": round(time.time() - started, 1),
                                  "log": str(args.logs_dir / f"{name}.log"), **extra})
        atomic_write_text(summary_path, json.dumps(summary, indent=1) + "\n")

    models = [args.only] if args.only else list(TRAINERS)
    try:
        started = time.time()
        if args.skip_training:
            pass
        elif (args.data_dir / MANIFEST_NAME).is_file():
            record("corpus", "skipped (already built)", started)
        else:
            run_stage("corpus", [sys.executable, REPO / "mvlm_training_dataset_complete" / "prepare.py",
                                 "--output_dir", args.data_dir], args.logs_dir / "corpus.log")
            record("corpus", "done", started, manifest=str(args.data_dir / MANIFEST_NAME))

        for model in [] if args.skip_training else models:
            folder, script = TRAINERS[model]
            out = args.models_dir / folder
            started = time.time()
            state = "fresh" if args.retrain else training_state(out, preset)
            if state == "done":
                record(model, "skipped (already trained)", started, **training_metrics(out))
                continue
            command = [sys.executable, *script, "--preset", preset, "--data_dir", args.data_dir, "--output_dir", out,
                       "--device", args.device, *shlex.split(args.trainer_args)]
            command += ["--resume_from", "latest"] if state == "resume" else (["--overwrite"] if out.exists() else [])
            run_stage(model, command, args.logs_dir / f"{model}.log")
            record(model, "resumed and done" if state == "resume" else "done", started, **training_metrics(out))

        started = time.time()
        trained = [TRAINERS[m][0] for m in models if (args.models_dir / TRAINERS[m][0] / "run_summary.json").is_file()]
        if not trained:
            raise StageFailed("package", f"no trained model in {args.models_dir} to package; run without --skip_training")
        run_stage("package", [sys.executable, "-m", "mvlm_engine.packaging", "--models_dir", args.models_dir,
                              "--download_dir", args.download_dir, "--names", *trained], args.logs_dir / "package.log")
        record("package", "done", started, archives=[str(args.download_dir / f"{n}.tar.gz") for n in trained])

        started = time.time()
        run_stage("validate", [sys.executable, REPO / "validate_models.py", "--models_dir", args.models_dir,
                               "--data_dir", args.data_dir, "--download_dir", args.download_dir],
                  args.logs_dir / "validate.log")
        record("validate", "passed", started, report=str(args.models_dir / "validation_report.md"))
    except StageFailed as err:
        record(err.stage, "failed", started)
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running stage saved a checkpoint if it was training. Run the same "
              "command again to resume.", file=sys.stderr)
        sys.exit(130)
    print(f"\n[pipeline] done. Summary: {summary_path}\n[pipeline] validation report: "
          f"{args.models_dir / 'validation_report.md'}\n[pipeline] downloads: {args.download_dir}")


def training_metrics(out: Path) -> dict:
    run = json.loads((out / "run_summary.json").read_text())
    return {key: run.get(key) for key in ("steps", "tokens_seen", "final_val_loss", "final_val_bpb", "device",
                                          "precision", "wall_seconds_this_process")}


if __name__ == "__main__":
    with user_errors_exit(PROG):
        main(sys.argv[1:])
