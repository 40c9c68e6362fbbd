#!/usr/bin/env bash
# The GPU measurements, in one command for the device machine (torch with CUDA already there,
# no internet, no pythonbible). Carry .carry/ made by benchmarks/pack_corpus.sh, and .whl/ with
# the gguf wheel (the packaging stage needs it; the machine's image lacks it). Prints every figure
# RESULTS.md needs; writes logs under ${OUT:-/tmp/gpu_out} and packs them into results.tar.gz.
#   bash benchmarks/gpu_session.sh [ab|pipeline|throughput|speedrun|ablation|all] [seconds]
# ab:         short A/B runs that decide the GPU defaults (benchmarks/ab.py, one process): batched
#             Muon vs torch's (SIM-ONE), chunked vs full padded logits (both), micro-batch 16/32/64
#             (GPT-2; SIM-ONE at 48 sequences per step: 12x4, 24x2, 48x1, 16x3), compile mode default
#             vs max-autotune-no-cudagraphs (GPT-2). Each row: the trainer's run through the engine,
#             warm-up steps (compile), then timed steps: median tokens/s, MFU (field's convention),
#             peak memory, compile time. Rows that do not fit in [seconds] (default 420) minus the
#             corpus rebuild are reported as not run. Prints one Markdown table, also written to
#             $OUT/ab_table.md (raw figures: $OUT/ab.json, log: $OUT/ab.log).
#             AB_ARGS appends flags to ab.py (a CPU dry run: AB_ARGS="--preset tiny --warmup 1 --steps 2").
# pipeline:   the whole pipeline at its defaults (small preset, 3 epochs of both models); the
#             trainers' logs give tokens/s and MFU of both models at the small preset. Killed after
#             [seconds] (default 540); a stage that fails is retried once without torch.compile.
#             Running it again resumes (finished stages are skipped).
# throughput: benchmarks/run.py on the GPU: tokens/s, MFU, attention kernel, micro-step memory.
# speedrun:   benchmarks/speedrun.py at the small preset, one seed.
# ablation:   the SIM-ONE ablation at the small preset.
# DATA_DIR: the corpus folder (default mvlm_training_dataset_complete, rebuilt from .carry/ when
# its manifest is missing).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/SIM-ONE Training${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m mvlm_engine.env --report 2>&1 | tail -20
data_dir=${DATA_DIR:-mvlm_training_dataset_complete}
[ -f "$data_dir/manifest.json" ] || \
  python3 mvlm_training_dataset_complete/prepare.py --output_dir "$data_dir" --from_verses .carry/verses.jsonl.xz | tail -2
what=${1:-all}
if [ "$what" = ab ]; then budget=${2:-420}; else budget=${2:-540}; fi
eval "pipeline_args=(${PIPELINE_ARGS:-})"  # e.g. PIPELINE_ARGS="--preset tiny" for a dry run on a CPU
left() { echo $(( budget - ($(date +%s) - started) )); }

pack() {  # everything worth reading, in one file (the device tool returns at most 8)
  tar czf "$out/results.tar.gz" logs models/training_summary.json models/*/run_summary.json \
    models/*/training_history.json models/*/resolved_config.json models/validation_report.* runs/*/*.json \
    runs/*/*/*.log 2>/dev/null
  ls -la "$out"
}
trap pack EXIT

if [ "$what" = pipeline ] || [ "$what" = all ]; then
  /usr/bin/time -f "pipeline wall %e s" timeout "$(left)" python3 train_all_models.py "${pipeline_args[@]}" 2>&1 \
    | tee "$out/pipeline.txt" | grep --line-buffered -vE "it/s\]|s/it\]"
  if [ "${PIPESTATUS[0]}" != 0 ] && [ "$(left)" -gt 60 ]; then
    echo "[gpu_session] the pipeline failed; once more without torch.compile (it resumes)"
    TORCH_COMPILE=0 /usr/bin/time -f "pipeline (resumed) wall %e s" timeout "$(left)" python3 train_all_models.py "${pipeline_args[@]}" \
      2>&1 | tee "$out/pipeline_retry.txt" | grep --line-buffered -vE "it/s\]|s/it\]"
  fi
  python3 - <<'EOF'
import json, pathlib
for p in sorted(pathlib.Path("models").glob("*/training_history.json")):
    h = json.loads(p.read_text())
    rows = h if isinstance(h, list) else h.get("train", h.get("records", []))
    rows = [r for r in rows if isinstance(r, dict) and r.get("tokens_per_s")]
    if rows:
        late = rows[len(rows) // 2:]
        tps = sorted(r["tokens_per_s"] for r in late)[len(late) // 2]
        mfus = sorted(r["mfu"] for r in late if r.get("mfu") is not None)
        mfu = f", median MFU {mfus[len(mfus) // 2]:.1%} (every matmul, the head included)" if mfus else ""
        print(f"[gpu_session] {p.parent.name}: median tokens/s {tps:,.0f} over the second half of the logs{mfu}")
summary = pathlib.Path("models/training_summary.json")
if summary.is_file():  # where the pipeline's time went: each stage, the trainers' own split, the totals
    s = json.loads(summary.read_text())
    for stage in s.get("stages", []):
        timings = {k: round(v, 1) for k, v in (stage.get("timings") or {}).items() if isinstance(v, (int, float))}
        print(f"[gpu_session] stage {stage['stage']}: {stage['status']}, {stage['seconds']} s {timings or ''}")
    print(f"[gpu_session] totals: {s.get('totals')}")
EOF
fi
if [ "$what" = ab ] && [ "$(left)" -gt 30 ]; then
  # The corpus rebuild above counts against the budget; ab.py gets what is left, less 15 s to print and
  # pack (a row still running at its deadline is stopped by ab.py itself; the timeout is the backstop).
  # shellcheck disable=SC2086
  timeout "$(left)" python3 benchmarks/ab.py --budget "$(( $(left) - 15 ))" --out "$out" --data_dir "$data_dir" \
    ${AB_ARGS:-} 2>&1 | tee "$out/ab.log" | grep --line-buffered -E "^\[ab\]|^\||^A/B|^$"
fi
if [ "$what" = throughput ] || [ "$what" = all ]; then
  timeout "$(left)" python3 benchmarks/run.py --sections train memory compare --presets small --memory_presets small \
    --output_dir runs/bench --json 2>&1 | tee "$out/bench.txt"
fi
if [ "$what" = speedrun ] || [ "$what" = all ]; then
  timeout "$(left)" python3 benchmarks/speedrun.py --preset small --seeds 1 --json 2>&1 | tee "$out/speedrun.txt"
fi
if [ "$what" = ablation ] || [ "$what" = all ]; then
  timeout "$(left)" python3 "SIM-ONE Training/ablation.py" --preset small --max_steps 300 2>&1 | tee "$out/ablation.txt"
fi
