#!/usr/bin/env python3
"""Slowrun: a CPU proxy of the data-limited regime the small preset meets on a GPU.

    python3 benchmarks/slowrun.py --quick --json          # SIM-ONE, old recipe vs default, 2 seeds, <= 15 min
    python3 benchmarks/slowrun.py --quick --model gpt2    # the same for MVLM-GPT2
    python3 benchmarks/slowrun.py --new_args "--muon_weight_decay 1.6"   # try a recipe against the old one

On the full corpus one epoch of the small preset is about 0.25 training tokens per non-embedding
parameter, and each verse's content comes back in ~23 wordings (one per translation), so both
models overfit within a few epochs (RESULTS.md, the H200 run). The proxy keeps both ratios at the
tiny presets: two New Testament books in every translation (Ephesians and 1 Thessalonians: about
0.19M tokens of a 4,096-token BPE, 0.25 tokens per non-embedding parameter of the 0.79M of either
tiny model, 23 translations), trained for several epochs. It is evaluated on two held-out books of
the same kind (Philippians and Colossians, Pauline letters in every translation: close in content,
never trained on), which the proxy corpus keeps as its held-out split.

Each run trains through its real trainer and the shared engine. Per run: held-out bits per byte
every quarter epoch, the best, the epoch of the best, and the last evaluation minus the best (how
far the curve turned up). Over seeds: the seed spread (max - min of the best, the larger of the
two recipes'). "baseline" is the recipe before the data-limited work (pinned here flag by flag, so
it stays what it was when defaults move); "new" is the trainer's default (plus --new_args).
With --json the last line is one JSON object with the lists per seed. A run whose output folder
already holds it, finished with the same settings, is reused.

--distill: the new recipe over 4 seeds (single_bpb: their mean, seed_spread: max - min), their
probability-averaged ensemble (ensemble_bpb, mvlm_engine/ensemble.py), and one model of the same size
and budget, another seed, trained with that ensemble as its teachers (distilled_bpb): what one shipped
model keeps of the ensemble's gain. Each is the exported weights' held-out bits per byte.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_corpus, reexec_in_venv, run_trainer  # noqa: E402
from speedrun import PLANS, TRAINERS  # noqa: E402

from mvlm_engine.config import setting  # noqa: E402  (torch-free)
from mvlm_engine.errors import UserError  # noqa: E402
from mvlm_engine.packaging import RUN_SUMMARY  # noqa: E402

PROG = "slowrun.py"
TRAIN_BOOKS = ("Ephesians", "1 Thessalonians")
HELD_OUT_BOOKS = ("Philippians", "Colossians")
# The recipe of each model before the data-limited work, pinned (today's defaults of the tiny preset).
BASELINE_ARGS = {
    "simone": ["--optimizer", "muon", "--muon_lr", 0.02, "--learning_rate", 0.05, "--head_lr", 0.008,
               "--scalar_lr", 0.02, "--beta1", 0.8, "--weight_decay", 0.0, "--muon_weight_decay", 0.0,
               "--schedule", "cosine", "--min_lr_ratio", 0.1, "--warmup_steps", 30, "--ema_decay", 0.0,
               "--dropout", 0.0, "--attention_dropout", 0.0],
    "gpt2": ["--optimizer", "adamw", "--learning_rate", 3e-3, "--weight_decay", 0.1, "--schedule", "cosine",
             "--min_lr_ratio", 0.1, "--warmup_steps", 30, "--ema_decay", 0.0, "--resid_pdrop", 0.0,
             "--embd_pdrop", 0.0, "--attn_pdrop", 0.0],
}


@dataclass
class SlowrunSettings:
    quick: bool = setting(False, "the CPU yardstick: 2 seeds of the old recipe and the default, <= 15 min on 2 cores")
    json: bool = setting(False, "end with one line of JSON")
    model: Literal["simone", "gpt2"] = setting("simone", "which trainer")
    seeds: int = setting(2, "seeds per recipe (each seed: its own data order and initialisation)")
    epochs: float = setting(3.0, "passes over the proxy's training books (the pipeline's default: 3)")
    evals_per_epoch: int = setting(4, "held-out evaluations per epoch")
    eval_windows: int = setting(128, "held-out windows of 128 tokens per evaluation")
    new_args: str = setting("", "extra trainer flags for the 'new' recipe, as one shell-quoted string")
    distill: bool = setting(False, "instead: the new recipe over --ensemble_seeds seeds, their ensemble, and one "
                                   "model taught by it (single_bpb, ensemble_bpb, distilled_bpb)")
    ensemble_seeds: int = setting(4, "--distill: seeds in the ensemble")
    # 3 and 2: measured on the proxy (RESULTS.md); weight 1 or 3 at temperature 1 kept no gain beyond the spread
    distill_weight: float = setting(3.0, "--distill: the student's --distill_weight")
    distill_temperature: float = setting(2.0, "--distill: the student's --distill_temperature")
    baseline: bool = setting(True, "also train the pinned old recipe (off: only the new one, e.g. for a search)")
    jobs: int = setting(0, "runs trained at once, one thread each (0: all of them)")
    data_dir: str = setting("mvlm_training_dataset_complete", "the full corpus (built if missing); the proxy's "
                                                              "slice is cut out of its verses.jsonl", path=True)
    train_books: list[str] = setting(help="the proxy's training books, in every translation",
                                     factory=lambda: list(TRAIN_BOOKS))
    held_out_books: list[str] = setting(help="the proxy's held-out books (held out in the full corpus too)",
                                        factory=lambda: list(HELD_OUT_BOOKS))
    proxy_dir: str = setting("runs/slowrun_corpus", "the proxy corpus (built once, shared by every slowrun)", path=True)
    output_dir: str = setting("runs/slowrun", "where the runs, logs and slowrun.json go", path=True)

    def problems(self) -> list[str]:
        errors = [f"--{n} must be > 0 (got {getattr(self, n)})"
                  for n in ("seeds", "epochs", "evals_per_epoch", "eval_windows", "ensemble_seeds", "distill_weight",
                            "distill_temperature") if getattr(self, n) <= 0]
        if self.jobs < 0:
            errors.append(f"--jobs must be >= 0 (got {self.jobs})")
        try:
            shlex.split(self.new_args)
        except ValueError as err:
            errors.append(f"--new_args is not a shell-quoted string ({err})")
        return errors


def build_proxy_corpus(settings: SlowrunSettings) -> Path:
    """The training books and held-out books in every translation, cut out of the full corpus
    (rebuilt when the folder holds another slice)."""
    source, out = Path(settings.data_dir), Path(settings.proxy_dir)
    ensure_corpus(source)
    books = settings.train_books + settings.held_out_books
    manifest = out / "manifest.json"
    if not manifest.is_file() or {f["book"] for f in json.loads(manifest.read_text())["files"]} != set(books):
        subprocess.run([sys.executable, str(REPO / "mvlm_training_dataset_complete" / "prepare.py"), "--from_verses",
                        str(source / "verses.jsonl"), "--output_dir", str(out), "--books", ",".join(books)],
                       check=True, stdout=subprocess.DEVNULL)
    held_out = json.loads(manifest.read_text())["heldout_books"]
    if set(held_out) != set(settings.held_out_books):
        raise UserError(f"--held_out_books {' '.join(settings.held_out_books)}: the corpus holds out "
                        f"{', '.join(held_out) or 'none of them'} (prepare.py's HELD_OUT_BOOKS)")
    return out


def plan_value(flag: str) -> int:
    """A batch-shape flag's value in the proxy's plan (the speedrun's tiny plan)."""
    shape = PLANS["tiny"]["batch"]
    return int(shape[shape.index(flag) + 1])


def steps_per_epoch(corpus: Path) -> int:
    """Optimizer steps in one epoch of the proxy (the trainers' own count: BlockSampler's)."""
    from mvlm_engine.corpus import load_corpus
    from mvlm_engine.shards import build_token_shards
    from mvlm_engine.tokenizer import get_or_train_tokenizer

    vocab, block, batch = (plan_value(flag) for flag in ("--vocab_size", "--block_size", "--batch_size"))
    data = load_corpus(corpus)
    tokenizer, _ = get_or_train_tokenizer(data, vocab, corpus / ".cache")
    train_tokens = build_token_shards(data, tokenizer, corpus / ".cache").meta["tokens"]["train"]
    return (train_tokens - block) // block // batch


def trainer_args(settings: SlowrunSettings, corpus: Path, name: str, seed: int, per_epoch: int) -> list:
    """A run's flags: the proxy's shape and budget, then its recipe's (baseline: the old one pinned)."""
    plan = PLANS["tiny"]
    steps = math.ceil(settings.epochs * per_epoch)
    interval = max(1, round(per_epoch / settings.evals_per_epoch))
    out = Path(settings.output_dir) / settings.model / f"{name}_seed{seed}"
    args = ["--preset", "tiny", "--device", "cpu", "--data_dir", corpus, "--output_dir", out, "--overwrite",
            "--seed", seed, "--max_steps", steps, "--eval_interval", interval, "--eval_windows", settings.eval_windows,
            "--save_interval", steps, "--log_interval", interval, *plan["batch"], *plan[settings.model]]
    if settings.model == "simone":
        args.append("--quality_seeds")  # one tokenizer for both models, as in the speedrun
    return args + (BASELINE_ARGS[settings.model] if name == "baseline" else shlex.split(settings.new_args))


def run_jobs(settings: SlowrunSettings, corpus: Path, jobs: list[tuple[str, int]], extra: tuple = ()) -> dict:
    """(name, seed) -> run, for runs trained at once, one thread each; `extra` flags go to every run."""
    per_epoch = steps_per_epoch(corpus)
    logs = Path(settings.output_dir) / settings.model
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"[slowrun] {settings.model}: {len(jobs)} run(s) of {settings.epochs:g} epochs x {per_epoch} steps",
          flush=True)

    def one(job):
        name, seed = job
        args = trainer_args(settings, corpus, name, seed, per_epoch) + list(extra)
        run = finished_run(TRAINERS[settings.model], args) or \
            run_trainer(TRAINERS[settings.model], args, logs / f"{name}_seed{seed}.log", env)
        return {**run, "steps_per_epoch": per_epoch, "output_dir": args[args.index("--output_dir") + 1]}

    with ThreadPoolExecutor(max_workers=settings.jobs or len(jobs)) as pool:
        return dict(zip(jobs, pool.map(one, jobs)))


def finished_run(trainer: Path, args: list) -> dict | None:
    """The run these flags describe, if its output folder already holds it finished with exactly
    these settings (the trainer's own --print_config; --num_epochs aside, unused with --max_steps, and
    the folder's own path, which a copied run does not keep)."""
    out = Path(args[args.index("--output_dir") + 1])
    if not (out / RUN_SUMMARY).is_file() or not (out / "train_config.json").is_file():
        return None
    resolved = subprocess.run([sys.executable, str(trainer), *map(str, args), "--print_config"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
    saved, wanted = json.loads((out / "train_config.json").read_text()), json.loads(resolved)
    for config in (saved, wanted):
        config.pop("num_epochs", None)
        config.pop("output_dir", None)
    if saved != wanted:
        return None
    print(f"[slowrun] reusing the finished run in {out}", flush=True)
    return {"summary": json.loads((out / RUN_SUMMARY).read_text()), "wall_seconds": 0.0,
            "history": json.loads((out / "training_history.json").read_text())}


def run_all(settings: SlowrunSettings, corpus: Path) -> dict[str, dict[int, dict]]:
    """recipe -> seed -> run, for the old recipe (unless --no_baseline) and the new one."""
    recipes = ("baseline", "new") if settings.baseline else ("new",)
    seeds = range(1, settings.seeds + 1)
    finished = run_jobs(settings, corpus, [(recipe, seed) for seed in seeds for recipe in recipes])
    return {recipe: {seed: finished[recipe, seed] for seed in seeds} for recipe in recipes}


def distill(settings: SlowrunSettings, corpus: Path) -> dict:
    """The new recipe over --ensemble_seeds seeds; their probability-averaged ensemble; one model of
    the same size taught by that ensemble (another seed). Bits per byte of the exported weights."""
    from mvlm_engine.ensemble import ensemble_bpb
    from release.trust import folder_check

    seeds = range(1, settings.ensemble_seeds + 1)
    members = run_jobs(settings, corpus, [("new", seed) for seed in seeds])
    folders = [run["output_dir"] for run in members.values()]
    singles = [run["summary"]["final_val_bpb"] for run in members.values()]
    ensemble = ensemble_bpb(folders, corpus, plan_value("--block_size"), settings.eval_windows,
                            folder_check("ensemble member"))
    print(f"[slowrun] ensemble of {len(folders)}: {ensemble:.4f} bits/byte; members {singles}", flush=True)
    teacher_args = ("--teachers", *folders, "--distill_weight", settings.distill_weight,
                    "--distill_temperature", settings.distill_temperature)
    student_seed = settings.ensemble_seeds + 1
    student = run_jobs(settings, corpus, [("distilled", student_seed)], teacher_args)[("distilled", student_seed)]
    return {"single_bpb": statistics.mean(singles), "single_bpb_per_seed": singles,
            "seed_spread": max(singles) - min(singles), "ensemble_bpb": ensemble,
            "distilled_bpb": student["summary"]["final_val_bpb"], "distilled_seed": student_seed,
            "distill_weight": settings.distill_weight, "distill_temperature": settings.distill_temperature,
            "distilled_gain_beyond_spread": statistics.mean(singles) - student["summary"]["final_val_bpb"]
            > max(singles) - min(singles)}


def curve(run: dict) -> list[tuple[float, float]]:
    """(epochs seen, held-out bits per byte) at every evaluation."""
    return [(r["step"] / run["steps_per_epoch"], r["val_bpb"]) for r in run["history"]["eval"]]


def describe(run: dict) -> dict:
    points = curve(run)
    best_epoch, best = min(points, key=lambda p: p[1])
    return {"best_bpb": best, "best_epoch": best_epoch, "final_bpb": points[-1][1],
            "final_minus_best": points[-1][1] - best}


def summarize(runs: dict[str, dict[int, dict]]) -> dict:
    """The headline numbers: per seed lists for each recipe, and the seed spread."""
    result = {}
    for recipe, by_seed in runs.items():
        rows = [describe(run) for run in by_seed.values()]
        prefix = "" if recipe == "new" else "baseline_"
        for key in rows[0]:
            result[prefix + key] = [row[key] for row in rows]
    spreads = [max(result[p + "best_bpb"]) - min(result[p + "best_bpb"])
               for p in ("", "baseline_") if p + "best_bpb" in result]
    result["seed_spread"] = max(spreads)
    if "baseline_best_bpb" in result:
        result["gain"] = statistics.mean(result["baseline_best_bpb"]) - statistics.mean(result["best_bpb"])
        result["gain_beyond_3x_spread"] = result["gain"] > 3 * result["seed_spread"]
    result["curve_turns_up"] = [d > 0.01 for d in result["final_minus_best"]]
    return result


def print_report(runs: dict[str, dict[int, dict]], result: dict, model: str) -> None:
    columns = [(f"{recipe} s{seed}", curve(run)) for recipe, by_seed in runs.items() for seed, run in by_seed.items()]
    print(f"\n{model}: held-out bits per byte by epoch\n| epoch | " + " | ".join(n for n, _ in columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for row in range(min(len(c) for _, c in columns)):
        print(f"| {columns[0][1][row][0]:.2f} | " + " | ".join(f"{c[row][1]:.4f}" for _, c in columns) + " |")
    print("\n| run | best bits/byte | epoch of best | last | last - best |\n|---|---:|---:|---:|---:|")
    for name, points in columns:
        best_epoch, best = min(points, key=lambda p: p[1])
        print(f"| {name} | {best:.4f} | {best_epoch:.2f} | {points[-1][1]:.4f} | {points[-1][1] - best:+.4f} |")
    print(f"\nseed spread (best, max - min): {result['seed_spread']:.4f}")
    if "gain" in result:
        print(f"new recipe's best below the old one's by {result['gain']:.4f} "
              f"(more than 3x the spread: {result['gain_beyond_3x_spread']})")


def main(argv=None) -> None:
    from mvlm_engine.cli import parse_run_config
    settings = parse_run_config(SlowrunSettings, argv, PROG, __doc__)
    if settings.quick:
        settings.seeds = 2
    corpus = build_proxy_corpus(settings)
    result = {"model": settings.model, "epochs": settings.epochs, "new_args": settings.new_args}
    if settings.distill:
        result.update(distill(settings, corpus))
        name = "distill.json"
        print("\n" + "\n".join(f"{key}: {value}" for key, value in result.items()))
    else:
        runs = run_all(settings, corpus)
        result.update(summarize(runs))
        name = "slowrun.json"
        print_report(runs, result, settings.model)
    (Path(settings.output_dir) / settings.model / name).write_text(json.dumps(result, indent=1) + "\n")
    if settings.json:
        print(json.dumps(result))


if __name__ == "__main__":
    reexec_in_venv()
    from mvlm_engine.cli import run_cli
    run_cli(PROG, main, sys.argv[1:])
