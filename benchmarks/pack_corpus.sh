#!/usr/bin/env bash
# Pack the built corpus for a machine without pythonbible (e.g. the GPU box): verses.jsonl.xz
# (~17 MB) and manifest.json into .carry/ (git-ignored). There, rebuild it byte for byte with
#   python3 mvlm_training_dataset_complete/prepare.py --from_verses .carry/verses.jsonl.xz
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
corpus=mvlm_training_dataset_complete
[ -f "$corpus/manifest.json" ] || { echo "build the corpus first: python3 $corpus/prepare.py" >&2; exit 1; }
mkdir -p .carry
xz -T0 -6 -c "$corpus/verses.jsonl" > .carry/verses.jsonl.xz.tmp && mv .carry/verses.jsonl.xz.tmp .carry/verses.jsonl.xz
cp "$corpus/manifest.json" .carry/manifest.json
ls -la .carry
