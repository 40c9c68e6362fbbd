#!/usr/bin/env bash
# The GPU measurements, in one command for the device machine (torch with CUDA already there,
# no internet, no pythonbible). Carry .carry/ made by benchmarks/pack_corpus.sh. Prints every
# figure RESULTS.md needs; writes logs under ${OUT:-/tmp/gpu_out}.
#   bash benchmarks/gpu_session.sh [throughput|pipeline|ablation|all]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
python3 -m mvlm_engine.env --report
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f mvlm_training_dataset_complete/manifest.json ] || \
  python3 mvlm_training_dataset_complete/prepare.py --from_verses .carry/verses.jsonl.xz
what=${1:-all}
if [ "$what" = throughput ] || [ "$what" = all ]; then
  python3 benchmarks/bench_train_throughput.py --trainer gpt2 --preset small --max_steps 60 | tee "$out/gpt2_small.txt"
  python3 benchmarks/bench_train_throughput.py --trainer simone --preset small --max_steps 40 | tee "$out/simone_small.txt"
fi
if [ "$what" = pipeline ] || [ "$what" = all ]; then
  /usr/bin/time -v python3 train_all_models.py --preset small --trainer_args "--max_steps 300" \
    2>&1 | tee "$out/pipeline.txt" | grep -E "^\[|stage|Elapsed"
fi
if [ "$what" = ablation ] || [ "$what" = all ]; then
  python3 "SIM-ONE Training/ablation.py" --preset small --max_steps 300 | tee "$out/ablation.txt"
fi
