"""Model folders as users get them: sampling defaults, model cards, manifests, download archives
and their checksums.

Every exporter writes GENERATION_DEFAULTS into the folder's generation_config.json. At the end
of training every model directory gets `model_manifest.json`: sha256 and size of each
top-level file; validation adds the model card (`write_model_card`). `package_model` turns the final model (not checkpoints/ or tensorboard/)
into a reproducible .tar.gz; `SHA256SUMS` and DOWNLOAD.md sit beside the archives. Single-file
formats for other clients (`DownloadFormat`) are handed in by the caller by module name
(`--formats`; train_all_models.py names them): each writes `<name><suffix>` beside the archive of
every model it can express and says why not for the others. The check functions return problems
as messages that name the file, for validate_models.py.
"""
from __future__ import annotations

import gzip
import importlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Protocol

from .errors import UserError
from .fileio import (atomic_write_text, ensure_free_space, folder_problem, remove_dead_staging, sha256_file,
                     staging_path, storage_errors)
from .logs import get_logger

log = get_logger("package")

# Sampling defaults for generation_config.json: a bare model.generate(ids) or
# pipeline("text-generation") samples with these; validation's sampled generation and generate.py
# read them back from the folder, so this is their one home. top_k 0 = off (nucleus sampling only).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1,
                       "max_new_tokens": 128}

MODEL_MANIFEST = "model_manifest.json"
NOT_PACKAGED = {"checkpoints", "tensorboard"}
SUMS_NAME = "SHA256SUMS"
COMPRESS_LEVEL = 0


def model_files(model_dir: Path) -> list[Path]:
    """The final model's files: every top-level file except the manifest itself, hidden files
    (the folder's .lock) and staging files."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MODEL_MANIFEST
                  and not p.name.startswith(".") and not p.name.endswith(".tmp"))


def write_model_manifest(model_dir: Path) -> dict:
    manifest = {"files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in model_files(model_dir)}}
    atomic_write_text(model_dir / MODEL_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check_model_manifest(model_dir: Path, required: tuple[str, ...]) -> list[str]:
    """Missing required files, and files whose size or sha256 differs from the manifest."""
    problems = [f"{model_dir / name}: missing" for name in required if not (model_dir / name).is_file()]
    manifest_path = model_dir / MODEL_MANIFEST
    if not manifest_path.is_file():
        return problems + [f"{manifest_path}: missing (written at the end of training)"]
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return problems + [f"{manifest_path}: corrupt"]
    for name, entry in sorted(recorded.items()):
        path = model_dir / name
        if not path.is_file():
            if name not in required:
                problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def package_model(model_dir: Path, archive: Path) -> Path:
    """A reproducible .tar.gz of the final model (same files, same bytes, same archive)."""
    with storage_errors(archive.parent, "creating"):
        archive.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(archive.parent)
    members = [p for p in sorted(model_dir.iterdir()) if p.is_file() and p.name not in NOT_PACKAGED
               and not p.name.startswith(".") and not p.name.endswith(".tmp")]
    size = sum(p.stat().st_size for p in members)
    needed = size + size // 1000 + 2048 * (len(members) + 2)  # stored: tar headers and gzip block overhead
    ensure_free_space(archive.parent, needed, f"the archive {archive.name}")
    tmp = staging_path(archive)
    try:
        with storage_errors(archive, "writing", needed):
            # Level 0 (stored blocks): gzip -9 shrinks fp32/bf16 weights by ~7% at ~10 MB/s (RESULTS.md), minutes
            # of a rented GPU box for a 1 GB model; stored blocks keep the .tar.gz every client opens, at disk speed.
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="",
                                                       compresslevel=COMPRESS_LEVEL) as zipped, \
                    tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in members:
                    info = tar.gettarinfo(str(path), arcname=f"{model_dir.name}/{path.name}")
                    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
            os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return archive


def write_sha256sums(folder: Path, files: list[Path]) -> Path:
    lines = "".join(f"{sha256_file(a)}  {a.name}\n" for a in sorted(files))
    atomic_write_text(folder / SUMS_NAME, lines)
    return folder / SUMS_NAME


def check_sha256sums(folder: Path) -> list[str]:
    """Every file listed in SHA256SUMS exists and matches its sum; each archive is a readable tar.gz."""
    sums = folder / SUMS_NAME
    if not sums.is_file():
        return [f"{sums}: missing"]
    problems = []
    for line in sums.read_text().splitlines():
        expected, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from {sums.name}")
        elif name.endswith(".tar.gz"):
            try:
                with tarfile.open(path, "r:gz") as tar:
                    tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append(f"{path}: not a readable .tar.gz ({err})")
    return problems


def archive_listing(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        return [m.name for m in tar.getmembers()]


def write_download_md(folder: Path, models: dict[str, dict]) -> Path:
    """DOWNLOAD.md: how to verify and load each packaged model. models: name -> info."""
    out = io.StringIO()
    out.write("# Model downloads\n\nVerify every file listed in SHA256SUMS (the archives and any single-file "
              "formats below), unpack, and load with transformers:\n\n```bash\nsha256sum -c SHA256SUMS\n")
    for name in models:
        out.write(f"tar -xzf {name}.tar.gz\n")
    out.write("```\n")
    for name, info in models.items():
        out.write(download_section(name, info))
    atomic_write_text(folder / "DOWNLOAD.md", out.getvalue())
    return folder / "DOWNLOAD.md"


def download_section(name: str, info: dict) -> str:
    """One model's part of DOWNLOAD.md: the archive, transformers, then each single-file format
    (its usage, or one line saying why this model has none)."""
    remote = ", trust_remote_code=True" if info.get("trust_remote_code") else ""
    text = (f"\n## {name}\n\n{info.get('description', '')}\n\n"
            f"- archive: `{name}.tar.gz` ({info['archive_bytes']:,} bytes)\n"
            f"- files: {', '.join(info['files'])}\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})\n'
            'ids = tokenizer("[KJV] John 3:16", return_tensors="pt").input_ids\n'
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_p=0.9)[0]))\n"
            "```\n")
    for single in info.get("formats", []):
        if single["file"]:
            text += f"\n- `{single['suffix']}` file: `{single['file']}` ({single['bytes']:,} bytes)\n\n{single['usage']}"
        else:
            text += f"\n- no `{single['suffix']}` file: {single['reason']}\n"
    return text


# --------------------------------------------------------------------------- model card


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing or unreadable (a card leaves the row out)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def write_model_card(model_dir: Path, validation: dict, corpus_manifest: dict | None, license_id: str) -> Path:
    """README.md in `model_dir`: a Hugging Face model card. Every figure in it comes from this run's
    own files (run_summary.json, train_config.json, generation_config.json) or from `validation`,
    the model's entry of validation_report.json as just measured ({"date", "passed", "checks",
    "metrics"}); the corpus part from the corpus manifest."""
    config = read_json(model_dir / "config.json")
    tags = ["text-generation", "causal-lm", "bible", "trained-from-scratch", config.get("model_type", "custom")]
    if "auto_map" in config:
        tags.append("custom_code")  # the Hub's tag for trust_remote_code models
    lines = ["---", f"license: {license_id}", "language:", "- en", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags],
             "# datasets: none on the Hub; the corpus is built locally from public-domain texts (see Training data)",
             *card_model_index(model_dir.name, validation.get("metrics", {})), "---", ""]
    body = [card_intro(model_dir, "auto_map" in config), card_training(model_dir),
            card_evaluation(validation), card_data(corpus_manifest), CARD_LIMITATIONS]
    path = model_dir / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n\n".join(part for part in body if part) + "\n")
    return path


def card_model_index(name: str, metrics: dict) -> list[str]:
    """The model-index block (the Hub's evaluation results) from validation's held-out figures."""
    held_out, recall = metrics.get("held_out"), metrics.get("verse_recall")
    if not held_out:
        return []
    rows = [("loss", "held-out loss (nats/token)", held_out["val_loss"]),
            ("bits_per_byte", "held-out bits per byte", held_out["val_bpb"])]
    if recall:
        rows.append(("accuracy", "verse recall token accuracy (training verses)", recall["token_accuracy"]))
    if metrics.get("retrieval_at_1"):
        rows.append(("accuracy", "parallel-verse retrieval@1", metrics["retrieval_at_1"]["score"]))
    out = ["model-index:", f"- name: {json.dumps(name)}", "  results:", "  - task:", "      type: text-generation",
           "    dataset:", '      name: "held-out books of the public-domain Bible corpus"', "      type: local",
           "    metrics:"]
    for kind, label, value in rows:
        out += [f"    - type: {kind}", f"      name: {json.dumps(label)}", f"      value: {round(value, 4)}"]
    return out


def card_intro(model_dir: Path, remote_code: bool) -> str:
    """Title, the trainer's description, and how to run it."""
    summary, generation = read_json(model_dir / "run_summary.json"), read_json(model_dir / "generation_config.json")
    remote = ", trust_remote_code=True" if remote_code else ""
    defaults = ", ".join(f"{k} {generation[k]}" for k in ("temperature", "top_p", "repetition_penalty",
                                                         "max_new_tokens") if k in generation)
    return (f"# {model_dir.name}\n\n{summary.get('description', '')}\n\n## How to use\n\n"
            "```python\nfrom transformers import pipeline\n"
            f'generator = pipeline("text-generation", model="{model_dir.name}"{remote})\n'
            'print(generator("[KJV] John 3:16")[0]["generated_text"])\n```\n\n'
            f"generation_config.json samples by default ({defaults}); pass do_sample=False for greedy text. "
            f"From the training repository: `python3 generate.py --model {model_dir.name} \"[KJV] John 3:16\"`."
            + (" The modelling code ships in this folder, hence trust_remote_code." if remote_code else ""))


def card_training(model_dir: Path) -> str:
    """How it was trained: run_summary.json and train_config.json, as written by the trainer."""
    summary, config = read_json(model_dir / "run_summary.json"), read_json(model_dir / "train_config.json")
    if not summary:
        return ""
    rows = [("preset", config.get("preset")), ("optimizer steps", summary.get("steps")),
            ("training tokens seen", summary.get("tokens_seen")),
            ("sequence length", config.get("block_size")), ("vocabulary (byte-level BPE)", config.get("vocab_size")),
            ("non-embedding parameters", summary.get("non_embedding_params")),
            ("optimizer, peak learning rate", f"{config.get('optimizer')}, {config.get('learning_rate')}"),
            ("precision", summary.get("precision")),
            ("devices", f"{summary.get('world_size')} x {summary.get('device')}"),
            ("weights exported: those of step", summary.get("exported_step")),
            ("their held-out loss (trainer's evaluation)", summary.get("final_val_loss")),
            ("the last step's held-out loss", summary.get("last_val_loss")),
            ("wall time of the last training process (s)", summary.get("wall_seconds_this_process"))]
    return "## Training\n\nTrained from scratch (random initialisation, own tokenizer); no pretrained weights.\n\n" \
        + card_table(rows) + "\n\nEvery setting of the run is in train_config.json (`--config` it to reproduce)."


def card_evaluation(validation: dict) -> str:
    """validate_models.py's figures for this model, with the checks it passed."""
    m = validation.get("metrics", {})
    if "held_out" not in m:
        return ""
    held, gen = m["held_out"], m.get("generation", {})
    rows = [("held-out loss (nats/token)", held["val_loss"]), ("held-out bits per byte", held["val_bpb"]),
            ("held-out windows x tokens", f"{held['windows']} x {held['block_size']}")]
    if "verse_recall" in m:
        rows += [("verse recall token accuracy", m["verse_recall"]["token_accuracy"]),
                 ("verse recall exact match", m["verse_recall"]["exact_match"])]
    if "retrieval_at_1" in m:
        r = m["retrieval_at_1"]
        rows.append(("parallel-verse retrieval@1", f"{r['score']:.4f} over {r['pairs']} pairs (chance {r['chance']:.4f})"))
    if gen:
        rows += [("distinct-2 of sampled text", gen.get("distinct_2")),
                 ("greedy decode tokens/s, KV cache", gen.get("decode_tokens_per_s_cache"))]
    checks = ", ".join(f"{c['check']} {'passed' if c['passed'] else 'FAILED'}" for c in validation.get("checks", []))
    return (f"## Evaluation\n\nMeasured by validate_models.py on {validation.get('date', 'n/a')}:\n\n"
            + card_table(rows) + f"\n\nChecks: {checks or 'none'}.")


def card_data(manifest: dict | None) -> str:
    """The corpus, from its manifest.json (the builder's record of what went in)."""
    if not manifest:
        return "## Training data\n\nThe corpus folder had no manifest.json: see train_config.json's data_dir."
    codes = ", ".join(t["code"] for t in manifest.get("translations", []))
    held_out = ", ".join(manifest.get("heldout_books", []))
    return (f"## Training data\n\n{len(manifest.get('translations', []))} English Bible translations ({codes}), "
            f"{manifest.get('total_chars', 0):,} characters, from {manifest.get('source', 'n/a')}. "
            f"Licence policy: {manifest.get('licence_policy', 'n/a')}. Held out of training, whole, in every "
            f"translation: {held_out or 'n/a'}. The corpus is not on the Hugging Face Hub; it is rebuilt "
            "byte for byte by the training repository's mvlm_training_dataset_complete/prepare.py.")


CARD_LIMITATIONS = ("## Limitations\n\nA small model trained on one domain: it continues text in the style of "
                    "English Bible translations and knows little else. It follows no instructions, recalls verses "
                    "imperfectly (see verse recall above) and may mix translations or invent verses; do not quote "
                    "it as scripture or as a source of facts.")


def card_table(rows: list[tuple[str, object]]) -> str:
    def show(value):
        if isinstance(value, float):
            return f"{value:,.4f}"
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    return "| | |\n| --- | ---: |\n" + "\n".join(f"| {label} | {show(value)} |" for label, value in rows
                                               if value is not None)


def describe_model(model_dir: Path) -> dict:
    """What DOWNLOAD.md says of a model: its description (recorded in run_summary.json at the
    end of training) and whether transformers needs trust_remote_code (config.json has auto_map)."""
    def read(name):
        try:
            return json.loads((model_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    summary, config = read("run_summary.json"), read("config.json")
    return {"description": summary.get("description") or summary.get("model", model_dir.name),
            "trust_remote_code": isinstance(config, dict) and "auto_map" in config}


def finished_models(models_dir: Path) -> list[str]:
    """Folders of `models_dir` that hold a finished model (a model manifest)."""
    return sorted(p.name for p in models_dir.iterdir() if (p / MODEL_MANIFEST).is_file()) if models_dir.is_dir() else []


class DownloadFormat(Protocol):
    """A single-file format for clients other than transformers, written beside the archives. The
    engine knows none: a module passed by name (`--formats`) exposes one as DOWNLOAD_FORMAT."""

    suffix: str  # the file is `<model folder name><suffix>`

    def write(self, model_dir: Path, output: Path) -> str | None:
        """Write `output` atomically (staging file then rename, free space checked first): None; or,
        writing nothing, the one-line reason this model has no such form. Raises for real faults."""

    def usage(self, output: Path, generation: dict) -> str:
        """DOWNLOAD.md markdown: how to run the written file `output` with the sampling defaults `generation`."""


def load_formats(modules: list[str]) -> list[DownloadFormat]:
    """The DOWNLOAD_FORMAT of each named module (importable from the working directory)."""
    formats = []
    for module in modules:
        try:
            formats.append(importlib.import_module(module).DOWNLOAD_FORMAT)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            raise UserError(f"--formats: no module {module!r} importable from {Path.cwd()}; run from the "
                            "repository root, or pass --formats with no module for archives only") from None
        except AttributeError:
            raise UserError(f"--formats: module {module!r} has no DOWNLOAD_FORMAT") from None
    return formats


def package_format(single: DownloadFormat, model_dir: Path, download_dir: Path) -> dict:
    """`<name><suffix>` for one model, or the reason it has none (an old file of that name goes:
    SHA256SUMS and DOWNLOAD.md must not offer a file of an earlier model)."""
    output = download_dir / f"{model_dir.name}{single.suffix}"
    reason = single.write(model_dir, output)
    if reason is not None:
        with storage_errors(output, "removing"):
            output.unlink(missing_ok=True)
        log.info(f"no {output.name}: {reason}")
        return {"suffix": single.suffix, "file": None, "reason": reason}
    generation = read_json(model_dir / "generation_config.json")
    defaults = {key: generation.get(key, value) for key, value in GENERATION_DEFAULTS.items()}
    return {"suffix": single.suffix, "file": output.name, "bytes": output.stat().st_size,
            "usage": single.usage(output, defaults)}


def package_all(models_dir: Path, download_dir: Path, names: list[str] | None = None,
                formats: list[DownloadFormat] = ()) -> list[Path]:
    """Archive every trained model in `models_dir` (and write each of `formats` it can express),
    then write SHA256SUMS over every download and DOWNLOAD.md. Returns the files written."""
    names = names or finished_models(models_dir)
    written, info = [], {}
    for name in names:
        archive = package_model(models_dir / name, download_dir / f"{name}.tar.gz")
        singles = [package_format(single, models_dir / name, download_dir) for single in formats]
        written += [archive] + [download_dir / s["file"] for s in singles if s["file"]]
        info[name] = {**describe_model(models_dir / name), "archive_bytes": archive.stat().st_size,
                      "files": [m.split("/", 1)[1] for m in archive_listing(archive)], "formats": singles}
    patterns = ["*.tar.gz", *(f"*{single.suffix}" for single in formats)]
    existing = {p for pattern in patterns for p in download_dir.glob(pattern)} - set(written)
    write_sha256sums(download_dir, written + sorted(existing))
    write_download_md(download_dir, info)
    return written


def main(argv=None) -> None:
    """python -m mvlm_engine.packaging: archive finished models (plus each --formats file), write
    SHA256SUMS and DOWNLOAD.md."""
    from .cli import OneLineParser
    from .locks import folder_holder, in_use_message

    parser = OneLineParser(prog="packaging", description="Archive trained models with SHA256SUMS and DOWNLOAD.md")
    parser.add_argument("--models_dir", type=Path, default=Path("models"))
    parser.add_argument("--download_dir", type=Path, default=Path("models_for_download"))
    parser.add_argument("--names", nargs="*", help="model folders (default: every folder of --models_dir that holds "
                                                   "a finished model)")
    parser.add_argument("--formats", nargs="*", default=[], metavar="MODULE",
                        help="modules whose DOWNLOAD_FORMAT writes a single file beside each archive of a "
                             "model it can express (train_all_models.py passes export_gguf); default: none")
    args = parser.parse_args(argv)
    if not args.models_dir.is_dir():
        raise UserError(f"--models_dir {args.models_dir} is not a folder; train the models first")
    missing = [n for n in args.names or [] if not (args.models_dir / n / MODEL_MANIFEST).is_file()
               or Path(n).name != n]
    if missing:
        raise UserError(f"no finished model (with {MODEL_MANIFEST}) in "
                        f"{', '.join(str(args.models_dir / n) for n in missing)}")
    if not (args.names or finished_models(args.models_dir)):
        raise UserError(f"no finished model (with {MODEL_MANIFEST}) in {args.models_dir}; train the models first")
    problem = folder_problem(args.download_dir, "--download_dir")
    if problem:
        raise UserError(problem)
    for name in args.names or finished_models(args.models_dir):
        holder = folder_holder(args.models_dir / name)
        if holder is not None:
            raise UserError(in_use_message(args.models_dir / name, holder))
    formats = load_formats(args.formats)
    for path in package_all(args.models_dir, args.download_dir, args.names, formats):
        log.info(f"packaged {path} ({path.stat().st_size:,} bytes)")
    log.info(f"wrote {args.download_dir / SUMS_NAME} and {args.download_dir / 'DOWNLOAD.md'}")


if __name__ == "__main__":
    from .cli import run_cli
    run_cli("packaging", main)
