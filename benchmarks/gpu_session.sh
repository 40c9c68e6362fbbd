#!/usr/bin/env bash
# The GPU measurements, in one command for the device machine (torch with CUDA already there,
# no internet, no pythonbible). Carry .carry/ made by benchmarks/pack_corpus.sh. Prints every
# figure RESULTS.md needs; writes logs under ${OUT:-/tmp/gpu_out}.
#   bash benchmarks/gpu_session.sh [throughput|pipeline|ablation|all]
# throughput: benchmarks/run.py (tokens/s and MFU of both models, memory, comparisons);
# pipeline: the whole pipeline's wall time; ablation: the SIM-ONE ablation at the small preset.
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
  # benchmarks/run.py on the GPU: tokens/s, MFU and the attention kernel of both models at the
  # small preset (bf16, fused AdamW, torch.compile), one micro-step's max allocated memory on the
  # old and the fast path, and the SIM-ONE vs HF Llama / decode comparisons. The last line is JSON.
  python3 benchmarks/run.py --sections memory train compare --presets small --memory_presets small \
    --output_dir "$out/bench" --json | tee "$out/bench.txt"
fi
if [ "$what" = pipeline ] || [ "$what" = all ]; then
  /usr/bin/time -v python3 train_all_models.py --preset small --trainer_args "--max_steps 300" \
    2>&1 | tee "$out/pipeline.txt" | grep -E "^\[|stage|Elapsed"
fi
if [ "$what" = ablation ] || [ "$what" = all ]; then
  python3 "SIM-ONE Training/ablation.py" --preset small --max_steps 300 | tee "$out/ablation.txt"
fi
