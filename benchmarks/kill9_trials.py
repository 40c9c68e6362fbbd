#!/usr/bin/env python3
"""kill -9 trials: a trainer is killed at seeded moments, half of them inside a checkpoint
write, then resumed until it finishes; its final weights must be bit-identical to those of an
uninterrupted run with the same settings.

    python3 benchmarks/kill9_trials.py --trials 10 --seed 0                  # MVLM-GPT2, CPU
    python3 benchmarks/kill9_trials.py --trainer simone --trials 3 --seed 0  # Enhanced SIM-ONE
    python3 benchmarks/kill9_trials.py --data_dir /path/to/corpus            # default: a small corpus built here
    python3 benchmarks/kill9_trials.py --pipeline --trials 10 --seed 0      # the whole train_all_models.py

A kill "inside a checkpoint write" is aimed by watching checkpoints/ for the staging folder
(.tmp-NAME) of a seeded n-th write and sending SIGKILL the moment it appears; whether it landed
there is read back from what the kill left (.tmp-/.old- folders). The other trials are killed at
a seeded moment of their own progress (a seeded fraction of a logging interval after a seeded
step), so a loaded machine cannot move the kill past the end of the run. Prints one line per
trial and the total; exit 1 unless every trial was killed and resumed bit-identical.
tests/test_reliability_e2e.py runs two of these trials in CI.

--pipeline kills the whole pipeline instead, at every stage in turn, and reruns it
(benchmarks/kill9_pipeline.py says how); tests/test_reliability_e2e.py runs two of those too.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import kill9_pipeline  # noqa: E402
from model_registry import MODELS  # noqa: E402  (the one table of models)

# Small enough for a CPU: STEPS steps of 8 x 64 tokens, a checkpoint every 2 steps (evaluation
# settings change no weight, so a run with other ones must still end bit-identical).
LOG_INTERVAL = 2  # the random kills are placed by the logged steps
SETTINGS = ["--preset", "tiny", "--device", "cpu", "--vocab_size", "1024", "--block_size", "64", "--batch_size", "8",
            "--save_interval", "2", "--eval_interval", "8", "--eval_windows", "8", "--log_interval", str(LOG_INTERVAL),
            "--keep_checkpoints", "3", "--seed", "5"]
STEPS = 16
PROG = "kill9_trials.py"


def command(trainer: str, data_dir: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, str(MODELS[trainer].trainer), "--data_dir", str(data_dir), "--output_dir", str(out),
            *SETTINGS, "--max_steps", str(steps), *extra]


def checkpoint_writes(steps: int) -> int:
    return steps // 2 + 1  # a step checkpoint every 2 steps, and the first best_model at least


def resume_to_the_end(trainer: str, data_dir: Path, out: Path, steps: int) -> str:
    """Resume from the latest checkpoint (or start again when the kill came before the first one);
    returns the resumed run's log."""
    resume = ["--resume_from", "latest"] if list((out / "checkpoints").glob("step_*")) else []
    proc = subprocess.run(command(trainer, data_dir, out, *resume, steps=steps), cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the resumed run failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def checkpoint_debris(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))) if root.is_dir() else []


def kill_inside_a_write(proc: subprocess.Popen, out: Path, nth: int) -> str:
    """SIGKILL the moment the nth checkpoint write's staging folder appears."""
    root, seen, writing_before = out / "checkpoints", 0, False
    while proc.poll() is None:
        try:
            writing = any(name.startswith(".tmp-") for name in os.listdir(root))
        except FileNotFoundError:
            writing = False
        if writing and not writing_before:
            seen += 1
            if seen == nth:
                os.kill(proc.pid, signal.SIGKILL)
                return f"at checkpoint write {nth}"
        writing_before = writing
        time.sleep(0.0002)
    return "after the run ended"


def last_logged_step(history: Path) -> int:
    try:
        return max((r["step"] for r in json.loads(history.read_text())["train"]), default=0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # not written yet (it is replaced atomically, so never half-written)


def kill_at_a_moment(proc: subprocess.Popen, out: Path, step: int, fraction: float) -> str:
    """SIGKILL `fraction` of a logging interval (as long as the last one took) after the run
    logged `step`: a moment of the run's own progress, however loaded the machine is."""
    seen: list[tuple[int, float]] = []
    while proc.poll() is None and (not seen or seen[-1][0] < step):
        logged = last_logged_step(out / "training_history.json")
        if logged and (not seen or seen[-1][0] != logged):
            seen.append((logged, time.monotonic()))
        time.sleep(0.005)
    interval = seen[-1][1] - seen[-2][1] if len(seen) > 1 else 0.5
    time.sleep(fraction * interval)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        return f"{fraction:.2f} of a logging interval after step {seen[-1][0]}"
    return "after the run ended"


def trial(trainer: str, data_dir: Path, work: Path, seed: int, inside: bool, reference: Path,
          steps: int = STEPS) -> dict:
    """One kill -9 (aimed at a checkpoint write, or at a seeded moment) and the resume after it."""
    rng = random.Random(seed)
    out = work / f"trial_{seed}"
    proc = subprocess.Popen(command(trainer, data_dir, out, steps=steps), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    when = kill_inside_a_write(proc, out, rng.randint(1, checkpoint_writes(steps))) if inside else \
        kill_at_a_moment(proc, out, rng.randrange(LOG_INTERVAL, steps, LOG_INTERVAL), rng.random())
    proc.wait()
    debris = checkpoint_debris(out)
    log = resume_to_the_end(trainer, data_dir, out, steps)
    return {"seed": seed, "aimed": "checkpoint write" if inside else "random moment", "killed": when,
            "was_killed": proc.returncode == -signal.SIGKILL, "landed_in_write": bool(debris), "debris": debris,
            "took_over": "[lock] took over" in log,
            "identical": same_weights(reference, out / "model.safetensors")}


def same_weights(path_a: Path, path_b: Path) -> bool:
    import torch
    from safetensors.torch import load_file
    a, b = load_file(str(path_a)), load_file(str(path_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_trials(trainer: str, data_dir: Path, work: Path, trials: int, seed: int) -> list[dict]:
    """The uninterrupted reference run, then `trials` kill-and-resume trials (even ones aimed at writes)."""
    reference_run(trainer, data_dir, work / "reference", STEPS)
    return [trial(trainer, data_dir, work, seed + i, i % 2 == 0, work / "reference" / "model.safetensors")
            for i in range(trials)]


def reference_run(trainer: str, data_dir: Path, out: Path, steps: int) -> None:
    """Run uninterrupted: the weights every trial must end with."""
    proc = subprocess.run(command(trainer, data_dir, out, steps=steps), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


def small_corpus(work: Path) -> Path:
    out = work / "corpus"
    subprocess.run([sys.executable, str(REPO / "mvlm_training_dataset_complete" / "prepare.py"), "--output_dir",
                    str(out), "--translations", "KJV,WEB,ASV,MONT", "--books", "Ruth,Jonah,Philippians,John,Mark"],
                   check=True, capture_output=True)
    return out


def main(argv=None) -> int:
    from mvlm_engine.cli import OneLineParser

    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--pipeline", action="store_true", help="kill the whole train_all_models.py instead")
    parser.add_argument("--only", choices=sorted(MODELS), default=None, help="--pipeline: train only this model")
    parser.add_argument("--aim", nargs="+", choices=kill9_pipeline.AIMS, default=kill9_pipeline.AIMS,
                        help="--pipeline: the phases the trials aim at, in turn (default: all)")
    parser.add_argument("--work_dir", type=Path, default=None, help="--pipeline: keep every run's folders here")
    args = parser.parse_args(argv)
    if args.pipeline:
        return pipeline_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or small_corpus(Path(tmp))
        results = run_trials(args.trainer, data_dir.resolve(), Path(tmp), args.trials, args.seed)
    for r in results:
        print(f"trial seed {r['seed']}: aimed at a {r['aimed']}, killed {r['killed']}, "
              f"{'inside a checkpoint write ' + str(r['debris']) if r['landed_in_write'] else 'between writes'}, "
              f"resumed: {'bit-identical' if r['identical'] else 'DIFFERENT'}")
    identical, inside = sum(r["identical"] for r in results), sum(r["landed_in_write"] for r in results)
    killed = sum(r["was_killed"] for r in results)
    print(f"{args.trainer}: {identical}/{len(results)} bit-identical; {killed} of them killed by SIGKILL, "
          f"{inside} inside a checkpoint write")
    return 0 if identical == killed == len(results) else 1


def pipeline_main(args) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir.resolve() if args.work_dir else Path(tmp)
        results = kill9_pipeline.run_pipeline_trials(work, args.trials, args.seed, args.only, tuple(args.aim))
    passed = kill9_pipeline.print_pipeline_results(results)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"wall time {(time.monotonic() - started) / 60:.1f} min; load average at the end {load}")
    return 0 if passed else 1


if __name__ == "__main__":
    from mvlm_engine.cli import run_cli
    run_cli(PROG, main, sys.argv[1:])
