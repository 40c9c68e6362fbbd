"""Shared test setup: CPU only, no model hub, small thread counts."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "mvlm_training_dataset_complete" / "prepare.py"
GPT2_TRAINER = REPO / "mvlm_trainer.py"
SIMONE_TRAINER = REPO / "SIM-ONE Training" / "enhanced_train.py"
TEST_VOCAB = 1024
# Enough for a tiny model to learn words: three full Bibles and one New Testament, five
# books, three of them held out (Old and New Testament).
SMALL_TRANSLATIONS = "KJV,WEB,ASV,MONT"
SMALL_BOOKS = "Ruth,Jonah,Philippians,John,Mark"

# A subprocess's time limit: minutes on an idle CPU; raise it on a shared, loaded machine.
TIMEOUT = float(os.environ.get("MVLM_TEST_TIMEOUT", 600))


def run_script(*args, cwd=REPO, timeout=None, env=None):
    """Run a repo script with this interpreter; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout or TIMEOUT, env=env)


def run_ok(*args, **kwargs):
    """run_script that must succeed; the failure message shows the end of stderr."""
    proc = run_script(*args, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def assert_one_line_error(proc, *needles):
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_plain_file_modes(folder):
    """Every file of a model folder readable as a plain open() leaves it (0644 under umask 022),
    not safetensors' private 0600."""
    mask = os.umask(0)
    os.umask(mask)
    narrow = {p.name: oct(p.stat().st_mode & 0o777) for p in Path(folder).iterdir()
              if p.is_file() and (p.stat().st_mode & 0o644 & ~mask) != 0o644 & ~mask}
    assert not narrow, narrow


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A corpus built by the real builder, small enough for CPU tests."""
    out = tmp_path_factory.mktemp("corpus")
    proc = run_script(PREPARE, "--output_dir", out, "--translations", SMALL_TRANSLATIONS, "--books", SMALL_BOOKS)
    assert proc.returncode == 0, proc.stderr
    return out


def assert_same_weights(path_a, path_b):
    """Two safetensors files hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# SIM-ONE's auxiliary losses at the weights the tests train with (the default recipe has them off).
# GPT-2 trains with dropout by default; comparisons of two runs or two code paths switch it off,
# since two processes (DDP) or two forward passes never draw the same masks.
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
GPT2_NO_DROPOUT_FLAGS = tuple(item for name in GPT2_NO_DROPOUT for item in (f"--{name}", 0))
SIMONE_AUX_LOSSES_ON = ("--coherence_weight", 0.1, "--alignment_weight", 0.1)


def tiny_args(trainer, data_dir, out, *extra, seed=5):
    """Command line of a tiny CPU run of `trainer` (GPT2_TRAINER or SIMONE_TRAINER)."""
    return [trainer, "--preset", "tiny", "--data_dir", data_dir, "--output_dir", out, "--vocab_size", TEST_VOCAB,
            "--device", "cpu", "--seed", seed, *extra]


@pytest.fixture(scope="session")
def trained_gpt2(small_corpus, tmp_path_factory) -> Path:
    """A finished tiny MVLM-GPT2 run (150 steps), shared by every test file that reads one."""
    out = tmp_path_factory.mktemp("gpt2") / "run"
    run_ok(*tiny_args(GPT2_TRAINER, small_corpus, out, "--max_steps", 150, "--eval_interval", 75,
                      "--save_interval", 75, "--log_interval", 5))
    return out


@pytest.fixture(scope="session")
def trained_simone(small_corpus, tmp_path_factory) -> Path:
    """A finished tiny Enhanced SIM-ONE run with every mechanism and loss on (80 steps)."""
    out = tmp_path_factory.mktemp("simone") / "run"
    run_ok(*tiny_args(SIMONE_TRAINER, small_corpus, out, "--batch_size", 8, "--max_steps", 80, "--eval_interval", 40,
                      "--save_interval", 40, "--log_interval", 5, *SIMONE_AUX_LOSSES_ON, seed=3))
    return out


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp through llama-cpp-python (an optional extra: pip install llama-cpp-python); listed
    first by the tests that need it, so a missing binding skips before any training."""
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="session")
def plain_simone(small_corpus, tmp_path_factory):
    """A tiny trained SIM-ONE with governance off (a Llama model: the default head is untied, zero-init)."""
    out = tmp_path_factory.mktemp("plain_simone") / "run"
    run_ok(*tiny_args(SIMONE_TRAINER, small_corpus, out, "--batch_size", 8, "--max_steps", 150,
                      "--eval_interval", 150, "--no_policy_gate", "--memory_tokens", 0, seed=3), timeout=1800)
    return out


def mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs on `folder` (root only); False where that is not possible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem, for full-disk tests (a tmpfs: needs root; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount_tmpfs(disk, "size=4m"):
        pytest.skip("a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture(scope="session")
def read_only_corpus(small_corpus, tmp_path_factory):
    """A read-only folder holding a copy of the small corpus (its cache included) and an empty
    folder `empty/`: a read-only tmpfs as root, else a folder without write permission."""
    import shutil
    folder = tmp_path_factory.mktemp("read_only")
    mounted = mount_tmpfs(folder, "size=64m")
    shutil.copytree(small_corpus, folder / "corpus")
    (folder / "empty").mkdir()
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
    probe = folder / "empty" / "probe"
    try:
        probe.write_text("")
        probe.unlink()
        pytest.skip("cannot make a read-only folder here (root without mount)")
    except OSError:
        pass
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def import_script(path: Path, name: str):
    """A script (not a package module) imported as module `name`; registered in sys.modules
    first, because dataclasses look their module up there."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------- tiny folders in the trainers' formats (random weights; the GGUF tests)

# Texts of a 300-token BPE tokenizer with awkward characters in it.
TOKENIZER_TEXTS = ["In the beginning God created the heaven and the earth.",
                   "And the earth was without form, and void; and darkness was upon the face of the deep.",
                   "For God so loved the world, that he gave his only begotten Son.",
                   "Jesus wept. 12 tribes, 144000 sealed: “Holy, holy, holy”!"] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from mvlm_engine.tokenizer import save_tokenizer, train_bpe
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_bpe(TOKENIZER_TEXTS, vocab_size=300), path)
    return path


def vocab_size_of(tokenizer_file):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer_file, tmp_path_factory):
    """What mvlm_trainer.py saves: a tied GPT2LMHeadModel plus its tokenizer (random weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from mvlm_engine.tokenizer import eos_id, hf_tokenizer, load_tokenizer
    torch.manual_seed(0)
    eos = eos_id(load_tokenizer(tokenizer_file))
    config = GPT2Config(vocab_size=vocab_size_of(tokenizer_file), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("gpt2") / "mvlm_gpt2"
    GPT2LMHeadModel(config).save_pretrained(out)
    hf_tokenizer(tokenizer_file, model_max_length=64).save_pretrained(out)
    return out


def save_simone(tokenizer_file, out, **overrides):
    """What enhanced_train.py saves, with random weights; ffn 80 leaves ffn_down rows unquantizable.

    The trainer's own steps: modelling folder, tokenizer files, special ids in config.json.
    """
    import torch
    from simone_transformer import SimOneConfig, SimOneModel
    from simone_transformer.enhanced_model import LLAMA_VALUES
    from simone_transformer.hf_model import save_pretrained_dir
    from mvlm_engine.tokenizer import eos_id, hf_tokenizer, load_tokenizer
    torch.manual_seed(0)
    settings = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=80, max_seq_len=64,
                    rope_theta=5e5, tie_embeddings=True, zero_init_head=False, zero_init_proj=False, **LLAMA_VALUES)
    model = SimOneModel(SimOneConfig.from_dict({**settings, "vocab_size": vocab_size_of(tokenizer_file), **overrides}))
    save_pretrained_dir(model, out)
    hf_tokenizer(tokenizer_file, model_max_length=model.config.max_seq_len).save_pretrained(out)
    eos = eos_id(load_tokenizer(tokenizer_file))
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def simone_dir(tokenizer_file, tmp_path_factory):
    return save_simone(tokenizer_file, tmp_path_factory.mktemp("simone") / "simone_plain")


# ------------------------------------------------------------ a tokenizer of the small corpus (the fault suite)


@pytest.fixture(scope="module")
def tokenized(small_corpus, tmp_path_factory):
    """(corpus, tokenizer, its file, the cache folder holding it): a 600-token tokenizer of the small
    corpus. Module scope: some tests build token shards into the cache folder."""
    from mvlm_engine.corpus import load_corpus
    from mvlm_engine.tokenizer import get_or_train_tokenizer
    cache = tmp_path_factory.mktemp("cache")
    corpus = load_corpus(small_corpus)
    tokenizer, path = get_or_train_tokenizer(corpus, 600, cache)
    return corpus, tokenizer, path, cache
