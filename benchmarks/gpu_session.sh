#!/usr/bin/env bash
# The GPU measurements, in one command for the device machine (torch with CUDA already there,
# no internet, no pythonbible). Carry .carry/ made by benchmarks/pack_corpus.sh, and .whl/ with
# the gguf wheel (the packaging stage needs it; the machine's image lacks it). Prints every figure
# RESULTS.md needs; writes logs under ${OUT:-/tmp/gpu_out} and packs them into results.tar.gz.
#   bash benchmarks/gpu_session.sh [pipeline|sweep|throughput|speedrun|ablation|all] [seconds]
# pipeline:   the whole pipeline at its defaults (small preset, 3 epochs of both models); the
#             trainers' logs give tokens/s and MFU of both models at the small preset. Killed after
#             [seconds] (default 540); a stage that fails is retried once without torch.compile.
#             Running it again resumes (finished stages are skipped).
# sweep:      short runs of both trainers (60 steps) over micro-batch sizes and torch.compile modes
#             (SWEEP_ARGS="--preset tiny" appends flags to each, for a dry run on a CPU):
#             median tokens/s and MFU of each, to find what lifts MFU toward the 45% goal.
# throughput: benchmarks/run.py on the GPU: tokens/s, MFU, attention kernel, micro-step memory.
# speedrun:   benchmarks/speedrun.py at the small preset, one seed.
# ablation:   the SIM-ONE ablation at the small preset.
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
[ -f mvlm_training_dataset_complete/manifest.json ] || \
  python3 mvlm_training_dataset_complete/prepare.py --from_verses .carry/verses.jsonl.xz | tail -2
what=${1:-all}
budget=${2:-540}
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
        mfu = f", median MFU {mfus[len(mfus) // 2]:.1%}" if mfus else ""
        print(f"[gpu_session] {p.parent.name}: median tokens/s {tps:,.0f} over the second half of the logs{mfu}")
EOF
fi
if [ "$what" = sweep ]; then
  # name | trainer | flags, in priority order (each run: startup, compile, 60 steps, one eval and save)
  while IFS='|' read -r name trainer flags; do
    [ "$(left)" -gt 90 ] || { echo "[gpu_session] sweep: out of time before $name"; break; }
    # shellcheck disable=SC2086
    timeout "$(left)" python3 "$trainer" --output_dir "runs/sweep/$name" --overwrite --max_steps 60 --log_interval 10 \
      --eval_interval 100000 --save_interval 100000 --eval_windows 20 $flags ${SWEEP_ARGS:-} > "$out/sweep_$name.log" 2>&1 \
      || echo "[gpu_session] sweep: $name failed (log: sweep_$name.log)"
  done <<'RUNS'
gpt2_b32|mvlm_trainer.py|--batch_size 32
simone_b24x2|SIM-ONE Training/enhanced_train.py|--batch_size 24 --gradient_accumulation_steps 2
gpt2_b32_autotune|mvlm_trainer.py|--batch_size 32 --compile_mode max-autotune-no-cudagraphs
simone_b24x2_autotune|SIM-ONE Training/enhanced_train.py|--batch_size 24 --gradient_accumulation_steps 2 --compile_mode max-autotune-no-cudagraphs
gpt2_b64|mvlm_trainer.py|--batch_size 64
simone_b48x1|SIM-ONE Training/enhanced_train.py|--batch_size 48 --gradient_accumulation_steps 1
RUNS
  python3 - <<'PY'
import json, pathlib
for p in sorted(pathlib.Path("runs/sweep").glob("*/training_history.json")):
    rows = [r for r in json.loads(p.read_text())["train"] if r["step"] > 20 and r.get("tokens_per_s")]
    if rows:
        tps, mfus = sorted(r["tokens_per_s"] for r in rows), sorted(r["mfu"] or 0 for r in rows)
        print(f"[gpu_session] sweep {p.parent.name}: median tokens/s {tps[len(tps) // 2]:,.0f}, "
              f"MFU {mfus[len(mfus) // 2]:.1%} (steps 21-60)")
PY
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
