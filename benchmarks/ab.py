#!/usr/bin/env python3
"""Short A/B runs that decide the GPU defaults (issue 19), in one process, within a time budget.

    python3 benchmarks/ab.py --budget 420 --out /tmp/gpu_out          # on the GPU (gpu_session.sh ab)
    python3 benchmarks/ab.py --preset tiny --warmup 1 --steps 2 --data_dir DIR --vocab_size 1024   # CPU dry run

Each row is a training run of one trainer's objective through the real engine (the trainer's own
build_task, then mvlm_engine.trainer's start_or_restore and optimizer_step: compile, precision,
optimizer, guard, the one host sync per step), at the preset's settings plus the row's flags:
`--warmup` steps (the first one compiles), then `--steps` steps each timed on the host (every
step ends in its host sync, so that is its device time too). Reported per row: median tokens/s,
MFU in the field's convention (metrics.FLOPS_CONVENTION, against the GPU's dense bf16 peak), peak
memory (CUDA max allocated; RSS peak on a CPU), the first step's extra time (compile), the last
loss (a NaN would show a broken variant) and tokens/s relative to the model's baseline row.

Rows run in ROWS order (most decisive first); a row that no longer fits in the budget (its
estimate, ROW_SECONDS, against the time left) is reported as not run, and a row still running
when the budget is spent is stopped (SIGALRM) and reported so. Between rows torch's compile
caches are reset (so each row compiles its own graphs, as a fresh run would) and the GPU memory
is freed. The table is printed at the end as Markdown, ready for RESULTS.md, and written to
<out>/ab_table.md with the raw figures in <out>/ab.json, both rewritten after every row (a kill
from outside leaves the rows done so far).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from measure import engine_run, repo_paths


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # "gpt2" or "simone"
    decides: str  # which question of issue 19 the row answers
    flags: dict = field(default_factory=dict)
    baseline: bool = False


# Most decisive first. SIM-ONE keeps 48 sequences per optimizer step in its micro-batch rows
# (12 x 4 is its default); GPT-2 takes one micro-batch per step, so its rows change the step too.
ROWS = [
    Row("gpt2 b16 (default)", "gpt2", "baseline", {}, baseline=True),
    Row("simone 12x4 (default)", "simone", "baseline", {}, baseline=True),
    Row("gpt2 b32", "gpt2", "micro-batch", {"batch_size": 32}),
    Row("simone batched Muon", "simone", "Muon: batched vs torch", {"muon_impl": "batched"}),
    Row("gpt2 full logits", "gpt2", "loss: full (padded) vs chunked", {"chunked_loss": False}),
    Row("simone full logits", "simone", "loss: full (padded) vs chunked", {"chunked_loss": False}),
    Row("simone 24x2", "simone", "micro-batch (same tokens/step)", {"batch_size": 24, "gradient_accumulation_steps": 2}),
    Row("gpt2 b64", "gpt2", "micro-batch", {"batch_size": 64}),
    Row("simone 48x1", "simone", "micro-batch (same tokens/step)", {"batch_size": 48, "gradient_accumulation_steps": 1}),
    Row("simone 16x3", "simone", "micro-batch (same tokens/step)", {"batch_size": 16, "gradient_accumulation_steps": 3}),
    Row("gpt2 max-autotune", "gpt2", "compile mode", {"compile_mode": "max-autotune-no-cudagraphs"}),
]
# Seconds a row needs on an H200 beyond its steps (model build, compile): a row runs only if this
# much is left. max-autotune benchmarks kernel choices while compiling.
ROW_SECONDS = {"default": 60, "max-autotune-no-cudagraphs": 150}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=420, help="seconds for all rows (rows that do not fit: not run)")
    parser.add_argument("--out", default=None, help="folder for ab_table.md and ab.json")
    parser.add_argument("--preset", default="small", help="both trainers' preset (tiny for a CPU dry run)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (the first one compiles)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per row")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="run only these rows: their numbers in ROWS (1-based, e.g. --rows 7 8 9) or names")
    parser.add_argument("--data_dir", default=None, help="corpus folder (default: the trainers' own default)")
    parser.add_argument("--vocab_size", type=int, default=None, help="both trainers' vocabulary (for small corpora)")
    return parser.parse_args(argv)


def row_flags(row: Row, args: argparse.Namespace) -> dict:
    flags = {"preset": args.preset, **row.flags}
    if args.data_dir:
        flags["data_dir"] = args.data_dir
    if args.vocab_size:
        flags["vocab_size"] = args.vocab_size
    return flags


def free_memory() -> None:
    """Drop what the last row held: compiled graphs, cached blocks, peak counters."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_row(row: Row, args: argparse.Namespace, runtime, work: Path) -> dict:
    """One row: build the run as the trainer does, warm up, time the steps."""
    from mvlm_engine.metrics import mfu, peak_flops
    from mvlm_engine.trainer import StopSignal, optimizer_step, peak_memory_bytes

    free_memory()
    started = time.perf_counter()
    run = engine_run(row.model, row_flags(row, args), runtime, work / row.name.replace(" ", "_"))
    stop, seconds = StopSignal(), []
    for _ in range(args.warmup + args.steps):
        step_started = time.perf_counter()
        result = optimizer_step(run, stop)
        seconds.append(time.perf_counter() - step_started)
    step = statistics.median(seconds[args.warmup:])
    tokens_per_s = run.tokens_per_step / step
    c = run.cfg
    figures = {"row": row.name, "model": row.model, "decides": row.decides, "flags": row.flags, "baseline": row.baseline,
               "micro_batch": f"{c.batch_size} x {c.gradient_accumulation_steps}", "tokens_per_step": run.tokens_per_step,
               "median_step_seconds": step, "tokens_per_s": tokens_per_s,
               "mfu": mfu(run.task.flops_per_token, tokens_per_s, peak_flops(runtime.device), runtime.world_size),
               "flops_per_token": run.task.flops_per_token, "peak_memory_bytes": peak_memory_bytes(runtime.device),
               "compile_seconds": max(0.0, seconds[0] - step), "last_loss": float(result.loss),
               "row_seconds": time.perf_counter() - started, "compile": runtime.compile, "status": "ran"}
    run.board.close()
    del run, result
    return figures


class OutOfTime(Exception):
    """The budget was spent while a row ran."""


def on_alarm(signum, frame):
    raise OutOfTime("the budget was spent while this row ran")


def prepare_in_background(model: str, args: argparse.Namespace, work: Path) -> subprocess.Popen:
    """The model's tokenizer and token shards built by its trainer (--prepare_data_only) while
    the other model's rows run, as train_all_models.py does; its rows wait for it."""
    from model_registry import MODELS
    script = MODELS[model].trainer
    flags = {f"--{key}": value for key, value in row_flags(Row("data", model, ""), args).items()}
    command = [sys.executable, str(script), *[str(x) for pair in flags.items() for x in pair], "--output_dir",
               str(work / f"prepare_{model}"), "--device", "cpu", "--prepare_data_only"]  # no CUDA context
    return subprocess.Popen(["nice", "-n", "10", *command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # niced: the rows' training comes first


def run_rows(args: argparse.Namespace, rows: list[Row], report) -> list[dict]:
    """Each row that fits in the budget; report(results) after each."""
    from mvlm_engine.runtime import start_runtime
    runtime = start_runtime("auto", "auto", None)
    deadline = time.perf_counter() + args.budget
    signal.signal(signal.SIGALRM, on_alarm)
    results = []
    with tempfile.TemporaryDirectory(prefix="ab_") as tmp:
        later = {row.model for row in rows} - {rows[0].model} if rows else set()
        preparing = {model: prepare_in_background(model, args, Path(tmp)) for model in later}
        for row in rows:
            if row.model in preparing:
                preparing.pop(row.model).wait()
            need = ROW_SECONDS.get(row.flags.get("compile_mode", "default"), ROW_SECONDS["default"])
            left = deadline - time.perf_counter()
            base = {"row": row.name, "model": row.model, "decides": row.decides, "flags": row.flags}
            if runtime.device.type == "cuda" and left < need:
                results.append({**base, "status": f"not run: {left:.0f} s left, needs ~{need} s"})
            else:
                signal.alarm(max(1, int(left)))
                try:
                    results.append(measure_row(row, args, runtime, Path(tmp)))
                except Exception as err:  # noqa: BLE001  (one failed variant must not cost the table)
                    results.append({**base, "status": f"failed: {type(err).__name__}: {str(err)[:200]}"})
                finally:
                    signal.alarm(0)
            print(f"[ab] {row.name}: {describe(results[-1])}", flush=True)
            add_ratios(results)
            report(results)
    return results


def describe(result: dict) -> str:
    if result["status"] != "ran":
        return result["status"]
    mfu = "" if result["mfu"] is None else f", MFU {result['mfu']:.1%}"
    return (f"{result['tokens_per_s']:,.0f} tokens/s{mfu}, peak {result['peak_memory_bytes'] / 2 ** 30:.1f} GiB, "
            f"compile {result['compile_seconds']:.0f} s, row {result['row_seconds']:.0f} s")


def add_ratios(results: list[dict]) -> None:
    """tokens/s relative to the model's baseline row (both must have run)."""
    base = {r["model"]: r["tokens_per_s"] for r in results if r["status"] == "ran" and r["baseline"]}
    for r in results:
        if r["status"] == "ran" and r["model"] in base:
            r["vs_baseline"] = r["tokens_per_s"] / base[r["model"]]


def table(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| row | decides | micro-batch x accumulation (tokens/step) | median tokens/s | MFU | peak memory | "
             "compile (first step extra) | last loss | vs baseline |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r["status"] != "ran":
            lines.append(f"| {r['row']} | {r['decides']} | | {r['status']} | | | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        ratio = f"{r['vs_baseline']:.3f}x" if "vs_baseline" in r else ""
        loss = f"{r['last_loss']:.3f}" if math.isfinite(r["last_loss"]) else str(r["last_loss"])
        lines.append(f"| {r['row']} | {r['decides']} | {r['micro_batch']} ({r['tokens_per_step']:,}) | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_bytes'] / 2 ** 30:.1f} GiB | "
                     f"{r['compile_seconds']:.1f} s | {loss} | {ratio} |")
    return "\n".join(lines) + "\n"


def machine_header(args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return (f"A/B, {time.strftime('%Y-%m-%d %H:%M')}, {device}, torch {torch.__version__}, preset {args.preset}, "
            f"{args.warmup} warm-up + {args.steps} timed steps per row (median), MFU: 6 x matmul weights (head "
            f"included) + 12 L d T attention, against 989 TFLOP/s; `python3 benchmarks/ab.py` "
            f"{' '.join(sys.argv[1:])}")


def main(argv=None) -> None:
    args = parse_args(argv)
    repo_paths()
    names = {str(number): row.name for number, row in enumerate(ROWS, 1)}
    wanted = None if args.rows is None else {names.get(key, key) for key in args.rows}
    rows = [row for row in ROWS if wanted is None or row.name in wanted]
    unknown = (wanted or set()) - {row.name for row in ROWS}
    if unknown:
        sys.exit(f"ab.py: unknown rows {sorted(unknown)}; known: {names}")
    header = machine_header(args)

    def report(results: list[dict]) -> None:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "ab_table.md").write_text(table(results, header))
            (out / "ab.json").write_text(json.dumps(results, indent=1) + "\n")

    print(table(run_rows(args, rows, report), header), flush=True)


if __name__ == "__main__":
    main()
