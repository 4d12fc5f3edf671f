#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the project needs.
# Idempotent: a second run only checks that everything is installed. Source it: `. scripts/setup_env.sh`.
# Optional settings: PYTHON (the interpreter to build the venv with), VENV (its folder), TORCH_SPEC (the torch build),
# CONSTRAINTS (a pip constraints file, e.g. constraints-oldest.txt: the oldest supported release of everything),
# UV (a uv executable: install with `uv pip install` instead of pip; on 2 cores torch's CUDA wheels and the rest take it
# 1 min 9 s, 1 min 49 s with the bytecode compiled as pip does, against pip's 3 min 7 s; it reads neither pip's
# configuration nor its index settings: it takes packages from PyPI or from what UV_* variables say).
# A change of the requirements, CONSTRAINTS, TORCH_SPEC or UV installs again (the stamp file in the venv covers them).
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: do the work in a child bash, so that its `set -euo pipefail` stays out of the caller's shell (an
  # interactive one would keep the options, and close on the next failing command or on a failed install here);
  # only the activation happens in the caller. The settings go along even when the caller did not export them.
  _setup_env_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if PYTHON="${PYTHON-}" VENV="${VENV-}" TORCH_SPEC="${TORCH_SPEC-}" CONSTRAINTS="${CONSTRAINTS-}" UV="${UV-}" \
      PIP_QUIET="${PIP_QUIET-}" bash "$_setup_env_root/scripts/setup_env.sh"; then
    . "${VENV:-$_setup_env_root/.venv}/bin/activate"
    unset _setup_env_root
    return 0
  fi
  unset _setup_env_root
  return 1
fi
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-"$ROOT/.venv"}
CONSTRAINTS=${CONSTRAINTS:+"$(realpath "$CONSTRAINTS")"}
GIVEN_TORCH_SPEC=${TORCH_SPEC:-}
CONSTRAINT_ARGS=()
if [ -n "$CONSTRAINTS" ]; then
  CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
  # The constraints file pins torch itself.
  TORCH_SPEC=${TORCH_SPEC:-torch}
fi
# TORCH_SPEC and UV count only when given, so that the stamp of the default installation stays what it was.
STAMP="$VENV/.installed-$({ cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" ${CONSTRAINTS:+"$CONSTRAINTS"}
  if [ -n "$GIVEN_TORCH_SPEC" ]; then echo "TORCH_SPEC=$GIVEN_TORCH_SPEC"; fi
  if [ -n "${UV:-}" ]; then echo "UV=$UV"; fi; } | cksum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if [ ! -f "$STAMP" ]; then
  if compgen -G "$VENV/.installed-*" >/dev/null; then
    echo "[setup] the requirements, CONSTRAINTS, TORCH_SPEC or UV changed since $VENV was installed: installing again"
  else
    echo "[setup] installing requirements (first run only; torch is large)"
  fi
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
  # One stamp only: going back to earlier settings must install again too.
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
python -c "import sys, torch, numpy, scipy; print('[setup] python', sys.version.split()[0], '| torch', torch.__version__,
'| numpy', numpy.__version__, '| scipy', scipy.__version__)"
