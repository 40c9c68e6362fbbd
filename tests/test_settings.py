"""Settings: flags generated from the dataclass fields, and a run reproduced from its own config."""
import json
import os
import shutil

import pytest

from conftest import GPT2_TRAINER, REPO, SIMONE_TRAINER, run_ok


@pytest.mark.e2e
def test_a_field_added_to_the_engine_config_becomes_a_flag_of_both_trainers(tmp_path):
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "mvlm_engine", copy / "mvlm_engine", ignore=ignore)
    shutil.copytree(REPO / "SIM-ONE Training", copy / "SIM-ONE Training", ignore=ignore)
    shutil.copy(GPT2_TRAINER, copy / GPT2_TRAINER.name)
    config = copy / "mvlm_engine" / "config.py"
    anchor = "    max_bad_steps: int = setting("
    added = '    probe_setting: float = setting(0.25, "a field added by the test")\n'
    assert anchor in config.read_text()
    config.write_text(config.read_text().replace(anchor, added + anchor, 1))  # the only edit

    env = {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{copy / 'SIM-ONE Training'}"}
    for script in (copy / GPT2_TRAINER.name, copy / "SIM-ONE Training" / SIMONE_TRAINER.name):
        help_text = run_ok(script, "--help", env=env).stdout
        assert "--probe_setting PROBE_SETTING" in help_text and "a field added by the test (default: 0.25)" in help_text
        settings = json.loads(run_ok(script, "--print_config", "--probe_setting", "0.5", env=env).stdout)
        assert settings["probe_setting"] == 0.5
    assert "--probe_setting" not in run_ok(GPT2_TRAINER, "--help").stdout  # the real repository is untouched


@pytest.mark.e2e
@pytest.mark.parametrize("trainer", [GPT2_TRAINER, SIMONE_TRAINER])
def test_bad_flags_are_one_line_errors(trainer):
    from conftest import assert_one_line_error, run_script
    assert_one_line_error(run_script(trainer, "--batch_size", "x"), "--batch_size: invalid int value")
    assert_one_line_error(run_script(trainer, "--learning_rate", "nan", "--seed", "1"),
                          "--learning_rate must be a finite number")
    assert_one_line_error(run_script(trainer, "--no_such_flag"), "unrecognized arguments: --no_such_flag")
