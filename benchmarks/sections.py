"""The sections of benchmarks/run.py: data, train (child processes), engine (one interleaved
pool of training runs) and compare (model-level), plus the printed report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO
from measure import repo_paths

repo_paths()
PREPARE = REPO / "mvlm_training_dataset_complete" / "prepare.py"
GPT2_SAME_SHAPE_AS_SIMONE_TINY = {"n_layer": 4}  # SIM-ONE tiny: 4 layers x 128 (GPT-2 tiny: 2 x 128)
FAST_PATH_OFF = {"chunked_loss": False, "prefetch_batches": False}
SIMONE_FAST_PATH_OFF = {**FAST_PATH_OFF, "alignment_pair_cache": False}
SIMONE_ALL_OFF = {"coherence_weight": 0.0, "alignment_weight": 0.0, "z_loss_weight": 0.0, "memory_tokens": 0,
                  "policy_gate": False}
SIMONE_VS_GPT2_GOAL = 0.6  # issue 12: SIM-ONE tiny, everything on, at >= 0.6x GPT-2's tokens/s, same shape


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


# --------------------------------------------------------------------------- train: one child per configuration


def run_child(spec: dict) -> dict:
    command = [sys.executable, str(Path(__file__).with_name("run.py")), "--child", json.dumps(spec)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec: dict) -> None:
    """In a fresh process: the micro-step peak memory, then (steps > 0) timed engine steps."""
    import torch
    from measure import attention_backend, engine_run, engine_timer, micro_step_memory
    from mvlm_engine.metrics import mfu, peak_flops
    from mvlm_engine.runtime import start_runtime

    runtime = start_runtime(spec["device"], "auto", spec.get("compile"))
    with tempfile.TemporaryDirectory() as tmp:
        run = engine_run(spec["model"], spec["flags"], runtime, Path(tmp) / "run")
        result = micro_step_memory(run)
        if spec["steps"]:
            timer = engine_timer(run, spec["steps"])
            timer()  # warm-up (and compilation)
            tokens_per_s = timer()
            result.update(tokens_per_s=tokens_per_s, mfu=mfu(run.task.flops_per_token, tokens_per_s,
                                                              peak_flops(runtime.device), runtime.world_size),
                          flops_per_token=run.task.flops_per_token)
        result.update(attention=attention_backend(spec["model"], run), precision=runtime.precision,
                      compile=runtime.compile, tokens_per_step=run.tokens_per_step,
                      batch=[run.cfg.batch_size, run.cfg.block_size, run.cfg.gradient_accumulation_steps])
    del run
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(json.dumps(result))


def section_train(plan, quick: bool, report: dict) -> None:
    """Per model and preset: fast path on (memory + tokens/s), then off (memory only)."""
    rows = {}
    for preset in plan.presets:
        for model, off in (("gpt2", FAST_PATH_OFF), ("simone", SIMONE_FAST_PATH_OFF)):
            flags = {"preset": preset, "device": plan.device, "data_dir": str(plan.data_dir),
                     "cache_dir": str(plan.cache_dir)}
            spec = {"model": model, "device": plan.device, "flags": flags, "steps": plan.steps}
            on = run_child(spec)
            before = run_child({**spec, "flags": {**flags, **off}, "steps": 0})
            rows[f"{model} {preset}"] = {"fast_path": on, "before": before}
            plan.ratios[f"{model}_{preset}_micro_step_memory_ratio"] = (before["micro_step_bytes"]
                                                                      / on["micro_step_bytes"])
    report["train"] = rows


# --------------------------------------------------------------------------- engine: one interleaved pool


def engine_variants() -> list[tuple[str, str, dict]]:
    """(name, model, flags over the tiny preset); names compared with each other sit side by side."""
    same = GPT2_SAME_SHAPE_AS_SIMONE_TINY
    return [
        ("simone", "simone", {}), ("gpt2 4x128", "gpt2", same),
        ("simone, fast path off", "simone", SIMONE_FAST_PATH_OFF),
        ("gpt2 4x128, fast path off", "gpt2", {**same, **FAST_PATH_OFF}),
        ("simone, chunked loss off", "simone", {"chunked_loss": False}),
        ("simone, pair cache off", "simone", {"alignment_pair_cache": False}),
        ("simone, prefetch off", "simone", {"prefetch_batches": False}),
        ("simone, no t+2 head", "simone", {"coherence_weight": 0.0}),
        ("simone, no alignment", "simone", {"alignment_weight": 0.0}),
        ("simone, no z-loss", "simone", {"z_loss_weight": 0.0}),
        ("simone, no memory tokens", "simone", {"memory_tokens": 0}),
        ("simone, no policy gate", "simone", {"policy_gate": False}),
        ("simone, all off (plain Llama)", "simone", SIMONE_ALL_OFF),
        ("simone, muon", "simone", {"optimizer": "muon"}),
        ("simone, untied head", "simone", {"tie_embeddings": False}),
        ("gpt2 4x128, chunked loss off", "gpt2", {**same, "chunked_loss": False}),
        ("gpt2 4x128, prefetch off", "gpt2", {**same, "prefetch_batches": False}),
        ("gpt2 tiny, engine", "gpt2", {}), ("gpt2 tiny, bare loop", "gpt2", {}),
        ("gpt2 tiny, engine, full logits", "gpt2", {"chunked_loss": False}),
    ]


def engine_ratios(samples: dict) -> dict:
    from measure import paired_ratio

    pairs = {"simone_fast_path_ratio": ("simone", "simone, fast path off"),
             "simone_chunked_loss_ratio": ("simone", "simone, chunked loss off"),
             "simone_pair_cache_ratio": ("simone", "simone, pair cache off"),
             "simone_prefetch_ratio": ("simone", "simone, prefetch off"),
             "gpt2_fast_path_ratio": ("gpt2 4x128", "gpt2 4x128, fast path off"),
             "gpt2_chunked_loss_ratio": ("gpt2 4x128", "gpt2 4x128, chunked loss off"),
             "gpt2_prefetch_ratio": ("gpt2 4x128", "gpt2 4x128, prefetch off"),
             "gpt2_engine_vs_bare_loop_ratio": ("gpt2 tiny, engine", "gpt2 tiny, bare loop"),
             "gpt2_engine_full_logits_vs_bare_loop_ratio": ("gpt2 tiny, engine, full logits", "gpt2 tiny, bare loop")}
    ratios = {key: paired_ratio(samples, *names) for key, names in pairs.items()}
    now = paired_ratio(samples, "simone", "gpt2 4x128")
    ratios.update(simone_vs_gpt2_goal_ratio=now / SIMONE_VS_GPT2_GOAL)
    return ratios


def section_engine(plan, quick: bool, report: dict) -> None:
    """Every variant built through its trainer and started by the engine, then timed round-robin."""
    from measure import bare_loop_timer, engine_run, engine_timer, interleaved, median, paired_ratio
    from mvlm_engine.runtime import start_runtime

    runtime = start_runtime(plan.device, "auto", False)  # compile off: many small runs
    timers, runs = {}, {}
    base = {"preset": "tiny", "device": plan.device, "data_dir": str(plan.data_dir), "cache_dir": str(plan.cache_dir),
            "compile": False}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, model, flags) in enumerate(engine_variants()):
            if name.endswith("bare loop"):
                timers[name] = bare_loop_timer(runs["gpt2 tiny, engine"], plan.steps)
                continue
            runs[name] = engine_run(model, {**base, **flags}, runtime, Path(tmp) / f"run{index}")
            timers[name] = engine_timer(runs[name], plan.steps)
        pair_seconds = time_pair_batches(runs["simone"], runs["simone, pair cache off"])
        samples = interleaved(timers, plan.repeats)
    tokens_per_s = median(samples)
    plan.ratios.update(engine_ratios(samples))
    plan.ratios["pair_batch_time_ratio"] = pair_seconds["tokenized every micro-step"] / pair_seconds["pair cache"]
    simone_vs_gpt2 = {"fast path on": paired_ratio(samples, "simone", "gpt2 4x128"),
                      "fast path off (before)": paired_ratio(samples, "simone, fast path off",
                                                             "gpt2 4x128, fast path off")}
    report["engine"] = {"tokens_per_s": tokens_per_s, "simone_vs_gpt2_same_shape": simone_vs_gpt2,
                        "simone_breakdown": breakdown(samples), "pair_batch_seconds": pair_seconds,
                        "vocab_size": {n: r.task.objective.model.config.vocab_size for n, r in runs.items()
                                       if n in ("simone", "gpt2 4x128")}}


def breakdown(samples: dict) -> dict:
    """Share of SIM-ONE's step time each piece costs: 1 - (tokens/s with it) / (tokens/s without)."""
    from measure import paired_ratio

    pieces = {"t+2 head (coherence)": "simone, no t+2 head", "alignment forward + InfoNCE": "simone, no alignment",
              "z-loss": "simone, no z-loss", "memory tokens": "simone, no memory tokens",
              "policy gate": "simone, no policy gate", "all of the above": "simone, all off (plain Llama)"}
    shares = {piece: 1 - paired_ratio(samples, "simone", name) for piece, name in pieces.items()}
    shares["muon instead of adamw (extra share)"] = 1 - paired_ratio(samples, "simone, muon", "simone")
    shares["untied head (extra share)"] = 1 - paired_ratio(samples, "simone, untied head", "simone")
    return shares


def time_pair_batches(cached_run, uncached_run, count: int = 128) -> dict:
    """Seconds per micro-batch from SIM-ONE's batch source, with and without the pair cache (the
    sources themselves, before any step: their prefetching wrappers have drawn nothing yet)."""
    seconds = {}
    for name, run in (("pair cache", cached_run), ("tokenized every micro-step", uncached_run)):
        source = getattr(run.task.batches, "source", run.task.batches)
        started = time.perf_counter()
        for _ in range(count):
            source.next_batch()
        seconds[name] = (time.perf_counter() - started) / count
    return seconds


# --------------------------------------------------------------------------- compare and report


def section_compare(plan, quick: bool, report: dict) -> None:
    import torch
    from model_compare import CompareShape, compare_models, compare_vocab_padding

    device = torch.device(plan.device)
    shape = CompareShape(new_tokens=32 if quick else 64)
    result = compare_models(device, shape, plan.steps, plan.repeats)
    plan.ratios.update(result.pop("ratios"))
    result["vocab_padding"] = compare_vocab_padding(device, plan.steps, plan.repeats, quick)
    report["compare"] = result


def print_report(report: dict) -> None:
    print(json.dumps({k: v for k, v in report.items() if k != "ratios"}, indent=1, default=str))
    print("\n| ratio (ours / reference, >= 1.0: ours at least as good) | value |\n|---|---:|")
    for key, value in report["ratios"].items():
        print(f"| {key} | {value:.3f} |")
