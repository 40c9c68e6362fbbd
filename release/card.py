"""The Hugging Face model card (README.md) of a model folder, built with huggingface_hub's
`ModelCard` / `ModelCardData` / `EvalResult`, which write the front matter and check it (an
evaluation result without its fields, metadata that does not parse: an error, not a card).

Every figure in a card comes from the folder's own records (run_summary.json, train_config.json,
generation_config.json), from validate_models.py's measurements, or from the corpus manifest.
validate_models.py writes the card of each trained model that passed; export_llama.py writes one
for its Llama folder, from the records of the SIM-ONE folder it came from.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mvlm_engine.corpus import MANIFEST_NAME
from mvlm_engine.fileio import atomic_write_text, read_json_object
from mvlm_engine.packaging import RUN_SUMMARY

from . import DEFAULT_CARD_LICENSE, SAMPLE_PROMPT

CARD_NAME = "README.md"
TAGS = ["text-generation", "causal-lm", "bible", "trained-from-scratch"]
HELD_OUT = "held-out books of the public-domain Bible corpus"  # the evaluation's dataset, in model-index


def write_model_card(model_dir: Path, validation: dict, corpus_manifest: dict | None, license_id: str) -> Path:
    """README.md in `model_dir` for a trained model. `validation` is the model's entry of
    validation_report.json as just measured ({"date", "passed", "checks", "metrics"})."""
    config = read_json_object(model_dir / "config.json")
    remote = "auto_map" in config
    parts = [card_intro(model_dir.name, read_json_object(model_dir / RUN_SUMMARY).get("description", ""),
                        read_json_object(model_dir / "generation_config.json"), remote),
             card_training(model_dir, "train_config.json"), card_evaluation(validation),
             card_data(corpus_manifest, "train_config.json"), CARD_LIMITATIONS]
    card = model_card(model_dir.name, config, license_id, eval_results(validation.get("metrics", {})), parts)
    return save_card(card, model_dir)


def write_export_card(source_dir: Path, out: Path, name: str, what: str) -> Path:
    """README.md in `out`, a folder exported (as `name`) from the trained folder `source_dir`:
    `what` says what the export is; training and data come from the source's records, and the
    source card's evaluation results (the export computes what the source computes) and licence
    are carried over when it has a card."""
    source = read_card(source_dir)
    results = source.data.eval_results if source else None
    license_id = source.data.license if source and source.data.license else DEFAULT_CARD_LICENSE
    description = f"{read_json_object(source_dir / RUN_SUMMARY).get('description', '')} {what}".strip()
    data_dir = read_json_object(source_dir / "train_config.json").get("data_dir")
    manifest = read_json_object(Path(data_dir) / MANIFEST_NAME) if isinstance(data_dir, str) else {}
    evaluation = ("## Evaluation\n\nNot measured on this folder itself: it computes what "
                  f"{source_dir.name} computes (the same weights in another layout), and "
                  + ("the results above are those validate_models.py measured there." if results else
                     f"{source_dir.name} has no model card with validate_models.py's figures yet."))
    settings = f"{source_dir.name}'s train_config.json"  # not copied: the export has no run of its own
    parts = [card_intro(name, description, read_json_object(out / "generation_config.json"), False),
             card_training(source_dir, settings), evaluation, card_data(manifest, settings), CARD_LIMITATIONS]
    return save_card(model_card(name, read_json_object(out / "config.json"), license_id, results, parts), out)


def model_card(name: str, config: dict, license_id: str, results: list[EvalResult] | None, parts: list[str]):
    """The card: front matter from ModelCardData (tags, licence, model-index), then the sections."""
    tags = [*TAGS, config.get("model_type", "custom")] + (["custom_code"] if "auto_map" in config else [])
    data = ModelCardData(license=license_id, language=["en"], library_name="transformers",
                         pipeline_tag="text-generation", tags=tags, model_name=name if results else None,
                         eval_results=results or None)
    # The datasets field stays empty: the corpus is not on the Hub; "Training data" says how it is built.
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(part for part in parts if part) + "\n")


def save_card(card: ModelCard, folder: Path) -> Path:
    atomic_write_text(folder / CARD_NAME, str(card))
    return folder / CARD_NAME


def read_card(folder: Path) -> ModelCard | None:
    """The folder's model card, or None when it has none (or an unreadable one)."""
    try:
        return ModelCard.load(folder / CARD_NAME)
    except (OSError, ValueError):
        return None


def eval_results(metrics: dict) -> list[EvalResult]:
    """The model-index entries (the Hub's evaluation results) from validation's held-out figures."""
    held_out, recall = metrics.get("held_out"), metrics.get("verse_recall")
    if not held_out:
        return []
    rows = [("loss", "held-out loss (nats/token)", held_out["val_loss"]),
            ("bits_per_byte", "held-out bits per byte", held_out["val_bpb"])]
    if recall:
        rows.append(("accuracy", "verse recall token accuracy (training verses)", recall["token_accuracy"]))
    if metrics.get("retrieval_at_1"):
        rows.append(("accuracy", "parallel-verse retrieval@1", metrics["retrieval_at_1"]["score"]))
    return [EvalResult(task_type="text-generation", dataset_type="local", dataset_name=HELD_OUT, metric_type=kind,
                       metric_name=label, metric_value=round(value, 4)) for kind, label, value in rows]


def card_intro(name: str, description: str, generation: dict, remote_code: bool) -> str:
    """Title, the trainer's description, and how to run it."""
    remote = ", trust_remote_code=True" if remote_code else ""
    defaults = ", ".join(f"{k} {generation[k]}" for k in ("temperature", "top_p", "repetition_penalty",
                                                         "max_new_tokens") if k in generation)
    return (f"# {name}\n\n{description}\n\n## How to use\n\n"
            "```python\nfrom transformers import pipeline\n"
            f'generator = pipeline("text-generation", model="{name}"{remote})\n'
            f'print(generator("{SAMPLE_PROMPT}")[0]["generated_text"])\n```\n\n'
            f"generation_config.json samples by default ({defaults}); pass do_sample=False for greedy text. "
            f"From the training repository: `python3 generate.py --model {name} \"{SAMPLE_PROMPT}\"`."
            + (" The modelling code ships in this folder, hence trust_remote_code." if remote_code else ""))


def card_training(model_dir: Path, settings: str) -> str:
    """How it was trained: run_summary.json and train_config.json, as written by the trainer
    (`settings` names the latter for the reader)."""
    summary, config = read_json_object(model_dir / RUN_SUMMARY), read_json_object(model_dir / "train_config.json")
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
        + card_table(rows) + f"\n\nEvery setting of the run is in {settings} (`--config` it to reproduce)."


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


def card_data(manifest: dict | None, settings: str) -> str:
    """The corpus, from its manifest.json (the builder's record of what went in)."""
    if not manifest:
        return f"## Training data\n\nThe corpus folder had no manifest.json: see {settings}'s data_dir."
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
