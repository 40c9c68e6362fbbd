"""The bad-input battery's cases (tests/test_bad_inputs.py runs them): per CLI, a name, the argv
built from the battery's workspace `ws`, and the text its one-line error must hold. Also the CLIs'
scripts, loaded in process (load_script), which the fault suite uses too."""
import sys
from pathlib import Path

import conftest
from conftest import GPT2_TRAINER, PREPARE, REPO, SIMONE_TRAINER, import_script


SIMONE_DIR = REPO / "SIM-ONE Training"


SCRIPTS = {
    "mvlm_trainer.py": GPT2_TRAINER, "enhanced_train.py": SIMONE_TRAINER, "train.py": SIMONE_DIR / "train.py",
    "train_all_models.py": REPO / "train_all_models.py", "validate_models.py": REPO / "validate_models.py",
    "prepare.py": PREPARE, "export_llama.py": SIMONE_DIR / "export_llama.py", "export_gguf.py": REPO / "export_gguf.py",
}


def load_script(name: str):
    if name == "release.package":
        from release import package
        return package
    if str(SIMONE_DIR) not in sys.path:
        sys.path.insert(0, str(SIMONE_DIR))
    return import_script(SCRIPTS[name], f"battery_{name.replace('.', '_')}")


# --------------------------------------------------------------------------- argv builders


def gpt2(ws, *extra, out=None, data=None):
    args = conftest.tiny_args(GPT2_TRAINER, data or ws.corpus, out or ws.root / "new_run", *extra)
    return [str(a) for a in args[1:]]


def simone(ws, *extra, out=None, data=None):
    args = conftest.tiny_args(SIMONE_TRAINER, data or ws.corpus, out or ws.root / "new_run", "--batch_size", 8, *extra,
                              seed=3)
    return [str(a) for a in args[1:]]


def resume(out: Path, steps: int, interval: int) -> list[str]:
    """Flags that resume the tiny run in `out` (later flags win over the common ones)."""
    return ["--output_dir", str(out), "--max_steps", str(steps + 1), "--eval_interval", str(interval),
            "--save_interval", str(interval), "--log_interval", "5", "--resume_from", "latest"]


# --------------------------------------------------------------------------- the cases


TRAINER_CASES = [
    # paths
    ("data_missing", lambda ws: ["--data_dir", str(ws.missing)], "does not exist"),
    ("data_file", lambda ws: ["--data_dir", str(ws.file)], "is not a folder"),
    ("out_file", lambda ws: ["--output_dir", str(ws.file)], "is a file"),
    ("out_under_file", lambda ws: ["--output_dir", str(ws.under_file)], "which is a file"),
    ("out_read_only", lambda ws: ["--output_dir", str(ws.ro / "empty" / "run")], "cannot be written"),
    ("cache_read_only", lambda ws: ["--cache_dir", str(ws.ro / "empty" / "cache")], "cannot be written"),
    ("cache_file", lambda ws: ["--cache_dir", str(ws.file)], "is a file"),
    ("corpus_read_only", lambda ws: ["--data_dir", str(ws.ro / "corpus")], "pass --cache_dir"),
    ("out_is_data", lambda ws: ["--output_dir", str(ws.corpus)], "the corpus folder"),
    ("out_in_data", lambda ws: ["--output_dir", str(ws.corpus / "KJV" / "run")], "the corpus folder"),
    ("out_in_cache", lambda ws: ["--output_dir", str(ws.root / "cache" / "run"), "--cache_dir", str(ws.root / "cache")],
     "the cache folder"),
    ("finished_model", lambda ws: ["--output_dir", str(ws.runs / "finished")], "already holds a finished model"),
    ("checkpoints", lambda ws: ["--output_dir", str(ws.runs / "with_checkpoints")], "already holds checkpoints"),
    ("resume_missing", lambda ws: ["--resume_from", str(ws.missing)], "is not a checkpoint folder"),
    ("resume_latest_none", lambda ws: ["--resume_from", "latest"], "no checkpoint in"),
    ("resume_file", lambda ws: ["--resume_from", str(ws.file)], "is not a checkpoint folder"),
    # numbers
    ("batch_zero", lambda ws: ["--batch_size", "0"], "--batch_size must be > 0"),
    ("batch_negative", lambda ws: ["--batch_size", "-4"], "--batch_size must be > 0"),
    ("batch_text", lambda ws: ["--batch_size", "many"], "invalid int value"),
    ("batch_float", lambda ws: ["--batch_size", "1e3"], "invalid int value"),
    ("batch_huge", lambda ws: ["--batch_size", "100000000"], "--batch_size must be <="),
    ("lr_nan", lambda ws: ["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ("lr_inf", lambda ws: ["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    ("lr_huge", lambda ws: ["--learning_rate", "1e30"], "--learning_rate must be <= 1"),
    ("lr_zero", lambda ws: ["--learning_rate", "0"], "--learning_rate must be > 0"),
    ("wd_nan", lambda ws: ["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    ("wd_negative", lambda ws: ["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    ("wd_huge", lambda ws: ["--weight_decay", "500"], "--weight_decay must be <= 100"),
    ("wd_flips_weights", lambda ws: ["--learning_rate", "0.5", "--weight_decay", "2"],
     "--learning_rate x --weight_decay must be < 1"),
    ("muon_wd_flips_weights", lambda ws: ["--muon_lr", "0.5", "--muon_weight_decay", "3"],
     "--muon_lr x --muon_weight_decay must be < 1"),
    ("scalar_wd_negative", lambda ws: ["--scalar_weight_decay", "-1"], "--scalar_weight_decay must be >= 0"),
    ("head_wd_huge", lambda ws: ["--head_weight_decay", "1e9"], "--head_weight_decay must be <= 100"),
    ("momentum_start_one", lambda ws: ["--muon_momentum_start", "1"], "--muon_momentum_start must be in [0, 1)"),
    ("momentum_warmup_negative", lambda ws: ["--muon_momentum_warmup_steps", "-1"],
     "--muon_momentum_warmup_steps must be >= 0"),
    ("clip_nan", lambda ws: ["--grad_clip", "nan"], "--grad_clip must be a finite number"),
    ("clip_negative", lambda ws: ["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    ("epochs_inf", lambda ws: ["--num_epochs", "inf"], "--num_epochs must be a finite number"),
    ("epochs_nan", lambda ws: ["--num_epochs", "nan"], "--num_epochs must be a finite number"),
    ("epochs_unused_negative", lambda ws: ["--num_epochs", "-1", "--max_steps", "10"], "--num_epochs must be > 0"),
    ("epochs_huge", lambda ws: ["--num_epochs", "1e12"], "--num_epochs must be <="),
    ("seed_negative", lambda ws: ["--seed", "-1"], "--seed must be in [0,"),
    ("seed_huge", lambda ws: ["--seed", str(2 ** 70)], "--seed must be in [0,"),
    ("block_zero", lambda ws: ["--block_size", "0"], "--block_size must be > 0"),
    ("block_huge", lambda ws: ["--block_size", "100000"], "--block_size must be <= 65,536"),
    ("vocab_below_bytes", lambda ws: ["--vocab_size", "100"], "--vocab_size must be >= 257"),
    ("vocab_huge", lambda ws: ["--vocab_size", "1000000000"], "--vocab_size must be <="),
    ("steps_negative", lambda ws: ["--max_steps", "-1"], "--max_steps must be >= 0"),
    ("steps_huge", lambda ws: ["--max_steps", str(10 ** 12)], "--max_steps must be <="),
    ("warmup_negative", lambda ws: ["--warmup_steps", "-5"], "--warmup_steps must be >= 0"),
    ("eval_windows_zero", lambda ws: ["--eval_windows", "0"], "--eval_windows must be > 0"),
    ("keep_zero", lambda ws: ["--keep_checkpoints", "0"], "--keep_checkpoints must be > 0"),
    ("min_lr_ratio", lambda ws: ["--min_lr_ratio", "2"], "--min_lr_ratio must be in [0, 1]"),
    ("beta_one", lambda ws: ["--beta2", "1"], "--beta2 must be in [0, 1)"),
    ("bad_steps_zero", lambda ws: ["--max_bad_steps", "0"], "--max_bad_steps must be > 0"),
    ("muon_lr_nan", lambda ws: ["--muon_lr", "nan"], "--muon_lr must be a finite number"),
    ("muon_lr_huge", lambda ws: ["--muon_lr", "1e9"], "--muon_lr must be <= 10"),
    ("head_lr_negative", lambda ws: ["--head_lr", "-0.1"], "--head_lr must be > 0"),
    ("scalar_lr_inf", lambda ws: ["--scalar_lr", "inf"], "--scalar_lr must be a finite number"),
    ("muon_momentum_one", lambda ws: ["--muon_momentum", "1"], "--muon_momentum must be in [0, 1)"),
    ("muon_decay_unused_negative", lambda ws: ["--optimizer", "adamw", "--muon_weight_decay", "-1"],
     "--muon_weight_decay must be >= 0"),
    ("decay_fraction_zero", lambda ws: ["--decay_fraction", "0"], "--decay_fraction must be in (0, 1]"),
    ("optimizer_unknown", lambda ws: ["--optimizer", "sgd"], "invalid choice"),
    ("schedule_unknown", lambda ws: ["--schedule", "linear"], "invalid choice"),
    ("accumulation_zero", lambda ws: ["--gradient_accumulation_steps", "0"],
     "--gradient_accumulation_steps must be > 0"),
    ("intervals_negative", lambda ws: ["--save_interval", "-5", "--log_interval", "0"], "--log_interval must be > 0"),
    ("precision_unknown", lambda ws: ["--precision", "fp8"], "invalid choice"),
    ("device_unknown", lambda ws: ["--device", "tpu"], "invalid choice"),
    ("unknown_flag", lambda ws: ["--learning-rate", "1e-3"], "unrecognized arguments"),
    # config files
    ("config_missing", lambda ws: ["--config", str(ws.configs.missing)], "is not a readable JSON file"),
    ("config_folder", lambda ws: ["--config", str(ws.configs.folder)], "is not a readable JSON file"),
    ("config_binary", lambda ws: ["--config", str(ws.configs.binary)], "is not a readable JSON file"),
    ("config_truncated", lambda ws: ["--config", str(ws.configs.truncated)], "is not a readable JSON file"),
    ("config_list", lambda ws: ["--config", str(ws.configs.list)], "must hold a JSON object"),
    ("config_types", lambda ws: ["--config", str(ws.configs.types)], "--learning_rate must be a float, got True"),
    ("config_nan", lambda ws: ["--config", str(ws.configs.nan)], "--learning_rate must be a finite number"),
    ("config_huge", lambda ws: ["--config", str(ws.configs.huge)], "--block_size must be <="),
    ("config_action", lambda ws: ["--config", str(ws.configs.action)], "overwrite is an action for one run"),
    ("config_unknown", lambda ws: ["--config", str(ws.configs.unknown)], "unknown"),
]


GPT2_ONLY = [
    ("layers_zero", lambda ws: ["--n_layer", "0"], "--n_layer must be > 0"),
    ("width_huge", lambda ws: ["--n_embd", "1000000", "--n_head", "1"], "--n_embd must be <="),
    ("heads_indivisible", lambda ws: ["--n_embd", "100", "--n_head", "3"], "must be divisible by --n_head"),
    ("resid_pdrop_one", lambda ws: ["--resid_pdrop", "1"], "--resid_pdrop must be in [0, 1)"),
    ("attn_pdrop_negative", lambda ws: ["--attn_pdrop", "-0.1"], "--attn_pdrop must be in [0, 1)"),
    ("config_nested", lambda ws: ["--config", str(ws.configs.nested)], "--n_layer must be > 0"),
] + [(f"resume_{name}", lambda ws, name=name: resume(ws.damaged[name], 150, 75), needle) for name, needle in [
    ("state_no_rng", "'rng' is missing"), ("state_edited_step", "'step' is 149 in the folder of step 150"),
    ("state_list", "not a JSON object"), ("state_binary", "trainer_state.json is unreadable"),
    ("old_checkpoint_data_gone", "data position is damaged"), ("weights_truncated", "corrupt"),
    ("optimizer_garbage", "corrupt"),
    ("rng_garbage", "corrupt"), ("optimizer_missing", "incomplete (missing optimizer.pt)")]]


SIMONE_ONLY = [
    ("memory_tokens_float", lambda ws: ["--memory_tokens", "1e9"], "invalid int value"),
    ("memory_tokens_huge", lambda ws: ["--memory_tokens", "1000000000"], "--memory_tokens must be <= 4,096"),
    ("memory_tokens_negative", lambda ws: ["--memory_tokens", "-1"], "memory_tokens must be >= 0"),
    ("coherence_nan", lambda ws: ["--coherence_weight", "nan"], "--coherence_weight must be a finite number"),
    ("coherence_negative", lambda ws: ["--coherence_weight", "-0.5"], "--coherence_weight must be >= 0"),
    ("z_loss_inf", lambda ws: ["--z_loss_weight", "inf"], "--z_loss_weight must be a finite number"),
    ("z_loss_huge", lambda ws: ["--z_loss_weight", "1e9"], "--z_loss_weight must be <= 100"),
    ("pairs_unused_negative", lambda ws: ["--alignment_weight", "0", "--alignment_pairs", "-3"],
     "--alignment_pairs must be >= 2"),
    ("temperature_zero", lambda ws: ["--alignment_temperature", "0"], "--alignment_temperature must be > 0"),
    ("heads_indivisible", lambda ws: ["--n_heads", "3"], "divisible by n_heads"),
    ("kv_heads", lambda ws: ["--n_kv_heads", "3"], "divisible by n_kv_heads"),
    ("norm_eps_huge", lambda ws: ["--norm_eps", "5"], "--norm_eps must be < 1"),
    ("rope_zero", lambda ws: ["--rope_theta", "0"], "rope_theta must be > 0"),
    ("d_model_huge", lambda ws: ["--d_model", "1048576", "--n_heads", "1", "--n_kv_heads", "1"],
     "--d_model must be <="),
    ("seeds_with_spaces", lambda ws: ["--quality_seeds", "Holy Spirit"], "single words"),
    ("softcap_negative", lambda ws: ["--logit_softcap", "-1"], "logit_softcap must be >= 0"),
    ("softcap_huge", lambda ws: ["--logit_softcap", "1e30"], "--logit_softcap must be <="),
    ("mlp_unknown", lambda ws: ["--mlp", "gelu"], "mlp must be one of"),
    ("dropout_one", lambda ws: ["--dropout", "1"], "dropout must be in [0, 1)"),
    ("attention_dropout_nan", lambda ws: ["--attention_dropout", "nan"], "--attention_dropout must be a finite number"),
] + [(f"resume_{name}", lambda ws, name=name: resume(ws.simone_damaged[name], 80, 40), needle)
     for name, needle in [("state_no_rng", "'rng' is missing"), ("optimizer_garbage", "corrupt")]] + [
    # The fixture run's losses again (its t+2 head is in the checkpoint), with another optimizer.
    ("resume_other_optimizer", lambda ws: [*resume(ws.simone_damaged["intact"], 80, 40),
                                           *map(str, conftest.SIMONE_AUX_LOSSES_ON), "--optimizer", "adamw"],
     "optimizer.pt was saved by another --optimizer")]


PIPELINE = lambda ws, *extra: ["--data_dir", str(ws.corpus), "--models_dir", str(ws.root / "p_models"),  # noqa: E731
                               "--download_dir", str(ws.root / "p_downloads"), "--logs_dir", str(ws.root / "p_logs"),
                               *map(str, extra)]


PIPELINE_CASES = [
    ("unbalanced_quote", lambda ws: PIPELINE(ws, "--trainer_args", '--max_steps "10'), "No closing quotation"),
    ("owned_flag", lambda ws: PIPELINE(ws, "--trainer_args=--output_dir=/tmp/x"), "may not set --output_dir"),
    ("help_in_trainer_args", lambda ws: PIPELINE(ws, "--trainer_args=--help"), "may not set --help"),
    ("corpus_args_owned", lambda ws: PIPELINE(ws, "--corpus_args=--output_dir /tmp/x"),
     "--corpus_args may not set --output_dir"),
    ("validate_args_owned", lambda ws: PIPELINE(ws, "--validate_args=--names a --archives_only"),
     "--validate_args may not set --archives_only, --names"),
    ("validate_args_unbalanced", lambda ws: PIPELINE(ws, "--validate_args", "'x"), "No closing quotation"),
    ("models_file", lambda ws: PIPELINE(ws, "--models_dir", ws.file), "is a file"),
    ("models_under_file", lambda ws: PIPELINE(ws, "--models_dir", ws.under_file), "which is a file"),
    ("models_read_only", lambda ws: PIPELINE(ws, "--models_dir", ws.ro / "empty" / "models"), "cannot be written"),
    ("logs_file", lambda ws: PIPELINE(ws, "--logs_dir", ws.file), "is a file"),
    ("downloads_read_only", lambda ws: PIPELINE(ws, "--download_dir", ws.ro / "empty"), "cannot be written"),
    ("data_file", lambda ws: PIPELINE(ws, "--data_dir", ws.file), "is a file"),
    ("preset_unknown", lambda ws: PIPELINE(ws, "--preset", "huge"), "invalid choice"),
    ("only_unknown", lambda ws: PIPELINE(ws, "--only", "llama"), "invalid choice"),
    ("config_binary", lambda ws: PIPELINE(ws, "--config", ws.configs.binary), "is not a readable JSON file"),
    ("config_types", lambda ws: ["--config", str(ws.configs.types)], "unknown PipelineSettings key"),
]


VALIDATE = lambda ws, *extra: ["--models_dir", str(ws.root / "models"), "--data_dir", str(ws.corpus),  # noqa: E731
                               "--no_archives", *map(str, extra)]


VALIDATE_CASES = [
    ("recall_zero", lambda ws: VALIDATE(ws, "--recall_verses", "0"), "--recall_verses must be > 0"),
    ("recall_negative", lambda ws: VALIDATE(ws, "--recall_verses", "-1"), "--recall_verses must be > 0"),
    ("recall_text", lambda ws: VALIDATE(ws, "--recall_verses", "nan"), "invalid int value"),
    ("windows_zero", lambda ws: VALIDATE(ws, "--eval_windows", "0"), "--eval_windows must be > 0"),
    ("pairs_huge", lambda ws: VALIDATE(ws, "--retrieval_pairs", "1000000000"), "--retrieval_pairs must be <="),
    ("models_missing", lambda ws: ["--models_dir", str(ws.missing)], "does not exist"),
    ("models_file", lambda ws: ["--models_dir", str(ws.file)], "is a file"),
    ("models_read_only", lambda ws: ["--models_dir", str(ws.ro / "empty")], "cannot be written"),
    ("names_escape", lambda ws: VALIDATE(ws, "--names", "../runs"), "is not a folder name"),
    ("names_missing", lambda ws: VALIDATE(ws, "--names", "nothing_here"), "no model folder nothing_here"),
    ("data_missing", lambda ws: VALIDATE(ws, "--names", "mvlm_gpt2", "--data_dir", ws.missing), "does not exist"),
    ("config_list", lambda ws: VALIDATE(ws, "--config", ws.configs.list), "must hold a JSON object"),
]


PREPARE_CASES = [
    ("out_file", lambda ws: ["--output_dir", str(ws.file), "--books", "Ruth"], "is a file"),
    ("out_under_file", lambda ws: ["--output_dir", str(ws.under_file), "--books", "Ruth"], "which is a file"),
    ("out_read_only", lambda ws: ["--output_dir", str(ws.ro / "empty"), "--books", "Ruth"], "cannot be written"),
    ("translation_unknown", lambda ws: ["--output_dir", str(ws.missing), "--translations", "KJV,NOPE"],
     "unknown translation 'NOPE'"),
    ("book_unknown", lambda ws: ["--output_dir", str(ws.missing), "--books", "Ruthless"], "unknown book 'Ruthless'"),
    ("books_empty", lambda ws: ["--output_dir", str(ws.missing), "--books", ","], "--books is empty"),
    ("verses_missing", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.missing / "v.jsonl")],
     "--from_verses needs"),
    ("verses_folder", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.root)],
     "--from_verses needs"),
    ("verses_garbage", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.verses.garbage)],
     "verses.jsonl:4 is not a verse record"),
    ("verses_record", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.verses.bad_record)],
     "verses.jsonl:4 is not a verse record"),
    ("verses_number", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.verses.bad_number)],
     "chapter and verse must be positive"),
    ("verses_book", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.verses.unknown_book)],
     "'Hezekiah' is not in the manifest"),
    ("verses_manifest", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.verses.bad_manifest)],
     "is not a manifest of prepare.py"),
    ("verses_xz", lambda ws: ["--output_dir", str(ws.missing), "--from_verses", str(ws.verses.bad_xz)],
     "cannot be read"),
    ("verses_into_a_file", lambda ws: ["--output_dir", str(ws.file), "--from_verses", str(ws.verses.garbage)],
     "is a file"),
]


EXPORT = lambda ws, name, out=None: ["--model_dir", str(ws.models[name]),  # noqa: E731
                                     "--output_dir", str(out or ws.root / "llama")]


EXPORT_CASES = [
    ("model_missing", lambda ws: ["--model_dir", str(ws.missing), "--output_dir", str(ws.root / "llama")],
     "is not a directory"),
    ("model_file", lambda ws: ["--model_dir", str(ws.file), "--output_dir", str(ws.root / "llama")],
     "is not a directory"),
    ("model_empty", lambda ws: ["--model_dir", str(ws.root / "configs"), "--output_dir", str(ws.root / "llama")],
     "has no config.json"),
    ("weights_truncated", lambda ws: EXPORT(ws, "truncated"), "cannot be read"),
    ("weights_garbage", lambda ws: EXPORT(ws, "garbage"), "cannot be read"),
    ("config_list", lambda ws: EXPORT(ws, "config_list"), "cannot be read"),
    ("config_garbage", lambda ws: EXPORT(ws, "config_garbage"), "cannot be read"),
    ("nan_weights", lambda ws: EXPORT(ws, "nan"), "NaN or infinite weights"),
    ("not_simone", lambda ws: EXPORT(ws, "gpt2"), "not a SIM-ONE config"),
    ("governed_model", lambda ws: EXPORT(ws, "good"), "Llama cannot express policy_gate"),
    ("out_not_empty", lambda ws: EXPORT(ws, "good", ws.not_empty), "exists and is not empty"),
    ("out_file", lambda ws: EXPORT(ws, "good", ws.file), "exists and is not empty"),
    ("out_under_file", lambda ws: EXPORT(ws, "good", ws.under_file), "which is a file"),
    ("out_read_only", lambda ws: EXPORT(ws, "good", ws.ro / "empty" / "llama"), "cannot be written"),
    ("out_inside_model", lambda ws: EXPORT(ws, "good", ws.models["good"] / "llama"), "is inside --model_dir"),
]


GGUF = lambda ws, name, out=None: ["--model_dir", str(ws.models[name]),  # noqa: E731
                                   "--output", str(out or ws.root / "model.gguf")]


GGUF_CASES = [
    ("model_missing", lambda ws: ["--model_dir", str(ws.missing), "--output", str(ws.root / "m.gguf")],
     "is not a directory"),
    ("model_file", lambda ws: ["--model_dir", str(ws.file), "--output", str(ws.root / "m.gguf")], "is not a directory"),
    ("model_empty", lambda ws: ["--model_dir", str(ws.root / "configs"), "--output", str(ws.root / "m.gguf")],
     "has no config.json"),
    ("weights_truncated", lambda ws: GGUF(ws, "gpt2_truncated"), "is not a readable safetensors file"),
    ("config_list", lambda ws: GGUF(ws, "config_list"), "holds a JSON list"),
    ("config_garbage", lambda ws: GGUF(ws, "config_garbage"), "is not readable JSON"),
    ("nan_weights", lambda ws: GGUF(ws, "gpt2_nan"), "NaN or infinite weights, so it was not exported"),
    ("governed_model", lambda ws: GGUF(ws, "good"), "cannot export to GGUF"),
    ("out_folder", lambda ws: GGUF(ws, "gpt2", ws.root), "is a directory"),
    ("out_parent_missing", lambda ws: GGUF(ws, "gpt2", ws.missing / "m.gguf"), "does not exist"),
    ("out_under_file", lambda ws: GGUF(ws, "gpt2", ws.file / "m.gguf"), "is a file, not a directory"),
    ("out_read_only", lambda ws: GGUF(ws, "gpt2", ws.ro / "empty" / "m.gguf"), "is not writable"),
    ("dtype_unknown", lambda ws: [*GGUF(ws, "gpt2"), "--dtype", "q4_0"], "invalid choice"),
]


PACKAGING_CASES = [
    ("models_missing", lambda ws: ["--models_dir", str(ws.missing)], "is not a folder"),
    ("models_file", lambda ws: ["--models_dir", str(ws.file)], "is not a folder"),
    ("no_finished_model", lambda ws: ["--models_dir", str(ws.root / "configs")], "no finished model"),
    ("names_missing", lambda ws: ["--models_dir", str(ws.runs), "--names", "nothing"], "no finished model"),
    ("names_escape", lambda ws: ["--models_dir", str(ws.runs), "--names", "../runs/finished"], "no finished model"),
    ("downloads_file", lambda ws: ["--models_dir", str(ws.runs), "--download_dir", str(ws.file)], "is a file"),
    ("downloads_under_file", lambda ws: ["--models_dir", str(ws.runs), "--download_dir", str(ws.under_file)],
     "which is a file"),
    ("downloads_read_only", lambda ws: ["--models_dir", str(ws.runs), "--download_dir", str(ws.ro / "empty")],
     "cannot be written"),
    ("formats_unknown", lambda ws: ["--models_dir", str(ws.runs), "--download_dir", str(ws.missing),
                                    "--formats", "no_such_format"], "--formats: invalid choice: 'no_such_format'"),
]


CASES = [("mvlm_trainer.py", name, lambda ws, f=f: gpt2(ws, *f(ws)), needle) for name, f, needle in
         TRAINER_CASES + GPT2_ONLY] + \
        [("enhanced_train.py", name, lambda ws, f=f: simone(ws, *f(ws)), needle) for name, f, needle in
         TRAINER_CASES + SIMONE_ONLY] + \
        [("train_all_models.py", *case) for case in PIPELINE_CASES] + \
        [("validate_models.py", *case) for case in VALIDATE_CASES] + \
        [("prepare.py", *case) for case in PREPARE_CASES] + \
        [("export_llama.py", *case) for case in EXPORT_CASES] + \
        [("export_gguf.py", *case) for case in GGUF_CASES] + \
        [("release.package", *case) for case in PACKAGING_CASES]
