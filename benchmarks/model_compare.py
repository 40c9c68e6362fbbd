"""SIM-ONE against HF `LlamaForCausalLM` holding the same weights (benchmarks/run.py, "compare").

Training step: forward, full-logits cross-entropy, backward, AdamW, for SIM-ONE with governance
off, with the policy gate and memory tokens on, and with governance off through the chunked
cross-entropy; HF Llama (which has no governance) is the reference for all three. Decode: greedy
tokens/s of SIM-ONE's KV-cache `generate` against HF `generate` (cache on) for the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from measure import interleaved, median, now, paired_ratio, sync


@dataclass
class CompareShape:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 4
    memory_tokens: int = 8
    prompt_len: int = 16
    new_tokens: int = 64


def simone(shape: CompareShape, governed: bool):
    from simone_transformer.enhanced_model import SimOneConfig, SimOneModel

    return SimOneModel(SimOneConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers,
                                    n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, max_seq_len=shape.seq_len,
                                    policy_gate=governed, memory_tokens=shape.memory_tokens if governed else 0))


def llama_like(model):
    from simone_transformer.llama_export import to_llama

    llama = to_llama(model.config, model.state_dict())
    llama.config._attn_implementation = "sdpa"
    return llama


def full_logits_loss(kind: str):
    def loss(model, x, y):
        logits = model(x).logits if kind == "simone" else model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return loss


def chunked_loss(model, x, y):
    from mvlm_engine.losses import cross_entropy_from_log_partition, linear_log_partition

    hidden = model(x, return_logits=False).hidden_states
    return cross_entropy_from_log_partition(*linear_log_partition(hidden.flatten(0, 1), model.embed_tokens.weight,
                                                                  y.flatten()))


def train_timer(model, loss_fn, batch, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch

    def timer() -> float:
        model.train()
        started = now()
        for _ in range(steps):
            loss_fn(model, x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(x.device)
        return steps * x.numel() / (now() - started)

    return timer


def decode_timer(generate, new_tokens: int, device):
    def timer() -> float:
        started = now()
        generate()
        sync(device)
        return new_tokens / (now() - started)
    return timer


def compare_models(device: torch.device, shape: CompareShape, steps: int, repeats: int) -> dict:
    """Interleaved training-step and decode comparisons; tokens/s medians and the ratios."""
    torch.manual_seed(0)
    base, governed = simone(shape, False).to(device), simone(shape, True).to(device)
    llama = llama_like(base).to(device)
    x = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), device=device)
    batch = (x, torch.roll(x, -1, dims=1))
    train = interleaved({
        "SIM-ONE, governance off": train_timer(base, full_logits_loss("simone"), batch, steps),
        "SIM-ONE, policy gate + memory tokens": train_timer(governed, full_logits_loss("simone"), batch, steps),
        "SIM-ONE, governance off, chunked cross-entropy": train_timer(copy_of(base), chunked_loss, batch, steps),
        "HF LlamaForCausalLM, same weights": train_timer(llama, full_logits_loss("llama"), batch, steps),
    }, repeats)
    from simone_transformer.hf_model import SimOneForCausalLM
    prompt = torch.randint(0, shape.vocab_size, (1, shape.prompt_len), device=device)
    n = shape.new_tokens
    wrapped = SimOneForCausalLM.from_native(base.eval(), pad_token_id=0)
    llama.eval()

    def greedy(model):  # exactly n new tokens through transformers' generate, whatever comes out
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)

    decode = interleaved({
        "SIM-ONE generate, KV cache": decode_timer(greedy(wrapped), n, device),
        "HF generate, KV cache": decode_timer(greedy(llama), n, device),
    }, repeats)
    reference = "HF LlamaForCausalLM, same weights"
    return {"train_tokens_per_s": median(train), "decode_tokens_per_s": median(decode),
            "ratios": {"simone_vs_llama_train_ratio": paired_ratio(train, "SIM-ONE, governance off", reference),
                       "simone_governed_vs_llama_train_ratio": paired_ratio(
                           train, "SIM-ONE, policy gate + memory tokens", reference),
                       "simone_chunked_ce_vs_llama_train_ratio": paired_ratio(
                           train, "SIM-ONE, governance off, chunked cross-entropy", reference),
                       "simone_decode_vs_hf_generate_ratio": paired_ratio(
                           decode, "SIM-ONE generate, KV cache", "HF generate, KV cache")},
            "shape": vars(shape)}


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def head_timer(hidden, weight, targets, steps: int):
    """Forward and backward of the chunked cross-entropy over one unembedding (the LM head alone)."""
    from mvlm_engine.losses import cross_entropy_from_log_partition, linear_log_partition

    def timer() -> float:
        started = now()
        for _ in range(steps):
            loss = cross_entropy_from_log_partition(*linear_log_partition(hidden, weight, targets))
            grads = torch.autograd.grad(loss, (hidden, weight))
        del grads
        sync(hidden.device)
        return steps * len(hidden) / (now() - started)

    return timer


def compare_vocab_padding(device: torch.device, steps: int, repeats: int, quick: bool) -> dict:
    """SIM-ONE's vocabulary (its tokenizer adds 58 seed forms: 4,096 -> 4,154; 32,000 -> 32,058)
    against the same padded to a multiple of 64 and of 128. Targets stay below the real size, as
    padding rows would never be a target. Measured: the LM head and its chunked loss, forward and
    backward, over 2,048 rows at the tiny (d 128) and, without --quick, the small (d 768) width.
    Figures: rows/s; the *_speedup keys are padded / unpadded."""
    torch.manual_seed(0)
    shapes = {"tiny": (4154, 128)} if quick else {"tiny": (4154, 128), "small": (32058, 768)}
    result = {}
    for name, (vocab, width) in shapes.items():
        sizes = {f"vocab {v}": v for v in (vocab, padded(vocab, 64), padded(vocab, 128))}
        targets = torch.randint(0, vocab, (2048,), device=device)
        hidden = torch.randn(2048, width, device=device, requires_grad=True)
        timers = {label: head_timer(hidden, torch.randn(v, width, device=device, requires_grad=True), targets, steps)
                  for label, v in sizes.items()}
        samples = interleaved(timers, repeats)
        labels = list(sizes)
        result[name] = {"lm_head_tokens_per_s": median(samples),
                        "pad64_speedup": paired_ratio(samples, labels[1], labels[0]),
                        "pad128_speedup": paired_ratio(samples, labels[2], labels[0])}
    return result


def section_compare(plan, quick: bool, report: dict) -> None:
    """benchmarks/run.py's "compare" section: the model-level comparisons and vocabulary padding."""
    device = torch.device(plan.device)
    shape = CompareShape(new_tokens=32 if quick else 64)
    result = compare_models(device, shape, plan.steps, plan.repeats)
    plan.ratios.update(result.pop("ratios"))
    result["vocab_padding"] = compare_vocab_padding(device, plan.steps, plan.repeats, quick)
    report["compare"] = result
