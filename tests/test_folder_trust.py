"""Folders from elsewhere (release/trust.py): a tampered modelling file, a foreign auto_map, a weight
file symlinked out of the folder and an oversized config are each refused in one line by
generate.py, validate_models.py and export_gguf.py before anything of the folder runs (the code the
tampered folders carry would write a sentinel file; it stays absent), and --trust_folder_code lets
the tampered folder load, its code then running (the sentinel appears)."""
import json
import os
import shutil

import pytest

from conftest import REPO, import_script, run_script
from mvlm_engine.cli import run_cli

pytestmark = pytest.mark.e2e  # it uses the shared tiny trained models
SCRIPTS = {"generate.py": REPO / "generate.py", "validate_models.py": REPO / "validate_models.py",
           "export_gguf.py": REPO / "export_gguf.py"}


def copy_model(trained, folder):
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", ".lock"))
    return folder


def write_sentinel_line(sentinel) -> str:
    return f"\nimport pathlib as _p\n_p.Path({str(sentinel)!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def from_elsewhere(trained_simone, trained_gpt2, tmp_path_factory):
    """Four folders, one fault each, under models/; the sentinel any of their code would write."""
    root = tmp_path_factory.mktemp("elsewhere")
    models, sentinel = root / "models", root / "SENTINEL"
    tampered = copy_model(trained_simone, models / "tampered_code")
    with open(tampered / "enhanced_model.py", "a") as handle:
        handle.write(write_sentinel_line(sentinel))
    foreign = copy_model(trained_simone, models / "foreign_auto_map")
    config = json.loads((foreign / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.EvilForCausalLM"
    (foreign / "config.json").write_text(json.dumps(config))
    (foreign / "evil.py").write_text(write_sentinel_line(sentinel))
    linked = copy_model(trained_gpt2, models / "symlinked_weights")
    (linked / "model.safetensors").rename(root / "model.safetensors")
    (linked / "model.safetensors").symlink_to(root / "model.safetensors")
    oversized = copy_model(trained_gpt2, models / "oversized_config")
    config = json.loads((oversized / "config.json").read_text())
    config["n_layer"] = 100_000
    (oversized / "config.json").write_text(json.dumps(config))
    return root, sentinel


CASES = {"tampered_code": "enhanced_model.py differs from this repository's",
         "foreign_auto_map": "auto_map names AutoModelForCausalLM -> evil.EvilForCausalLM",
         "symlinked_weights": "model.safetensors is a symlink to",
         "oversized_config": "config.json asks for n_layer 100,000"}


def arguments(script, root, name):
    folder = root / "models" / name
    if script == "generate.py":
        return ["--model", str(folder), "--temperature", "0", "--max_new_tokens", "2", "In the beginning"]
    if script == "validate_models.py":
        return ["--models_dir", str(root / "models"), "--names", name, "--data_dir", str(root / "no_corpus"),
                "--download_dir", str(root / "downloads")]
    return ["--model_dir", str(folder), "--output", str(root / f"{name}.gguf")]


@pytest.fixture(scope="module")
def mains():
    return {}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_folder_from_elsewhere_is_refused_in_one_line_and_nothing_of_it_runs(script, name, from_elsewhere, mains,
                                                                                capsys, monkeypatch, tmp_path):
    root, sentinel = from_elsewhere
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers would copy its code
    module = mains.setdefault(script, import_script(SCRIPTS[script], f"trust_{script[:-3]}"))
    with pytest.raises(SystemExit) as exit_status:
        run_cli(script, module.main, arguments(script, root, name))
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_status.value.code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert CASES[name] in lines[0] and "--trust_folder_code" in lines[0] and "Nothing of it was run" in lines[0]
    assert not sentinel.exists() and not (tmp_path / "modules").exists()
    assert not (root / f"{name}.gguf").exists() and not (root / "downloads").exists()


def test_the_trust_flag_loads_the_tampered_folder_and_its_code_runs(from_elsewhere, tmp_path):
    root, sentinel = from_elsewhere
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = run_script(SCRIPTS["generate.py"], *arguments("generate.py", root, "tampered_code"), "--trust_folder_code",
                      env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING: --trust_folder_code: loading" in proc.stdout and "enhanced_model.py differs" in proc.stdout
    assert sentinel.read_text() == "ran"  # the folder's own code ran, as the flag allows
    sentinel.unlink()


def test_the_repositorys_own_folders_pass(trained_simone, trained_gpt2):
    from release.trust import folder_problems
    assert folder_problems(trained_simone) == [] and folder_problems(trained_gpt2) == []


def test_a_tokenizer_auto_map_custom_pipelines_and_a_manifest_path_are_refused(trained_simone, tmp_path):
    from release.trust import folder_problems
    folder = copy_model(trained_simone, tmp_path / "model")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tok.Slow", "tok.Fast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((folder / "config.json").read_text())
    config["custom_pipelines"] = {"text-generation": {"impl": "pipe.Pipe"}}
    (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "model_manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (folder / "model_manifest.json").write_text(json.dumps(manifest))
    problems = " | ".join(folder_problems(folder))
    for needle in ("tokenizer_config.json has an auto_map", "custom_pipelines", "names '../../etc/passwd'"):
        assert needle in problems, problems
