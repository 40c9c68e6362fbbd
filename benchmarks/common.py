"""What every benchmark script shares: running under the project's virtualenv, the corpus,
and running a trainer as a subprocess through its real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def reexec_in_venv() -> None:
    """`python3 benchmarks/x.py` from a shell without the venv: run again with .venv's Python."""
    try:
        import torch  # noqa: F401
    except ImportError:
        if VENV_PYTHON.is_file() and Path(sys.executable).resolve() != VENV_PYTHON.resolve():
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
        sys.exit("torch is not importable; run ./setup_environment.sh first")


def ensure_corpus(data_dir: Path) -> None:
    """Build the corpus with prepare.py when its manifest is missing."""
    if not (data_dir / "manifest.json").is_file():
        print(f"[bench] building the corpus in {data_dir}", flush=True)
        subprocess.run([sys.executable, str(REPO / "mvlm_training_dataset_complete" / "prepare.py"),
                        "--output_dir", str(data_dir)], check=True)


def run_trainer(script: Path, args: list, log_path: Path, env: dict | None = None) -> dict:
    """Run a trainer to completion; return {"summary", "history", "wall_seconds"} of its output."""
    from mvlm_engine.packaging import RUN_SUMMARY

    out = Path(args[args.index("--output_dir") + 1])
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise SystemExit(f"[bench] {script.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return {"summary": json.loads((out / RUN_SUMMARY).read_text()),
            "history": json.loads((out / "training_history.json").read_text()), "wall_seconds": wall}
