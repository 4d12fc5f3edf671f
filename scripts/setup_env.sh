#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the project needs.
# Idempotent: a second run only checks that everything is installed. Source it: `. scripts/setup_env.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-"$ROOT/.venv"}
STAMP="$VENV/.installed-$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | cksum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing requirements (first run only; torch is large)"
  # TORCH_SPEC lets a GPU machine pick its own build; the default pins the release CI and the docs were tested with.
  python -m pip install --disable-pip-version-check ${PIP_QUIET:--q} ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
  python -m pip install --disable-pip-version-check ${PIP_QUIET:--q} -r "$ROOT/requirements-dev.txt"
  touch "$STAMP"
fi
python -c "import torch, numpy, scipy; print('[setup] torch', torch.__version__, '| numpy', numpy.__version__, '| scipy', scipy.__version__)"
