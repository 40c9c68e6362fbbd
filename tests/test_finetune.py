"""Fine-tuning a downloaded model folder as users do it, with transformers' own tools.

Both folder kinds (MVLM-GPT2: stock GPT-2; SIM-ONE: its modelling code inside the folder, loaded
with trust_remote_code) go through a stock `transformers.Trainer` with gradient checkpointing on and
`labels` in the batch, and through PEFT LoRA; what they save reloads with AutoModelForCausalLM and
generates. That part runs in a clean interpreter where nothing of this repository is importable
(mvlm_engine.isolation's pattern), on tiny random-weight folders saved the way the trainers save
them. In-process tests pin SIM-ONE's side of the HF contract: gradient checkpointing recomputes
each block and changes no loss or gradient, the loss takes Trainer's num_items_in_batch, and
resize_token_embeddings resizes an untied head.

PEFT is an optional extra (pip install peft); its tests skip without it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import TIMEOUT
from mvlm_engine.isolation import ISOLATE_FROM_REPO, clean_environment
from simone_transformer import SimOneConfig, SimOneModel
from simone_transformer.hf_model import SimOneForCausalLM, SimOneHFConfig, save_pretrained_dir
from helpers.tiny_simone import write_tiny_tokenizer

# Every mechanism that runs inside a block or between blocks, and dropout (the recomputation must
# draw the same masks).
STRESSED = dict(vocab_size=300, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, policy_gate=True,
                memory_tokens=3, value_residual=True, x0_mix=True, unet_skips=True, qk_norm=True, dropout=0.1,
                attention_dropout=0.1, zero_init_head=False)


def hf_simone(**overrides) -> SimOneForCausalLM:
    torch.manual_seed(0)
    return SimOneForCausalLM(SimOneHFConfig(**{**STRESSED, **overrides})).train()


def loss_and_grads(model, ids, mask, seed=7):
    """One training forward and backward: (loss, {name: grad}), dropout seeded."""
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_every_block_and_changes_no_gradient(use_reentrant):
    model = hf_simone()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a right-padded row, as a data collator pads
    plain_loss, plain_grads = loss_and_grads(model, ids, mask)
    assert not model.is_gradient_checkpointing

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.supports_gradient_checkpointing and model.is_gradient_checkpointing
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    loss, grads = loss_and_grads(model, ids, mask)
    assert calls == [0, 1, 2, 3, 3, 2, 1, 0]  # forward, then each block again in the backward pass
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys() == {n for n, p in model.named_parameters()}
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    calls.clear()
    with torch.no_grad():  # evaluation and generation never recompute
        model.eval()(ids)
    assert calls == [0, 1, 2, 3]
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    for hook in hooks:
        hook.remove()


def test_checkpointed_training_with_a_cache_runs_uncheckpointed_and_generation_still_works():
    model = hf_simone(dropout=0.0, attention_dropout=0.0)
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    out = model(ids, use_cache=True, labels=ids)  # HF's convention: no cache while checkpointing
    assert getattr(out, "cache", getattr(out, "past_key_values", None)) is None
    out.loss.backward()
    model.eval()
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    uncached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              use_cache=False)
    assert torch.equal(greedy, uncached)


def test_the_loss_shifts_inside_and_takes_trainers_token_count():
    model = hf_simone(dropout=0.0, attention_dropout=0.0).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt the loss skips
    with torch.no_grad():
        out = model(ids, labels=labels)
        summed = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
        counted = int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(out.loss, summed / counted)
        # Gradient accumulation: Trainer passes the token count of the whole window.
        torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=torch.tensor(2 * counted)).loss,
                                   summed / (2 * counted))


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_resizes_what_the_vocabulary_sizes(tmp_path, tie):
    model = hf_simone(tie_embeddings=tie, value_embeddings=True, value_residual=False).eval()
    assert model.get_output_embeddings() is (None if tie else model.model.lm_head)
    model.resize_token_embeddings(310)
    assert model.config.vocab_size == model.model.config.vocab_size == 310
    assert {e.weight.shape[0] for e in [model.model.embed_tokens, *model.model.value_embeds]} == {310}
    ids = torch.tensor([[305, 1, 309, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 310)
    model.save_pretrained(tmp_path / "resized")
    reloaded = SimOneForCausalLM.from_pretrained(tmp_path / "resized").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)
    model.tie_weights()  # SIM-ONE ties structurally: never the untied head onto the embedding
    assert tie or model.model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------- as users do it, in a clean interpreter

# argv: folder, trust_remote_code (0/1), work folder, LoRA target modules (JSON list), with PEFT (0/1).
# Prints one JSON line of what happened; the test asserts on it.
FINE_TUNE = ISOLATE_FROM_REPO + r"""
import json, os, torch
from pathlib import Path
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
folder, remote, work, targets, with_peft = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "1"
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
verses = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light.",
          "And the earth was without form, and void.", "God created.", "And God saw the light, that it was good.",
          "And the evening and the morning were the first day.", "Let there be a firmament.", "And it was so."]
train = [tokenizer(v) for v in verses]  # a list of features is a dataset for Trainer
collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels = input_ids, padding -100
prompt = tokenizer("In the beginning", return_tensors="pt").input_ids

def load(path=folder):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=torch.float32)

def arguments(name, **options):
    usual = dict(output_dir=str(work / name), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                 gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                 bf16=False, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**usual, **options})

def fit(model, args):
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer)
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

def logits(model, ids=prompt):
    with torch.no_grad():
        return model.eval()(ids).logits

def greedy(model):
    return model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, prompt.shape[1]:].tolist()

def train_loss(model):  # the mean next-token loss over every verse: one padded batch, the collator's labels
    with torch.no_grad():
        return float(model.eval()(**collator(train)).loss)

def max_diff(a, b):
    return float((a - b).abs().max())

result = {}
if not with_peft:
    # Gradient accumulation: 2 x 2 rows must be the step of one batch of 4 (plain SGD shows any scale).
    plain = dict(optim="sgd", max_grad_norm=0.0, learning_rate=0.5)
    one, one_losses = fit(load(), arguments("batch4", **plain))
    two, two_losses = fit(load(), arguments("batch2x2", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                            **plain))
    result["accumulation"] = {"losses_batch4": one_losses, "losses_2x2": two_losses, "weights_max_diff": max(
        max_diff(a, b) for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()))}
    # The usual run: AdamW, warmup, accumulation, checkpoints; the output folder is the Trainer's.
    model = load()
    before, loss_before = logits(model), train_loss(model)
    trainer, losses = fit(model, arguments("finetuned", max_steps=6, warmup_steps=2, gradient_accumulation_steps=2,
                                           per_device_train_batch_size=2, save_strategy="steps", save_steps=3))
    trainer.save_model()
    reloaded = load(work / "finetuned")
    result["trainer"] = {"losses": losses, "moved": max_diff(logits(model), before),
                         "train_loss": [loss_before, train_loss(model)],
                         "reload_max_diff": max_diff(logits(reloaded), logits(model)),
                         "checkpoints": sorted(p.name for p in (work / "finetuned").glob("checkpoint-*")),
                         "greedy": greedy(reloaded), "greedy_in_memory": greedy(model)}
else:
    from peft import LoraConfig, PeftModel, get_peft_model
    base = load()
    base.enable_input_require_grads()  # what reentrant checkpointing needs with frozen embeddings (transformers 4's default)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    loss_before = train_loss(model)
    _, losses = fit(model, arguments("lora", max_steps=3, learning_rate=5e-2,
                                     gradient_checkpointing_kwargs={"use_reentrant": True}))
    tuned = logits(model)
    model.save_pretrained(work / "adapter")
    reloaded = PeftModel.from_pretrained(load(), work / "adapter")
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(work / "merged")
    tokenizer.save_pretrained(work / "merged")
    from_merged = load(work / "merged")
    result["lora"] = {"losses": losses, "trainable": trainable, "moved": max_diff(tuned, logits(load())),
                      "train_loss": [loss_before, train_loss(model)],
                      "adapter_files": sorted(p.name for p in (work / "adapter").iterdir()),
                      "adapter_max_diff": max_diff(logits(reloaded), tuned), "merged_max_diff": max_diff(logits(merged), tuned),
                      "merged_folder_max_diff": max_diff(logits(from_merged), tuned),
                      "greedy": greedy(from_merged), "greedy_adapter": greedy(reloaded)}
assert_nothing_of_the_repo_loaded()
print(json.dumps(result))
"""

LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "simone": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def fine_tune_alone(folder, remote: bool, work, peft: bool) -> dict:
    """FINE_TUNE in a fresh interpreter, its working folder `work` outside the repository."""
    work.mkdir()
    kind = "simone" if remote else "gpt2"
    proc = subprocess.run([sys.executable, "-c", FINE_TUNE, str(folder), "1" if remote else "0", str(work),
                           json.dumps(LORA_TARGETS[kind]), "1" if peft else "0"], cwd=work, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, env=clean_environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["gpt2", "simone"])
def folder(request, tmp_path_factory):
    """A tiny folder as each trainer saves it: SIM-ONE with its default governance on (policy gate,
    memory tokens, untied head), GPT-2 tied; both with the project's tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from mvlm_engine.tokenizer import save_hf_tokenizer
    from release import GENERATION_DEFAULTS

    root = tmp_path_factory.mktemp(request.param)
    special = save_hf_tokenizer(write_tiny_tokenizer(root / "tokenizer.json"), 64, root / "model")
    torch.manual_seed(0)
    if request.param == "simone":
        config = SimOneConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, memory_tokens=2,
                              zero_init_head=False)
        save_pretrained_dir(SimOneModel(config), root / "model", special, generation=GENERATION_DEFAULTS)
    else:
        # No dropout (SIM-ONE's default too): batch 4 and 2 x 2 rows would draw different masks.
        no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, **no_dropout,
                                   **special)).save_pretrained(root / "model")
    return request.param, root / "model"


def test_a_stock_trainer_fine_tunes_with_checkpointing_and_the_output_folder_reloads(folder, tmp_path):
    kind, model_dir = folder
    result = fine_tune_alone(model_dir, kind == "simone", tmp_path / "work", peft=False)
    accumulation = result["accumulation"]
    assert accumulation["losses_2x2"] == pytest.approx(accumulation["losses_batch4"], rel=1e-4)
    assert accumulation["weights_max_diff"] < 1e-5
    trainer = result["trainer"]
    assert len(trainer["losses"]) == 6 and all(0 < loss < 10 for loss in trainer["losses"])
    assert trainer["train_loss"][1] < trainer["train_loss"][0] - 0.05  # six steps on eight verses: it learns them
    assert trainer["moved"] > 1e-3 and trainer["reload_max_diff"] < 1e-5
    assert trainer["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    assert len(trainer["greedy"]) == 8 and trainer["greedy"] == trainer["greedy_in_memory"]


def test_peft_lora_trains_saves_reloads_and_merges(folder, tmp_path):
    pytest.importorskip("peft")
    kind, model_dir = folder
    lora = fine_tune_alone(model_dir, kind == "simone", tmp_path / "work", peft=True)["lora"]
    assert lora["trainable"] and all("lora_" in name for name in lora["trainable"])
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora["trainable"]}
    assert targets == set(LORA_TARGETS[kind])
    assert len(lora["losses"]) == 3 and all(0 < loss < 10 for loss in lora["losses"])
    assert lora["train_loss"][1] < lora["train_loss"][0] - 0.05
    assert lora["moved"] > 1e-3  # the adapter changed the model
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(lora["adapter_files"])
    assert max(lora["adapter_max_diff"], lora["merged_max_diff"], lora["merged_folder_max_diff"]) < 1e-4
    assert len(lora["greedy"]) == 8 and lora["greedy"] == lora["greedy_adapter"]
