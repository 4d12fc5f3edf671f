#!/usr/bin/env bash
# Set up the environment if needed and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
ruff check .
python -m pytest -q "$@"
