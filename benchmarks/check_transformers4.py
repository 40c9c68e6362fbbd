#!/usr/bin/env python3
"""Do the saved model folders load and generate alike under transformers 4.57 and 5.x?

    python3 benchmarks/check_transformers4.py --models_dir models --tf4_python venv-tf4/bin/python [--apply_fix]

Every folder under --models_dir with a config.json (or --models_dir itself) is loaded in a clean
interpreter of each transformers version, with nothing of this repository importable:
AutoTokenizer + AutoModelForCausalLM (trust_remote_code where the model registry's kind of the
folder ships its modelling code: SIM-ONE), then 20
greedy tokens after a fixed prompt. The transformers 5 side is this interpreter's environment;
the transformers 4 side is --tf4_python, a separate virtual environment, for example:

    python3 -m venv venv-tf4 && venv-tf4/bin/pip install torch==2.13.0 && \\
        venv-tf4/bin/pip install "transformers==4.57.*" tokenizers safetensors numpy

--apply_fix runs on patched copies (in a temporary folder) instead: the file changes that make
transformers 4 load what transformers 5 saved (see `patch_for_transformers4`). Exit status 0
when every folder loads under both versions with the same prompt ids and greedy tokens, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from model_registry import kind_of_folder
from mvlm_engine.cli import OneLineParser, run_cli
from mvlm_engine.errors import UserError
from mvlm_engine.isolation import ISOLATE_FROM_REPO
from release.trust import TRUST_FLAG, TRUST_HELP, vet_folder

PROG = "check_transformers4.py"
PROMPT = "In the beginning God created"
NEW_TOKENS = 20
NOT_MODEL_FILES = {"checkpoints", "tensorboard"}

# Runs in the clean interpreter: prints one JSON line. Tokenizer and model load separately, so
# one failure does not hide the other.
CHILD = ISOLATE_FROM_REPO + r"""
import json, sys, traceback
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, remote, prompt, n_new = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
result = {"version": transformers.__version__}

def failure(err):
    where = traceback.extract_tb(err.__traceback__)[-1]
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]} (at {where.filename}:{where.lineno})"

try:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    result["tokenizer"] = type(tokenizer).__name__
except Exception as err:
    result["tokenizer_error"] = failure(err)
try:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32,
                                                 use_safetensors=True).eval()
    result["model"] = type(model).__name__
except Exception as err:
    result["model_error"] = failure(err)
if "tokenizer" in result and "model" in result:
    try:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        result.update(ids=ids[0].tolist(), greedy=out[0, ids.shape[1]:].tolist(),
                      prompt_logprob=logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum().item())
    except Exception as err:
        result["generate_error"] = failure(err)
print(json.dumps(result))
"""


def model_folders(models_dir: Path) -> list[Path]:
    """--models_dir itself when it is a model folder, else its subfolders that hold a config.json."""
    if (models_dir / "config.json").is_file():
        return [models_dir]
    return sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file())


def needs_remote_code(folder: Path) -> bool:
    kind = kind_of_folder(folder)
    return bool(kind and kind.trust_remote_code)


def run_child(python: str, folder: Path, workdir: Path) -> dict:
    """Load and generate in a clean interpreter (cwd outside the repo, no PYTHONPATH, -I)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Own cache for copied remote code per interpreter: no stale module from the other version.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_MODULES_CACHE=str(workdir / "hf_modules" / str(abs(hash(python)))))
    args = [python, "-I", "-c", CHILD, str(folder), "1" if needs_remote_code(folder) else "0", PROMPT, str(NEW_TOKENS)]
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"model_error": f"interpreter exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])




def patch_for_transformers4(folder: Path) -> list[str]:
    """Edit a copy of a model folder so transformers 4.57 loads it; returns what changed.

    1. tokenizer_config.json: transformers 5 writes tokenizer_class "TokenizersBackend", a class
       4.x lacks; "PreTrainedTokenizerFast" names the same tokenizer in both versions. An explicit
       model_max_length keeps 4.x from taking its "very large" default.
    2. config.json that keeps rope_theta only inside rope_parameters (transformers 5's Llama): 4.x
       reads only the top-level rope_theta and silently falls back to 10000 without it.
    3. hf_model.py (SIM-ONE remote code): import the config base class under either name
       (PreTrainedConfig in 5.x, PretrainedConfig in 4.x), and import every sibling file directly:
       for a local folder, 4.x copies only the files the entry module itself imports.
    """
    changes = []
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") != "PreTrainedTokenizerFast":
            changes.append(f"tokenizer_class {tok.get('tokenizer_class')!r} -> 'PreTrainedTokenizerFast'")
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        kind = kind_of_folder(folder)
        n_ctx = kind.context_length(json.loads((folder / "config.json").read_text())) if kind else None
        if "model_max_length" not in tok and n_ctx:
            changes.append(f"model_max_length -> {n_ctx}")
            tok["model_max_length"] = n_ctx
        tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
    changes += add_top_level_rope_theta(folder / "config.json")
    code = folder / "hf_model.py"
    old = "from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel\n"
    if code.is_file() and old in code.read_text():
        new = ("from transformers import GenerationConfig, GenerationMixin, PreTrainedModel\n"
               "try:  # transformers 5 name; 4.x calls it PretrainedConfig\n"
               "    from transformers import PreTrainedConfig\n"
               "except ImportError:\n"
               "    from transformers import PretrainedConfig as PreTrainedConfig\n")
        siblings = ("from .enhanced_model import SimOneConfig, SimOneModel\n"
                    "from .modern_layers import RMSNorm  # noqa: F401\n"
                    "from .rope_attention import KVCache  # noqa: F401\n")
        text = code.read_text().replace(old, new)
        code.write_text(text.replace("from .enhanced_model import SimOneConfig, SimOneModel\n", siblings))
        changes.append("hf_model.py: try-import PreTrainedConfig, else PretrainedConfig; import "
                       "modern_layers and rope_attention directly")
    return changes


def add_top_level_rope_theta(config_path: Path) -> list[str]:
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is None or "rope_theta" in config:
        return []
    config["rope_theta"] = theta
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [f"config.json: rope_theta {theta} at the top level"]


def copy_model_files(folder: Path, dest_root: Path) -> Path:
    dest = dest_root / folder.name
    dest.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and path.name not in NOT_MODEL_FILES:
            shutil.copyfile(path, dest / path.name)
    return dest


def describe(result: dict) -> str:
    errors = [f"{part} FAILS {result[part + '_error']}" for part in ("tokenizer", "model", "generate")
              if part + "_error" in result]
    if errors:
        return "; ".join(errors)
    return f"loads  {result['tokenizer']} + {result['model']}, greedy {result['greedy']}"


def check_folder(folder: Path, tf4_python: str, workdir: Path) -> bool:
    """Print both versions' results for one folder; True when they load and agree."""
    tf5 = run_child(sys.executable, folder, workdir)
    tf4 = run_child(tf4_python, folder, workdir)
    print(f"\n{folder.name}:")
    for result in (tf5, tf4):
        print(f"  transformers {result.get('version', '?'):8s} {describe(result)}")
    if "greedy" not in tf5 or "greedy" not in tf4:
        return False
    same_tokens = (tf5["ids"], tf5["greedy"]) == (tf4["ids"], tf4["greedy"])
    # Same weights and arithmetic: the prompt's log-probability may differ only by float rounding.
    same_logprob = abs(tf5["prompt_logprob"] - tf4["prompt_logprob"]) <= 1e-4 * max(1.0, abs(tf5["prompt_logprob"]))
    print(f"  same prompt ids and {NEW_TOKENS} greedy tokens: {'yes' if same_tokens else 'NO'}; prompt "
          f"log-probability {tf5['prompt_logprob']:.6f} vs {tf4['prompt_logprob']:.6f}: "
          f"{'same' if same_logprob else 'DIFFERENT'}")
    return same_tokens and same_logprob


def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models_dir", type=Path, required=True, help="a model folder, or a folder of them")
    parser.add_argument("--tf4_python", required=True, help="python of a venv with transformers 4.57")
    parser.add_argument("--apply_fix", action="store_true", help="check patched copies (see patch_for_transformers4)")
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    folders = model_folders(args.models_dir) if args.models_dir.is_dir() else []
    if not folders:
        raise UserError(f"no model folder (with config.json) in {args.models_dir}")
    for folder in folders:
        vet_folder(folder, "--models_dir", args.trust_folder_code)  # before either interpreter loads it
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            if args.apply_fix:
                folder = copy_model_files(folder, Path(tmp) / "patched")
                print(f"\n{folder.name}: patched copy: {'; '.join(patch_for_transformers4(folder)) or 'no change'}")
            ok &= check_folder(folder, args.tf4_python, Path(tmp))
    print(f"\n{'every folder loads under both versions with the same greedy tokens' if ok else 'MISMATCH or failure'}")
    return 0 if ok else 1


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
