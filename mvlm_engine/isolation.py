"""Prove that a model folder loads on its own: the HF Auto classes and a stock text-generation
pipeline, in a fresh interpreter where nothing of this repository is importable, and no module
of it gets loaded along the way."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Prepend to a `python -c` program: drops the editable-install finder and the repository's
# paths, so only site-packages and the model folder itself can provide code.
ISOLATE_FROM_REPO = f"""
import sys
REPO = {str(REPO)!r}
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path = [p for p in sys.path if p and (not p.startswith(REPO) or "site-packages" in p)]

def assert_nothing_of_the_repo_loaded():
    leaked = sorted(name for name, module in list(sys.modules.items())
                    if (getattr(module, "__file__", None) or "").startswith(REPO + "/")
                    and "site-packages" not in module.__file__)
    if leaked:
        raise SystemExit("modules of the repository were loaded: " + ", ".join(leaked))
"""

# Loads a folder with the Auto classes, then reports the prompt's ids, the last position's
# logits and a greedy continuation. With batch prompts, also a stock text-generation pipeline on
# the folder, its tokenizer padding on the left: greedy text for the batch prompts in one batch of
# 2, then one call per prompt. argv: folder, trust_remote_code (0/1), prompt, new tokens, batch
# prompts (a JSON list, [] for none).
CLEAN_LOAD = ISOLATE_FROM_REPO + r"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, remote, prompt, new_tokens = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
batch_prompts = json.loads(sys.argv[5])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32,
                                             use_safetensors=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0]
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
result = {"ids": ids[0].tolist(), "logits": logits.tolist(), "greedy_ids": greedy[0, ids.shape[1]:].tolist(),
          "text": tokenizer.decode(greedy[0, ids.shape[1]:])}
if batch_prompts:
    from transformers import pipeline
    generator = pipeline("text-generation", model=folder, trust_remote_code=remote, dtype=torch.float32, device="cpu",
                         model_kwargs={"use_safetensors": True})
    generator.tokenizer.padding_side = "left"
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    result["pipeline"] = {
        "batched": [out[0]["generated_text"] for out in generator(batch_prompts, batch_size=2, **options)],
        "single": [generator(p, **options)[0]["generated_text"] for p in batch_prompts],
        "prompt_tokens": [len(generator.tokenizer(p).input_ids) for p in batch_prompts]}
assert_nothing_of_the_repo_loaded()
print(json.dumps(result))
"""


def load_in_clean_interpreter(folder: Path, prompt: str, trust_remote_code: bool = False, new_tokens: int = 20,
                              timeout: float = 600, batch_prompts: list[str] | None = None) -> dict:
    """Load `folder` in a fresh interpreter with nothing of this repository importable.

    Returns {"ids", "logits" (T, V), "greedy_ids", "text"}. With batch_prompts, also "pipeline":
    a stock `pipeline("text-generation", model=folder)`, its tokenizer padding on the left, run
    greedy on batch_prompts as one batch (batch_size=2) and once per prompt: {"batched": [text],
    "single": [text], "prompt_tokens": [count]}; equal lists mean padding changed nothing.
    Raises RuntimeError with the last line of the child's stderr when it fails.
    """
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(folder), "1" if trust_remote_code else "0", prompt,
                           str(new_tokens), json.dumps(batch_prompts or [])], cwd=folder, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=clean_environment())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"loading {folder} alone failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def clean_environment() -> dict:
    """This process's environment without PYTHONPATH (which could point into the repository)."""
    import os
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
