"""model_registry.py is the one table of models: a third model, written here in its own tiny file
(a trainer on the shared engine) plus one registry entry, is trained by the pipeline's stage for it,
run by generate.py, loaded and checked by validation, packaged with a one-line GGUF note, and
measured by the benchmarks' hooks; no other file learns of it."""
import math
import sys

import pytest

from conftest import REPO, import_script

pytestmark = pytest.mark.e2e  # the pipeline's stage trains the toy in a subprocess

TOY_TRAINER = '''"""Toy: a tiny transformers Mistral trained from scratch on the shared engine (the registry test's model)."""
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mvlm_engine import cli
from mvlm_engine.config import CPU_SMOKE_TRAINING, TrainConfig, override
from mvlm_engine.data import BlockSampler, LMBatches
from mvlm_engine.runtime import start_runtime
from mvlm_engine.shards import prepare_token_data
from mvlm_engine.tokenizer import eos_id, save_hf_tokenizer
from mvlm_engine.trainer import TrainingTask, fit
from release import GENERATION_DEFAULTS


@dataclass
class ToyRunConfig(TrainConfig):
    PRESETS = {"tiny": {**CPU_SMOKE_TRAINING, "vocab_size": 300, "block_size": 32, "batch_size": 4, "max_steps": 4,
                        "warmup_steps": 1, "log_interval": 2, "eval_interval": 4, "save_interval": 4,
                        "eval_windows": 2}}
    preset: str = override(TrainConfig, "preset", "tiny")


class ToyObjective(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def logits(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def forward(self, batch):
        logits = self.logits(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten()), {}


def build_objective(cfg, vocab_size=None, eos=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(cfg.seed)
    config = MistralConfig(vocab_size=vocab_size or cfg.vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=cfg.block_size, bos_token_id=eos, eos_token_id=eos,
                           pad_token_id=eos, sliding_window=None)
    return ToyObjective(MistralForCausalLM(config))


def build_task(cfg, runtime):
    from transformers import GenerationConfig

    data = prepare_token_data(cfg, runtime)
    eos = eos_id(data.tokenizer)
    objective = build_objective(cfg, data.tokenizer.get_vocab_size(), eos)

    def export(out):
        objective.model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, **GENERATION_DEFAULTS)
        objective.model.save_pretrained(out)
        save_hf_tokenizer(data.tokenizer_path, cfg.block_size, out)

    sampler = BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed)
    params = sum(p.numel() for p in objective.parameters())
    return TrainingTask(name="Toy", objective=objective, logits=lambda m, x: m.logits(x), batches=LMBatches(sampler),
                        flops_per_token=6.0 * params, export=export, config=cfg,
                        description="Toy: a tiny Mistral, trained to prove the model registry."), data


def main(argv=None):
    cfg = cli.parse_run_config(ToyRunConfig, argv, "toy_trainer.py", __doc__)
    cli.claim_output_dir(cfg)
    runtime = start_runtime(cfg.device, cfg.precision, cfg.compile)  # one process: no torchrun group to stop
    task, data = build_task(cfg, runtime)
    fit(cfg, task, runtime, data)


if __name__ == "__main__":
    cli.run_cli("toy_trainer.py", main, sys.argv[1:])
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy's own file, importable for its hooks."""
    folder = tmp_path_factory.mktemp("toy_model")
    (folder / "toy_trainer.py").write_text(TOY_TRAINER)
    return import_script(folder / "toy_trainer.py", "toy_trainer")


@pytest.fixture(scope="module")
def registered(toy):
    """The one registry entry of the third model (for this module's tests only)."""
    import model_registry
    from model_registry import FolderKind, ModelSpec

    spec = ModelSpec("toy", "toy_mistral", toy.__file__, FolderKind("mistral", "Toy Mistral"),
                     run_config=lambda: toy.ToyRunConfig, build_task=toy.build_task, build_objective=toy.build_objective)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(model_registry.MODELS, "toy", spec)
        yield spec


@pytest.fixture(scope="module")
def trained_toy(registered, small_corpus, tmp_path_factory):
    """The pipeline's stage list with the toy in it, and its stage run (a subprocess of its trainer)."""
    import train_all_models as pipeline_module

    tmp_path = tmp_path_factory.mktemp("registry")
    settings = pipeline_module.PipelineSettings(data_dir=str(small_corpus), models_dir=str(tmp_path / "models"),
                                                download_dir=str(tmp_path / "downloads"),
                                                logs_dir=str(tmp_path / "logs"), device="cpu")
    pipeline = pipeline_module.Pipeline(settings, "tiny", {"stages": []})
    stages = dict(pipeline_module.stages(pipeline))
    assert list(stages) == ["corpus", "gpt2", "simone", "toy", "validate", "package", "archives"]
    stages["toy"]()
    assert pipeline.summary["stages"][-1]["stage"] == "toy" and pipeline.summary["stages"][-1]["status"] == "done"
    assert pipeline.summary["stages"][-1]["steps"] == 4
    only = pipeline_module.PipelineSettings(only="toy", models_dir=str(tmp_path / "models"))
    assert not [p for p in only.problems() if "--only" in p]
    return tmp_path / "models" / "toy_mistral"


def test_the_pipeline_trains_a_registered_model_and_generate_runs_it(trained_toy, capsys):
    generate = import_script(REPO / "generate.py", "generate_for_registry")
    assert generate.model_kind(trained_toy).display_name == "Toy Mistral"
    assert generate.main(["--model", str(trained_toy), "--temperature", "0", "--max_new_tokens", "5",
                          "In the beginning"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")
    with pytest.raises(generate.UserError, match="--trace needs a SIM-ONE model; .* is Toy Mistral"):
        generate.main(["--model", str(trained_toy), "--trace", "In the beginning"])


def test_validation_and_packaging_take_a_registered_model(trained_toy):
    import torch

    import validate_models
    from release.package import FORMATS, package_all

    assert trained_toy in validate_models.model_folders(trained_toy.parent, [])
    model = validate_models.LoadedModel(trained_toy, torch.device("cpu"))
    assert model.kind.model_type == "mistral" and model.block_size == 32 and not model.remote
    report = validate_models.Report(trained_toy.name)
    validate_models.check_loading_alone(report, trained_toy, model)  # the Auto classes, in a clean interpreter
    validate_models.check_generation(report, trained_toy, model)
    assert report.passed and [c["check"] for c in report.checks] == ["loading", "padded batch", "generation"]
    downloads = trained_toy.parent.parent / "downloads"
    package_all(trained_toy.parent, downloads, ["toy_mistral"], [FORMATS["gguf_f16"], FORMATS["gguf_q8_0"]])
    assert "- no `-f16.gguf`, `-q8_0.gguf` files: Toy Mistral folders have no GGUF form" in \
        (downloads / "DOWNLOAD.md").read_text()


def test_the_benchmarks_measure_a_registered_model(registered):
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import measure
    import sections

    assert sections.benchmark_models() == ["gpt2", "simone", "toy"]
    assert sections.old_path("toy") == {"chunked_loss": False, "fused_layers": False, "prefetch_batches": False}
    cfg = measure.resolve_run_config("toy", {"preset": "tiny"})
    objective = measure.build_objective("toy", cfg)
    loss, terms = objective(measure.synthetic_batch("toy", cfg, torch.Generator().manual_seed(0)))
    assert math.isfinite(loss.item()) and terms == {}
    assert measure.attention_backend("toy", cfg, None).startswith("n/a")
