#!/usr/bin/env python3
"""Ablation: does each governance mechanism and loss term help?

    python3 "SIM-ONE Training/ablation.py" --preset tiny --device cpu          # CPU, ~20 min
    python3 "SIM-ONE Training/ablation.py" --preset small --max_steps 2000     # one GPU

Trains, for the same number of language-modelling tokens (same steps, batch and seed):
a baseline with everything off (a plain Llama), the baseline plus each single mechanism or
loss, everything on, and the baseline again with another seed (the run-to-run noise floor).
Then it prints and writes a table of held-out bits per byte (the trainer's final evaluation)
and parallel-verse retrieval@1 on held-out books. Runs already finished are reused.
Arguments after `--` go to every enhanced_train.py run unchanged.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OFF = ["--no_policy_gate", "--memory_tokens", "0", "--coherence_weight", "0", "--alignment_weight", "0",
       "--z_loss_weight", "0"]


def variants(memory_tokens: int) -> dict[str, list[str]]:
    """Run name -> enhanced_train.py flags. Later flags win, so each row re-enables one thing."""
    return {
        "baseline (all off)": OFF,
        "+ policy gate": [a for a in OFF if a != "--no_policy_gate"],
        "+ memory tokens": OFF + ["--memory_tokens", str(memory_tokens)],
        "+ coherence (t+2)": OFF + ["--coherence_weight", "0.1"],
        "+ alignment (InfoNCE)": OFF + ["--alignment_weight", "0.1"],
        "+ z-loss": OFF + ["--z_loss_weight", "1e-4"],
        "everything on": [],
        "baseline, seed 2 (noise)": OFF + ["--seed", "2"],
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def held_out_retrieval(model_dir: Path, data_dir: str, pairs: int, max_tokens: int) -> float:
    """Retrieval@1 between two translations of held-out verses, mean-pooled final hidden states."""
    import numpy as np
    from tokenizers import Tokenizer

    from mvlm_engine.parallel_verses import ParallelVerses, mean_pool, retrieval_at_1
    from mvlm_engine.tokenizer import eos_id
    from simone_transformer.hf_model import load_native

    model = load_native(model_dir).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    first, second = ParallelVerses(data_dir, "val").sample(np.random.default_rng(0), pairs)
    return retrieval_at_1(lambda ids, mask: mean_pool(model(ids).hidden_states, mask), tokenizer, first, second,
                          max_tokens, eos_id(tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--data_dir", default=str(REPO / "mvlm_training_dataset_complete"))
    parser.add_argument("--output_dir", default=str(REPO / "models" / "ablation"))
    parser.add_argument("--max_steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--retrieval_pairs", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    from prioritary_mvlm.config import PrioritaryConfig
    preset = PrioritaryConfig.PRESETS[args.preset]
    out = Path(args.output_dir)
    rows = []
    for name, flags in variants(preset.get("memory_tokens", 8)).items():
        run_dir = out / slug(name)
        if not (run_dir / "run_summary.json").is_file():
            command = [sys.executable, str(HERE / "enhanced_train.py"), "--preset", args.preset, "--data_dir",
                       args.data_dir, "--output_dir", str(run_dir), "--device", args.device, "--overwrite",
                       "--eval_windows", "256", *(["--max_steps", str(args.max_steps)] if args.max_steps else []),
                       *flags, *extra]
            print(f"[ablation] {name}: {' '.join(command[2:])}", flush=True)
            proc = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.exit(f"[ablation] {name} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / "run_summary.json").read_text())
        config = json.loads((run_dir / "train_config.json").read_text())
        retrieval = held_out_retrieval(run_dir, args.data_dir, args.retrieval_pairs, config["alignment_max_tokens"])
        rows.append({"run": name, "val_bpb": summary["final_val_bpb"], "val_loss": summary["final_val_loss"],
                     "retrieval_at_1": retrieval, "steps": summary["steps"], "tokens": summary["tokens_seen"],
                     "flags": " ".join(flags)})
        print(f"[ablation] {name}: held-out {summary['final_val_bpb']:.4f} bits/byte, retrieval@1 {retrieval:.3f}",
              flush=True)
    base = rows[0]["val_bpb"]
    table = ["| run | held-out bits/byte | vs baseline | retrieval@1 (held-out) |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r['run']} | {r['val_bpb']:.4f} | {r['val_bpb'] - base:+.4f} | {r['retrieval_at_1']:.3f} |"
              for r in rows]
    header = (f"Ablation, preset {args.preset}, {rows[0]['steps']} steps x {rows[0]['tokens'] // rows[0]['steps']:,} "
              f"tokens per run ({rows[0]['tokens']:,} LM tokens), {date.today().isoformat()}; retrieval over "
              f"{args.retrieval_pairs} held-out verse pairs (chance {1 / args.retrieval_pairs:.3f}).")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
