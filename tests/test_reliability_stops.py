"""The fault suite, prompt stops: SIGTERM/SIGINT end evaluation, tokenizer training and cache
builds at their next safe point leaving nothing; a repeated signal is a request, not a traceback
(RELIABILITY.md lists what each proves)."""
import os
import signal
import subprocess
import time

import pytest
import torch

from mvlm_engine.errors import SignalStop, TrainingInterrupted
from mvlm_engine.evaluation import EvaluationStopped, evaluate
from mvlm_engine.shards import build_token_shards
from mvlm_engine.stopping import STOP
from mvlm_engine.tokenizer import train_in_child
from helpers.reliability import CPU


# --------------------------------------------------------------------------- prompt stops


def test_evaluation_stops_between_batches(tokenized):
    corpus, tokenizer, _, cache = tokenized
    shards = build_token_shards(corpus, tokenizer, cache)
    table = torch.nn.Embedding(tokenizer.get_vocab_size(), tokenizer.get_vocab_size())
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) >= 2
    with pytest.raises(EvaluationStopped):
        evaluate(table, lambda m, x: m(x), shards.tokens("val"), 16, 400, 4, CPU,
                 torch.ones(tokenizer.get_vocab_size()), should_stop=should_stop)
    assert len(asked) == 2 and table.training  # stopped after two batches, the module's mode restored


def test_tokenizer_training_is_abandoned_at_once_on_a_stop(tokenized, tmp_path, monkeypatch):
    import mvlm_engine.tokenizer
    corpus = tokenized[0]
    out = tmp_path / ".tokenizer.json.1@x.tmp"
    children, real_popen = [], subprocess.Popen
    monkeypatch.setattr(mvlm_engine.tokenizer.subprocess, "Popen",
                        lambda *a, **k: children.append(real_popen(*a, **k)) or children[-1])
    with STOP.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(TrainingInterrupted, match="while training the tokenizer; nothing was saved"):
            train_in_child(corpus, 20000, (), out)
    assert [c.returncode for c in children] == [-signal.SIGKILL]  # killed mid-training, not finished
    assert list(tmp_path.iterdir()) == []  # the child's output and spec are gone


def test_a_cache_build_stops_between_batches_and_leaves_nothing(tokenized, tmp_path):
    corpus, tokenizer, _, _ = tokenized
    with STOP.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(TrainingInterrupted, match="while building the token cache") as stop:
            build_token_shards(corpus, tokenizer, tmp_path)
    assert stop.value.exit_code == 130
    assert [p.name for p in (tmp_path / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def test_a_repeated_signal_is_a_request_not_a_traceback(capfd):
    with STOP.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert STOP.signum == signal.SIGTERM  # the first one decides the exit status
        with pytest.raises(TrainingInterrupted) as stop:
            STOP.check("testing")
    assert stop.value.exit_code == 143
    assert "still stopping at the next safe point" in capfd.readouterr().out


def test_a_repeat_while_a_stop_is_on_its_way_out_changes_nothing(capfd):
    from mvlm_engine.cli import run_cli

    def main(argv):
        try:
            with STOP.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                STOP.check("testing", "the test's checkpoint was saved")
        finally:  # past the deferred region: the stop's exception is on its way out
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli("test", main, [])
        os.kill(os.getpid(), signal.SIGINT)  # after run_cli, on the process's way out
        time.sleep(0.2)
        assert signal.getsignal(signal.SIGINT) == STOP._handle  # kept until the process ends
    finally:
        STOP.uninstall()
    assert exit_.value.code == 143
    captured = capfd.readouterr()
    assert captured.err.strip() == "test: stopped by SIGTERM while testing; the test's checkpoint was saved"
    assert captured.out.count("SIGINT again: already stopping") == 2


def test_outside_deferred_work_a_signal_stops_at_once():
    installed = STOP.install()
    try:
        with pytest.raises(SignalStop) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stop.value.exit_code == 130
    finally:
        if installed:
            STOP.uninstall()
