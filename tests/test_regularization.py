"""The data-limited recipe's settings (issue 18, part 2): decoupled weight decay per group, dropout
on SIM-ONE's residual branches and attention, GPT-2's dropouts, schedules that anneal to 0 and
Muon's momentum warmup. Each does what its help text says; dropout acts in training only."""
import json
import shutil

import numpy as np
import pytest
import torch

import conftest
from conftest import REPO, SIMONE_TRAINER, assert_same_weights, import_script, run_script
from mvlm_engine.config import TrainConfig
from mvlm_engine.optim import apply_schedule, build_optimizer, lr_factor, muon_momentum_at, set_learning_rates
from simone_transformer.enhanced_model import SimOneConfig, SimOneModel
from simone_transformer.hf_model import SimOneForCausalLM, save_pretrained_dir

DROPOUT_ON = dict(dropout=0.3, attention_dropout=0.3)


# --------------------------------------------------------------------------- weight decay


class TinyLM(torch.nn.Module):
    """An embedding, a hidden matrix with a bias, a gain and an untied output head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.gain = torch.nn.Parameter(torch.ones(16) + 0.1)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.is_output_head = True


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_each_group_shrinks_by_its_own_lr_times_its_own_decay(optimizer):
    model = TinyLM()
    cfg = TrainConfig(optimizer=optimizer, learning_rate=0.01, head_lr=0.02, scalar_lr=0.03, muon_lr=0.04,
                      weight_decay=1.5, head_weight_decay=2.5, scalar_weight_decay=3.5, muon_weight_decay=1.6)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    set_learning_rates(opt, 1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    opt.step()
    factors = {"embed.weight": 1 - 0.01 * 1.5, "head.weight": 1 - 0.02 * 2.5, "gain": 1 - 0.03 * 3.5,
               "hidden.bias": 1 - 0.03 * 3.5,
               "hidden.weight": 1 - 0.04 * 1.6 if optimizer == "muon" else 1 - 0.01 * 1.5}
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name] * factors[name]), name


def test_without_new_flags_the_groups_decay_as_before():
    """GPT-2's AdamW: matrices, embeddings and heads at weight_decay, gains and biases at 0."""
    model = TinyLM()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    set_learning_rates(opt, 1.0)
    gain = model.gain.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model.gain.detach(), gain)


def test_the_fields_decay_values_fit_and_a_flipping_factor_is_named_in_one_line():
    assert TrainConfig(optimizer="muon", muon_lr=0.04, muon_weight_decay=1.6, weight_decay=0.8).problems() == []
    assert TrainConfig(weight_decay=100.0, learning_rate=1e-3).problems() == []
    assert TrainConfig(weight_decay=101.0, learning_rate=1e-3).problems() == [
        "--weight_decay must be <= 100 (got 101.0)"]
    flipping = TrainConfig(muon_lr=0.5, muon_weight_decay=3.0).problems()
    assert len(flipping) == 1 and flipping[0].startswith("--muon_lr x --muon_weight_decay must be < 1 (got 0.5 x 3.0")
    # A group without a flag of its own is named by the flag it falls back to.
    assert TrainConfig(learning_rate=0.5, weight_decay=0.5, head_weight_decay=2.0).problems() == [
        "--learning_rate x --head_weight_decay must be < 1 (got 0.5 x 2.0 = 1): each step multiplies the weights by "
        "1 - lr x decay"]
    assert "--scalar_lr x --scalar_weight_decay" in TrainConfig(scalar_lr=0.1, scalar_weight_decay=20.0).problems()[0]
    assert "--scalar_weight_decay must be >= 0" in TrainConfig(scalar_weight_decay=-1.0).problems()[0]


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_min_lr_ratio_zero_anneals_to_zero_at_the_last_step(schedule):
    total = 50
    factors = [lr_factor(s, 5, total, 0.0, schedule, 0.4) for s in range(total)]
    assert factors[-1] == 0.0 and all(f > 0 for f in factors[:-1])
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))
    assert lr_factor(total, 5, total, 0.0, schedule) == 0.0
    assert lr_factor(total - 1, 5, total, 0.25, schedule) == 0.25  # the floor, whatever it is


def test_muon_momentum_warms_up_linearly_and_only_on_muon():
    assert [muon_momentum_at(s, 4, 0.85, 0.95) for s in (0, 2, 4, 100)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert muon_momentum_at(0, 0, 0.85, 0.95) == 0.95  # warmup off
    cfg = TrainConfig(optimizer="muon", muon_momentum_warmup_steps=10, muon_momentum_start=0.5, muon_momentum=0.9,
                      warmup_steps=2, max_steps=20)
    opt = build_optimizer(TinyLM(), cfg, torch.device("cpu"))
    muon, adamw = opt.optimizers
    for step, expected in [(0, 0.5), (5, 0.7), (10, 0.9), (19, 0.9)]:
        factor = apply_schedule(opt, cfg, step, 20)
        assert factor == lr_factor(step, 2, 20, cfg.min_lr_ratio)
        assert muon.param_groups[0]["momentum"] == pytest.approx(expected)
        assert all("momentum" not in g and g["lr"] == g["peak_lr"] * factor for g in adamw.param_groups)


# --------------------------------------------------------------------------- SIM-ONE dropout


def simone(seed=0, **overrides) -> SimOneModel:
    """A tiny governed SIM-ONE (policy gate, memory tokens) with randomised weights."""
    torch.manual_seed(seed)
    config = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160,
                  max_seq_len=64, policy_gate=True, memory_tokens=3, tie_embeddings=True, zero_init_head=False)
    model = SimOneModel(SimOneConfig.from_dict({**config, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    return model


def with_dropout(model: SimOneModel, **dropouts) -> SimOneModel:
    """The same weights under a config with other dropouts."""
    other = SimOneModel(SimOneConfig.from_dict({**model.config.to_dict(), **dropouts})).eval()
    other.load_state_dict(model.state_dict())
    return other


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_simone_dropout_acts_in_training_only():
    plain = simone()
    dropped = with_dropout(plain, **DROPOUT_ON)
    x = ids()
    with torch.no_grad():
        reference = plain(x).logits
        assert torch.equal(dropped(x).logits, reference)
        plain.train()
        assert torch.equal(plain(x).logits, reference)  # p = 0 in training: nothing drawn, nothing changed
        for one in ({"dropout": 0.3}, {"attention_dropout": 0.3}):
            model = with_dropout(plain, **one).train()
            first, second = model(x).logits, model(x).logits
            assert not torch.allclose(first, reference, atol=1e-3) and not torch.allclose(first, second, atol=1e-3)
    assert [b.residual_dropout.p for b in dropped.layers] == [0.3, 0.3]
    assert SimOneConfig.from_dict({**plain.config.to_dict(), **DROPOUT_ON}) == dropped.config


def test_dropout_changes_no_eval_path_memory_gate_cache_padding_or_trace():
    plain = simone()
    dropped = with_dropout(plain, **DROPOUT_ON)
    x = ids(length=9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        a, b = plain(x, trace=True), dropped(x, trace=True)
        assert torch.equal(a.logits, b.logits)
        assert all(torch.equal(a.trace[k], b.trace[k]) for k in ("policy_gate", "memory_mass", "lens_top_ids"))
        assert torch.equal(plain(x, attention_mask=mask).logits, dropped(x, attention_mask=mask).logits)
    generated = [SimOneForCausalLM.from_native(m).generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
                 for m in (plain, dropped)]
    assert torch.equal(*generated)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode_however_it_ends():
    from mvlm_engine.evaluation import EvaluationStopped, evaluate
    from mvlm_engine.runtime import Runtime
    runtime = Runtime(0, 0, 1, torch.device("cpu"), "fp32", False)
    tokens = np.random.default_rng(0).integers(0, 300, 400).astype(np.uint16)
    byte_lengths = torch.ones(300)
    plain = simone()
    dropped = with_dropout(plain, **DROPOUT_ON).train()
    modes = []

    def logits(module, x):
        modes.append(module.training)
        return module(x).logits

    scores = [evaluate(m, logits, tokens, 16, 8, 4, runtime, byte_lengths) for m in (dropped, plain)]
    assert scores[0] == scores[1] and not any(modes) and dropped.training and not plain.training
    with pytest.raises(EvaluationStopped):
        evaluate(dropped, logits, tokens, 16, 8, 4, runtime, byte_lengths, should_stop=lambda: True)
    assert dropped.training
    with pytest.raises(ZeroDivisionError):
        evaluate(dropped, lambda m, x: 1 / 0, tokens, 16, 8, 4, runtime, byte_lengths)
    assert dropped.training


def test_the_trainer_starts_the_objective_in_training_mode(monkeypatch):
    """A task may hand over a model in eval mode (from_pretrained gives one): fit trains it with dropout on."""
    from mvlm_engine import trainer
    from mvlm_engine.runtime import Runtime
    seen = []

    def record_and_stop(objective, *args):
        seen.append(objective.training)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_optimizer", record_and_stop)
    task = trainer.TrainingTask("t", simone().eval(), None, None, 0.0, None, TrainConfig())
    with pytest.raises(KeyboardInterrupt):
        trainer.start_or_restore(TrainConfig(prefetch_batches=False), task,
                                 Runtime(0, 0, 1, torch.device("cpu"), "fp32", False), None)
    assert seen == [True]


def save_with_tokenizer(model: SimOneModel, folder):
    from mvlm_engine.tokenizer import save_hf_tokenizer
    from helpers.tiny_simone import write_tiny_tokenizer
    folder.mkdir(parents=True)
    special_ids = save_hf_tokenizer(write_tiny_tokenizer(folder.parent / f"{folder.name}.json"), 64, folder)
    return save_pretrained_dir(model, folder, special_ids)


@pytest.mark.e2e
def test_a_folder_saved_with_dropout_loads_and_generates_as_without(tmp_path):
    from mvlm_engine.isolation import load_in_clean_interpreter
    from helpers.tiny_simone import assert_same_as_clean_load
    plain = simone()
    folder = save_with_tokenizer(with_dropout(plain, **DROPOUT_ON), tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["dropout"] == 0.3
    result = load_in_clean_interpreter(folder, "In the beginning God created", trust_remote_code=True, new_tokens=6)
    assert_same_as_clean_load(plain, result)


def test_llama_and_gguf_exports_take_a_model_trained_with_dropout(tmp_path, capsys):
    from transformers import LlamaForCausalLM
    from simone_transformer.enhanced_model import LLAMA_VALUES
    plain = simone(**{**LLAMA_VALUES, "tie_embeddings": False})
    folder = save_with_tokenizer(with_dropout(plain, dropout=0.2, attention_dropout=0.1), tmp_path / "model")
    exporter = import_script(REPO / "SIM-ONE Training" / "export_llama.py", "export_llama_regularization")
    exporter.main(["--model_dir", str(folder), "--output_dir", str(tmp_path / "llama")])
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert llama.config.attention_dropout == 0.1
    x = ids(length=20)
    with torch.no_grad():
        torch.testing.assert_close(llama(x).logits, plain(x).logits, atol=1e-4, rtol=0)
    pytest.importorskip("gguf")
    gguf_export = import_script(REPO / "export_gguf.py", "export_gguf_regularization")
    assert gguf_export.main(["--model_dir", str(folder), "--output", str(tmp_path / "m.gguf")]) in (0, None)
    assert (tmp_path / "m.gguf").stat().st_size > 0


# --------------------------------------------------------------------------- GPT-2 dropouts


@pytest.mark.parametrize("chunked", [True, False])
def test_gpt2_dropouts_reach_both_loss_paths_in_training_only(chunked):
    import mvlm_trainer
    batch = {"input_ids": ids(length=16) % 100, "labels": ids(length=16, seed=2) % 100}
    losses = {}
    for p in (0.0, 0.2):
        torch.manual_seed(0)
        shape = mvlm_trainer.GPT2Shape(n_layer=2, n_embd=32, n_head=4, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
        objective = mvlm_trainer.CausalLMObjective(mvlm_trainer.build_model(shape, 100, 16, 0), chunked)
        assert (objective.model.config.resid_pdrop, objective.model.config.attn_pdrop) == (p, p)
        losses[p] = [objective.train()(batch)[0].item(), objective.eval()(batch)[0].item()]
    assert losses[0.0][0] == losses[0.0][1] == losses[0.2][1]  # eval: the same weights compute the same
    assert losses[0.2][0] != losses[0.2][1]


# --------------------------------------------------------------------------- settings


def test_each_setting_is_a_flag_and_a_saved_value_where_it_applies(capsys):
    import mvlm_trainer
    from mvlm_engine.cli import build_parser, parse_run_config
    from prioritary_mvlm.config import PrioritaryConfig
    engine = {"head_weight_decay": 0.3, "scalar_weight_decay": 0.01, "muon_weight_decay": 1.6,
              "muon_momentum_warmup_steps": 300, "muon_momentum_start": 0.8}
    trainers = {"gpt2": (mvlm_trainer.GPT2RunConfig, {"resid_pdrop": 0.1, "embd_pdrop": 0.05, "attn_pdrop": 0.02}),
                "simone": (PrioritaryConfig, {"dropout": 0.1, "attention_dropout": 0.05})}
    for name, (cls, own) in trainers.items():
        other = set(trainers["simone" if name == "gpt2" else "gpt2"][1])
        help_text = build_parser(cls, name, "").format_help()
        assert all(f"--{flag} " in help_text for flag in [*engine, *own]) and not any(f"--{f} " in help_text
                                                                                       for f in other)
        argv = [f"--{flag}={value}" for flag, value in {**engine, **own}.items()]
        with pytest.raises(SystemExit):
            parse_run_config(cls, ["--print_config", *argv], name, "")
        printed = json.loads(capsys.readouterr().out)
        flat = {**printed, **printed["model"]}
        assert {flag: flat[flag] for flag in [*engine, *own]} == {**engine, **own}


# --------------------------------------------------------------------------- exact resume


@pytest.mark.e2e
def test_resume_is_exact_with_dropout_decay_and_the_momentum_warmup(small_corpus, tmp_path):
    recipe = ["--dropout", 0.1, "--attention_dropout", 0.1, "--muon_weight_decay", 0.5, "--weight_decay", 0.2,
              "--scalar_weight_decay", 0.1, "--muon_momentum_warmup_steps", 12, "--min_lr_ratio", 0,
              "--warmup_steps", 4]
    common = ["--batch_size", 8, "--max_steps", 16, "--save_interval", 8, "--eval_interval", 8, "--log_interval", 4,
              "--keep_checkpoints", 5, *recipe]

    def args(out, *extra):
        return conftest.tiny_args(SIMONE_TRAINER, small_corpus, out, *common, *extra, seed=3)

    full = run_script(*args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    saved = json.loads((tmp_path / "full" / "train_config.json").read_text())
    saved_values = saved["model"]["dropout"], saved["muon_momentum_warmup_steps"], saved["scalar_weight_decay"]
    assert saved_values == (0.1, 12, 0.1)
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000008", resumed_dir / "step_000008")
    resumed = run_script(*args(tmp_path / "resumed", "--resume_from", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(tmp_path / "full" / "checkpoints" / "step_000016" / "model.safetensors",
                        tmp_path / "resumed" / "checkpoints" / "step_000016" / "model.safetensors")
    # The last step ran at lr 0 (--min_lr_ratio 0): its logged lr says so.
    history = json.loads((tmp_path / "full" / "training_history.json").read_text())
    assert history["train"][-1]["step"] == 16 and history["train"][-1]["lr"] == 0.0
