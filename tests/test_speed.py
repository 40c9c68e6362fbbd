"""The speed work (issue 19): FLOPs per token in the field's convention, batched Muon, the loss
path's graph breaks and padding, one host sync per optimizer step, the GPU A/B script's dry run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import GPT2_NO_DROPOUT

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "SIM-ONE Training", REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def tiny_config(model: str, **flags):
    from measure import resolve_run_config
    return resolve_run_config(model, {"preset": "tiny", "device": "cpu", **flags})


def tiny_batch(model: str, cfg):
    from measure import synthetic_batch
    return synthetic_batch(model, cfg, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- FLOPs per token


def test_gpt2_small_flops_per_token_pinned():
    """GPT-2 small (12 layers, d 768, vocab 50,257, T 1,024), by hand:
    per layer the matmul weights are c_attn 768 x 2,304 + attn c_proj 768 x 768 + c_fc 768 x 3,072
    + mlp c_proj 3,072 x 768 = 768 x 9,216 = 7,077,888; 12 layers: 84,934,656. The tied head:
    50,257 x 768 = 38,597,376. Matmuls: 6 x (84,934,656 + 38,597,376) = 741,192,192. Attention:
    12 x 12 x 768 x 1,024 = 113,246,208. Total 854,438,400 FLOPs per token (the old convention,
    6 x non-embedding parameters, gave 623,582,208: it left out the head)."""
    import mvlm_trainer

    with torch.device("meta"):
        model = mvlm_trainer.build_model(mvlm_trainer.GPT2Shape(), 50257, 1024, 0)
    assert mvlm_trainer.flops_per_token(model, 1024) == 854_438_400


@pytest.mark.parametrize("model,flags", [
    ("gpt2", {"chunked_loss": False}),
    ("simone", {"chunked_loss": False}),  # memory tokens, the policy gate, GQA, the z-loss
    # The full-logits path runs the t+2 head on every row and unembeds the alignment pairs (work it
    # throws away); the chunked path runs only what is used. Its counter misses the in-place
    # weight-gradient accumulation and counts the forward recompute instead: the same FLOPs.
    ("simone", {"coherence_weight": 0.5, "alignment_weight": 0.1, "tie_embeddings": True}),
])
def test_flops_per_token_counts_every_matmul_of_the_step(model, flags):
    """The trainers' FLOPs per token equal what torch's FlopCounterMode counts in one training
    micro-step (forward and backward) of the tiny objective: every matmul and attention FLOP of the step, per language-model token
    (attention through SDPA's math kernel, whose matmuls the counter sees on a CPU).
    (The alignment loss's P x P similarity matmul is the one term the formula leaves out.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from measure import build_objective
    cfg = tiny_config(model, **flags)
    objective = build_objective(model, cfg)
    batch = tiny_batch(model, cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = objective(batch)
        loss.backward()
    counted = counter.get_total_flops() / batch["input_ids"].numel()
    if model == "gpt2":
        import mvlm_trainer
        ours = mvlm_trainer.flops_per_token(objective.model, cfg.block_size)
    else:
        from prioritary_mvlm.enhanced_trainer import flops_per_token
        ours = flops_per_token(objective, cfg)
    if "alignment_weight" in flags:
        pairs, d = cfg.alignment_pairs, cfg.model.d_model
        counted -= 3 * 2 * pairs * pairs * d / batch["input_ids"].numel()  # similarity, forward + backward
    assert ours == pytest.approx(counted, rel=1e-9)


# --------------------------------------------------------------------------- batched Muon


def muon_pair(weight_decay: float = 0.0):
    """The tiny SIM-ONE objective twice with the same weights: (torch's Muon, batched Muon)."""
    import copy
    import dataclasses

    from measure import build_objective
    cfg = tiny_config("simone", muon_weight_decay=weight_decay, coherence_weight=0.1)
    objective = build_objective("simone", cfg)
    return cfg, [with_optimizer(copy.deepcopy(objective), dataclasses.replace(cfg, muon_impl=impl))
                 for impl in ("torch", "batched")]


def with_optimizer(module, cfg):
    from mvlm_engine.optim import build_optimizer
    return module, build_optimizer(module, cfg, torch.device("cpu"))


def train_steps(module, optimizer, batches) -> None:
    from mvlm_engine.optim import set_learning_rates
    for factor, batch in batches:
        set_learning_rates(optimizer, factor)
        loss, _ = module(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_muon_equals_torchs_muon_in_fp32(weight_decay):
    """The tiny SIM-ONE's hidden matrices (five shapes, tall and wide, the 4 x 128 gates included),
    five steps of the same gradients at changing learning rates: every weight and momentum buffer
    within 1e-6 relative of torch.optim.Muon's, and what the five steps changed in every weight
    within 1e-5 relative of torch's change. The iteration is the same, in fp32 on a CPU; a batched
    matmul rounds differently from n single ones (about 2e-6 relative after five Newton-Schulz
    iterations, measured), and that is all that differs."""
    from measure import build_objective
    from mvlm_engine.muon import BatchedMuon
    from mvlm_engine.optim import hidden_matrices, use_fp32_newton_schulz_on_cpu
    use_fp32_newton_schulz_on_cpu()  # what build_optimizer does on a CPU
    matrices = hidden_matrices(build_objective("simone", tiny_config("simone")))
    shapes = {tuple(p.shape) for p in matrices}
    assert len(shapes) >= 4 and any(r > c for r, c in shapes) and any(r < c for r, c in shapes)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
    options = {"lr": 0.02, "weight_decay": weight_decay, "momentum": 0.95, "nesterov": True,
               "adjust_lr_fn": "original"}
    batched, reference = BatchedMuon(ours, **options), torch.optim.Muon(theirs, **options)
    generator = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in theirs]
    for lr in (0.006, 0.02, 0.016, 0.01, 0.004):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator) * 1e-3
            b.grad = a.grad.clone()
        for optimizer in (batched, reference):
            optimizer.param_groups[0]["lr"] = lr
            optimizer.step()
        for a, b, b0 in zip(ours, theirs, start):
            assert torch.linalg.norm(a - b) <= 1e-6 * torch.linalg.norm(b)
            assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b - b0)
            buf_a, buf_b = batched.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"]
            assert torch.linalg.norm(buf_a - buf_b) <= 1e-6 * torch.linalg.norm(buf_b)


def test_batched_muon_state_round_trips_and_loads_torchs():
    """Its state_dict goes through the bytes a checkpoint holds (weights_only) and training goes on
    bit for bit; it has torch.optim.Muon's layout, so torch's state loads into it and its next step
    is torch's (to rounding: 1e-6 relative)."""
    import copy
    import dataclasses
    import io
    cfg, ((a, opt_a), (b, opt_b)) = muon_pair()
    batches = [(1.0, tiny_batch("simone", cfg))] * 2
    train_steps(a, opt_a, batches)
    train_steps(b, opt_b, batches)
    for source_module, source_optimizer in ((b, opt_b), (a, opt_a)):
        module, optimizer = with_optimizer(copy.deepcopy(source_module), dataclasses.replace(cfg, muon_impl="batched"))
        saved = io.BytesIO()
        torch.save(source_optimizer.state_dict(), saved)
        optimizer.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
        steps = batches if source_optimizer is opt_b else batches[:1]
        train_steps(module, optimizer, steps)
        train_steps(source_module, source_optimizer, steps)
        for p_source, p_copy in zip(source_module.parameters(), module.parameters()):
            if source_optimizer is opt_b:
                assert torch.equal(p_source, p_copy)
            else:
                assert torch.linalg.norm(p_source - p_copy) <= 1e-6 * torch.linalg.norm(p_source)


@pytest.mark.parametrize("impl", ["torch", "batched"])
def test_step_guard_undoes_a_step_right_after_a_resume(impl):
    """As the trainer does it: the guard is built before the checkpoint's optimizer state is
    loaded; a step taken right after the load and undone leaves weights and optimizer state
    (Muon's stacked momentum included) exactly as loaded."""
    import copy
    import dataclasses
    import io

    from mvlm_engine.guard import StepGuard
    from mvlm_engine.optim import optimizers_of
    cfg, (_, (module, optimizer)) = muon_pair()
    cfg = dataclasses.replace(cfg, muon_impl=impl)
    batch = tiny_batch("simone", cfg)
    train_steps(module, optimizer, [(1.0, batch)] * 2)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    resumed, resumed_optimizer = with_optimizer(copy.deepcopy(module), cfg)
    guard = StepGuard(resumed, resumed_optimizer)
    resumed_optimizer.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    expected = copy.deepcopy(resumed_optimizer.state_dict())
    weights = [p.detach().clone() for p in resumed.parameters()]
    loss, _ = resumed(batch)
    loss.backward()
    guard.save()
    resumed_optimizer.step()
    assert not torch.equal(weights[0], next(resumed.parameters()))
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed.parameters()))
    restored = resumed_optimizer.state_dict()
    for part, part_expected in zip(restored["optimizers"], expected["optimizers"]):
        assert part["state"].keys() == part_expected["state"].keys()
        for key, state in part["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(part_expected["state"][key][name])), name
    assert len(optimizers_of(resumed_optimizer)) == 2


def test_resume_is_exact_with_batched_muon(small_corpus, tmp_path):
    """The tiny SIM-ONE with --muon_impl batched: 8 steps, or 4 then a resume from the step-4
    checkpoint, give the same weights bit for bit."""
    import shutil

    from conftest import SIMONE_TRAINER, assert_same_weights, run_ok, tiny_args
    common = ["--max_steps", 8, "--save_interval", 4, "--eval_interval", 4, "--eval_windows", 8, "--log_interval", 2,
              "--muon_impl", "batched", "--batch_size", 8]
    run_ok(*tiny_args(SIMONE_TRAINER, small_corpus, tmp_path / "full", *common))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000004", tmp_path / "resumed" / "checkpoints" / "step_000004")
    proc = run_ok(*tiny_args(SIMONE_TRAINER, small_corpus, tmp_path / "resumed", *common, "--resume_from", "latest"))
    assert "resumed from" in proc.stdout
    assert_same_weights(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")


def test_batched_muon_calls_at_least_five_times_fewer_kernels():
    """benchmarks/muon_kernels.py's count (operators per Muon step, torch.profiler on a CPU) on the
    tiny SIM-ONE: the batched Muon at least 5x fewer than torch.optim.Muon. A count, not a timing."""
    import muon_kernels
    torch_count = muon_kernels.measure("torch", "tiny", 1, timed_steps=0)["kernels_per_step"]
    batched_count = muon_kernels.measure("batched", "tiny", 1, timed_steps=0)["kernels_per_step"]
    assert torch_count >= 5 * batched_count > 0


# --------------------------------------------------------------------------- the loss path


@pytest.mark.parametrize("model", ["gpt2", "simone"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_compiled_step_has_no_graph_break_on_the_default_loss_path(model, precision):
    """torch._dynamo.explain on the objective as the trainer compiles it (the whole training
    module, under the run's autocast: fp32 on a CPU, bf16 on a GPU), default settings of the tiny
    preset (the chunked cross-entropy): one graph, no break."""
    from measure import build_objective
    from mvlm_engine.runtime import Runtime
    cfg = tiny_config(model)
    assert cfg.chunked_loss
    objective = build_objective(model, cfg)
    runtime = Runtime(0, 0, 1, torch.device("cpu"), precision, True)
    torch._dynamo.reset()
    with runtime.autocast():
        explained = torch._dynamo.explain(objective)(tiny_batch(model, cfg))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_full_logits_pad_the_head_in_the_matmul_and_never_predict_the_padding(monkeypatch):
    """GPT-2's 50,257 rows run as 50,304 in the one matmul; the padding is no class of the softmax
    and gets no gradient: values and gradients are those of the unpadded logits."""
    import torch.nn.functional as F

    from mvlm_engine.losses import full_log_partition
    seen, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *rest: seen.append(tuple(w.shape)) or linear(x, w, *rest))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50257, 8, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 5, 50256, 17, 3, 50000])
    log_partition, target_logit = full_log_partition(hidden, weight, targets)
    assert seen == [(50304, 8)]
    monkeypatch.undo()
    logits = hidden @ weight.T
    torch.testing.assert_close(log_partition, logits.logsumexp(-1))
    torch.testing.assert_close(target_logit, logits.gather(1, targets[:, None]).squeeze(1))
    ours = torch.autograd.grad((log_partition - target_logit).mean(), (hidden, weight))
    reference = torch.autograd.grad(F.cross_entropy(logits, targets), (hidden, weight))
    assert ours[1].shape == weight.shape
    for a, b in zip(ours, reference):  # sums over 50,257 classes: rounding to 1e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_logits_objectives_equal_the_models_own_logits():
    """--no_chunked_loss (padded full logits, our cross-entropy) gives the loss and gradients of
    each model's own logits through the reference functions: F.cross_entropy on HF GPT-2's
    logits; the pure next-token, t+2 and z-loss functions on SIM-ONE's (soft-cap on, vocabulary
    300, padded to 320). tests/test_fast_path.py checks the chunked path against this one."""
    import copy

    from mvlm_trainer import CausalLMObjective, GPT2Shape, build_model
    from prioritary_mvlm.advanced_losses import CompositeObjective, multi_token_loss, next_token_loss, z_loss
    from prioritary_mvlm.config import simone_preset
    from simone_transformer import SimOneModel
    torch.manual_seed(0)
    x = torch.randint(0, 300, (3, 32))
    shape = GPT2Shape(n_layer=2, n_embd=32, n_head=4, **GPT2_NO_DROPOUT)
    gpt2 = CausalLMObjective(build_model(shape, 300, 32, 0), chunked_loss=False)
    reference_gpt2 = copy.deepcopy(gpt2)
    labels = torch.roll(x, -1, 1)
    assert_same_loss_and_gradients(gpt2({"input_ids": x, "labels": labels})[0], gpt2,
                                   torch.nn.functional.cross_entropy(reference_gpt2.logits(x).flatten(0, 1), labels.flatten()),
                                   reference_gpt2)
    model = SimOneModel(simone_preset("tiny", vocab_size=300, max_seq_len=32, memory_tokens=2, logit_softcap=3.0))
    simone = CompositeObjective(model, {"coherence": 0.1, "stability": 1e-2}, adaptive=False, temperature=0.1,
                                chunked_loss=False)
    reference = copy.deepcopy(simone)
    out = reference.model(x)
    ahead = reference.model.logits(reference.multi_token_head(out.hidden_states))
    expected = next_token_loss(out.logits, labels) + 0.1 * multi_token_loss(ahead, labels) + 1e-2 * z_loss(out.logits)
    assert_same_loss_and_gradients(simone({"input_ids": x, "labels": labels})[0], simone, expected, reference)


def assert_same_loss_and_gradients(loss, module, expected, reference_module):
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    for (name, a), b in zip(module.named_parameters(), reference_module.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


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
    assert by_name["gpt2 b16 (default)"]["vs_baseline"] == 1.0 and by_name["simone 12x4 (default)"]["vs_baseline"] == 1.0


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
