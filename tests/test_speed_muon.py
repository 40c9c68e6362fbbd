"""The speed work (issue 19), batched Muon: equal to torch.optim.Muon in fp32, its state round-trips
and loads torch's, the step guard undoes a step after a resume, exact resume, fewer kernels."""
from __future__ import annotations

import pytest
import torch

from helpers.speed import tiny_batch, tiny_config


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
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000004",
                    tmp_path / "resumed" / "checkpoints" / "step_000004")
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
