#!/usr/bin/env python3
"""Try a trained model: continue prompts, printing the text as it comes.

    python3 generate.py --model models/simone_enhanced "[KJV] John 3:16" "In the beginning"
    python3 generate.py --model models/mvlm_gpt2 --temperature 0 --max_new_tokens 40 "[WEB] Genesis 1:1"
    python3 generate.py --model models/simone_enhanced --trace --temperature 0 "[KJV] John 3:16"
    python3 generate.py --model models/mvlm_gpt2           # interactive: one prompt per line

--model is any model folder of this project, MVLM-GPT2, SIM-ONE or SIM-ONE's Llama export (told
apart by config.json's model_type: model_registry.py), an unpacked download archive included.
Generation is transformers' own `generate` with a TextStreamer; sampling settings not given here
come from the folder's generation_config.json, and --temperature 0 is greedy decoding. An empty
prompt starts a fresh document. --trace (SIM-ONE) prints the governance record of each continuation as a table: for
every generated token, the policy gate per layer (mean over heads), the attention mass on the
memory tokens per layer (mean over heads) and the logit lens's top token per layer.

A folder is checked before anything of it loads (release/trust.py): modelling code other than this
repository's, a foreign auto_map, a symlink out of the folder or sizes past the limits are refused in
one line, unless --trust_folder_code is given. Weights load from safetensors only.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model_registry import FolderKind, folder_kind, folder_kinds
from mvlm_engine.cli import parse_run_config, run_cli
from mvlm_engine.config import setting
from mvlm_engine.errors import UserError
from release.trust import TRUST_HELP, vet_folder

PROG = "generate.py"


@dataclass
class GenerateSettings:
    model: str | None = setting(None, "model folder (MVLM-GPT2 or SIM-ONE; an unpacked archive works too)", path=True)
    prompt: list[str] = setting(help="prompts to continue (the flag may be left out); none: an interactive prompt",
                                factory=list, positional=True)
    max_new_tokens: int | None = setting(None, "tokens to generate per sample (default: the folder's "
                                               "generation_config.json)")
    temperature: float | None = setting(None, "sampling temperature; 0 = greedy (default: generation_config.json)")
    top_k: int | None = setting(None, "sample among the k likeliest tokens; 0 = off (default: generation_config.json)")
    top_p: float | None = setting(None, "nucleus sampling: the smallest set of tokens holding this probability "
                                        "(default: generation_config.json)")
    repetition_penalty: float | None = setting(None, "> 1 discourages tokens already in the text "
                                                     "(default: generation_config.json)")
    seed: int = setting(0, "random seed: the same seed gives the same samples for a prompt")
    num_samples: int = setting(1, "continuations per prompt")
    trace: bool = setting(False, "SIM-ONE only: print the governance trace of each continuation as a table")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to run the model")
    trust_folder_code: bool = setting(False, TRUST_HELP)

    def problems(self) -> list[str]:
        errors = [] if self.model else ["--model is required: a model folder, e.g. --model models/simone_enhanced"]
        errors += [f"--{name} must be > 0 (got {getattr(self, name)})" for name in ("max_new_tokens", "top_p",
                   "repetition_penalty", "num_samples") if getattr(self, name) is not None and getattr(self, name) <= 0]
        errors += [f"--{name} must be >= 0 (got {getattr(self, name)})" for name in ("temperature", "top_k")
                   if getattr(self, name) is not None and getattr(self, name) < 0]
        if self.top_p is not None and self.top_p > 1:
            errors.append(f"--top_p must be at most 1 (got {self.top_p})")
        if self.temperature == 0 and self.num_samples > 1:
            errors.append("--num_samples > 1 needs sampling: greedy decoding (--temperature 0) gives one continuation")
        return errors


def model_kind(folder: Path) -> FolderKind:
    """The registry's kind of the folder's config.json model_type; bad folders are user errors."""
    if not folder.is_dir():
        raise UserError(f"--model {folder} is not a folder; pass a trained model folder or an unpacked archive")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--model {folder} has no config.json; pass a trained model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--model {folder}: config.json is unreadable ({err.__class__.__name__})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    kind = folder_kind(model_type)
    if kind is None:
        raise UserError(f"--model {folder} holds a {model_type!r} model; this tool runs "
                        f"{', '.join(folder_kinds())} folders")
    return kind


class Session:
    """A loaded model and tokenizer, and the generation options every prompt uses."""

    def __init__(self, s: GenerateSettings):
        folder = Path(s.model)
        self.kind, self.settings = model_kind(folder), s
        if s.trace and not self.kind.trace:
            traced = " or ".join(k.display_name for k in folder_kinds().values() if k.trace)
            raise UserError(f"--trace needs a {traced} model; {folder} is {self.kind.display_name}")
        vet_folder(folder, "--model", s.trust_folder_code)  # before anything of the folder can run
        import torch  # after the checks: a bad folder is reported without waiting for torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # The terminal is for the text: no loading bars, and no padding notices (one prompt, never padded).
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        remote = self.kind.trust_remote_code  # its modelling code ships in the folder
        device = "cuda" if s.device != "cpu" and torch.cuda.is_available() else "cpu"
        if s.device == "cuda" and device == "cpu":
            raise UserError("--device cuda: no CUDA GPU is visible")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32,
                                                          use_safetensors=True).to(device).eval()  # never a pickle
        self.options = generation_options(s, self.model.generation_config)
        self.options["pad_token_id"] = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def continue_prompt(self, prompt: str) -> None:
        """Stream each sample of a continuation of `prompt` to stdout (and its trace table)."""
        import torch
        from transformers import TextStreamer

        ids = self.tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.tensor(
            [[self.tokenizer.eos_token_id]])  # an empty prompt: the start of a fresh document
        ids = ids.to(self.model.device)
        options = {**self.options, **self.room(ids.shape[1])}
        if self.settings.trace:  # SIM-ONE's generate returns the trace beside the tokens
            options["trace"] = True
        torch.manual_seed(self.settings.seed)  # per prompt: its samples do not depend on the prompts before it
        for sample in range(self.settings.num_samples):
            if self.settings.num_samples > 1:
                print(f"--- sample {sample + 1} of {self.settings.num_samples}", flush=True)
            streamer = TextStreamer(self.tokenizer, skip_prompt=not prompt, skip_special_tokens=True)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **options)
            if self.settings.trace:
                print(trace_table(out.trace, out.sequences[0].tolist(), ids.shape[1], self.tokenizer), flush=True)

    def room(self, prompt_tokens: int) -> dict:
        """{"max_new_tokens": n}, cut to what the model's context leaves after the prompt."""
        context = self.model.config.max_position_embeddings
        if prompt_tokens >= context:
            raise UserError(f"the prompt has {prompt_tokens} tokens; the model reads at most {context}")
        wanted = self.options.get("max_new_tokens") or self.model.generation_config.max_new_tokens
        if wanted is None:  # a folder without the setting: transformers' own max_length applies
            return {}
        if wanted > context - prompt_tokens:
            print(f"{PROG}: {wanted} new tokens do not fit the {context}-token context after the prompt; "
                  f"generating {context - prompt_tokens}", file=sys.stderr)
        return {"max_new_tokens": min(wanted, context - prompt_tokens)}


def generation_options(s: GenerateSettings, defaults) -> dict:
    """The flags given, over the folder's generation_config.json (`defaults`); temperature 0 = greedy."""
    options = {name: getattr(s, name) for name in ("max_new_tokens", "top_k", "top_p", "repetition_penalty")
               if getattr(s, name) is not None}
    if s.temperature == 0:
        # Greedy: drop the sampling settings too, so transformers has nothing to warn about.
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    elif s.temperature is not None:
        options.update(do_sample=True, temperature=s.temperature)
    if s.num_samples > 1 and not options.get("do_sample", defaults.do_sample):
        raise UserError("--num_samples > 1 needs sampling; this folder's generation_config.json decodes greedily: "
                        "pass a --temperature above 0")
    return options


def trace_table(trace: dict, tokens: list[int], prompt_len: int, tokenizer) -> str:
    """SIM-ONE's governance trace of one continuation as a Markdown table, one row per generated
    token: the trace position that predicted it (t - 1 predicts token t)."""
    layers = trace["lens_top_ids"].shape[0]
    header = ["pos", "token"]
    header += [f"gate L{i}" for i in range(layers)] if "policy_gate" in trace else []
    header += [f"memory L{i}" for i in range(layers)] if "memory_mass" in trace else []
    header.append("logit lens top-1, layer 0 .. last")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for t in range(prompt_len, len(tokens)):
        row = [str(t), repr(tokenizer.decode([tokens[t]]))]
        for key in ("policy_gate", "memory_mass"):
            if key in trace:
                row += [f"{v:.2f}" for v in trace[key][:, 0, t - 1].float().mean(-1).tolist()]
        lens = [tokenizer.decode([i]) for i in trace["lens_top_ids"][:, 0, t - 1, 0].tolist()]
        row.append(" / ".join(repr(w)[1:-1] for w in lens))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def interactive(session: Session) -> None:
    """One prompt per line until end of input (Ctrl-D); an empty line starts a fresh document."""
    print(f"{session.kind.display_name} from {session.settings.model}: type a prompt and press Enter "
          "(Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            prompt = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        session.continue_prompt(prompt)


def main(argv=None) -> int:
    """Parse and check the flags, load the model, then continue each prompt or read prompts."""
    settings = parse_run_config(GenerateSettings, argv, PROG, __doc__)
    session = Session(settings)
    if not settings.prompt:
        interactive(session)
    for prompt in settings.prompt:
        session.continue_prompt(prompt)
    return 0


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
