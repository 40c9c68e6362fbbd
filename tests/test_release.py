"""release/card.py: model cards built with huggingface_hub's classes, for a validated model folder
and for export_llama.py's Llama folder (which carries its source's figures and licence)."""
import json

import pytest
from huggingface_hub import ModelCard

from conftest import REPO, import_script

VALIDATION = {"date": "2026-11-27 10:00 UTC", "passed": True,
              "checks": [{"check": "integrity", "passed": True, "detail": ""},
                         {"check": "loading", "passed": True, "detail": ""}],
              "metrics": {"held_out": {"val_loss": 5.01234567, "val_bpb": 2.1409876, "windows": 8, "block_size": 64},
                          "verse_recall": {"token_accuracy": 0.0523, "exact_match": 0.0},
                          "retrieval_at_1": {"score": 0.35, "pairs": 200, "chance": 0.005},
                          "generation": {"distinct_2": 0.9, "decode_tokens_per_s_cache": 487.3}}}
MANIFEST = {"translations": [{"code": "KJV"}, {"code": "WEB"}], "total_chars": 1234567, "source": "pythonbible",
            "licence_policy": "public domain only", "heldout_books": ["Ruth", "Jonah"]}


def simone_folder(path, remote=True):
    """A SIM-ONE folder as the trainer leaves it (governance off: the Llama export can take it)."""
    from simone_transformer import SimOneConfig, SimOneModel
    from simone_transformer.enhanced_model import LLAMA_VALUES
    from simone_transformer.hf_model import save_pretrained_dir

    config = SimOneConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **LLAMA_VALUES)
    save_pretrained_dir(SimOneModel(config), path, generation={"do_sample": True, "temperature": 0.8, "top_p": 0.9})
    (path / "run_summary.json").write_text(json.dumps({"description": "Enhanced SIM-ONE, a test.", "steps": 24,
                                                       "tokens_seen": 24576, "exported_step": 16}))
    (path / "train_config.json").write_text(json.dumps({"preset": "tiny", "block_size": 64, "optimizer": "muon"}))
    return path


def test_a_validated_folder_gets_a_card_whose_metadata_huggingface_hub_reads_back(tmp_path):
    from release.card import write_model_card

    folder = simone_folder(tmp_path / "simone_enhanced")
    card = ModelCard.load(write_model_card(folder, VALIDATION, MANIFEST, "cc0-1.0"))
    data = card.data
    assert (data.license, data.language, data.library_name, data.pipeline_tag) == \
        ("cc0-1.0", ["en"], "transformers", "text-generation")
    assert {"simone", "custom_code", "bible"} <= set(data.tags)
    assert {r.metric_name: r.metric_value for r in data.eval_results} == {
        "held-out loss (nats/token)": 5.0123, "held-out bits per byte": 2.141,
        "verse recall token accuracy (training verses)": 0.0523, "parallel-verse retrieval@1": 0.35}
    assert {r.dataset_name for r in data.eval_results} == {"held-out books of the public-domain Bible corpus"}
    text = card.text
    for heading in ("# simone_enhanced", "## How to use", "## Training", "## Evaluation", "## Training data",
                    "## Limitations"):
        assert heading in text
    assert 'pipeline("text-generation", model="simone_enhanced", trust_remote_code=True)' in text
    assert "| optimizer steps | 24 |" in text and "| held-out bits per byte | 2.1410 |" in text
    assert "2 English Bible translations (KJV, WEB), 1,234,567 characters" in text
    assert "Checks: integrity passed, loading passed." in text


def test_a_folder_without_figures_gets_a_card_without_model_index(tmp_path):
    from release.card import write_model_card

    folder = simone_folder(tmp_path / "unvalidated")
    card = ModelCard.load(write_model_card(folder, {}, None, "apache-2.0"))
    assert card.data.license == "apache-2.0" and not card.data.eval_results
    assert "model-index" not in (folder / "README.md").read_text()
    assert "The corpus folder had no manifest.json" in card.text and "## Evaluation" not in card.text


@pytest.fixture(scope="module")
def export_llama():
    return import_script(REPO / "SIM-ONE Training" / "export_llama.py", "export_llama_for_cards")


def test_the_llama_export_carries_its_sources_card(tmp_path, export_llama):
    from release.card import write_model_card

    source = simone_folder(tmp_path / "simone_plain")
    write_model_card(source, VALIDATION, MANIFEST, "mit")
    export_llama.main(["--model_dir", str(source), "--output_dir", str(tmp_path / "simone_llama")])
    card = ModelCard.load(tmp_path / "simone_llama" / "README.md")
    assert card.data.license == "mit" and "llama" in card.data.tags and "custom_code" not in card.data.tags
    assert [r.metric_value for r in card.data.eval_results] == \
        [r.metric_value for r in ModelCard.load(source / "README.md").data.eval_results]
    assert card.data.eval_results[0].metric_name == "held-out loss (nats/token)"
    assert "# simone_llama" in card.text and "Enhanced SIM-ONE, a test. This folder is its export" in card.text
    assert 'pipeline("text-generation", model="simone_llama")' in card.text  # no trust_remote_code
    assert "validate_models.py measured there" in card.text and "| optimizer steps | 24 |" in card.text
    assert "Every setting of the run is in simone_plain's train_config.json" in card.text


def test_a_llama_export_of_an_unvalidated_folder_says_so(tmp_path, export_llama):
    source = simone_folder(tmp_path / "simone_plain")
    export_llama.main(["--model_dir", str(source), "--output_dir", str(tmp_path / "llama")])
    card = ModelCard.load(tmp_path / "llama" / "README.md")
    assert card.data.license == "cc0-1.0" and not card.data.eval_results
    assert "simone_plain has no model card with validate_models.py's figures yet" in card.text
