"""benchmarks/slowrun.py runs end to end on a small slice (the proxy's figures are the benchmark's
business; here: every run trains through the real trainers, and the report has every key)."""
import json
import math

import pytest

from conftest import REPO, run_ok

SLOWRUN = REPO / "benchmarks" / "slowrun.py"


def slowrun(small_corpus, tmp_path, *args):
    """One slowrun over John (training) and Philippians (held out), a fraction of an epoch."""
    proc = run_ok(SLOWRUN, "--data_dir", small_corpus, "--proxy_dir", tmp_path / "proxy", "--output_dir", tmp_path,
                  "--train_books", "John", "--held_out_books", "Philippians", "--epochs", 0.25, "--evals_per_epoch", 8,
                  "--eval_windows", 8, "--json", *args)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_slowrun_compares_the_pinned_old_recipe_with_the_default(small_corpus, tmp_path):
    result = slowrun(small_corpus, tmp_path, "--seeds", 1)
    for key in ("best_bpb", "baseline_best_bpb", "final_minus_best", "baseline_final_minus_best", "best_epoch"):
        assert len(result[key]) == 1 and all(math.isfinite(v) for v in result[key]), key
    assert all(d >= 0 for d in result["final_minus_best"] + result["baseline_final_minus_best"])
    assert result["seed_spread"] >= 0 and math.isfinite(result["gain"])
    # The baseline really is the old recipe: no weight average, no decay on Muon's matrices.
    old = json.loads((tmp_path / "simone" / "baseline_seed1" / "train_config.json").read_text())
    new = json.loads((tmp_path / "simone" / "new_seed1" / "train_config.json").read_text())
    assert (old["ema_decay"], old["muon_weight_decay"]) == (0.0, 0.0)
    assert new["ema_decay"] > 0 and new["muon_weight_decay"] > 0
    proxy = json.loads((tmp_path / "proxy" / "manifest.json").read_text())
    assert proxy["heldout_books"] == ["Philippians"] and {f["book"] for f in proxy["files"]} == {"John", "Philippians"}


@pytest.mark.e2e
def test_slowrun_distills_an_ensemble_into_one_model(small_corpus, tmp_path):
    result = slowrun(small_corpus, tmp_path, "--distill", "--ensemble_seeds", 2)
    assert len(result["single_bpb_per_seed"]) == 2
    for key in ("single_bpb", "ensemble_bpb", "distilled_bpb", "seed_spread"):
        assert math.isfinite(result[key]), key
    student = json.loads((tmp_path / "simone" / "distilled_seed3" / "train_config.json").read_text())
    assert len(student["teachers"]) == 2 and student["distill_weight"] > 0
    history = json.loads((tmp_path / "simone" / "distilled_seed3" / "training_history.json").read_text())
    assert any("loss/distill" in record for record in history["train"])
