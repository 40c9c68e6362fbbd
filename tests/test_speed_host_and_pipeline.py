"""The speed work (issue 19), time outside the kernels: one host sync per optimizer step, the GPU
A/B script's dry run, and the pipeline's non-training time (data prepared while another model
trains, totals without compiles)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import REPO
from helpers.speed import script_folders_on_path

script_folders_on_path()


# --------------------------------------------------------------------------- host syncs


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


# transformers' eager-mode checks in GPT-2's forward (a padding warning, packed-sequence detection):
# each reads input values, and each is skipped when traced (`is_tracing`), so the compiled step
# (the GPU default, one graph without a break: test above) does not run them.
HF_EAGER_CHECKS = ("warn_if_padding_and_no_attention_mask", "find_packed_sequence_indices")


class HostSyncCounter:
    """Counts the calls that read a tensor's value on the host (each one a device sync on a GPU),
    by wrapping torch.Tensor's methods; records where each came from. `host_tensors`: tensors
    that live on the host on a GPU too (reading them syncs nothing), not counted."""

    def __init__(self, monkeypatch, host_tensors=()):
        self.calls, self.paused, self.host = [], 0, {id(t) for t in host_tensors}
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.wrap(name, getattr(torch.Tensor, name)))

    def wrap(self, name, original):
        import traceback

        def counted(tensor, *args, **kwargs):
            if not self.paused and id(tensor) not in self.host:
                self.calls.append((name, "".join(traceback.format_stack(limit=8)[:-1])))
            self.paused += 1  # a read inside a read (tolist calling item, say) is the same sync
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.paused -= 1
        return counted


@pytest.mark.parametrize("model", ["gpt2", "simone"])
def test_one_host_sync_per_optimizer_step(model, small_corpus, tmp_path, monkeypatch):
    """Six optimizer steps of the tiny preset through the engine's step path (optimizer_step and
    log_window, logging every second step; for SIM-ONE gradient accumulation 2 and the batched
    Muon) read the device exactly six times: the step's flags, with the logged values riding along
    on logging steps. Not counted: AdamW's step counters (host tensors unless fused: the CUDA path
    is fused and never reads them) and transformers' two eager-only checks (HF_EAGER_CHECKS)."""
    from conftest import TEST_VOCAB
    from measure import engine_run
    from mvlm_engine.optim import optimizers_of
    from mvlm_engine.runtime import start_runtime
    from mvlm_engine.trainer import StopSignal, log_window, optimizer_step
    flags = {"preset": "tiny", "device": "cpu", "data_dir": str(small_corpus), "vocab_size": TEST_VOCAB,
             "log_interval": 2, "batch_size": 4}
    if model == "simone":
        flags.update(gradient_accumulation_steps=2, optimizer="muon", muon_impl="batched")
    runtime = start_runtime("cpu", "fp32", False)
    run = engine_run(model, flags, runtime, tmp_path / "out")
    stop = StopSignal()
    log_window(run, optimizer_step(run, stop))  # creates the optimizer state
    counters = [state["step"] for o in optimizers_of(run.optimizer) for state in o.state.values() if "step" in state]
    counter = HostSyncCounter(monkeypatch, counters)
    for _ in range(6):
        log_window(run, optimizer_step(run, stop))
    monkeypatch.undo()
    ours = [(name, where) for name, where in counter.calls if not any(check in where for check in HF_EAGER_CHECKS)]
    assert len(ours) == 6, "\n".join(f"{name}:\n{where}" for name, where in ours)
    hf = len(counter.calls) - len(ours)
    assert hf == (2 * 6 if model == "gpt2" else 0)  # one micro-step per optimizer step for GPT-2
    assert [r["step"] for r in run.history.data["train"]] == [2, 4, 6]
    run.history.flush()
    assert [r["step"] for r in json.loads(run.history.path.read_text())["train"]] == [2, 4, 6]


# --------------------------------------------------------------------------- the GPU A/B script


def test_gpu_session_ab_dry_runs_on_a_cpu_and_prints_every_row(small_corpus, tmp_path):
    """`bash benchmarks/gpu_session.sh ab` as the GPU session runs it, on a CPU with the tiny
    preset and a few steps per row (AB_ARGS): every row runs and the Markdown table (printed and
    written to $OUT/ab_table.md, raw figures in ab.json) has a line for each."""
    import os
    import subprocess

    import ab
    from conftest import TEST_VOCAB, TIMEOUT
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"  # the script calls python3: this interpreter (a venv's, found from its path)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "DATA_DIR": str(small_corpus),
           "AB_ARGS": f"--preset tiny --warmup 1 --steps 2 --vocab_size {TEST_VOCAB}"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "ab", "600"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = (out / "ab_table.md").read_text()
    results = json.loads((out / "ab.json").read_text())
    assert [r["row"] for r in results] == [row.name for row in ab.ROWS]
    assert all(r["status"] == "ran" and r["tokens_per_s"] > 0 for r in results), [r["status"] for r in results]
    for row in ab.ROWS:
        assert sum(line.startswith(f"| {row.name} |") for line in written.splitlines()) == 1, row.name
        assert f"| {row.name} |" in proc.stdout
    by_name = {r["row"]: r for r in results}
    assert len({by_name[name]["tokens_per_step"] for name in ("simone 24x2", "simone 48x1", "simone 16x3")}) == 1
    assert by_name["gpt2 b16 (default)"]["vs_baseline"] == 1.0
    assert by_name["simone 12x4 (default)"]["vs_baseline"] == 1.0


# --------------------------------------------------------------------------- the pipeline's non-training time


@pytest.mark.parametrize("trainer", ["gpt2", "simone"])
def test_prepare_data_only_builds_the_cache_and_leaves_the_output_dir_alone(trainer, small_corpus, tmp_path):
    """What train_all_models.py runs for the next model while the previous one trains: the
    tokenizer and shards land in the corpus cache (the trainer's next start finds them), and
    --output_dir is neither created nor locked."""
    from conftest import GPT2_TRAINER, SIMONE_TRAINER, run_ok, tiny_args
    cache, out = tmp_path / "cache", tmp_path / "out"
    script = GPT2_TRAINER if trainer == "gpt2" else SIMONE_TRAINER
    run_ok(*tiny_args(script, small_corpus, out, "--cache_dir", cache, "--prepare_data_only"))
    assert not out.exists()
    assert [p.name for p in (cache / "tokens").iterdir() if p.is_dir()]  # the shards
    assert [p.name for p in (cache / "tokenizers").iterdir() if p.is_dir()]


def test_pipeline_totals_count_the_training_loops_without_their_compiles():
    """training_summary.json's totals: training = the loops of the stages that trained now, less
    their first step's compile; everything else (a skipped stage's old figures included) is not."""
    from train_all_models import pipeline_totals
    stages = [{"stage": "corpus", "status": "done", "seconds": 10.0},
              {"stage": "gpt2", "status": "done", "seconds": 100.0,
               "timings": {"loop_seconds": 70.0, "compile_seconds": 20.0}},
              {"stage": "simone", "status": "skipped (already trained)", "seconds": 0.1,
               "timings": {"loop_seconds": 500.0, "compile_seconds": 0.0}},
              {"stage": "validate", "status": "passed", "seconds": 30.0}]
    totals = pipeline_totals(stages, 200.0)
    assert totals == {"wall_seconds": 200.0, "training_loop_seconds": 50.0, "non_training_seconds": 150.0,
                      "non_training_share": 0.75}
