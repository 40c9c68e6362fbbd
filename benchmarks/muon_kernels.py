#!/usr/bin/env python3
"""Kernels per Muon step: torch.optim.Muon against the batched Muon (mvlm_engine/muon.py).

    python3 benchmarks/muon_kernels.py [--preset tiny] [--steps 3]

Builds the SIM-ONE objective of the preset as its trainer does (the default recipe: Muon on
the hidden matrices), gives every parameter a seeded random gradient, then profiles optimizer
steps of the Muon part alone with torch.profiler, once per implementation, on the same gradients. On a CPU there are
no kernel launches to count; what is counted is the operators the optimizer calls: the
profiler's outermost aten operators (one called from Python, not from inside another operator;
on a GPU each launches one kernel or a few, a foreach operator one per chunk of tensors), without
pure view and metadata operators (transpose, unbind, to() of a tensor already in that dtype and
the like: no kernel anywhere). Prints the count per step of each implementation and their ratio,
and the wall time per step (median).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from measure import repo_paths

# Operators that only make a new view or read metadata: no kernel on any device.
VIEW_OPS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::t", "aten::transpose", "aten::permute",
            "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
            "aten::unbind", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::result_type",
            "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::numpy_T",
            "aten::matrix_H", "aten::mT", "aten::_reshape_alias", "aten::split", "aten::chunk", "aten::narrow",
            "aten::contiguous", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}


def outermost(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def kernel_count(events) -> int:
    """Outermost aten operators that do work (see the module docstring)."""
    return sum(1 for e in events if e.name.startswith("aten::") and e.name not in VIEW_OPS and outermost(e)
               and (e.name != "aten::to" or e.cpu_children))  # to() into the dtype it has: no copy


def muon_of(impl: str, preset: str):
    """The preset's SIM-ONE objective with random gradients, and the Muon optimizer of `impl` on it."""
    import dataclasses

    from measure import build_objective, resolve_run_config
    from mvlm_engine.optim import build_optimizer
    cfg = dataclasses.replace(resolve_run_config("simone", {"preset": preset, "device": "cpu"}), muon_impl=impl)
    objective = build_objective("simone", cfg)
    generator = torch.Generator().manual_seed(0)
    for p in objective.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    muon = build_optimizer(objective, cfg, torch.device("cpu")).optimizers[0]
    return objective, muon


def measure(impl: str, preset: str, steps: int, timed_steps: int = 5) -> dict:
    _, muon = muon_of(impl, preset)
    muon.step()  # the first step creates the momentum buffers (and, batched, the stacks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            muon.step()
    times = [float("nan")]
    for _ in range(timed_steps):
        started = time.perf_counter()
        muon.step()
        times.append(time.perf_counter() - started)
    matrices = sum(len(g["params"]) for g in muon.param_groups)
    shapes = len({tuple(p.shape) for g in muon.param_groups for p in g["params"]})
    return {"kernels_per_step": kernel_count(profile.events()) / steps,
            "seconds_per_step": statistics.median(times[1:] or times),
            "matrices": matrices, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="SIM-ONE preset (tiny on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per implementation")
    args = parser.parse_args()
    repo_paths()
    torch.set_num_threads(1)  # steady on a shared CPU; both implementations alike
    results = {impl: measure(impl, args.preset, args.steps, max(5, args.steps)) for impl in ("torch", "batched")}
    first = results["torch"]
    print(f"SIM-ONE {args.preset}: {first['matrices']} hidden matrices in {first['shapes']} shapes, torch "
          f"{torch.__version__}, CPU, 1 thread")
    for impl, r in results.items():
        print(f"{impl:8s} kernels per Muon step {r['kernels_per_step']:7.0f}   wall {r['seconds_per_step'] * 1e3:8.2f} ms")
    print(f"ratio torch / batched: kernels {first['kernels_per_step'] / results['batched']['kernels_per_step']:.1f}x, "
          f"wall {first['seconds_per_step'] / results['batched']['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    main()
