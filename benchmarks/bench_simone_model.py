"""Benchmark the Enhanced SIM-ONE model against HF LlamaForCausalLM in one process.

    python benchmarks/bench_simone_model.py [--device cpu] [--repeats 5]

Measures, with every timing interleaved across variants and reported as a median:
- training step (forward + backward + AdamW) tokens/s: SIM-ONE with governance off vs
  `transformers.LlamaForCausalLM` holding the same weights, then the overhead of the
  policy gate, of memory tokens, and of both;
- forward-only tokens/s with trace off vs on;
- greedy decode tokens/s through transformers' `generate`: SIM-ONE with and without the KV
  cache, with governance on, and HF Llama holding the same weights.
Prints a Markdown table. Numbers only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from simone_transformer.enhanced_model import SimOneConfig, SimOneModel
from simone_transformer.hf_model import SimOneForCausalLM


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--memory_tokens", type=int, default=8, help="for the memory variants")
    p.add_argument("--steps", type=int, default=2, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings per variant")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=64)
    return p.parse_args()


def make_config(args, policy_gate: bool, memory_tokens: int) -> SimOneConfig:
    return SimOneConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads, max_seq_len=args.seq_len, policy_gate=policy_gate, memory_tokens=memory_tokens,
    )


def make_llama(simone: SimOneModel):
    """An HF Llama with the same architecture and the same weights as `simone` (governance off)."""
    from simone_transformer.llama_export import to_llama

    llama = to_llama(simone.config, simone.state_dict())
    llama.config._attn_implementation = "sdpa"
    return llama


def simone_logits(model, x):
    return model(x).logits


def llama_logits(model, x):
    return model(input_ids=x, use_cache=False).logits


def train_timer(model, logits_fn, batch, steps):
    """A closure that runs `steps` AdamW steps and returns tokens/s."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch

    def run() -> float:
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            logits = logits_fn(model, x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(x.device)
        return steps * x.numel() / (time.perf_counter() - start)

    return run


def forward_timer(model, x, trace: bool, steps):
    def run() -> float:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                model(x, trace=trace)
        _sync(x.device)
        return steps * x.numel() / (time.perf_counter() - start)

    return run


def decode_timer(generate_fn, new_tokens):
    def run() -> float:
        start = time.perf_counter()
        generate_fn()
        return new_tokens / (time.perf_counter() - start)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(timers: dict, repeats: int) -> dict:
    """Warm each timer once, then run them round-robin `repeats` times; median per name."""
    for run in timers.values():
        run()
    results = {name: [] for name in timers}
    for _ in range(repeats):
        for name, run in timers.items():
            results[name].append(run())
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()[0]  # other processes on the box skew CPU timings: report it
    device = torch.device(args.device)
    torch.manual_seed(0)
    variants = {
        "SIM-ONE, governance off": make_config(args, False, 0),
        "SIM-ONE + policy gate": make_config(args, True, 0),
        f"SIM-ONE + {args.memory_tokens} memory tokens": make_config(args, False, args.memory_tokens),
        "SIM-ONE, gate + memory": make_config(args, True, args.memory_tokens),
    }
    models = {name: SimOneModel(config).to(device) for name, config in variants.items()}
    baseline_name = "SIM-ONE, governance off"
    llama = make_llama(models[baseline_name]).to(device)

    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    batch = (x, torch.roll(x, -1, dims=1))
    train = {name: train_timer(m, simone_logits, batch, args.steps) for name, m in models.items()}
    train["HF LlamaForCausalLM (same weights)"] = train_timer(llama, llama_logits, batch, args.steps)
    train_tps = interleaved_medians(train, args.repeats)

    governed = models["SIM-ONE, gate + memory"]
    forward_tps = interleaved_medians({
        "forward, trace off (gate + memory)": forward_timer(governed, x, False, args.steps),
        "forward, trace on (gate + memory)": forward_timer(governed, x, True, args.steps),
    }, args.repeats)

    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len), device=device)
    n = args.new_tokens
    base = SimOneForCausalLM.from_native(models[baseline_name].eval())
    governed = SimOneForCausalLM.from_native(governed.eval())
    llama.eval()

    def greedy(model, **options):  # exactly n new tokens, whatever comes out
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, **options)

    decode_tps = interleaved_medians({
        "decode, SIM-ONE KV cache": decode_timer(greedy(base), n),
        "decode, SIM-ONE no cache": decode_timer(greedy(base, use_cache=False), n),
        "decode, SIM-ONE gate + memory, KV cache": decode_timer(greedy(governed), n),
        "decode, HF Llama generate (cache)": decode_timer(greedy(llama), n),
    }, args.repeats)

    report(args, device, train_tps, baseline_name, forward_tps, decode_tps, (load_before, os.getloadavg()[0]))


def report(args, device, train_tps, baseline_name, forward_tps, decode_tps, load) -> None:
    base = train_tps[baseline_name]
    llama = train_tps["HF LlamaForCausalLM (same weights)"]
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{platform.processor() or platform.machine()} | 1-min load average {load[0]:.2f} before, "
          f"{load[1]:.2f} after")
    print(f"config: d_model {args.d_model}, layers {args.n_layers}, heads {args.n_heads}/{args.n_kv_heads} kv, "
          f"vocab {args.vocab_size}, batch {args.batch_size} x seq {args.seq_len}, fp32, "
          f"median of {args.repeats} interleaved timings x {args.steps} steps\n")
    print("| measurement | tokens/s (median) | relative |")
    print("|---|---:|---:|")
    print(f"| train step, SIM-ONE governance off vs HF Llama | {base:,.0f} vs {llama:,.0f} | {base / llama:.2f}x |")
    for name, tps in train_tps.items():
        if name not in (baseline_name,) and not name.startswith("HF"):
            print(f"| train step, {name} | {tps:,.0f} | {tps / base - 1:+.1%} vs off |")
    off, on = forward_tps.values()
    print(f"| forward, trace off / on (gate + memory) | {off:,.0f} / {on:,.0f} | {on / off - 1:+.1%} with trace |")
    cached = decode_tps["decode, SIM-ONE KV cache"]
    for name, tps in decode_tps.items():
        print(f"| {name} (batch 1, {args.prompt_len}+{args.new_tokens} tokens) | {tps:,.1f} | "
              f"{tps / cached:.2f}x of SIM-ONE cached |")


if __name__ == "__main__":
    main()
