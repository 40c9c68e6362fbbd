#!/usr/bin/env python3
"""Speedrun: how many tokens Enhanced SIM-ONE needs to reach MVLM-GPT2's final quality.

    python3 benchmarks/speedrun.py --quick --json      # CPU yardstick, 2 seeds, <= 10 min on 2 cores
    python3 benchmarks/speedrun.py --preset small      # on a GPU: the small preset, bf16

Both models train through their real trainers and the shared engine: MVLM-GPT2 with its
shipped recipe (HF GPT-2, AdamW, warmup + cosine) and SIM-ONE with its default recipe. They
have the same non-embedding parameter count (within 10%, checked), the same token budget,
the same batch shape and the same token stream in the same order (one tokenizer: SIM-ONE's
quality seeds are left out here so the two tokenizers are identical). Held-out bits per byte
is measured at regular token counts.

tokens_to_target_ratio = the tokens SIM-ONE needs to reach GPT-2's final held-out bits per
byte (linear interpolation on SIM-ONE's curve) / GPT-2's tokens, one value per seed. With
--json the last line is a JSON object with the ratios, both final values and the spreads.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_corpus, reexec_in_venv, run_trainer  # noqa: E402

from model_registry import MODELS  # noqa: E402  (torch-free)
from mvlm_engine.config import setting  # noqa: E402  (torch-free)

PROG = "speedrun.py"
TRAINERS = {name: MODELS[name].trainer for name in ("gpt2", "simone")}  # the pair this race compares
# Per preset: the budget and the shapes that give both models the same non-embedding size.
PLANS = {
    "tiny": {"steps": 300, "batch": ["--batch_size", 16, "--gradient_accumulation_steps", 1, "--block_size", 128,
                                     "--vocab_size", 4096],
             "gpt2": ["--n_layer", 4], "simone": [], "eval_windows": 128},
    "small": {"steps": 1000, "batch": ["--batch_size", 16, "--gradient_accumulation_steps", 2, "--block_size", 1024,
                                       "--vocab_size", 32000],
              "gpt2": [], "simone": [], "eval_windows": 200},
}


@dataclass
class SpeedrunSettings:
    quick: bool = setting(False, "the CPU yardstick: tiny preset, 2 seeds, <= 10 minutes on 2 cores")
    json: bool = setting(False, "end with one line of JSON")
    seeds: int = setting(2, "seeds per model (each seed: its own data order and initialisation)")
    preset: Literal["auto", "tiny", "small"] = setting("auto", "auto: tiny with --quick or without a GPU, else small")
    steps: int = setting(0, "optimizer steps per run (0: the preset's budget)")
    eval_points: int = setting(15, "held-out evaluations per run, evenly spaced")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train")
    side_by_side: bool = setting(True, "tiny preset: every run (both models, every seed) trains at once, one "
                                       "thread each")
    data_dir: str = setting("mvlm_training_dataset_complete", "corpus folder (built if missing)", path=True)
    output_dir: str = setting("runs/speedrun", "where the runs, logs and speedrun.json go", path=True)

    def problems(self) -> list[str]:
        return [f"--{n} must be > 0 (got {getattr(self, n)})" for n in ("seeds", "eval_points") if getattr(self, n) <= 0]


def trainer_args(settings: SpeedrunSettings, model: str, preset: str, seed: int) -> list:
    plan, steps = PLANS[preset], settings.steps or PLANS[preset]["steps"]
    interval = max(1, steps // settings.eval_points)
    out = Path(settings.output_dir) / preset / f"{model}_seed{seed}"
    args = ["--preset", preset, "--data_dir", settings.data_dir, "--output_dir", out, "--overwrite",
            "--device", settings.device, "--seed", seed, "--max_steps", steps, "--eval_interval", interval,
            "--eval_windows", plan["eval_windows"], "--save_interval", steps, "--log_interval", interval,
            *plan["batch"], *plan[model]]
    return args + (["--quality_seeds"] if model == "simone" else [])


def run_all(settings: SpeedrunSettings, preset: str) -> dict[int, dict]:
    """Every run: seed -> model -> run. On CPU (tiny) all of them train at once, one thread
    each, so that no core idles while the slower model of a seed finishes."""
    logs = Path(settings.output_dir) / preset
    logs.mkdir(parents=True, exist_ok=True)
    parallel = settings.side_by_side and preset == "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if parallel else None
    jobs = [(seed, model) for seed in range(1, settings.seeds + 1) for model in TRAINERS]

    def one(job):
        seed, model = job
        print(f"[speedrun] seed {seed}: training {model} (preset {preset})", flush=True)
        return run_trainer(TRAINERS[model], trainer_args(settings, model, preset, seed),
                           logs / f"{model}_seed{seed}.log", env)

    with ThreadPoolExecutor(max_workers=len(jobs) if parallel else 1) as pool:
        finished = dict(zip(jobs, pool.map(one, jobs)))
    return {seed: {model: finished[seed, model] for model in TRAINERS} for seed in range(1, settings.seeds + 1)}


def curve(run: dict) -> list[tuple[int, float]]:
    """(tokens seen, held-out bits per byte) at every evaluation."""
    per_step = run["summary"]["tokens_per_step"]
    return [(r["step"] * per_step, r["val_bpb"]) for r in run["history"]["eval"]]


def tokens_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """First token count where the curve reaches `target`, interpolated linearly between
    evaluations (the first evaluation itself if it is already there); None if never."""
    previous = None
    for tokens, bpb in points:
        if bpb <= target:
            if previous is None or previous[1] == bpb:
                return float(tokens)
            t0, b0 = previous
            return t0 + (b0 - target) / (b0 - bpb) * (tokens - t0)
        previous = (tokens, bpb)
    return None


def summarize(runs: dict[int, dict]) -> dict:
    """The headline numbers over seeds: ratios, finals, spreads, sizes, wall times."""
    ratios, finals = [], {"gpt2": [], "simone": []}
    for seed, pair in runs.items():
        target, budget = pair["gpt2"]["summary"]["final_val_bpb"], pair["gpt2"]["summary"]["tokens_seen"]
        reached = tokens_to_reach(curve(pair["simone"]), target)
        ratios.append(None if reached is None else reached / budget)
        for model in finals:
            finals[model].append(pair[model]["summary"]["final_val_bpb"])
    spread = {m: max(v) - min(v) for m, v in finals.items()}
    first = next(iter(runs.values()))
    sizes = {m: first[m]["summary"]["non_embedding_params"] for m in TRAINERS}
    return {"tokens_to_target_ratio": ratios, "simone_final_bpb": statistics.mean(finals["simone"]),
            "gpt2_final_bpb": statistics.mean(finals["gpt2"]), "simone_final_bpb_per_seed": finals["simone"],
            "gpt2_final_bpb_per_seed": finals["gpt2"], "seed_spread": spread, "seeds": list(runs),
            "non_embedding_params": sizes, "tokens": first["gpt2"]["summary"]["tokens_seen"],
            "wall_seconds": {f"{m}_seed{s}": round(p[m]["wall_seconds"], 1) for s, p in runs.items() for m in p},
            "simone_beats_gpt2_beyond_spread": statistics.mean(finals["gpt2"]) - statistics.mean(finals["simone"])
            > max(spread.values())}


def print_report(runs: dict[int, dict], result: dict, preset: str) -> None:
    seeds = list(runs)
    header = " | ".join(f"{m} s{s}" for s in seeds for m in TRAINERS)
    print(f"\nheld-out bits per byte by tokens seen (preset {preset}):\n| tokens | {header} |")
    print("|---:|" + "---:|" * (2 * len(seeds)))
    columns = [curve(runs[s][m]) for s in seeds for m in TRAINERS]
    for row in range(min(len(c) for c in columns)):
        cells = " | ".join(f"{c[row][1]:.4f}" for c in columns)
        print(f"| {columns[0][row][0]:,} | {cells} |")
    ratio_text = ", ".join("not reached" if r is None else f"{r:.3f}" for r in result["tokens_to_target_ratio"])
    print(f"\ntokens_to_target_ratio per seed: {ratio_text}")
    print(f"final bits/byte: simone {result['simone_final_bpb']:.4f}, gpt2 {result['gpt2_final_bpb']:.4f}; "
          f"seed spread simone {result['seed_spread']['simone']:.4f}, gpt2 {result['seed_spread']['gpt2']:.4f}; "
          f"simone better beyond the spread: {result['simone_beats_gpt2_beyond_spread']}")
    print(f"non-embedding parameters: {result['non_embedding_params']}; wall seconds: {result['wall_seconds']}")


def choose_preset(settings: SpeedrunSettings) -> str:
    if settings.preset != "auto":
        return settings.preset
    import torch
    return "small" if not settings.quick and settings.device != "cpu" and torch.cuda.is_available() else "tiny"


def main(argv=None) -> None:
    from mvlm_engine.cli import parse_run_config
    settings = parse_run_config(SpeedrunSettings, argv, PROG, __doc__)
    preset = choose_preset(settings)
    ensure_corpus(Path(settings.data_dir))
    runs = run_all(settings, preset)
    result = summarize(runs)
    sizes = result["non_embedding_params"]
    if abs(sizes["simone"] - sizes["gpt2"]) > 0.1 * sizes["gpt2"]:
        raise SystemExit(f"{PROG}: non-embedding sizes differ by more than 10%: {sizes}")
    print_report(runs, result, preset)
    (Path(settings.output_dir) / preset / "speedrun.json").write_text(json.dumps(result, indent=1) + "\n")
    if settings.json:
        print(json.dumps(result))


if __name__ == "__main__":
    reexec_in_venv()
    from mvlm_engine.cli import run_cli
    run_cli(PROG, main, sys.argv[1:])
