#!/usr/bin/env python3
"""Ablation: what does each piece of SIM-ONE's default recipe buy?

    python3 "SIM-ONE Training/ablation.py" --preset tiny --device cpu          # CPU
    python3 "SIM-ONE Training/ablation.py" --preset small --max_steps 2000     # one GPU

Trains, for the same language-modelling tokens (same steps, batch and data order): the
default recipe; the default with one piece switched off at a time (the optimizer, the head,
the init, the soft-cap, each governance mechanism, each auxiliary loss); each auxiliary loss
at other weights; and the default again with other seeds (the run-to-run noise floor). Then
it prints and writes a table of held-out bits per byte (the trainer's final evaluation) and
parallel-verse retrieval@1 on held-out books. Runs already finished are reused.
Arguments after `--` go to every enhanced_train.py run unchanged.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from common import reexec_in_venv, run_trainer  # noqa: E402

from mvlm_engine.config import setting  # noqa: E402  (torch-free)
from mvlm_engine.packaging import RUN_SUMMARY  # noqa: E402  (torch-free)

PROG = "ablation.py"
# Other weights tried for each auxiliary loss (the default's own weight is the "default" row).
LOSS_WEIGHTS = {"coherence_weight": (0.03, 0.1), "alignment_weight": (0.01, 0.1), "z_loss_weight": (1e-4,)}


@dataclass
class AblationSettings:
    preset: Literal["tiny", "small", "medium"] = setting("tiny", "the SIM-ONE preset every run uses")
    max_steps: int = setting(0, "optimizer steps per run (0: the preset's)")
    noise_seeds: int = setting(2, "extra seeds of the default recipe (the noise floor)")
    retrieval_pairs: int = setting(200, "held-out verse pairs for retrieval@1")
    eval_windows: int = setting(256, "held-out windows of the final evaluation")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train")
    jobs: int = setting(1, "runs trained at once (CPU: one thread each, e.g. 2 on 2 cores)")
    data_dir: str = setting("mvlm_training_dataset_complete", "corpus folder", path=True)
    output_dir: str = setting("models/ablation", "one folder per run, plus ablation.md and ablation.json", path=True)

    def problems(self) -> list[str]:
        errors = [f"--{n} must be > 0 (got {getattr(self, n)})" for n in ("jobs", "eval_windows")
                  if getattr(self, n) <= 0]
        errors += [f"--{n} must be >= 0 (got {getattr(self, n)})" for n in ("max_steps", "noise_seeds")
                   if getattr(self, n) < 0]
        if self.retrieval_pairs < 2:
            errors.append(f"--retrieval_pairs must be >= 2 (got {self.retrieval_pairs})")
        return errors


def switch_offs(cfg) -> dict[str, list[str]]:
    """One row per piece the default recipe has on: the flags that switch it off."""
    m, rows = cfg.model, {}
    if cfg.optimizer == "muon":
        # The whole optimizer recipe goes: AdamW as GPT-2 trains (one lr, beta1 0.9, decay 0.1).
        rows["- Muon (AdamW everywhere: lr 3e-3, beta1 0.9, decay 0.1)"] = [
            "--optimizer", "adamw", "--learning_rate", "3e-3", "--head_lr", "3e-3", "--scalar_lr", "3e-3",
            "--beta1", "0.9", "--weight_decay", "0.1"]
    if cfg.schedule == "wsd":
        rows["- WSD schedule (cosine)"] = ["--schedule", "cosine"]
    if not m.tie_embeddings:
        rows["- untied head (tied)"] = ["--tie_embeddings"]
    flags = {"zero_init_proj": "- zero-init projections", "qk_norm": "- QK-norm", "value_embeddings":
             "- value embeddings", "value_residual": "- value residual", "x0_mix": "- x0 mixing",
             "unet_skips": "- U-net skips", "policy_gate": "- policy gate"}
    rows.update({label: [f"--no_{name}"] for name, label in flags.items() if getattr(m, name, False)})
    if getattr(m, "logit_softcap", 0):
        rows["- logit soft-cap"] = ["--logit_softcap", "0"]
    if m.memory_tokens:
        rows["- memory tokens"] = ["--memory_tokens", "0"]
    if getattr(m, "mlp", "swiglu") != "swiglu":
        rows["- ReLU^2 (SwiGLU)"] = ["--mlp", "swiglu"]
    return rows


def variants(cfg, noise_seeds: int) -> dict[str, list[str]]:
    """Run name -> enhanced_train.py flags, relative to the default recipe."""
    rows = {"default recipe": [], **switch_offs(cfg)}
    for name, weights in LOSS_WEIGHTS.items():
        current = getattr(cfg, name)
        if current > 0:
            rows[f"{name} 0 (off)"] = [f"--{name}", "0"]
        rows.update({f"{name} {w:g}": [f"--{name}", str(w)] for w in weights if w != current})
    rows.update({f"default, seed {cfg.seed + i}": ["--seed", str(cfg.seed + i)] for i in range(1, noise_seeds + 1)})
    return rows


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


def run_variant(settings: AblationSettings, name: str, flags: list[str], extra: list[str]) -> dict:
    run_dir = Path(settings.output_dir) / slug(name)
    if not (run_dir / RUN_SUMMARY).is_file():
        args = ["--preset", settings.preset, "--data_dir", settings.data_dir, "--output_dir", run_dir,
                "--device", settings.device, "--overwrite", "--eval_windows", settings.eval_windows,
                *(["--max_steps", settings.max_steps] if settings.max_steps else []), *flags, *extra]
        print(f"[ablation] {name}: {' '.join(map(str, flags)) or '(defaults)'}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if settings.jobs > 1 else None
        run_trainer(HERE / "enhanced_train.py", args, Path(settings.output_dir) / f"{slug(name)}.log", env)
    summary = json.loads((run_dir / RUN_SUMMARY).read_text())
    config = json.loads((run_dir / "train_config.json").read_text())
    retrieval = held_out_retrieval(run_dir, settings.data_dir, settings.retrieval_pairs,
                                   config["alignment_max_tokens"])
    print(f"[ablation] {name}: held-out {summary['final_val_bpb']:.4f} bits/byte, retrieval@1 {retrieval:.3f}",
          flush=True)
    return {"run": name, "val_bpb": summary["final_val_bpb"], "val_loss": summary["final_val_loss"],
            "retrieval_at_1": retrieval, "steps": summary["steps"], "tokens": summary["tokens_seen"],
            "flags": " ".join(map(str, flags))}


def table(rows: list[dict], settings: AblationSettings) -> str:
    base = rows[0]["val_bpb"]
    noise = [r["val_bpb"] for r in rows if r["run"].startswith("default")]
    spread = max(noise) - min(noise)
    lines = [f"Ablation, preset {settings.preset}, {rows[0]['steps']} steps x "
             f"{rows[0]['tokens'] // rows[0]['steps']:,} tokens per run ({rows[0]['tokens']:,} LM tokens), "
             f"{date.today().isoformat()}; seed spread of the default recipe over {len(noise)} seeds: "
             f"{spread:.4f} bits/byte (mean {statistics.mean(noise):.4f}); retrieval over "
             f"{settings.retrieval_pairs} held-out verse pairs (chance {1 / settings.retrieval_pairs:.3f}).", "",
             "| run | held-out bits/byte | vs default | retrieval@1 (held-out) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['run']} | {r['val_bpb']:.4f} | {r['val_bpb'] - base:+.4f} | {r['retrieval_at_1']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from mvlm_engine.cli import parse_run_config, resolve_settings
    from prioritary_mvlm.config import PrioritaryConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    settings, extra = parse_run_config(AblationSettings, argv[:cut], PROG, __doc__), argv[cut + 1:]
    default = resolve_settings(PrioritaryConfig, {"preset": settings.preset}, {})
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        rows = list(pool.map(lambda item: run_variant(settings, *item, extra),
                             variants(default, settings.noise_seeds).items()))
    text = table(rows, settings)
    print("\n" + text)
    out = Path(settings.output_dir)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"preset": settings.preset, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    reexec_in_venv()
    from mvlm_engine.cli import run_cli
    run_cli(PROG, main, None)
