"""The "engine" section of benchmarks/run.py: tiny-preset training runs, each built through its
trainer and started by the engine, timed round-robin in one process (so a shared machine slows
adjacent timings alike and the per-round ratios survive it).

--quick times the five runs its ratios need; the full run adds the fast path piece by piece and
where SIM-ONE's step time goes (each mechanism, loss and optimizer choice switched off in turn).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from measure import (bare_loop_timer, engine_run, engine_timer, flops_per_token, interleaved, median, now,
                     paired_ratio)
from sections import old_path

GPT2_SAME_SHAPE_AS_SIMONE_TINY = {"n_layer": 4}  # SIM-ONE tiny: 4 layers x 128 (GPT-2 tiny: 2 x 128)
SIMONE_ALL_OFF = {"coherence_weight": 0.0, "alignment_weight": 0.0, "z_loss_weight": 0.0, "memory_tokens": 0,
                  "policy_gate": False}
SIMONE_VS_GPT2_GOAL = 0.6  # issue 12: SIM-ONE tiny, everything on, at >= 0.6x GPT-2's tokens/s, same shape
BARE_LOOP = "gpt2 4x128, bare loop"


def engine_variants(quick: bool) -> list[tuple[str, str, dict]]:
    """(name, model, flags over the tiny preset). The bare loop reuses "gpt2 4x128"'s model."""
    same = GPT2_SAME_SHAPE_AS_SIMONE_TINY
    core = [("simone", "simone", {}), ("gpt2 4x128", "gpt2", same),
            ("simone, old path", "simone", old_path("simone")),
            ("gpt2 4x128, old path", "gpt2", {**same, **old_path("gpt2")}), (BARE_LOOP, "gpt2", same)]
    if quick:
        return core
    return core + [
        ("simone, chunked loss off", "simone", {"chunked_loss": False}),
        ("simone, fused layers off", "simone", {"fused_layers": False}),
        ("simone, pair cache off", "simone", {"alignment_pair_cache": False}),
        ("simone, prefetch on", "simone", {"prefetch_batches": True}),
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
        ("gpt2 4x128, fused layers off", "gpt2", {**same, "fused_layers": False}),
        ("gpt2 4x128, prefetch on", "gpt2", {**same, "prefetch_batches": True}),
        ("gpt2 4x128, prefetch off", "gpt2", {**same, "prefetch_batches": False}),
    ]


def engine_ratios(samples: dict) -> dict:
    """Each *_ratio: tokens/s of ours / tokens/s of the reference, median of per-round ratios."""
    pairs = {"simone_fast_path_ratio": ("simone", "simone, old path"),
             "gpt2_fast_path_ratio": ("gpt2 4x128", "gpt2 4x128, old path"),
             "gpt2_engine_vs_bare_loop_ratio": ("gpt2 4x128", BARE_LOOP)}
    for model in ("simone", "gpt2 4x128"):  # each piece on (the default) against it alone off
        for piece in ("chunked loss", "fused layers", "pair cache", "prefetch"):
            on = f"{model}, prefetch on" if piece == "prefetch" else model  # prefetch's default depends on the device
            if f"{model}, {piece} off" in samples:
                pairs[f"{model.split()[0]}_{piece.replace(' ', '_')}_ratio"] = (on, f"{model}, {piece} off")
    ratios = {key: paired_ratio(samples, *names) for key, names in pairs.items()}
    ratios["simone_vs_gpt2_goal_ratio"] = paired_ratio(samples, "simone", "gpt2 4x128") / SIMONE_VS_GPT2_GOAL
    return ratios


def build_timers(plan, runs: dict, tmp: Path, quick: bool) -> dict:
    from mvlm_engine.runtime import start_runtime

    runtime = start_runtime(plan.device, "auto", False)  # compile off: many small runs
    base = {"preset": "tiny", "device": plan.device, "data_dir": str(plan.data_dir), "cache_dir": str(plan.cache_dir),
            "compile": False}
    timers = {}
    for index, (name, model, flags) in enumerate(engine_variants(quick)):
        if name == BARE_LOOP:
            timers[name] = bare_loop_timer(runs["gpt2 4x128"], plan.steps)
            continue
        runs[name] = engine_run(model, {**base, **flags}, runtime, tmp / f"run{index}")
        timers[name] = engine_timer(runs[name], plan.steps)
    return timers


def section_engine(plan, quick: bool, report: dict) -> None:
    """Every variant built, then all timed round-robin; tokens/s medians and the ratios."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        timers = build_timers(plan, runs, Path(tmp), quick)
        pair_seconds = time_pair_batches(runs["simone"], runs["simone, old path"])
        samples = interleaved(timers, plan.repeats)
    flops = {name: flops_per_token(model, runs[name]) for name, model in (("simone", "simone"), ("gpt2 4x128", "gpt2"))}
    plan.ratios.update(engine_ratios(samples))
    plan.ratios["pair_batch_time_ratio"] = pair_seconds["tokenized every micro-step"] / pair_seconds["pair cache"]
    report["engine"] = {
        "tokens_per_s": median(samples), "rounds": plan.repeats, "optimizer_steps_per_timing": plan.steps,
        "tokens_per_step": {n: r.tokens_per_step for n, r in runs.items() if n in ("simone", "gpt2 4x128")},
        "simone_vs_gpt2_same_shape": {
            "fast path": paired_ratio(samples, "simone", "gpt2 4x128"),
            "old path": paired_ratio(samples, "simone, old path", "gpt2 4x128, old path")},
        # tokens/s of SIM-ONE / GPT-2 if both turned FLOPs into tokens equally fast
        "simone_vs_gpt2_flop_ceiling": flops["gpt2 4x128"] / flops["simone"], "flops_per_token": flops,
        "pair_batch_seconds": pair_seconds,
        "vocab_size": {n: r.task.objective.model.config.vocab_size for n, r in runs.items()
                       if n in ("simone", "gpt2 4x128")}}
    if not quick:
        report["engine"]["simone_breakdown"] = breakdown(samples)


def breakdown(samples: dict) -> dict:
    """Share of SIM-ONE's step time each piece costs: 1 - (tokens/s with it) / (tokens/s without)."""
    pieces = {"t+2 head (coherence)": "simone, no t+2 head", "alignment forward + InfoNCE": "simone, no alignment",
              "z-loss": "simone, no z-loss", "memory tokens": "simone, no memory tokens",
              "policy gate": "simone, no policy gate", "all of the above": "simone, all off (plain Llama)"}
    shares = {piece: 1 - paired_ratio(samples, "simone", name) for piece, name in pieces.items()}
    shares["muon instead of adamw (extra share)"] = 1 - paired_ratio(samples, "simone, muon", "simone")
    shares["untied head (extra share)"] = 1 - paired_ratio(samples, "simone, untied head", "simone")
    return shares


def time_pair_batches(cached_run, uncached_run, count: int = 64) -> dict:
    """Seconds per micro-batch from SIM-ONE's batch source, with and without the pair cache (the
    sources themselves, read before any step, so no prefetching worker is drawing)."""
    seconds = {}
    for name, run in (("pair cache", cached_run), ("tokenized every micro-step", uncached_run)):
        source = getattr(run.task.batches, "source", run.task.batches)
        state = source.state_dict()
        started = now()
        for _ in range(count):
            source.next_batch()
        seconds[name] = (now() - started) / count
        source.load_state_dict(state)
    return seconds
