#!/usr/bin/env python3
"""Validate the trained models and their download archives.

    python3 validate_models.py [--models_dir models] [--data_dir mvlm_training_dataset_complete]
                               [--download_dir models_for_download] [--json]

For each model folder in --models_dir (--names, or every folder holding a model):
  integrity      expected files present, size and sha256 as in model_manifest.json
  sizes          bytes of every model file
  loading        AutoModelForCausalLM + AutoTokenizer from the folder alone, in a clean
                 subprocess where nothing of this repo imports; logits equal in-process ones
  padded batch   a stock text-generation pipeline in such a subprocess, tokenizer padding on
                 the left: two prompts of different lengths in one batch give the text of one
                 call each
  generation     fixed prompts, greedy with and without the KV cache (must agree) and sampled
                 with the folder's own generation_config.json; decode tokens/s; distinct-n
  quality        held-out loss and bits per byte (the trainer's own evaluation code)
  verse recall   "[KJV] John 3:16"-style prompts on training books, greedy: token accuracy,
                 exact match
  retrieval@1    parallel held-out verses, mean-pooled last hidden states
  trace          (SIM-ONE) a generation trace: gates, memory attention, logit lens -> JSON
and the downloads in --download_dir: every file SHA256SUMS lists (the archives and the .gguf
files packaging writes beside them) matches its sum, each archive is a readable tar.gz holding
the weights and no checkpoints. Writes validation_report.json,
validation_report.md and two PNG plots to --models_dir, and a model card (README.md, its figures
from this report) into each model folder that passed; exits 1 naming every failed check.
--no_archives checks the models only; --archives_only then adds the archives to the same report
(train_all_models.py packages in between, so that the archives hold the cards). Before anything of a
folder loads, it is checked as one from elsewhere would be (release/trust.py); a folder that fails is
refused in one line unless --trust_folder_code is given.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from mvlm_engine.env import apply_training_env

apply_training_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model_registry import FolderKind, folder_kind, folder_kinds  # noqa: E402
from mvlm_engine.cli import parse_run_config, run_cli  # noqa: E402
from mvlm_engine.config import setting, upper_limit_problems  # noqa: E402
from mvlm_engine.corpus import load_corpus  # noqa: E402
from mvlm_engine.errors import UserError  # noqa: E402
from mvlm_engine.evaluation import evaluate  # noqa: E402
from mvlm_engine.fileio import atomic_write_text, folder_problem, read_json_object  # noqa: E402
from mvlm_engine.isolation import load_in_clean_interpreter  # noqa: E402
from mvlm_engine.locks import lock_folder  # noqa: E402
from mvlm_engine.logs import get_logger  # noqa: E402
from mvlm_engine.packaging import MODEL_MANIFEST, archive_listing, check_model_manifest, check_sha256sums  # noqa: E402
from mvlm_engine.parallel_verses import ParallelVerses, mean_pool, retrieval_at_1  # noqa: E402
from mvlm_engine.runtime import Runtime  # noqa: E402
from mvlm_engine.tokenizer import token_byte_lengths  # noqa: E402
from release import DEFAULT_CARD_LICENSE, SAMPLE_PROMPT  # noqa: E402
from release.card import write_model_card  # noqa: E402
from release.trust import TRUST_HELP, vet_folder  # noqa: E402

PROG = "validate_models.py"
REPO = Path(__file__).resolve().parent
REQUIRED = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
PROMPTS = [SAMPLE_PROMPT, "[WEB] Genesis 1:1", "[ASV] Psalms 23:1", "In the beginning"]
# Two prompts of different token lengths, so that a batch of them is padded.
PADDED_BATCH = ["In the beginning God created the heaven and the earth.", SAMPLE_PROMPT]
GENERATE_TOKENS = 48


log = get_logger("validate")


@dataclass
class ValidationSettings:
    models_dir: str = setting("models", "folder of the trained models", path=True)
    names: list[str] = setting(help="model folders to check (default: every folder of --models_dir with a "
                                    "config.json or a model manifest)", factory=list)
    data_dir: str = setting("mvlm_training_dataset_complete", "the corpus (held-out text, verses)", path=True)
    download_dir: str = setting("models_for_download", "folder of the archives and SHA256SUMS", path=True)
    no_archives: bool = setting(False, "skip the archive checks")
    archives_only: bool = setting(False, "check only the archives, adding them to the existing report")
    card_license: str = setting(DEFAULT_CARD_LICENSE, "licence (a Hugging Face licence id) in the model cards' front matter; "
                                           "the corpus is public domain, the weights' terms are the owner's choice")
    eval_windows: int = setting(64, "held-out windows for loss / bits per byte")
    recall_verses: int = setting(40, "training verses prompted for recall")
    retrieval_pairs: int = setting(200, "held-out parallel verse pairs for retrieval@1")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to run the models")
    json: bool = setting(False, "print the JSON report to stdout")
    trust_folder_code: bool = setting(False, TRUST_HELP)

    def problems(self) -> list[str]:
        errors = [f"--{name} must be > 0 (got {getattr(self, name)})"
                  for name in ("eval_windows", "recall_verses", "retrieval_pairs") if getattr(self, name) <= 0]
        errors += upper_limit_problems(self, {"eval_windows": 10 ** 6, "recall_verses": 10 ** 5,
                                              "retrieval_pairs": 10 ** 5})
        errors += [f"--names: {name!r} is not a folder name" for name in self.names
                   if not name or Path(name).name != name or name in (".", "..")]
        if self.no_archives and self.archives_only:
            errors.append("--no_archives and --archives_only exclude each other")
        problem = folder_problem(Path(self.models_dir), "--models_dir")
        return errors + ([problem] if problem else [])


class Report:
    """Checks (pass/fail with the file concerned) and metrics for one model or the archives."""

    def __init__(self, name: str):
        self.name, self.checks, self.metrics = name, [], {}

    def check(self, check: str, passed: bool, detail: str) -> bool:
        self.checks.append({"check": check, "passed": bool(passed), "detail": detail})
        return passed

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "checks": self.checks, "metrics": self.metrics}


class LoadedModel:
    """One interface over every folder kind of the model registry, each loaded by the Auto classes
    (trust_remote_code where its kind ships its modelling code)."""

    def __init__(self, folder: Path, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = json.loads((folder / "config.json").read_text())
        self.kind: FolderKind = folder_kind(self.config.get("model_type"))
        if self.kind is None:
            raise ValueError(f"model_type {self.config.get('model_type')!r} is none of {', '.join(folder_kinds())}")
        self.remote = self.kind.trust_remote_code
        self.hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=self.remote, dtype=torch.float32,
                                                       use_safetensors=True)  # never a pickled .bin
        self.hf.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=self.remote)
        self.device = device
        self.block_size = self.kind.context_length(self.config)
        self.eos = self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(ids).logits

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, D) after the last norm: what the LM head reads."""
        return self.hf(ids, output_hidden_states=True).hidden_states[-1]

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True, sample: bool = False,
                 seed: int = 0, **options):
        """Greedy, or sampled with the folder's generation_config.json (its sampling defaults), within
        the model's context (GPT-2 has no position past its block size: an IndexError, not a result)."""
        torch.manual_seed(seed)
        max_new_tokens = max(1, min(max_new_tokens, self.block_size - ids.shape[1]))
        return self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=sample, use_cache=use_cache, pad_token_id=self.eos, **options)

    def sampling(self) -> str:
        c = self.hf.generation_config
        return f"temperature {c.temperature}, top-p {c.top_p}, top-k {c.top_k}, repetition penalty {c.repetition_penalty}"


def check_loading_alone(report: Report, folder: Path, model: LoadedModel) -> None:
    """The Auto classes and a stock pipeline in a clean interpreter: same logits as here, and a
    left-padded batch that gives the text of one call per prompt."""
    try:
        result = load_in_clean_interpreter(folder, PROMPTS[0], model.remote, new_tokens=12, batch_prompts=PADDED_BATCH)
    except RuntimeError as err:
        report.check("loading", False, str(err))
        return
    with torch.no_grad():
        ours = model.logits(torch.tensor([result["ids"]], device=model.device))[0, -1].float().cpu()
    difference = (ours - torch.tensor(result["logits"][-1])).abs().max().item()
    # fp32 on a GPU and on the CPU round differently; relative to the logits' scale.
    tolerance = (1e-3 if model.device.type == "cuda" else 1e-4) * max(1.0, ours.abs().max().item())
    report.check("loading", difference <= tolerance, f"{folder}: loaded alone by the HF Auto classes"
                 f"{' (trust_remote_code)' if model.remote else ''}; max logit difference {difference:.2e} "
                 f"(tolerance {tolerance:.1e})")
    texts = result["pipeline"]
    same = texts["batched"] == texts["single"]
    report.check("padded batch", same, f"{folder}: stock text-generation pipeline, left padding, batch of 2 "
                 f"(prompts of {texts['prompt_tokens']} tokens): {'same text as' if same else 'DIFFERENT text from'} "
                 "one call per prompt")


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def check_generation(report: Report, folder: Path, model: LoadedModel) -> None:
    samples, greedy_agree, timings = {}, True, {"cache": 0.0, "no_cache": 0.0}
    new_tokens = {"cache": 0, "no_cache": 0}
    sampled_tokens = []
    for index, prompt in enumerate(PROMPTS):
        ids = torch.tensor([model.encode(prompt)], device=model.device)
        outputs = {}
        for mode, use_cache in (("cache", True), ("no_cache", False)):
            start = time.perf_counter()
            outputs[mode] = model.generate(ids, GENERATE_TOKENS, use_cache=use_cache)
            timings[mode] += time.perf_counter() - start
            new_tokens[mode] += outputs[mode].shape[1] - ids.shape[1]
        greedy_agree &= torch.equal(outputs["cache"], outputs["no_cache"])
        sampled = model.generate(ids, GENERATE_TOKENS, sample=True, seed=index)[0, ids.shape[1]:].tolist()
        sampled_tokens.append(sampled)
        samples[prompt] = {"greedy": model.tokenizer.decode(outputs["cache"][0, ids.shape[1]:]),
                           "sampled": model.tokenizer.decode(sampled)}
    report.metrics["generation"] = {
        "samples": samples, "decode_tokens_per_s_cache": new_tokens["cache"] / timings["cache"],
        "decode_tokens_per_s_no_cache": new_tokens["no_cache"] / timings["no_cache"],
        "distinct_1": distinct_n(sampled_tokens, 1), "distinct_2": distinct_n(sampled_tokens, 2),
        "sampling": model.sampling()}
    report.check("generation", greedy_agree, f"{folder}: greedy generation with and without the KV cache "
                 f"{'agrees' if greedy_agree else 'DIFFERS'} on {len(PROMPTS)} prompts")


def check_quality(report: Report, folder: Path, model: LoadedModel, corpus, args) -> None:
    tokenizer = model.tokenizer.backend_tokenizer
    tokens = []
    for encoding in tokenizer.encode_batch(list(corpus.documents("val")), add_special_tokens=False):
        tokens += encoding.ids + [model.eos]
    tokens = np.asarray(tokens, dtype=np.int64)
    runtime = Runtime(0, 0, 1, model.device, "fp32", False)
    lengths = torch.as_tensor(token_byte_lengths(tokenizer), device=model.device)
    result = evaluate(model.hf, lambda m, x: m(x).logits, tokens, model.block_size, args.eval_windows, 8, runtime,
                      lengths)
    report.metrics["held_out"] = {**result, "windows": min(args.eval_windows, (len(tokens) - 1) // model.block_size),
                                  "block_size": model.block_size}
    vocab = len(model.tokenizer)
    report.check("quality", math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(vocab),
                 f"{folder}: held-out loss {result['val_loss']:.4f} (uniform guess {math.log(vocab):.2f}), "
                 f"{result['val_bpb']:.4f} bits/byte")


@torch.no_grad()
def measure_verse_recall(report: Report, model: LoadedModel, train_verses: ParallelVerses, count: int) -> None:
    rng = np.random.default_rng(0)
    token_hits = token_total = exact = 0
    examples = []
    for index in rng.choice(len(train_verses), size=min(count, len(train_verses)), replace=False):
        book, chapter, verse = train_verses.references[index]
        translation = sorted(train_verses.texts[index])[0] if "KJV" not in train_verses.texts[index] else "KJV"
        prompt = f"[{translation}] {book} {chapter}:{verse}"
        ids = torch.tensor([model.encode(prompt)], device=model.device)
        # at most 64 tokens, and no more than fit the context after the prompt (a small --block_size)
        target = model.encode(" " + train_verses.texts[index][translation])[:min(64, model.block_size - ids.shape[1])]
        generated = model.generate(ids, len(target))[0, ids.shape[1]:].tolist()
        hits = sum(a == b for a, b in zip(generated, target))
        token_hits, token_total = token_hits + hits, token_total + len(target)
        exact += generated[:len(target)] == target
        if len(examples) < 3:
            examples.append({"prompt": prompt, "expected": model.tokenizer.decode(target),
                             "generated": model.tokenizer.decode(generated)})
    report.metrics["verse_recall"] = {"verses": min(count, len(train_verses)), "token_accuracy": token_hits / token_total,
                                      "exact_match": exact / min(count, len(train_verses)), "examples": examples}


def measure_retrieval(report: Report, model: LoadedModel, val_verses: ParallelVerses, pairs: int) -> None:
    first, second = val_verses.sample(np.random.default_rng(0), pairs)
    score = retrieval_at_1(lambda ids, mask: mean_pool(model.hidden(ids.to(model.device)), mask.to(model.device)),
                           model.tokenizer.backend_tokenizer, first, second, 64, model.eos)
    report.metrics["retrieval_at_1"] = {"score": score, "pairs": len(first), "chance": 1 / len(first)}


def write_trace(report: Report, model: LoadedModel, out: Path) -> None:
    from simone_transformer import trace_to_jsonable

    ids = torch.tensor([model.encode(PROMPTS[0])], device=model.device)
    result = model.generate(ids, 8, trace=True)  # the trace rides along transformers' own generate
    trace = {"prompt": PROMPTS[0], "tokens": result.sequences[0].tolist(),
             "text": model.tokenizer.decode(result.sequences[0]), "trace": trace_to_jsonable(result.trace)}
    atomic_write_text(out, json.dumps(trace) + "\n")
    report.metrics["trace_file"] = str(out)


def validate_model(folder: Path, corpus, train_verses, val_verses, device, args) -> Report:
    report = Report(folder.name)
    problems = check_model_manifest(folder, REQUIRED)
    report.check("integrity", not problems, "; ".join(problems) or f"{folder}: every file matches {MODEL_MANIFEST}")
    report.metrics["sizes"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                               if p.is_file() and not p.name.startswith(".")}
    if problems:
        return report  # loading a damaged model would only repeat the same failure
    try:
        model = LoadedModel(folder, device)
    except Exception as err:  # noqa: BLE001  (a damaged folder fails this check; it must not crash the run)
        report.check("loading", False, f"{folder}: cannot be loaded ({type(err).__name__}: "
                                       f"{(str(err).splitlines() or [''])[0][:200]})")
        return report
    check_loading_alone(report, folder, model)
    check_generation(report, folder, model)
    check_quality(report, folder, model, corpus, args)
    measure_verse_recall(report, model, train_verses, args.recall_verses)
    measure_retrieval(report, model, val_verses, args.retrieval_pairs)
    if model.kind.trace:
        write_trace(report, model, Path(args.models_dir) / f"validation_trace_{folder.name}.json")
    history = folder / "training_history.json"
    if history.is_file():
        report.metrics["history"] = json.loads(history.read_text())
    return report


def check_archives(download_dir: Path, names: list[str]) -> Report:
    report = Report("archives")
    problems = check_sha256sums(download_dir)
    report.check("archives", not problems, "; ".join(problems) or f"{download_dir}: SHA256SUMS matches")
    for name in names:
        archive = download_dir / f"{name}.tar.gz"
        if not archive.is_file():
            report.check("archives", False, f"{archive}: missing")
        elif not problems:
            members = archive_listing(archive)
            has_weights = f"{name}/model.safetensors" in members
            no_checkpoints = not any("/checkpoints/" in m for m in members)
            report.check("archive contents", has_weights and no_checkpoints,
                         f"{archive}: {len(members)} files, weights {'present' if has_weights else 'MISSING'}, "
                         f"{'no step checkpoints' if no_checkpoints else 'CONTAINS checkpoints'}")
    return report


def write_outputs(reports: list[Report], out: Path, started: str, archives_only: bool) -> dict:
    """The report files; with --archives_only the models' part of the earlier report stays as it was."""
    models = {r.name: r.to_dict() for r in reports}
    histories = {r.name: r.metrics.pop("history") for r in reports if "history" in r.metrics}
    if archives_only:
        previous = read_json_object(out / "validation_report.json")
        models = {**{k: v for k, v in previous.get("models", {}).items() if k != "archives"}, **models}
        started = previous.get("date", started)
    data = {"date": started, "passed": all(m["passed"] for m in models.values()), "models": models}
    atomic_write_text(out / "validation_report.json", json.dumps(data, indent=1) + "\n")
    atomic_write_text(out / "validation_report.md", markdown(data))
    if not archives_only:
        plot_outputs(histories, data, out)
    return data


def markdown(data: dict) -> str:
    models = {name: m for name, m in data["models"].items() if name != "archives"}
    lines = [f"# Validation report ({data['date']})", "", f"Overall: **{'PASSED' if data['passed'] else 'FAILED'}**",
             "", "| metric | " + " | ".join(models) + " |", "| --- |" + " ---: |" * len(models)]

    def row(label, getter):
        values = []
        for m in models.values():
            try:
                values.append(getter(m["metrics"]))
            except (KeyError, TypeError):
                values.append("n/a")
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("held-out loss (nats/token)", lambda m: f"{m['held_out']['val_loss']:.4f}")
    row("held-out bits per byte", lambda m: f"{m['held_out']['val_bpb']:.4f}")
    row("verse recall token accuracy", lambda m: f"{m['verse_recall']['token_accuracy']:.3f}")
    row("verse recall exact match", lambda m: f"{m['verse_recall']['exact_match']:.3f}")
    row("parallel-verse retrieval@1", lambda m: f"{m['retrieval_at_1']['score']:.3f} (chance {m['retrieval_at_1']['chance']:.3f})")
    row("decode tokens/s, KV cache", lambda m: f"{m['generation']['decode_tokens_per_s_cache']:.1f}")
    row("decode tokens/s, no cache", lambda m: f"{m['generation']['decode_tokens_per_s_no_cache']:.1f}")
    row("distinct-2 of samples", lambda m: f"{m['generation']['distinct_2']:.3f}")
    row("model.safetensors bytes", lambda m: f"{m['sizes']['model.safetensors']:,}")
    lines += ["", "## Checks", "", "| model | check | result | detail |", "| --- | --- | --- | --- |"]
    for name, model in data["models"].items():
        for c in model["checks"]:
            lines.append(f"| {name} | {c['check']} | {'pass' if c['passed'] else 'FAIL'} | {c['detail']} |")
    for name, model in models.items():
        samples = model["metrics"].get("generation", {}).get("samples", {})
        if samples:
            lines += ["", f"## Samples: {name}", ""]
            lines += [f"- `{p}` greedy: {s['greedy']!r}\n  sampled: {s['sampled']!r}" for p, s in samples.items()]
    return "\n".join(lines) + "\n"


def plot_outputs(histories: dict, data: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        ax.plot([r["step"] for r in history["train"]], [r["loss"] for r in history["train"]], label=f"{name} train")
        ax.plot([r["step"] for r in history["eval"]], [r["val_loss"] for r in history["eval"]], "o--",
                label=f"{name} held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token; tokenizers differ)", title="Loss curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "validation_loss_curves.png", dpi=110)
    plt.close(fig)

    models = {n: m["metrics"] for n, m in data["models"].items() if "held_out" in m["metrics"]}
    panels = [("held-out bits/byte", lambda m: m["held_out"]["val_bpb"]),
              ("verse recall token acc.", lambda m: m["verse_recall"]["token_accuracy"]),
              ("retrieval@1", lambda m: m["retrieval_at_1"]["score"]),
              ("decode tok/s (cache)", lambda m: m["generation"]["decode_tokens_per_s_cache"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, getter) in zip(axes, panels):
        ax.bar(list(models), [getter(m) for m in models.values()], color=["C0", "C1", "C2"][:len(models)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "validation_metrics.png", dpi=110)
    plt.close(fig)


def model_folders(models_dir: Path, names: list[str]) -> list[Path]:
    """The folders to validate: those named, or every folder holding a model."""
    if not models_dir.is_dir():
        raise UserError(f"--models_dir {models_dir} does not exist; train the models first")
    if names:
        missing = [n for n in names if not (models_dir / n).is_dir()]
        if missing:
            raise UserError(f"no model folder {', '.join(missing)} in {models_dir}; train the models first")
        return [models_dir / n for n in names]
    folders = sorted(p for p in models_dir.iterdir()
                     if p.is_dir() and ((p / "config.json").is_file() or (p / MODEL_MANIFEST).is_file()))
    if not folders:
        raise UserError(f"no model folder in {models_dir}; train the models first")
    return folders


def validate_folders(folders: list[Path], args: ValidationSettings, started: str) -> list[Report]:
    """Validate each model folder; give each one that passed its model card, from these figures."""
    corpus = load_corpus(args.data_dir)
    train_verses, val_verses = ParallelVerses.of_splits(args.data_dir, ("train", "val"))
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    reports = []
    for folder in folders:
        log.info(f"{folder}")
        report = validate_model(folder, corpus, train_verses, val_verses, device, args)
        reports.append(report)
        if report.passed:
            card = write_model_card(folder, {"date": started, **report.to_dict()}, corpus.manifest, args.card_license)
            log.info(f"model card: {card}")
    return reports


def main(argv=None) -> int:
    args = parse_run_config(ValidationSettings, argv, PROG, __doc__)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    models_dir = Path(args.models_dir)
    folders = model_folders(models_dir, args.names)
    if not args.archives_only:  # before anything of a folder can run
        for folder in folders:
            vet_folder(folder, "--models_dir", args.trust_folder_code)
    locks = [lock_folder(folder, "validate_models.py validation") for folder in folders]  # noqa: F841 (held)
    reports = [] if args.archives_only else validate_folders(folders, args, started)
    if not args.no_archives:
        reports.append(check_archives(Path(args.download_dir), [f.name for f in folders]))
    data = write_outputs(reports, models_dir, started, args.archives_only)
    if args.json:
        print(json.dumps(data, indent=1))
    failed = [(r.name, c) for r in reports for c in r.checks if not c["passed"]]
    for name, check in failed:
        print(f"{PROG}: FAILED {check['check']} ({name}): {check['detail']}", file=sys.stderr)
    log.info(f"{'FAILED' if failed else 'passed'}: report in {models_dir / 'validation_report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
