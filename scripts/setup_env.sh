#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the project needs.
# Idempotent: a second run only checks that everything is installed. Source it: `. scripts/setup_env.sh`.
# Optional settings: PYTHON (the interpreter to build the venv with), VENV (its folder), TORCH_SPEC (the torch build),
# CONSTRAINTS (a pip constraints file, e.g. constraints-oldest.txt: the oldest supported release of everything),
# UV (a uv executable: install with `uv pip install` instead of pip; on 2 cores torch's CUDA wheels and the rest take it
# 1 min 9 s, 1 min 49 s with the bytecode compiled as pip does, against pip's 3 min 7 s; it reads neither pip's
# configuration nor its index settings: it takes packages from PyPI or from what UV_* variables say).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-"$ROOT/.venv"}
CONSTRAINTS=${CONSTRAINTS:+"$(realpath "$CONSTRAINTS")"}
CONSTRAINT_ARGS=()
if [ -n "$CONSTRAINTS" ]; then
  CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
  # The constraints file pins torch itself.
  TORCH_SPEC=${TORCH_SPEC:-torch}
fi
STAMP="$VENV/.installed-$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" ${CONSTRAINTS:+"$CONSTRAINTS"} \
  | cksum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing requirements (first run only; torch is large)"
  # TORCH_SPEC lets a GPU machine pick its own build; the default pins the release CI and the docs were tested with,
  # and torchvision, which only a test uses (as an independent reference; the project itself does not need it).
  if [ -n "${UV:-}" ]; then
    INSTALL=("$UV" pip install --python "$VENV/bin/python" ${PIP_QUIET:--q})
    # Where Python may not cache bytecode itself, compile it now as pip does (uv does not by default): else every new
    # process compiles the thousand modules `import torch` reads, about 10 s each time.
    if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then INSTALL+=(--compile-bytecode); fi
    echo "[setup] installing with $("$UV" --version)"
  else
    INSTALL=(python -m pip install --disable-pip-version-check ${PIP_QUIET:--q})
  fi
  "${INSTALL[@]}" ${CONSTRAINT_ARGS[@]+"${CONSTRAINT_ARGS[@]}"} ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
  "${INSTALL[@]}" ${CONSTRAINT_ARGS[@]+"${CONSTRAINT_ARGS[@]}"} -r "$ROOT/requirements-dev.txt"
  touch "$STAMP"
fi
python -c "import sys, torch, numpy, scipy; print('[setup] python', sys.version.split()[0], '| torch', torch.__version__,
'| numpy', numpy.__version__, '| scipy', scipy.__version__)"
