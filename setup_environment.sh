#!/usr/bin/env bash
# One-shot setup for a CPU-only laptop or a CUDA box. Idempotent: a second run only
# re-checks the stamp and prints the report. No sudo, no driver installs, no ~/.bashrc edits.
#
#   ./setup_environment.sh            # creates/uses .venv (or the active virtualenv)
#   MVLM_VENV=/path/to/venv ./setup_environment.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  VENV="${MVLM_VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    python3 -m venv "$VENV" || { echo "[setup] ERROR: 'python3 -m venv' failed; install python3-venv (Python >= 3.10)" >&2; exit 1; }
  fi
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; fi

# The stamp covers everything that decides what gets installed; if it matches and the
# imports still work, there is nothing to do.
STAMP_FILE="$(dirname "$PY")/../.mvlm_setup_stamp"
STAMP=$(cat requirements.txt pyproject.toml setup_environment.sh | sha256sum | cut -c1-16)-gpu$HAS_GPU
if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP" ] \
   && "$PY" -c "import torch, transformers, tokenizers, safetensors, pythonbible, mvlm_engine, simone_transformer, prioritary_mvlm" 2>/dev/null; then
  echo "[setup] environment up to date ($STAMP), nothing to install"
else
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    if [ "$HAS_GPU" = 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
      echo "[setup] WARNING: an NVIDIA GPU is present but the installed torch is a CPU build;" \
           "run '$PY -m pip install --force-reinstall torch' to get the CUDA build" >&2
    fi
  elif [ "$HAS_GPU" = 1 ]; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    "${PIP[@]}" install "torch>=2.4"
  else
    # On CPU-only machines this exact pin resolves to a local CPU build; any other
    # spec pulls a multi-GB CUDA build.
    echo "[setup] CPU-only machine: installing torch==2.13.0"
    "${PIP[@]}" install "torch==2.13.0"
  fi
  echo "[setup] installing requirements.txt"
  "${PIP[@]}" install -q -r requirements.txt
  echo "[setup] installing this project (editable)"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
  if [ "$HAS_GPU" = 1 ] && ! "$PY" -c "import flash_attn" 2>/dev/null; then
    echo "[setup] trying the optional flash-attn build (SDPA is used if it fails)"
    "${PIP[@]}" install -q flash-attn --no-build-isolation \
      || echo "[setup] WARNING: flash-attn did not build; attention uses torch SDPA instead" >&2
  fi
  echo "$STAMP" > "$STAMP_FILE"
fi

# Seed settings that the trainers apply by default (values already in the environment win).
"$PY" -m mvlm_engine.env --write training.env
"$PY" -m mvlm_engine.env --report
