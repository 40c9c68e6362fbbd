#!/usr/bin/env python3
"""The benchmark suite: one entry point for every performance figure of this repository.

    python3 benchmarks/run.py --quick --json     # CPU yardstick, <= 3 minutes on 2 quiet cores
    python3 benchmarks/run.py                    # full: the whole corpus, every variant, more rounds
    python3 benchmarks/run.py --sections memory --memory_presets small    # the small-preset memory
    python3 benchmarks/run.py --sections train --presets small            # on a GPU: tokens/s, MFU

Sections (--sections; default all, --quick: all but train):
  data      seconds to build the corpus (prepare.py) and to train the BPE and tokenize it into
            shards, from scratch (--quick: two translations and a 4K vocabulary).
  memory    per model and preset (--memory_presets; tiny with --quick, tiny and small otherwise):
            the peak memory of one training micro-step (forward and backward of the objective
            the trainer builds, on random token ids of the run's shapes), old path against fast
            path, each in a fresh process: RSS high-water mark on a CPU (reset before the step),
            max allocated on CUDA. On a CPU presets above tiny take one sequence per micro-step.
  train     per model and preset (--presets; tiny on a CPU, small on a GPU): tokens/s of engine
            optimizer steps on the corpus, fast path on, each in a fresh process; on a GPU also
            MFU = FLOPs per token x tokens/s / peak, FLOPs per token in the field's convention
            (6 x matmul weights, the output head included, + 12 L d T attention, L layers, d width,
            T positions; mvlm_engine/metrics.py FLOPS_CONVENTION), peak = the GPU's dense bf16
            figure (989 TFLOP/s on H100/H200); the attention kernel that ran is named.
  engine    tiny presets through the engine, timed round-robin in one process: both models on
            the fast and the old path, SIM-ONE against GPT-2 at the same shape (4 layers x 128),
            MVLM-GPT2 through the engine against a bare loop over the same HF model; without
            --quick also each fast-path piece alone and where SIM-ONE's step time goes.
  compare   SIM-ONE against HF LlamaForCausalLM with the same weights (training step, governance
            off and on), KV-cache decode against HF generate, and vocabulary padding.

The old path is the code as it was before the fast path, behind its settings: --no_chunked_loss
(full logits: one matmul against the head padded to a multiple of 64 rows), --no_fused_layers (plain-op norms, SwiGLU, GELU), --no_prefetch_batches and, for
SIM-ONE, --no_alignment_pair_cache (verse pairs tokenized every micro-step). Prefetching is on by
default on CUDA only (the engine section measures it on and off).

With --json the last line is one JSON object; keys ending in _ratio are ours / reference, where
>= 1.0 means ours is at least as good (throughput: ours faster; memory: old path / fast path).
Timings are medians of interleaved rounds; ratios are medians of per-round ratios.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_corpus, reexec_in_venv  # noqa: E402

from mvlm_engine.config import setting  # noqa: E402  (torch-free)

PROG = "run.py"
SECTIONS = ("data", "memory", "train", "engine", "compare")
QUICK_SECTIONS = ("data", "memory", "engine", "compare")
QUICK_TRANSLATIONS = "KJV,WEB"


@dataclass
class BenchSettings:
    quick: bool = setting(False, "the CPU yardstick: a two-translation corpus, tiny presets, few rounds (<= 3 min)")
    json: bool = setting(False, "end with one line of JSON")
    sections: list[str] = setting(help=f"sections to run, of: {', '.join(SECTIONS)} (default: all; --quick: all but "
                                       "train)", factory=list)
    presets: list[str] = setting(help="train section presets (default: tiny on a CPU, small on a GPU)", factory=list)
    memory_presets: list[str] = setting(help="memory section presets (default: tiny with --quick, else tiny and "
                                             "small)", factory=list)
    repeats: int = setting(0, "interleaved rounds per timing (0: 3 with --quick, 5 otherwise)")
    steps: int = setting(0, "optimizer steps per timing (0: 1 with --quick, 2 otherwise)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to measure")
    clock: Literal["auto", "wall", "cpu"] = setting(
        "auto", "what the timings read: wall time, or the process's CPU time (auto: CPU time on a CPU with one "
                "intra-op thread, where it is steady under other load; wall time otherwise)")
    threads: int = setting(0, "torch intra-op threads for the timings on a CPU (0: 1 with --quick, which keeps the "
                              "ratios steady on a machine shared with other work; else torch's default)")
    malloc_mmap_threshold: int = setting(131072, "memory section on a CPU: glibc's M_MMAP_THRESHOLD in bytes for the "
                                                 "measuring processes (0: glibc's default, which rises to 32 MiB)")
    data_dir: str = setting("mvlm_training_dataset_complete", "corpus folder (built if missing; not used by --quick)",
                            path=True)
    output_dir: str = setting("runs/bench", "scratch runs, caches and results.json", path=True)
    child: str | None = setting(None, "internal: measure one training configuration (JSON) and print one JSON line")

    def problems(self) -> list[str]:
        errors = [f"--sections: unknown {s!r}" for s in self.sections if s not in SECTIONS]
        return errors + [f"--{n} must be >= 0" for n in ("repeats", "steps", "threads", "malloc_mmap_threshold")
                         if getattr(self, n) < 0]


@dataclass
class Plan:
    """What this invocation measures, resolved from the settings and the machine."""

    device: str
    data_dir: Path
    cache_dir: Path
    out: Path
    repeats: int
    steps: int
    presets: list[str]
    memory_presets: list[str]
    malloc_mmap_threshold: int
    clock: str
    ratios: dict = field(default_factory=dict)


def make_plan(settings: BenchSettings) -> Plan:
    import torch

    import measure
    device = "cuda" if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cpu" and (settings.threads or settings.quick):
        torch.set_num_threads(settings.threads or 1)
    clock = settings.clock if settings.clock != "auto" else (
        "cpu" if device == "cpu" and torch.get_num_threads() == 1 else "wall")
    measure.use_clock(clock)
    out = Path(settings.output_dir) / ("quick" if settings.quick else "full")
    presets = settings.presets or (["small"] if device == "cuda" else ["tiny"])
    memory_presets = settings.memory_presets or (["tiny"] if settings.quick else ["tiny", "small"])
    data_dir = out / "corpus" if settings.quick else Path(settings.data_dir)
    return Plan(device, data_dir, out / "cache", out, settings.repeats or (3 if settings.quick else 5),
                settings.steps or (1 if settings.quick else 2), presets, memory_presets, settings.malloc_mmap_threshold,
                clock)


def machine_line() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_before": os.getloadavg()}


def main(argv=None) -> None:
    from mvlm_engine.cli import parse_run_config

    started = time.perf_counter()
    settings = parse_run_config(BenchSettings, argv, PROG, __doc__)
    if settings.child:
        from sections import child_main
        return child_main(json.loads(settings.child))
    import engine_pool
    import model_compare
    import sections
    plan = make_plan(settings)
    chosen = settings.sections or list(QUICK_SECTIONS if settings.quick else SECTIONS)
    plan.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_line(), "quick": settings.quick, "device": plan.device, "clock": plan.clock,
              "rounds": plan.repeats, "steps_per_timing": plan.steps}
    if settings.quick:
        sections.build_quick_corpus(plan, QUICK_TRANSLATIONS, "data" in chosen, report)
    else:
        ensure_corpus(plan.data_dir)
        if "data" in chosen:
            sections.measure_data_full(plan, report)
    run_sections = {"memory": sections.section_memory, "train": sections.section_train,
                    "engine": engine_pool.section_engine, "compare": model_compare.section_compare}
    for name, section in run_sections.items():
        if name in chosen:
            section_started = time.perf_counter()
            section(plan, settings.quick, report)
            report.setdefault("section_seconds", {})[name] = time.perf_counter() - section_started
    report["machine"]["load_average_after"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - started
    report["ratios"] = plan.ratios
    sections.print_report(report)
    (plan.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    if settings.json:
        print(json.dumps({**{k: v for k, v in report.items() if k != "ratios"}, **plan.ratios}))


if __name__ == "__main__":
    reexec_in_venv()
    from mvlm_engine.cli import run_cli
    run_cli(PROG, main, sys.argv[1:])
