"""generate.py on both tiny trained models: what it prints is transformers' own generation, sampling
follows the seed, the SIM-ONE trace table, unpacked archives, interactive input, one-line errors."""
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import REPO, assert_one_line_error, import_script, run_script

pytestmark = pytest.mark.e2e

GENERATE = REPO / "generate.py"
PROMPT = "[KJV] John 3:16"


@pytest.fixture(scope="module")
def cli():
    return import_script(GENERATE, "generate_cli")


def printed(cli, capsys, *args) -> str:
    assert cli.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def transformers_greedy(folder, prompt: str, new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = (folder / "hf_model.py").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_greedy_text_is_transformers_greedy_on_both_models(cli, capsys, trained_gpt2, trained_simone):
    for folder in (trained_gpt2, trained_simone):
        text = printed(cli, capsys, "--model", folder, "--temperature", 0, "--max_new_tokens", 12, PROMPT)
        assert text == transformers_greedy(folder, PROMPT, 12) + "\n"
        assert len(text) > len(PROMPT) + 5


def test_sampling_follows_the_seed_and_the_folder_defaults(cli, capsys, trained_gpt2):
    args = ["--model", trained_gpt2, "--max_new_tokens", 16, "--num_samples", 2, PROMPT]
    first, again = printed(cli, capsys, *args, "--seed", 3), printed(cli, capsys, *args, "--seed", 3)
    assert first == again and first.count("--- sample") == 2
    assert printed(cli, capsys, *args, "--seed", 4) != first
    with pytest.raises(cli.UserError, match="--num_samples > 1 needs sampling"):
        cli.main(["--model", str(trained_gpt2), "--temperature", "0", "--num_samples", "2", PROMPT])


def test_trace_prints_the_governance_table_for_each_new_token(cli, capsys, trained_simone):
    text = printed(cli, capsys, "--model", trained_simone, "--trace", "--temperature", 0, "--max_new_tokens", 5,
                   PROMPT)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| pos | token | gate L0 | gate L1 |") and "memory L0" in table[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:] if not line.startswith("| ---")]
    assert len(rows) == 5
    for row in rows:
        values = [float(v) for v in row[2:-1]]  # gates and memory masses: probabilities
        assert values and all(0 <= v <= 1 for v in values)


def test_unpacked_archive_generates_like_its_folder(cli, capsys, trained_simone, tmp_path):
    from mvlm_engine.packaging import package_model

    archive = package_model(trained_simone, tmp_path / "simone.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked" / trained_simone.name
    args = ["--temperature", 0, "--max_new_tokens", 8, PROMPT]
    assert printed(cli, capsys, "--model", unpacked, *args) == printed(cli, capsys, "--model", trained_simone, *args)


def test_interactive_prompts_from_standard_input(trained_gpt2):
    proc = subprocess.run([sys.executable, GENERATE, "--model", trained_gpt2, "--temperature", "0",
                           "--max_new_tokens", "6"], input=f"{PROMPT}\n\n", capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    first = transformers_greedy(trained_gpt2, PROMPT, 6) + "\n"
    assert proc.stdout.startswith(first) and proc.stdout[len(first):].strip()  # an empty line: a fresh document
    assert "type a prompt" in proc.stderr


def test_bad_input_is_one_line_and_exit_2(cli, trained_gpt2, tmp_path):
    proc = run_script(GENERATE, "--model", trained_gpt2, "--temperature", -1, "--top_p", 2, PROMPT)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--temperature must be >= 0", "--top_p must be at most 1")
    for args, needle in ((["--model", tmp_path / "missing"], "is not a folder"),
                         (["--model", tmp_path], "has no config.json"),
                         (["--model", trained_gpt2, "--trace"], "--trace needs a SIM-ONE model"),
                         ([PROMPT], "--model is required")):
        with pytest.raises(cli.UserError, match=needle):
            cli.main([str(a) for a in args])
