"""The sections of benchmarks/run.py: data, memory and train (one child process per measured
configuration), engine (benchmarks/engine_pool.py) and compare (benchmarks/model_compare.py),
plus the printed report."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO
from measure import repo_paths

repo_paths()
PREPARE = REPO / "mvlm_training_dataset_complete" / "prepare.py"
# The old path, piece by piece behind its setting: full logits, plain-op layers, no prefetch, and
# (SIM-ONE) verse pairs tokenized every micro-step; each model gets those of its run config's settings.
FAST_PATH_SETTINGS = ("chunked_loss", "fused_layers", "prefetch_batches", "alignment_pair_cache")


def benchmark_models() -> list[str]:
    """The models the memory and train sections measure: every model of the registry."""
    from model_registry import model_names
    return model_names()


def old_path(model: str) -> dict:
    """The flags that switch `model` back to the old path: each fast-path setting its run config has, off."""
    from model_registry import MODELS
    from mvlm_engine.config import leaves

    settings = leaves(MODELS[model].run_config())
    return {name: False for name in FAST_PATH_SETTINGS if name in settings}


# --------------------------------------------------------------------------- data


def time_tokenizing(corpus_dir: Path, cache_dir: Path, vocab_size: int) -> dict:
    """Seconds to index the corpus, train the BPE and tokenize both splits into shards."""
    from mvlm_engine.corpus import load_corpus
    from mvlm_engine.shards import build_token_shards
    from mvlm_engine.tokenizer import get_or_train_tokenizer

    started = time.perf_counter()
    corpus = load_corpus(corpus_dir)
    indexed = time.perf_counter()
    tokenizer, _ = get_or_train_tokenizer(corpus, vocab_size, cache_dir)
    trained = time.perf_counter()
    shards = build_token_shards(corpus, tokenizer, cache_dir)
    done = time.perf_counter()
    return {"index_seconds": indexed - started, "train_bpe_seconds": trained - indexed,
            "tokenize_seconds": done - trained, "vocab_size": vocab_size, "tokens": shards.meta["tokens"],
            "characters": (corpus.manifest or {}).get("total_chars")}


def build_corpus(out: Path, translations: str | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    extra = ["--translations", translations] if translations else []
    subprocess.run([sys.executable, str(PREPARE), "--output_dir", str(out), *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def build_quick_corpus(plan, translations: str, timed: bool, report: dict) -> None:
    """--quick: a two-translation corpus, built and tokenized afresh (its cache is the one the
    other sections use)."""
    seconds = build_corpus(plan.data_dir, translations)
    shutil.rmtree(plan.cache_dir, ignore_errors=True)
    tokenizing = time_tokenizing(plan.data_dir, plan.cache_dir, 4096)
    if timed:
        report["data"] = {"corpus": f"translations {translations}", "build_corpus_seconds": seconds, **tokenizing}


def measure_data_full(plan, report: dict) -> None:
    """The whole corpus built into a temporary folder, and a 32K BPE plus shards from scratch."""
    with tempfile.TemporaryDirectory() as tmp:
        seconds = build_corpus(Path(tmp) / "corpus", None)
        tokenizing = time_tokenizing(Path(tmp) / "corpus", Path(tmp) / "cache", 32000)
    report["data"] = {"corpus": "all default translations", "build_corpus_seconds": seconds, **tokenizing}


# --------------------------------------------------------------------------- children


def run_child(spec: dict, env: dict | None = None) -> dict:
    """One measurement in a fresh process (run.py --child SPEC), its last stdout line as JSON."""
    command = [sys.executable, str(Path(__file__).with_name("run.py")), "--child", json.dumps(spec)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec: dict) -> None:
    """In a fresh process: {"kind": "memory"} or {"kind": "train"}; prints one JSON line."""
    from mvlm_engine.runtime import start_runtime

    runtime = start_runtime(spec["device"], "auto", spec.get("compile", False))
    result = child_memory(spec, runtime) if spec["kind"] == "memory" else child_train(spec, runtime)
    print(json.dumps(result))


def child_memory(spec: dict, runtime) -> dict:
    """Peak memory of one training micro-step of the objective the trainer builds, on a batch
    of random token ids of the run's shapes."""
    import torch
    from measure import build_objective, micro_step_memory, resolve_run_config, synthetic_batch

    cfg = resolve_run_config(spec["model"], spec["flags"])
    objective = build_objective(spec["model"], cfg).to(runtime.device)
    batch = synthetic_batch(spec["model"], cfg, torch.Generator().manual_seed(0))
    result = micro_step_memory(objective, batch, runtime)
    result.update(batch=[cfg.batch_size, cfg.block_size], vocab_size=cfg.vocab_size, precision=runtime.precision,
                  parameters=sum(p.numel() for p in objective.parameters()))
    return result


def child_train(spec: dict, runtime) -> dict:
    """Tokens/s (and MFU on a GPU) of engine optimizer steps on the real corpus, after one
    warm-up (and compilation) timing."""
    from measure import attention_backend, engine_timer, engine_run
    from mvlm_engine.metrics import mfu, peak_flops

    with tempfile.TemporaryDirectory() as tmp:
        run = engine_run(spec["model"], spec["flags"], runtime, Path(tmp) / "run")
        timer = engine_timer(run, spec["steps"])
        timer()
        tokens_per_s = max(timer() for _ in range(spec.get("repeats", 1)))
    return {"tokens_per_s": tokens_per_s, "flops_per_token": run.task.flops_per_token,
            "mfu": mfu(run.task.flops_per_token, tokens_per_s, peak_flops(runtime.device), runtime.world_size),
            "attention": attention_backend(spec["model"], run.cfg, runtime), "precision": runtime.precision,
            "compile": runtime.compile, "tokens_per_step": run.tokens_per_step,
            "batch": [run.cfg.batch_size, run.cfg.block_size, run.cfg.gradient_accumulation_steps]}


# --------------------------------------------------------------------------- memory and train sections


def memory_batch_size(plan, preset: str) -> dict:
    """On a CPU, presets above tiny take one sequence per micro-step (their real batches would
    not fit the RAM of a small machine); on a GPU, the preset's own batch."""
    return {} if plan.device == "cuda" or preset == "tiny" else {"batch_size": 1}


def malloc_env(plan) -> tuple[dict | None, str]:
    """The measuring processes' environment on a CPU. glibc serves a freed block of up to
    M_MMAP_THRESHOLD from its heap, and the threshold rises with each large block freed (to
    32 MiB): activations then sit in a fragmented heap, and the RSS high-water mark depends on
    the order of allocations as much as on what is live. A fixed threshold maps and unmaps every
    tensor above it on its own, so RSS follows the live tensors; both paths run under it."""
    if plan.device == "cuda":
        return None, "cuda max_memory_allocated"
    if not plan.malloc_mmap_threshold:
        return None, "rss, glibc malloc defaults"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(plan.malloc_mmap_threshold)}
    return env, f"rss, MALLOC_MMAP_THRESHOLD_={plan.malloc_mmap_threshold}"


def section_memory(plan, quick: bool, report: dict) -> None:
    """Per model and preset: one micro-step's peak memory on the old path and on the fast
    path, each in a fresh process, side by side; ratio = old / fast (>= 1: the fast path holds less)."""
    env, kind = malloc_env(plan)
    rows, jobs = {"measured as": kind}, {}
    for preset in plan.memory_presets:
        for model in benchmark_models():
            flags = {"preset": preset, "device": plan.device, **memory_batch_size(plan, preset)}
            spec = {"kind": "memory", "model": model, "device": plan.device}
            jobs[(model, preset)] = [{**spec, "flags": {**flags, **old_path(model)}}, {**spec, "flags": flags}]
    # Each child's peak is its own process's, so two run at once (RAM permitting) to save time.
    with ThreadPoolExecutor(max_workers=1 if plan.device == "cuda" else 2) as pool:
        results = {key: [pool.submit(run_child, spec, env) for spec in specs] for key, specs in jobs.items()}
    for (model, preset), (old, fast) in results.items():
        old, fast = old.result(), fast.result()
        rows[f"{model} {preset}"] = {"old path": old, "fast path": fast,
                                     "lower_by": 1 - fast["micro_step_bytes"] / old["micro_step_bytes"]}
        plan.ratios[f"{model}_{preset}_micro_step_memory_ratio"] = old["micro_step_bytes"] / fast["micro_step_bytes"]
    report["memory"] = rows


def section_train(plan, quick: bool, report: dict) -> None:
    """Per model and preset: tokens/s (MFU on a GPU) through the real engine on the corpus,
    fast path on, each configuration in a fresh process."""
    rows = {}
    for preset in plan.presets:
        for model in benchmark_models():
            flags = {"preset": preset, "device": plan.device, "data_dir": str(plan.data_dir),
                     "cache_dir": str(plan.cache_dir), "compile": None if plan.device == "cuda" else False}
            rows[f"{model} {preset}"] = run_child({"kind": "train", "model": model, "device": plan.device,
                                                   "compile": flags["compile"], "flags": flags,
                                                   "steps": plan.steps, "repeats": plan.repeats})
    report["train"] = rows


# --------------------------------------------------------------------------- report


def print_report(report: dict) -> None:
    print(json.dumps({k: v for k, v in report.items() if k != "ratios"}, indent=1, default=str))
    print("\n| ratio (ours / reference, >= 1.0: ours at least as good) | value |\n|---|---:|")
    for key, value in report["ratios"].items():
        print(f"| {key} | {value:.3f} |")
